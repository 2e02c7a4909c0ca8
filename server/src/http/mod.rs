//! The HTTP layer: the OpenAI-compatible routes over an [`Engine`](crate::engine::Engine).
//!
//! [`app`] builds the whole router from an [`AppState`]; it needs no socket, so tests drive
//! it with `tower::ServiceExt::oneshot`. Every request passes, outermost first: `observe`
//! (request id, tracing span, `graft_requests_total`, `x-request-id` header), the body limit
//! (`body_limit`: 413 in our error shape, after reading the refused body so the client sees
//! it), and on every route except /health and /metrics the optional API-key check. /metrics stays open like vLLM's, so Prometheus and the Kubernetes
//! inference gateway scrape it without a key; it exposes counts, never request content.
//!
//! Request path of a generation: [`extract::ApiJson`] parses and screens the body,
//! `validate` turns it into `GenerateRequest`s, `generate` submits them and reads the
//! events, `chat` / `completions` shape the reply or `stream` the SSE chunks.

mod body_limit;
mod chat;
mod completions;
pub mod error;
pub mod extract;
mod generate;
mod logprobs;
pub mod metrics;
mod plugin_api;
mod routes;
mod selection;
pub mod state;
mod stream;
mod tokenize;
mod validate;
pub mod wire;

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderName, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{delete, get, post};
use axum::Router;
use tracing::Instrument;

use self::metrics::Metrics;
pub use error::{ApiError, ErrorKind};
pub use state::{AppState, EngineSlot, HttpConfig};

/// The header carrying the request id back to the client.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// This request's id (a UUID without dashes), set by the outermost middleware; also the id
/// the engine logs and the suffix of `chatcmpl-` / `cmpl-` response ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

/// The whole router.
pub fn app(state: AppState) -> Router {
    let protected = Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/models", get(routes::models))
        .route("/v1/plugins", get(plugin_api::list).post(plugin_api::load))
        .route("/v1/plugins/{name}", delete(plugin_api::unload))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    let open = Router::new()
        .route("/health", get(routes::health))
        .route("/metrics", get(routes::metrics));
    Router::new()
        .merge(protected)
        .merge(open)
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        // `body_limit` replaces axum's default limit (2 MiB) rather than stacking on it.
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(
            state.clone(),
            body_limit::limit_body,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Unix seconds now (`created` fields).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Request id, span, metrics and the `x-request-id` header.
async fn observe(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let id = uuid::Uuid::new_v4().simple().to_string();
    req.extensions_mut().insert(RequestId(id.clone()));
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let span =
        tracing::info_span!("request", request_id = %id, method = %req.method(), route = %route);
    let started = Instant::now();
    let mut pending = Pending {
        metrics: state.metrics.clone(),
        route: route.clone(),
        answered: false,
    };
    let mut response = next.run(req).instrument(span.clone()).await;
    pending.answered = true;
    let status = response.status().as_u16();
    state.metrics.request(&route, status);
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    span.in_scope(|| match route.as_str() {
        // Probes and scrapes arrive every few seconds; keep them out of the default log.
        "/health" | "/metrics" => tracing::debug!(status, ms, "request answered"),
        _ => tracing::info!(status, ms, "request answered"),
    });
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

/// Status recorded for a request whose client left before the reply was ready (nginx's
/// "client closed request"); the handler future is dropped, which cancels its generation.
const CLIENT_CLOSED: u16 = 499;

/// Counts a request as 499 if `observe` is dropped before the handler answered.
struct Pending {
    metrics: Arc<Metrics>,
    route: String,
    answered: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.answered {
            self.metrics.request(&self.route, CLIENT_CLOSED);
            tracing::info!(route = %self.route, "client closed the connection before the reply");
        }
    }
}

/// With API keys configured, a request needs `Authorization: Bearer <one of them>`.
async fn authorize(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let keys = &state.config.api_keys;
    if keys.is_empty() {
        return Ok(next.run(req).await);
    }
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match token {
        Some(token)
            if keys
                .iter()
                .any(|k| constant_time_eq(k.as_bytes(), token.as_bytes())) =>
        {
            Ok(next.run(req).await)
        }
        _ => Err(ApiError::new(
            ErrorKind::Unauthorized,
            "a valid API key is required: send `Authorization: Bearer <key>`",
        )),
    }
}

/// Compares without an early exit, so response time does not reveal how much of a key
/// matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares_whole_keys() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
