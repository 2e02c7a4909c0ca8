//! The plug-in registry over HTTP: GET /v1/plugins lists what is registered (type, name,
//! path, content hash, resident memory, requests using it), POST /v1/plugins loads one at run
//! time, DELETE /v1/plugins/{name} unloads one. Loading reads and checks files, so it runs on
//! the blocking pool; a refused file is a 400 naming what cannot be applied.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use plugins::{PluginError, PluginKind, Registry, Source};
use serde_json::{json, Value};

use super::error::{on_blocking_pool, ApiError, ErrorKind};
use super::extract::ApiJson;
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

pub async fn list(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let registry = registry(&state)?;
    let (resident, budget) = registry.memory();
    Ok(Json(json!({
        "object": "list",
        "data": registry.list(),
        "memory": {"resident_bytes": resident, "budget_bytes": budget},
    })))
}

pub async fn load(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<LoadPluginRequest>,
) -> Result<Json<Value>, ApiError> {
    let registry = registry(&state)?;
    let kind = PluginKind::parse(&req.kind).map_err(|e| ApiError::from(e).with_param("type"))?;
    let loaded = on_blocking_pool("plug-in load task", move || {
        registry.load(kind, &req.name, &req.path, Source::Api, req.replace)
    })
    .await?;
    let info = loaded.map_err(|e| {
        let param = load_param(&e);
        ApiError::from(e).with_param(param)
    })?;
    Ok(Json(json!(info)))
}

/// The field of a `POST /v1/plugins` body a load error is about.
fn load_param(e: &PluginError) -> &'static str {
    match e {
        PluginError::BadName { .. } | PluginError::AlreadyLoaded(_) => "name",
        PluginError::UnknownType(_) | PluginError::WrongType { .. } => "type",
        _ => "path",
    }
}

pub async fn unload(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let registry = registry(&state)?;
    let info = registry.unload(&name)?;
    Ok(Json(
        json!({"name": info.name, "type": info.kind, "deleted": true}),
    ))
}
