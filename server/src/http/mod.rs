//! The HTTP layer: the OpenAI-compatible routes over an [`Engine`](crate::engine::Engine).
//!
//! [`app`] builds the whole router from an [`AppState`]; it needs no socket, so tests drive
//! it with `tower::ServiceExt::oneshot`. Every request passes, outermost first: `observe`
//! (request id, tracing span, `graft_requests_total`, `x-request-id` header), CORS when
//! origins are configured, the body limit (`body_limit`: 413 in our error shape, after reading
//! the refused body so the client sees it), and on every route except /health, /metrics and
//! /openapi.json the API-key check with its per-key limits ([`auth`]). /metrics stays open
//! like vLLM's, so Prometheus and the Kubernetes inference gateway scrape it without a key; it
//! exposes counts, never request content. /openapi.json ([`openapi`]) describes the API and
//! nothing of the deployment.
//!
//! Request path of a generation: [`extract::ApiJson`] parses and screens the body,
//! `validate` turns it into `GenerateRequest`s, `generate` submits them and reads the
//! events, `chat` / `completions` shape the reply or `stream` the SSE chunks.

pub mod auth;
mod body_limit;
mod chat;
mod completions;
pub mod cors;
mod embeddings;
pub mod error;
mod extensions;
pub mod extract;
pub mod fuzzing;
mod generate;
pub mod images;
mod logprobs;
pub mod metrics;
pub mod openapi;
mod plugin_api;
pub mod replies;
pub mod responses;
mod routes;
mod selection;
pub mod state;
mod stream;
mod tokenize;
mod tool_calls;
mod validate;
mod vllm_lora;
pub mod wire;

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{delete, get, post};
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tracing::Instrument;

use self::auth::KeyLabel;
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
        .route("/v1/responses", post(responses::create_response))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/models", get(routes::models))
        .route(
            "/v1/plugins",
            get(plugin_api::list).merge(
                post(plugin_api::load).route_layer(middleware::from_fn(auth::require_admin)),
            ),
        )
        .route(
            "/v1/plugins/{name}",
            delete(plugin_api::unload).route_layer(middleware::from_fn(auth::require_admin)),
        )
        .route(
            "/v1/load_lora_adapter",
            post(vllm_lora::load).route_layer(middleware::from_fn(auth::require_admin)),
        )
        .route(
            "/v1/unload_lora_adapter",
            post(vllm_lora::unload).route_layer(middleware::from_fn(auth::require_admin)),
        )
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authorize,
        ));
    let open = Router::new()
        .route("/health", get(routes::health))
        .route("/live", get(routes::live))
        .route("/metrics", get(routes::metrics))
        .route("/openapi.json", get(openapi::openapi_json));
    let router = Router::new()
        .merge(protected)
        .merge(open)
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        // `body_limit` replaces axum's default limit (2 MiB) rather than stacking on it.
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(
            state.clone(),
            body_limit::limit_body,
        ));
    let router = match state.config.allowed_origins.layer() {
        Some(cors) => router.layer(cors),
        None => router,
    };
    router
        // Inside `observe`, so a handler's panic is counted and logged as the 500 it becomes.
        .layer(CatchPanicLayer::custom(error::panicked))
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
    let key = KeyLabel::default();
    req.extensions_mut().insert(key.clone());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    // `key` is recorded by the auth middleware once it knows the key's name.
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %req.method(),
        route = %route,
        key = tracing::field::Empty,
    );
    let started = Instant::now();
    let mut pending = Pending {
        metrics: state.metrics.clone(),
        route: route.clone(),
        key: key.clone(),
        answered: false,
    };
    let mut response = next.run(req).instrument(span.clone()).await;
    pending.answered = true;
    let status = response.status().as_u16();
    state.metrics.request_for_key(&route, status, key.get());
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    span.in_scope(|| match route.as_str() {
        // Probes and scrapes arrive every few seconds; keep them out of the default log.
        "/health" | "/live" | "/metrics" => tracing::debug!(status, ms, "request answered"),
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
    key: KeyLabel,
    answered: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.answered {
            self.metrics
                .request_for_key(&self.route, CLIENT_CLOSED, self.key.get());
            tracing::info!(route = %self.route, "client closed the connection before the reply");
        }
    }
}
