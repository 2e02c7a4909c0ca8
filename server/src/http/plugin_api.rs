//! The plug-in registry over HTTP: GET /v1/plugins lists what is registered (type, name,
//! path, content hash, resident memory, requests using it), POST /v1/plugins loads one at run
//! time, DELETE /v1/plugins/{name} unloads one. Loading reads and checks files, so it runs on
//! the blocking pool; a refused file is a 400 naming what cannot be applied.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use plugins::{PluginError, PluginInfo, Registry, Source};

use super::error::{on_blocking_pool, ApiError, ErrorKind};
use super::extract::ApiJson;
use super::replies::{PluginDeleted, PluginList, PluginMemory};
use super::state::AppState;
use super::wire::LoadPluginRequest;

/// The registry, or the 503 to answer while the model loads or the server shuts down.
fn registry(state: &AppState) -> Result<Arc<Registry>, ApiError> {
    state.engine()?;
    state
        .slot
        .plugins()
        .ok_or_else(|| ApiError::new(ErrorKind::ModelLoading, "the plug-in registry is not ready"))
}

/// List plug-ins
///
/// Every registered plug-in (type, name, path, content hash, resident memory, requests
/// using it) and the registry's memory use.
#[utoipa::path(
    get,
    path = "/v1/plugins",
    operation_id = "listPlugins",
    tag = "plugins",
    responses((status = 200, description = "The registry", body = PluginList)),
)]
pub async fn list(State(state): State<AppState>) -> Result<Json<PluginList>, ApiError> {
    let registry = registry(&state)?;
    let (resident_bytes, budget_bytes) = registry.memory();
    Ok(Json(PluginList {
        object: "list",
        data: registry.list(),
        memory: PluginMemory {
            resident_bytes,
            budget_bytes,
        },
    }))
}

/// Load a plug-in
///
/// Registers a plug-in from a file or folder under the plug-in folder (`--plugin-dir`);
/// with `replace`, a plug-in of the same name is replaced (running requests keep the old
/// one). Needs an admin key when keys are configured.
#[utoipa::path(
    post,
    path = "/v1/plugins",
    operation_id = "loadPlugin",
    tag = "plugins",
    request_body = LoadPluginRequest,
    responses((status = 200, description = "The registered plug-in", body = PluginInfo)),
)]
pub async fn load(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<LoadPluginRequest>,
) -> Result<Json<PluginInfo>, ApiError> {
    let registry = registry(&state)?;
    let loaded = on_blocking_pool("plug-in load task", move || {
        registry.load(req.kind, &req.name, &req.path, Source::Api, req.replace)
    })
    .await?;
    let info = loaded.map_err(|e| {
        let param = load_param(&e);
        ApiError::from(e).with_param(param)
    })?;
    Ok(Json(info))
}

/// The field of a `POST /v1/plugins` body a load error is about.
fn load_param(e: &PluginError) -> &'static str {
    match e {
        PluginError::BadName { .. } | PluginError::AlreadyLoaded(_) => "name",
        PluginError::UnknownType(_) | PluginError::WrongType { .. } => "type",
        _ => "path",
    }
}

/// Unload a plug-in
///
/// Removes a plug-in from the registry (running requests keep it until they finish). Needs
/// an admin key when keys are configured.
#[utoipa::path(
    delete,
    path = "/v1/plugins/{name}",
    operation_id = "unloadPlugin",
    tag = "plugins",
    params(("name" = String, Path, description = "The plug-in's registered name")),
    responses((status = 200, description = "The plug-in is unloaded", body = PluginDeleted)),
)]
pub async fn unload(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<PluginDeleted>, ApiError> {
    let registry = registry(&state)?;
    let info = registry.unload(&name)?;
    Ok(Json(PluginDeleted {
        name: info.name,
        kind: info.kind,
        deleted: true,
    }))
}
