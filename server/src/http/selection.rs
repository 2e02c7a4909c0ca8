//! A request's `model` field and `plugins` list, resolved into the plug-in chain its rows run.
//!
//! `model` may name the base model, `<base>::<plugin>` or a registered plug-in alone (the
//! forms vLLM, LoRAX, mistral.rs and the Kubernetes inference gateway use to pick an
//! adapter); a plug-in picked that way runs first, with default parameters, before the
//! `plugins` list in its order. Every failure names what is wrong: `model` for the model
//! field, `plugins[i]` (or `plugins[i].<param>`) for an entry of the list.

use std::sync::Arc;

use plugins::{Chain, PluginError, PluginKind, PluginSpec, Registry};

use super::auth::Caller;
use super::error::{on_blocking_pool, ApiError, ErrorKind};
use super::state::AppState;
use crate::engine::{Engine, ModelInfo};

/// The resolved chain and the model name the response reports.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub chain: Chain,
    /// The `model` the client sent when it selected a plug-in (what vLLM answers with), else
    /// the base model's id.
    pub model: String,
}

impl Selection {
    /// The LoRA adapters in the chain, by name (what `vllm:lora_requests_info` reports).
    pub fn lora_names(&self) -> Vec<String> {
        self.chain
            .entries
            .iter()
            .filter(|e| e.kind == PluginKind::Lora)
            .map(|e| e.name.clone())
            .collect()
    }
}

/// [`select_for`] for a generation request. One that names plug-ins resolves on the blocking
/// pool: an evicted plug-in is read back from disk (and hashed and checked) there, not on a
/// thread that also streams other requests' tokens.
pub async fn select_for_generation(
    state: &AppState,
    info: &ModelInfo,
    model: Option<&str>,
    plugins: &[PluginSpec],
) -> Result<Selection, ApiError> {
    let base_only = plugins.is_empty() && model.is_none_or(|m| m == info.id);
    let Some(registry) = state.slot.plugins().filter(|_| !base_only) else {
        return select_for(state, info, model, plugins);
    };
    let (model, plugins, info) = (model.map(str::to_owned), plugins.to_vec(), info.clone());
    on_blocking_pool("plug-in selection", move || {
        select(model.as_deref(), &plugins, &info, Some(&registry))
    })
    .await?
}

/// What every generation route does first: the engine (503 while loading), the caller's
/// permission for the model and plug-ins (403), the plug-in selection (404s), and the
/// plug-ins' use counted in the metrics.
pub async fn prepare_generation(
    state: &AppState,
    caller: &Caller,
    model: Option<&str>,
    plugins: &[PluginSpec],
) -> Result<(Arc<dyn Engine>, Selection), ApiError> {
    let engine = state.engine()?;
    caller.check(&engine.info().id, model, plugins)?;
    let selection = select_for_generation(state, engine.info(), model, plugins).await?;
    state.metrics.plugins_used(&selection.chain.entries);
    Ok((engine, selection))
}

/// [`select`] with the app's registry (none until the model is loaded).
pub fn select_for(
    state: &AppState,
    info: &ModelInfo,
    model: Option<&str>,
    plugins: &[PluginSpec],
) -> Result<Selection, ApiError> {
    select(model, plugins, info, state.slot.plugins().as_deref())
}

/// Resolves `model` and `plugins` against the served model and the registry.
pub fn select(
    model: Option<&str>,
    plugins: &[PluginSpec],
    info: &ModelInfo,
    registry: Option<&Registry>,
) -> Result<Selection, ApiError> {
    let from_model = model_plugin(model, info, registry)?;
    let mut chain = Chain::default();
    if let Some(spec) = &from_model {
        let resolved = resolve_one(registry, spec).map_err(|e| e.with_param("model"))?;
        extend(&mut chain, resolved);
    }
    for (i, spec) in plugins.iter().enumerate() {
        let resolved = resolve_one(registry, spec).map_err(|e| {
            let param = match &e.1 {
                Some(p) => format!("plugins[{i}].{p}"),
                None => format!("plugins[{i}]"),
            };
            e.with_param(param)
        })?;
        extend(&mut chain, resolved);
    }
    let model = match from_model {
        Some(_) => model.unwrap_or_default().to_string(),
        None => info.id.clone(),
    };
    Ok(Selection { chain, model })
}

/// The plug-in the `model` field selects, if any.
fn model_plugin(
    model: Option<&str>,
    info: &ModelInfo,
    registry: Option<&Registry>,
) -> Result<Option<PluginSpec>, ApiError> {
    let Some(requested) = model.filter(|m| *m != info.id) else {
        return Ok(None);
    };
    let name = match requested.split_once("::") {
        Some((base, name)) if base == info.id => name,
        Some(_) | None => requested,
    };
    let kind = registry.and_then(|r| r.kind_of(name));
    match kind {
        Some(kind) => Ok(Some(PluginSpec::named(kind, name))),
        None => Err(ApiError::new(
            ErrorKind::ModelNotFound,
            format!(
                "the model `{requested}` does not exist; this server serves `{}` and the \
                 plug-ins GET /v1/plugins lists (as `{}::<plug-in>` or the plug-in name)",
                info.id, info.id
            ),
        )
        .with_param("model")),
    }
}

/// An error and the parameter inside the spec it concerns.
struct SpecError(ApiError, Option<String>);

impl SpecError {
    fn with_param(self, param: impl Into<String>) -> ApiError {
        self.0.with_param(param)
    }
}

fn resolve_one(registry: Option<&Registry>, spec: &PluginSpec) -> Result<Chain, SpecError> {
    let Some(registry) = registry else {
        let e = PluginError::NotFound(spec.name.clone());
        return Err(SpecError(e.into(), None));
    };
    registry.resolve(std::slice::from_ref(spec)).map_err(|e| {
        let param = match &e {
            PluginError::BadParameter { param, .. } => Some(param.clone()),
            _ => None,
        };
        SpecError(e.into(), param)
    })
}

fn extend(chain: &mut Chain, more: Chain) {
    chain.calls.extend(more.calls);
    chain.entries.extend(more.entries);
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use models::tiny::{tiny_config, TinyModel};
    use models::{Architecture, Projection};
    use plugins::lora::tiny::TinyAdapter;
    use plugins::{BaseModel, PluginKind, RegistryConfig, Source};
    use serde_json::json;

    fn info() -> ModelInfo {
        ModelInfo {
            id: "m".into(),
            context_length: 100,
            vocab_size: 96,
            hidden_size: 32,
            created: 0,
        }
    }

    fn registry(dir: &std::path::Path) -> Registry {
        let config = TinyModel::random(tiny_config(Architecture::Llama), 1)
            .unwrap()
            .config;
        TinyAdapter::random(&config, 2, 2.0, &[Projection::Q], 3)
            .unwrap()
            .write(&dir.join("sql"))
            .unwrap();
        let base = BaseModel {
            id: "m".into(),
            config,
            device: Device::Cpu,
            tokenizer_hash: None,
            kv_dtype: models::KvDtype::F32,
        };
        let rc = RegistryConfig {
            dir: Some(dir.to_path_buf()),
            budget_bytes: 1 << 20,
        };
        let r = Registry::new(base, rc).unwrap();
        r.load(
            PluginKind::Lora,
            "sql",
            "sql".as_ref(),
            Source::Config,
            false,
        )
        .unwrap();
        r
    }

    #[test]
    fn the_model_field_selects_the_base_or_an_adapter_in_three_forms() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path());
        for (model, chain_len, echoed) in [
            (None, 0, "m"),
            (Some("m"), 0, "m"),
            (Some("m::sql"), 1, "m::sql"),
            (Some("sql"), 1, "sql"),
        ] {
            let s = select(model, &[], &info(), Some(&reg)).unwrap();
            assert_eq!(s.chain.calls.len(), chain_len, "{model:?}");
            assert_eq!(s.model, echoed);
        }
        for bad in ["gpt-4", "other::sql", "m::nope"] {
            let e = select(Some(bad), &[], &info(), Some(&reg)).unwrap_err();
            assert_eq!(e.kind, ErrorKind::ModelNotFound, "{bad}");
            assert_eq!(e.param.as_deref(), Some("model"));
            assert!(e.message.contains(bad), "{}", e.message);
        }
    }

    #[test]
    fn plugin_list_errors_name_the_entry_and_parameter() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path());
        let spec = |v: serde_json::Value| serde_json::from_value::<PluginSpec>(v).unwrap();
        let ok = spec(json!({"type": "lora", "name": "sql", "scale": 0.5}));
        let chain = select(Some("sql"), std::slice::from_ref(&ok), &info(), Some(&reg)).unwrap();
        assert_eq!(
            chain.chain.entries.len(),
            2,
            "model adapter first, then the list"
        );

        let cases = [
            (
                json!({"type": "lora", "name": "nope"}),
                ErrorKind::PluginNotFound,
                "plugins[1]",
            ),
            (
                json!({"type": "steer", "name": "sql"}),
                ErrorKind::InvalidParameter,
                "plugins[1]",
            ),
            (
                json!({"type": "lora", "name": "sql", "scale": 99}),
                ErrorKind::InvalidParameter,
                "plugins[1].scale",
            ),
        ];
        for (bad, kind, param) in cases {
            let e = select(None, &[ok.clone(), spec(bad)], &info(), Some(&reg)).unwrap_err();
            assert_eq!(
                (e.kind, e.param.as_deref()),
                (kind, Some(param)),
                "{}",
                e.message
            );
        }
        let e = select(None, &[ok], &info(), None).unwrap_err();
        assert_eq!(e.kind, ErrorKind::PluginNotFound);
    }
}
