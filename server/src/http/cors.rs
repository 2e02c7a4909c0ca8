//! CORS for browser clients (`allowed_origins`): tower-http's `CorsLayer` answers preflight
//! `OPTIONS` requests itself, before authentication (a preflight carries no key), and adds
//! the `Access-Control-*` headers to every reply, errors included, so a page can read them.
//!
//! Request headers are mirrored rather than listed: OpenAI's JavaScript client sends its own
//! `x-stainless-*` headers, and a `*` wildcard would not cover `Authorization`. Credentials
//! (cookies) are never allowed; API keys travel in `Authorization`.

use std::time::Duration;

use axum::http::{header, HeaderValue, Method};
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

use super::REQUEST_ID_HEADER;

/// How long a browser may cache a preflight answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(3600);

/// The origins browsers may call from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AllowedOrigins {
    /// No CORS headers: browsers refuse cross-origin calls.
    #[default]
    None,
    /// `*`: every origin.
    Any,
    /// Exactly these `scheme://host[:port]` origins.
    List(Vec<HeaderValue>),
}

impl AllowedOrigins {
    /// Checks the configured list: `*` alone, or origins without a path (what browsers send
    /// in `Origin`; `https://app.example/` with its slash would never match).
    pub fn parse(origins: &[String]) -> Result<Self, String> {
        let origins: Vec<&str> = origins
            .iter()
            .map(|o| o.trim())
            .filter(|o| !o.is_empty())
            .collect();
        if origins.is_empty() {
            return Ok(Self::None);
        }
        if origins.contains(&"*") {
            return match origins.len() {
                1 => Ok(Self::Any),
                _ => Err("`*` allows every origin; list it alone".into()),
            };
        }
        origins
            .iter()
            .map(|origin| parse_origin(origin))
            .collect::<Result<_, _>>()
            .map(Self::List)
    }

    /// The layer, or `None` when no origin is allowed.
    pub fn layer(&self) -> Option<CorsLayer> {
        let origin = match self {
            Self::None => return None,
            Self::Any => AllowOrigin::any(),
            Self::List(origins) => AllowOrigin::list(origins.iter().cloned()),
        };
        Some(
            CorsLayer::new()
                .allow_origin(origin)
                .allow_methods([Method::GET, Method::POST, Method::DELETE])
                .allow_headers(AllowHeaders::mirror_request())
                .expose_headers([REQUEST_ID_HEADER, header::RETRY_AFTER])
                .max_age(PREFLIGHT_MAX_AGE),
        )
    }
}

fn parse_origin(origin: &str) -> Result<HeaderValue, String> {
    let invalid = || {
        format!(
            "`{origin}` is not an origin: write scheme://host[:port], e.g. https://app.example.com"
        )
    };
    let rest = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .ok_or_else(invalid)?;
    if rest.is_empty() || rest.contains(['/', '?', '#', ' ']) {
        return Err(invalid());
    }
    HeaderValue::from_str(origin).map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(origins: &[&str]) -> Result<AllowedOrigins, String> {
        let owned: Vec<String> = origins.iter().map(|o| o.to_string()).collect();
        AllowedOrigins::parse(&owned)
    }

    #[test]
    fn origins_parse_to_none_any_or_a_list() {
        assert_eq!(parse(&[]), Ok(AllowedOrigins::None));
        assert_eq!(parse(&[""]), Ok(AllowedOrigins::None));
        assert_eq!(parse(&["*"]), Ok(AllowedOrigins::Any));
        let list = parse(&["https://a.example", "http://localhost:3000"]).expect("valid");
        assert_eq!(
            list,
            AllowedOrigins::List(vec![
                HeaderValue::from_static("https://a.example"),
                HeaderValue::from_static("http://localhost:3000"),
            ])
        );
        assert!(AllowedOrigins::None.layer().is_none());
        assert!(list.layer().is_some());
    }

    #[test]
    fn paths_schemes_and_mixed_wildcards_are_refused() {
        for bad in [
            &["https://a.example/"][..],
            &["a.example"],
            &["ftp://a.example"],
            &["https://"],
            &["*", "https://a.example"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
