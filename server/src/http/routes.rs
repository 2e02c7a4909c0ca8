//! The small routes: GET /health, GET /metrics, GET /v1/models (the base model and its
//! adapters, those the caller's API key may use), and the fallbacks that give
//! unknown routes (404) and wrong methods (405) the same error body as everything else.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use plugins::PluginKind;

use super::auth::Caller;
use super::error::{ApiError, ErrorKind};
use super::state::AppState;

/// 200 once the model is loaded; 503 (with the reason) while loading or shutting down, so a
/// load balancer stops sending traffic in both cases.
pub async fn health(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    state.engine()?;
    Ok(Json(json!({"status": "ok"})))
}

/// Prometheus text exposition; load gauges are read from the engine now.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let engine = state.slot.peek();
    let stats = engine.as_ref().map(|e| e.stats());
    let steps = engine.as_ref().and_then(|e| e.step_metrics());
    if let Some(registry) = state.slot.plugins() {
        state
            .metrics
            .plugin_gauges(&registry.list(), registry.memory());
    }
    let body = state.metrics.render(stats, steps);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// The served model, OpenAI's list shape plus vLLM's `max_model_len`.
pub async fn models(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    let engine = state.engine()?;
    let info = engine.info();
    let mut data = vec![json!({
        "id": info.id,
        "object": "model",
        "created": info.created,
        "owned_by": "graft",
        "root": info.id,
        "parent": null,
        "max_model_len": info.context_length,
    })];
    // Adapters are models of their own to OpenAI clients and gateways, as vLLM lists them:
    // selectable by name in `model`, with the base model as parent.
    let registry = state.slot.plugins();
    let plugins = registry.as_deref().map(|r| r.list()).unwrap_or_default();
    data.extend(
        plugins
            .iter()
            .filter(|p| p.kind == PluginKind::Lora)
            .map(|p| {
                json!({
                    "id": p.name,
                    "object": "model",
                    "created": info.created,
                    "owned_by": "graft",
                    "root": p.path,
                    "parent": info.id,
                    "max_model_len": info.context_length,
                })
            }),
    );
    // A key restricted to some models sees those (LiteLLM's behaviour).
    data.retain(|m| {
        m["id"]
            .as_str()
            .is_some_and(|id| caller.may_use_model(&info.id, id))
    });
    Ok(Json(json!({"object": "list", "data": data})))
}

pub async fn not_found() -> ApiError {
    ApiError::new(ErrorKind::RouteNotFound, "no such route")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorKind::MethodNotAllowed,
        "method not allowed on this route",
    )
}
