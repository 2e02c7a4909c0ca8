//! The small routes: GET /health, GET /metrics, GET /v1/models (the base model and its
//! adapters, those the caller's API key may use), and the fallbacks that give
//! unknown routes (404) and wrong methods (405) the same error body as everything else.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;

use plugins::PluginKind;

use super::auth::Caller;
use super::error::{ApiError, ErrorKind};
use super::replies::{Health, Live, ModelCard, ModelList};
use super::state::AppState;

/// Readiness
///
/// 200 once the model is loaded; 503 (with the reason) while loading or shutting down, so a
/// load balancer stops sending traffic in both cases.
#[utoipa::path(
    get,
    path = "/health",
    operation_id = "health",
    tag = "operations",
    responses((status = 200, description = "The model is loaded", body = Health)),
)]
pub async fn health(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    state.engine()?;
    Ok(Json(Health { status: "ok" }))
}

/// Liveness
///
/// 200 whenever the process answers, loading and draining included: a liveness probe that
/// read `/health` would restart a pod that is only loading its model or finishing its streams.
#[utoipa::path(
    get,
    path = "/live",
    operation_id = "live",
    tag = "operations",
    responses((status = 200, description = "The process is alive", body = Live)),
)]
pub async fn live() -> Json<Live> {
    Json(Live { status: "alive" })
}

/// Prometheus metrics
///
/// Prometheus text exposition (vLLM's metric names where they exist); load gauges are read
/// from the engine now. Open like /health: counts only, never request content.
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text format 0.0.4", body = String, content_type = "text/plain")),
)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let engine = state.slot.peek();
    let stats = engine.as_ref().map(|e| e.stats());
    let steps = engine.as_ref().and_then(|e| e.step_metrics());
    if let Some(registry) = state.slot.plugins() {
        state
            .metrics
            .plugin_gauges(&registry.list(), registry.memory());
        state.metrics.plugin_counters(&registry.counters());
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

/// List models
///
/// The served model and its LoRA adapters (selectable by name in `model`), those the
/// caller's key may use: OpenAI's list shape plus vLLM's `root`, `parent`, `max_model_len`.
#[utoipa::path(
    get,
    path = "/v1/models",
    operation_id = "listModels",
    tag = "models",
    responses((status = 200, description = "The models", body = ModelList)),
)]
pub async fn models(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<ModelList>, ApiError> {
    let engine = state.engine()?;
    let info = engine.info();
    let card = |id: &str, root: String, parent: Option<String>| ModelCard {
        id: id.to_string(),
        object: "model",
        created: info.created,
        owned_by: "graft",
        root,
        parent,
        max_model_len: info.context_length,
    };
    let mut data = vec![card(&info.id, info.id.clone(), None)];
    // Adapters are models of their own to OpenAI clients and gateways, as vLLM lists them:
    // selectable by name in `model`, with the base model as parent.
    let registry = state.slot.plugins();
    let plugins = registry.as_deref().map(|r| r.list()).unwrap_or_default();
    data.extend(
        plugins
            .iter()
            .filter(|p| p.kind == PluginKind::Lora)
            .map(|p| {
                let root = p.path.to_string_lossy().into_owned();
                card(&p.name, root, Some(info.id.clone()))
            }),
    );
    // A key restricted to some models sees those (LiteLLM's behaviour).
    data.retain(|m| caller.may_use_model(&info.id, &m.id));
    Ok(Json(ModelList {
        object: "list",
        data,
    }))
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
