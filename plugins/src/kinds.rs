//! The table of plug-in kinds: every kind a request, the config or `POST /v1/plugins` can
//! name, with its wire name, a one-line description and its loader. Nothing else in the
//! crate names a kind: the registry loads through [`PluginKind::load`], parsing and printing
//! go through the table, and the forward pass only ever sees hooks.
//!
//! Adding a kind is one folder (`src/<kind>/`: the hook, its file format, its request
//! parameters, its trainer and evaluation) plus one variant and one row here.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use crate::base::BaseModel;
use crate::controller::SteeringController;
use crate::early_exit::EarlyExit;
use crate::error::{PluginError, Result};
use crate::files::PluginFiles;
use crate::lora::LoraAdapter;
use crate::memory::MemoryDecoder;
use crate::plugin::Plugin;
use crate::sparse_attention::SparseAttention;
use crate::speculative::Speculative;
use crate::steer::SteeringVector;
use crate::vision_prune::VisionPrune;

/// A plug-in type, as written in requests (`"type": "lora"`) and in the config. Its name,
/// description and loader are its row of [`KINDS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(
    feature = "openapi",
    derive(utoipa::ToSchema),
    schema(rename_all = "snake_case")
)]
pub enum PluginKind {
    Lora,
    Steer,
    Controller,
    Memory,
    Speculative,
    EarlyExit,
    SparseAttention,
    VisionPrune,
}

/// Reads a plug-in of one kind from `path` (already resolved and confined) through `files`
/// and checks it against the base model.
pub type Loader = fn(&str, &Path, &BaseModel, &mut PluginFiles) -> Result<Arc<dyn Plugin>>;

/// One row of the table.
#[derive(Debug, Clone, Copy)]
pub struct KindInfo {
    pub kind: PluginKind,
    /// The name requests, the config and responses use.
    pub name: &'static str,
    pub description: &'static str,
    pub load: Loader,
    /// A kind with no files: one instance, made at start, serves every request, which names
    /// only its type (`name` may be left out). Its loader refuses every path.
    pub built_in: Option<fn() -> Arc<dyn Plugin>>,
}

/// Every kind, in [`PluginKind`] declaration order (`KINDS[k as usize].kind == k`, which a
/// test keeps true).
pub const KINDS: [KindInfo; 8] = [
    KindInfo {
        kind: PluginKind::Lora,
        name: "lora",
        description: "a LoRA adapter in the PEFT format (adapter_config.json + \
                      adapter_model.safetensors)",
        load: |name, path, base, files| Ok(Arc::new(LoraAdapter::load(name, path, base, files)?)),
        built_in: None,
    },
    KindInfo {
        kind: PluginKind::Steer,
        name: "steer",
        description: "a steering vector (llama.cpp control-vector GGUF)",
        load: |name, path, base, files| {
            Ok(Arc::new(SteeringVector::load(name, path, base, files)?))
        },
        built_in: None,
    },
    KindInfo {
        kind: PluginKind::Controller,
        name: "controller",
        description: "a learned steering controller (config.json + model.safetensors)",
        load: |name, path, base, files| {
            Ok(Arc::new(SteeringController::load(name, path, base, files)?))
        },
        built_in: None,
    },
    KindInfo {
        kind: PluginKind::Memory,
        name: "memory",
        description: "a memory decoder: a small LM mixed into the next-token distribution \
                      (config.json with a graft block + model.safetensors or model.gguf)",
        load: |name, path, base, files| Ok(Arc::new(MemoryDecoder::load(name, path, base, files)?)),
        built_in: None,
    },
    KindInfo {
        kind: PluginKind::Speculative,
        name: "speculative",
        description: "speculative decoding (built in, no file): drafts by prompt lookup, \
                      verified by the model, output unchanged",
        load: |_name, _path, _base, _files| {
            Err(PluginError::BuiltIn(
                PluginKind::Speculative.name().to_string(),
            ))
        },
        built_in: Some(Speculative::built_in),
    },
    KindInfo {
        kind: PluginKind::EarlyExit,
        name: "early_exit",
        description: "speculative early exit (SpecEE): per-layer predictors let a decode token \
                      leave the model early (config.json + predictors.safetensors); lossy",
        load: |name, path, base, files| Ok(Arc::new(EarlyExit::load(name, path, base, files)?)),
        built_in: None,
    },
    KindInfo {
        kind: PluginKind::SparseAttention,
        name: "sparse_attention",
        description: "learned block-sparse decode attention (SeerAttention-R): per-layer gates \
                      pick the KV-cache blocks a decoding token reads (config.json + \
                      gates.safetensors); lossy",
        load: |name, path, base, files| {
            Ok(Arc::new(SparseAttention::load(name, path, base, files)?))
        },
        built_in: None,
    },
    KindInfo {
        kind: PluginKind::VisionPrune,
        name: "vision_prune",
        description: "vision-token pruning (LVPruning): most of a prompt's image tokens leave                       the forward pass after a middle layer (config.json); lossy",
        load: |name, path, base, files| Ok(Arc::new(VisionPrune::load(name, path, base, files)?)),
        built_in: None,
    },
];

impl PluginKind {
    /// Every kind, in table order.
    pub const ALL: [PluginKind; KINDS.len()] = {
        let mut all = [PluginKind::Lora; KINDS.len()];
        let mut i = 0;
        while i < KINDS.len() {
            all[i] = KINDS[i].kind;
            i += 1;
        }
        all
    };

    /// This kind's row of [`KINDS`].
    pub fn info(self) -> &'static KindInfo {
        &KINDS[self as usize]
    }

    pub fn parse(name: &str) -> Result<Self> {
        KINDS
            .iter()
            .find(|row| row.name == name)
            .map(|row| row.kind)
            .ok_or_else(|| PluginError::UnknownType(name.to_string()))
    }

    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// The known type names, for error messages.
    pub fn known() -> String {
        KINDS.map(|row| row.name).join(", ")
    }

    /// Runs this kind's loader.
    pub fn load(
        self,
        name: &str,
        path: &Path,
        base: &BaseModel,
        files: &mut PluginFiles,
    ) -> Result<Arc<dyn Plugin>> {
        (self.info().load)(name, path, base, files)
    }
}

impl fmt::Display for PluginKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl serde::Serialize for PluginKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// A kind crosses from text to [`PluginKind`] here, once, at the wire edge: an unknown name
/// fails deserialization with the message of [`PluginError::UnknownType`].
impl<'de> serde::Deserialize<'de> for PluginKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let name = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Self::parse(&name).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_round_trips_its_name_and_sits_at_its_kinds_index() {
        for (i, row) in KINDS.iter().enumerate() {
            assert_eq!(row.kind as usize, i, "{} is out of order", row.name);
            assert_eq!(PluginKind::parse(row.name).unwrap(), row.kind);
            assert_eq!(row.kind.name(), row.name);
            assert_eq!(PluginKind::ALL[i], row.kind);
            let json = serde_json::to_value(row.kind).unwrap();
            assert_eq!(json, row.name);
            assert_eq!(
                serde_json::from_value::<PluginKind>(json).unwrap(),
                row.kind
            );
            assert!(!row.description.is_empty());
        }
        let names: std::collections::BTreeSet<_> = KINDS.iter().map(|r| r.name).collect();
        assert_eq!(names.len(), KINDS.len(), "two rows share a name");
    }

    #[test]
    fn unknown_types_are_named_with_the_known_ones() {
        let err = PluginKind::parse("lorra").unwrap_err().to_string();
        assert!(err.contains("`lorra`") && err.contains("lora"), "{err}");
        let err = serde_json::from_value::<PluginKind>("dora".into())
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "unknown plug-in type `dora` (known: lora, steer, controller, memory, speculative, early_exit, sparse_attention, vision_prune)"
        );
        assert!(serde_json::from_value::<PluginKind>(serde_json::json!(3)).is_err());
    }
}
