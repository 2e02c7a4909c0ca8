//! http(s) image URLs, fetched only from the hosts an operator allowed
//! (`--allowed-media-domains`, vLLM's flag): a server that fetches whatever URL a request names
//! can be aimed at its own network (server-side request forgery), so by default nothing is
//! fetched. From an allowed host, a fetch has a time limit for the whole exchange
//! (`--media-fetch-timeout`), a size limit checked against `Content-Length` and again as the
//! body streams in, and follows no redirect (an allowed host could otherwise send the server
//! anywhere). TLS is rustls with the platform's certificate store.

use std::time::Duration;

use reqwest::header::CONTENT_TYPE;
use reqwest::redirect::Policy;
use reqwest::{Client, Url};

use super::{format_of, too_large, Detail, Encoded, ImageLimits};
use crate::http::error::ApiError;

/// The hosts image URLs may name, and the client that fetches from them.
#[derive(Debug, Clone)]
pub struct ImageFetcher {
    /// Lower-case host names, compared exactly (no subdomains), each with the one port it may
    /// be reached on (`None`: the scheme's default, 80 or 443), so that naming a host does not
    /// open its other services.
    allowed: Vec<(String, Option<u16>)>,
    timeout: Duration,
    client: Client,
}

/// `host` or `host:port` of an allowed entry (an IPv6 literal in brackets, as URLs write it).
/// `url` drops a scheme's default port, so `example.com:443` is written `example.com`.
pub(super) fn host_and_port(entry: &str) -> (String, Option<u16>) {
    match entry.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') || host.ends_with(']') => match port.parse() {
            Ok(port) => (host.to_string(), Some(port)),
            Err(_) => (entry.to_string(), None),
        },
        _ => (entry.to_string(), None),
    }
}

/// Fetchers are equal when they fetch from the same hosts with the same time limit.
impl PartialEq for ImageFetcher {
    fn eq(&self, other: &Self) -> bool {
        (&self.allowed, self.timeout) == (&other.allowed, other.timeout)
    }
}

/// An image part naming an http(s) URL of an allowed host.
pub(super) struct Remote {
    pub part: String,
    pub url: Url,
    pub detail: Detail,
}

impl ImageFetcher {
    /// `None` when no host is allowed (nothing is fetched).
    pub fn new(allowed: &[String], timeout: Duration) -> Result<Option<Self>, reqwest::Error> {
        let allowed: Vec<(String, Option<u16>)> = allowed
            .iter()
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .map(|h| host_and_port(&h))
            .collect();
        if allowed.is_empty() {
            return Ok(None);
        }
        // reqwest is built without a default crypto provider (see Cargo.toml); another part of
        // the process may have installed one already, which is as good. rustls deprecated
        // ring's provider for lacking post-quantum key exchange, which aws-lc-rs has; fetching
        // a public image does not need it, and aws-lc-rs needs a C toolchain with cmake.
        #[allow(deprecated)]
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = Client::builder()
            .redirect(Policy::none())
            .timeout(timeout)
            .build()?;
        Ok(Some(Self {
            allowed,
            timeout,
            client,
        }))
    }

    /// The URL of an image part, if its host is allowed.
    pub(super) fn check(
        &self,
        part: String,
        url: &str,
        detail: Detail,
    ) -> Result<Remote, ApiError> {
        let url = Url::parse(url).map_err(|e| {
            ApiError::invalid(part.clone(), format!("the image URL is not valid: {e}"))
        })?;
        let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
        let port = url.port();
        if !self.allowed.iter().any(|(h, p)| *h == host && *p == port) {
            let at = port.map(|p| format!("{host}:{p}")).unwrap_or(host);
            return Err(ApiError::invalid(
                part,
                format!(
                    "image URLs from {at:?} are not fetched: not in --allowed-media-domains \
                     (a host on another port than its scheme's default is listed as host:port)"
                ),
            ));
        }
        Ok(Remote { part, url, detail })
    }

    /// The image's bytes and media type, or a 400 naming the part.
    pub(super) async fn fetch(&self, r: Remote, limits: ImageLimits) -> Result<Encoded, ApiError> {
        let bad = |message: String| ApiError::invalid(r.part.clone(), message);
        let failed = |e: reqwest::Error| match e.is_timeout() {
            true => bad(format!(
                "fetching the image took more than {} s (--media-fetch-timeout)",
                self.timeout.as_secs_f64()
            )),
            false => bad(format!("cannot fetch the image: {e}")),
        };
        let mut response = self
            .client
            .get(r.url.clone())
            .send()
            .await
            .map_err(failed)?;
        let status = response.status();
        if status.is_redirection() {
            return Err(bad(format!(
                "the image URL answered {status}: redirects are not followed (an allowed host \
                 could send the server anywhere); give the final URL"
            )));
        }
        if !status.is_success() {
            return Err(bad(format!("fetching the image answered {status}")));
        }
        let media_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| v.trim().to_ascii_lowercase())
            .unwrap_or_default();
        if format_of(&media_type).is_none() {
            return Err(bad(format!(
                "unsupported image type {media_type:?} (the response's Content-Type): \
                 image/png, image/jpeg or image/webp"
            )));
        }
        let declared = response.content_length().unwrap_or(0);
        if declared > limits.max_bytes as u64 {
            return Err(too_large(r.part, declared as usize, limits));
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(failed)? {
            if bytes.len() + chunk.len() > limits.max_bytes {
                return Err(too_large(r.part, bytes.len() + chunk.len(), limits));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(Encoded {
            part: r.part,
            media_type,
            bytes,
            detail: r.detail,
        })
    }
}
