//! vLLM's dynamic LoRA endpoints, `POST /v1/load_lora_adapter` and
//! `POST /v1/unload_lora_adapter`, so that tools written for vLLM (the Gateway API Inference
//! Extension's adapter syncer among them) manage graft's LoRA adapters.
//!
//! They are a second door to the plug-in registry of `POST /v1/plugins` (the same confinement
//! to the plug-in folder, the same admin guard) that answers as vLLM 0.33.0 does: 200 with a
//! plain-text `Success: ...` line, errors as `{"error": {"message", "type", "param", "code"}}`
//! with vLLM's types (`InvalidUserInput`, `NotFoundError`, `BadRequestError`) and the status
//! as the numeric `code`. One deliberate difference: an adapter whose files cannot be used is
//! a 400 here, where vLLM answers 500.

use std::path::PathBuf;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use plugins::{PluginError, PluginKind, Source};

use super::error::on_blocking_pool;
use super::extract::{parse, Screen};
use super::state::AppState;

/// POST /v1/load_lora_adapter, as vLLM takes it.
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoadLoraAdapterRequest {
    pub lora_name: String,
    /// A folder or file under the plug-in folder; relative paths resolve against it.
    pub lora_path: String,
    /// Replace an adapter of the same name (requests already running keep the old one).
    #[serde(default)]
    pub load_inplace: bool,
    /// vLLM's flag for 3-D (mixture-of-experts) LoRA weights; only `false` is served.
    #[serde(default)]
    pub is_3d_lora_weight: bool,
}

impl Screen for LoadLoraAdapterRequest {}

/// POST /v1/unload_lora_adapter, as vLLM takes it.
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UnloadLoraAdapterRequest {
    pub lora_name: String,
    /// vLLM's internal id; accepted and unused (the name identifies the adapter).
    pub lora_int_id: Option<i64>,
}

impl Screen for UnloadLoraAdapterRequest {}

/// An error in vLLM's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct VllmError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl VllmError {
    fn invalid(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "InvalidUserInput",
            message: message.into(),
        }
    }
}

/// vLLM's error body: OpenAI's fields, with the HTTP status as a number in `code`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct VllmErrorBody {
    pub error: VllmErrorInfo,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct VllmErrorInfo {
    pub message: String,
    /// `InvalidUserInput`, `NotFoundError`, `BadRequestError` or `ServiceUnavailableError`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Always null.
    pub param: Option<String>,
    /// The HTTP status.
    pub code: u16,
}

impl IntoResponse for VllmError {
    fn into_response(self) -> Response {
        let body = VllmErrorBody {
            error: VllmErrorInfo {
                message: self.message,
                kind: self.kind.to_string(),
                param: None,
                code: self.status.as_u16(),
            },
        };
        (self.status, Json(body)).into_response()
    }
}

fn success(message: String) -> Response {
    let content_type = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    (StatusCode::OK, content_type, message).into_response()
}

/// Load a LoRA adapter (vLLM's endpoint)
///
/// Registers a LoRA adapter from the plug-in folder under `lora_name`, as `POST /v1/plugins`
/// does, answering as vLLM. Needs an admin key when keys are configured.
#[utoipa::path(
    post,
    path = "/v1/load_lora_adapter",
    operation_id = "loadLoraAdapter",
    tag = "plugins",
    request_body = LoadLoraAdapterRequest,
    responses(
        (status = 200, description = "`Success: LoRA adapter '<name>' added successfully.`", body = String, content_type = "text/plain"),
        (status = 400, description = "Missing name or path, a name in use or the base model's, unusable files", body = VllmErrorBody),
        (status = 404, description = "No adapter at `lora_path`", body = VllmErrorBody),
        (status = 503, description = "The model is loading, the server is shutting down, or the plug-in memory budget is exhausted", body = VllmErrorBody),
    ),
)]
pub async fn load(State(state): State<AppState>, body: Bytes) -> Result<Response, VllmError> {
    let req: LoadLoraAdapterRequest = parse(&body).map_err(|e| VllmError::invalid(e.message))?;
    let registry = check_load(&state, &req)?;
    let name = req.lora_name.clone();
    let path = PathBuf::from(&req.lora_path);
    let loaded = on_blocking_pool("LoRA adapter load task", move || {
        registry.load(
            PluginKind::Lora,
            &name,
            &path,
            Source::Api,
            req.load_inplace,
        )
    })
    .await
    .map_err(|e| VllmError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        kind: "InternalServerError",
        message: e.message,
    })?;
    match loaded {
        Ok(info) => Ok(success(format!(
            "Success: LoRA adapter '{}' added successfully.",
            info.name
        ))),
        Err(e) => Err(load_error(&req, e)),
    }
}

/// vLLM's checks before loading, with its messages; returns the registry to load into.
fn check_load(
    state: &AppState,
    req: &LoadLoraAdapterRequest,
) -> Result<std::sync::Arc<plugins::Registry>, VllmError> {
    if req.lora_name.is_empty() || req.lora_path.is_empty() {
        return Err(VllmError::invalid(
            "Both 'lora_name' and 'lora_path' must be provided.",
        ));
    }
    if req.is_3d_lora_weight {
        return Err(VllmError::invalid(
            "3-D (mixture-of-experts) LoRA weights are not supported by this server.",
        ));
    }
    let base = state.slot.peek().map(|e| e.info().id.clone());
    if base.as_deref() == Some(req.lora_name.as_str()) {
        return Err(VllmError::invalid(format!(
            "The lora adapter '{}' conflicts with a served base model.",
            req.lora_name
        )));
    }
    // `load_inplace` replaces a LoRA adapter, never a plug-in of another type.
    let registry = registry(state)?;
    let existing = registry
        .list()
        .into_iter()
        .find(|p| p.name == req.lora_name);
    match existing {
        Some(p) if p.kind != PluginKind::Lora => Err(VllmError::invalid(format!(
            "The name '{}' is taken by a {} plug-in.",
            req.lora_name, p.kind
        ))),
        _ => Ok(registry),
    }
}

fn load_error(req: &LoadLoraAdapterRequest, e: PluginError) -> VllmError {
    match e {
        PluginError::AlreadyLoaded(name) => VllmError::invalid(format!(
            "The lora adapter '{name}' has already been loaded. If you want to load the adapter \
             in place, set 'load_inplace' to True."
        )),
        PluginError::Missing(_) => VllmError {
            status: StatusCode::NOT_FOUND,
            kind: "NotFoundError",
            message: format!(
                "Loading lora {} failed: No adapter found for {}",
                req.lora_name, req.lora_path
            ),
        },
        PluginError::OverBudget { .. } | PluginError::Tensor(_) => VllmError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "ServiceUnavailableError",
            message: e.to_string(),
        },
        other => VllmError {
            status: StatusCode::BAD_REQUEST,
            kind: "BadRequestError",
            message: other.to_string(),
        },
    }
}

/// Unload a LoRA adapter (vLLM's endpoint)
///
/// Removes the LoRA adapter `lora_name` (requests already running finish with it). Needs an
/// admin key when keys are configured.
#[utoipa::path(
    post,
    path = "/v1/unload_lora_adapter",
    operation_id = "unloadLoraAdapter",
    tag = "plugins",
    request_body = UnloadLoraAdapterRequest,
    responses(
        (status = 200, description = "`Success: LoRA adapter '<name>' removed successfully.`", body = String, content_type = "text/plain"),
        (status = 400, description = "No `lora_name`, or a malformed body", body = VllmErrorBody),
        (status = 404, description = "No LoRA adapter of that name", body = VllmErrorBody),
        (status = 503, description = "The model is loading or the server is shutting down", body = VllmErrorBody),
    ),
)]
pub async fn unload(State(state): State<AppState>, body: Bytes) -> Result<Response, VllmError> {
    let req: UnloadLoraAdapterRequest = parse(&body).map_err(|e| VllmError::invalid(e.message))?;
    if req.lora_name.is_empty() {
        return Err(VllmError::invalid(
            "'lora_name' needs to be provided to unload a LoRA adapter.",
        ));
    }
    let registry = registry(&state)?;
    let not_found = || VllmError {
        status: StatusCode::NOT_FOUND,
        kind: "NotFoundError",
        message: format!("The lora adapter '{}' cannot be found.", req.lora_name),
    };
    // Only LoRA adapters are this endpoint's to remove.
    let is_lora = registry
        .list()
        .iter()
        .any(|p| p.name == req.lora_name && p.kind == PluginKind::Lora);
    if !is_lora {
        return Err(not_found());
    }
    registry.unload(&req.lora_name).map_err(|_| not_found())?;
    Ok(success(format!(
        "Success: LoRA adapter '{}' removed successfully.",
        req.lora_name
    )))
}

/// The registry, or vLLM's 503 while the model loads or the server shuts down.
fn registry(state: &AppState) -> Result<std::sync::Arc<plugins::Registry>, VllmError> {
    let unavailable = |message: String| VllmError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        kind: "ServiceUnavailableError",
        message,
    };
    state.engine().map_err(|e| unavailable(e.message))?;
    state
        .slot
        .plugins()
        .ok_or_else(|| unavailable("the plug-in registry is not ready".into()))
}
