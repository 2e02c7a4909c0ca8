//! Tiny memory decoders written to disk, for tests: a seeded tiny Llama
//! ([`models::tiny::TinyModel`]) as a memory folder the real loader reads.

use std::path::Path;

use candle_core::quantized::GgmlDType;
use models::error::{ModelError, Result};
use models::tiny::TinyModel;
use serde_json::{json, Value};

use super::{CONFIG_FILE, GGUF_FILE, TYPE};

/// How the memory's weights are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weights {
    /// `model.safetensors`, f32.
    Safetensors,
    /// `model.gguf`, matrices quantized to this type.
    Gguf(GgmlDType),
}

/// The `graft` block of a memory decoder with default mixing weight `lambda`.
pub fn graft_block(lambda: f32) -> Value {
    json!({"type": TYPE, "lambda": lambda})
}

/// Writes `model` as a memory folder `dir` with default mixing weight `lambda`: config.json
/// (the Hugging Face fields and the `graft` block) and the weights.
pub fn write_memory(model: &TinyModel, dir: &Path, weights: Weights, lambda: f32) -> Result<()> {
    // The Hugging Face folder gives config.json's model fields (and, for safetensors, the weights).
    model.write_safetensors(dir)?;
    if let Weights::Gguf(dtype) = weights {
        let st = dir.join(super::SAFETENSORS_FILE);
        std::fs::remove_file(&st).map_err(|e| io(&st, e))?;
        model.write_gguf(&dir.join(GGUF_FILE), dtype)?;
    }
    edit_config(dir, |c| c["graft"] = graft_block(lambda))
}

/// Rewrites `dir/config.json` through `edit` (tests break files with it).
pub fn edit_config(dir: &Path, edit: impl FnOnce(&mut Value)) -> Result<()> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
    let mut config: Value = serde_json::from_str(&text).map_err(|e| ModelError::Parse {
        path: path.clone(),
        message: e.to_string(),
    })?;
    edit(&mut config);
    std::fs::write(&path, config.to_string()).map_err(|e| io(&path, e))
}

fn io(path: &Path, source: std::io::Error) -> ModelError {
    ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}
