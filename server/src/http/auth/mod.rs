//! API keys on the protected routes: who is calling ([`keys`]), what it may use
//! ([`access`]) and how much ([`limits`]).
//!
//! [`authorize`] runs on every route except /health, /metrics and /openapi.json. With keys configured it
//! needs `Authorization: Bearer <key>` (the scheme in any case, RFC 9110) and answers 401
//! without one; it names the request's key for the metrics and logs, applies the key's
//! limits (429 `rate_limit_exceeded` with `Retry-After`) and holds the key's in-flight slot
//! until the response's last byte, then hands the handler a [`Caller`] that checks models and
//! plug-ins (403). [`require_admin`] guards the routes that change the plug-in registry.

pub mod access;
pub mod keys;
pub mod limits;

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body::{Frame, SizeHint};

pub use access::{Caller, Meter};
pub use keys::{ApiKey, KeyFileError, KeyTable};
use limits::{KeyLimiter, Permit};

use super::error::{ApiError, ErrorKind};
use super::state::AppState;

/// The key table with each key's limiter (`None` for keys without limits), in table order.
#[derive(Debug, Default)]
pub struct Auth {
    table: KeyTable,
    limiters: Vec<Option<Arc<KeyLimiter>>>,
}

impl Auth {
    pub fn new(table: &KeyTable) -> Self {
        if !table.is_empty() {
            let names: Vec<&str> = table.keys().iter().map(|k| k.name.as_str()).collect();
            tracing::info!(keys = table.len(), names = %names.join(","), "API keys loaded");
        }
        let now = Instant::now();
        let limiters = table
            .keys()
            .iter()
            .map(|k| KeyLimiter::new(&k.name, k.limits, now).map(Arc::new))
            .collect();
        Self {
            table: table.clone(),
            limiters,
        }
    }

    pub fn is_enabled(&self) -> bool {
        !self.table.is_empty()
    }

    /// The caller a request's headers prove, or the 401.
    fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        if !self.is_enabled() {
            return Ok(Caller::anonymous());
        }
        let found = bearer_token(headers).and_then(|token| self.table.find(token));
        let key = found.and_then(|i| Some((self.table.keys().get(i)?, self.limiters.get(i)?)));
        match key {
            Some((key, limiter)) => Ok(Caller::with_key(key.clone(), limiter.clone())),
            None => Err(ApiError::new(
                ErrorKind::Unauthorized,
                "a valid API key is required: send `Authorization: Bearer <key>`",
            )),
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header; the scheme is case-insensitive
/// (RFC 9110 section 11.1).
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim_start().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The name of the key that authenticated a request, for the metrics: the outermost
/// middleware puts an empty one on the request and reads it after the reply (or after the
/// client left), `authorize` fills it.
#[derive(Debug, Clone, Default)]
pub struct KeyLabel(Arc<OnceLock<String>>);

impl KeyLabel {
    pub fn get(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }

    fn set(&self, name: &str) {
        let _ = self.0.set(name.to_string());
    }
}

/// The middleware of the protected routes (see the module documentation).
pub async fn authorize(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let caller = match state.auth.authenticate(req.headers()) {
        Ok(caller) => caller,
        Err(e) => return e.into_response(),
    };
    if let Some(name) = caller.name() {
        if let Some(label) = req.extensions().get::<KeyLabel>() {
            label.set(name);
        }
        tracing::Span::current().record("key", name);
    }
    let permit = match caller.limiter().map(|l| l.admit(Instant::now())) {
        None => None,
        Some(Ok(permit)) => Some(permit),
        Some(Err(refusal)) => return refusal.into_response(),
    };
    req.extensions_mut().insert(caller);
    let response = next.run(req).await;
    match permit {
        Some(permit) => response.map(|inner| Body::new(HeldBody { inner, permit })),
        None => response,
    }
}

/// The middleware of POST /v1/plugins and DELETE /v1/plugins/{name}: 403 for keys without
/// `admin` (every caller is admin with authentication off).
pub async fn require_admin(req: Request, next: Next) -> Response {
    let allowed = match req.extensions().get::<Caller>() {
        Some(caller) => caller.require_admin(),
        None => Err(ApiError::new(
            ErrorKind::Internal,
            "the route has no authentication middleware",
        )),
    };
    match allowed {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// A response body that holds its key's in-flight slot until it is sent or dropped, so a
/// streamed response counts for as long as it streams.
struct HeldBody {
    inner: Body,
    #[allow(dead_code)] // held for its `Drop`
    permit: Permit,
}

impl HttpBody for HeldBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(value).expect("ascii"),
        );
        h
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_the_token_trimmed() {
        for value in ["Bearer k", "bearer k", "BEARER  k ", "  bEaReR k"] {
            assert_eq!(bearer_token(&headers(value)), Some("k"), "{value:?}");
        }
        for value in ["Basic k", "Bearer", "Bearer ", "Bearerk", "k"] {
            assert_eq!(bearer_token(&headers(value)), None, "{value:?}");
        }
        assert_eq!(bearer_token(&HeaderMap::new()), None);
    }

    #[test]
    fn auth_off_is_the_anonymous_caller_and_on_needs_a_known_key() {
        let off = Auth::new(&KeyTable::default());
        let caller = off.authenticate(&HeaderMap::new()).expect("open");
        assert!(caller.name().is_none());
        let on = Auth::new(&KeyTable::parse("k1\nk2\n").expect("keys"));
        let e = on.authenticate(&HeaderMap::new()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unauthorized);
        assert!(on.authenticate(&headers("Bearer k3")).is_err());
        let caller = on.authenticate(&headers("bearer k2")).expect("known");
        assert_eq!(caller.name(), Some("key-2"));
    }
}
