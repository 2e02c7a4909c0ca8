//! `config.json` of a memory decoder: a Hugging Face `LlamaConfig` of the memory's own
//! architecture plus a `graft` block saying what the file is (`"type": "memory_decoder"`),
//! the base tokenizer it was trained with, and the default mixing weight λ.
//!
//! With `model.safetensors` weights the Hugging Face fields give the architecture; with
//! `model.gguf` the GGUF metadata does and config.json needs only the `graft` block.

use std::path::Path;

use models::config::HfConfig;
use models::ModelConfig;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{PluginError, Result};

/// The `graft.type` of a memory decoder's config.
pub const TYPE: &str = "memory_decoder";

/// The `graft` block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraftBlock {
    /// Always [`TYPE`].
    #[serde(rename = "type")]
    pub kind: String,
    /// The identity of the base tokenizer the memory was trained with
    /// ([`models::Tokenizer::identity`]); a memory that records one loads only beside a base
    /// model with the same tokenizer.
    #[serde(default)]
    pub tokenizer_hash: Option<String>,
    /// The default mixing weight λ in `[0, 1]`; a request's `lambda` overrides it.
    pub lambda: f32,
    /// How many of the base model's first layers the memory shares: 0, the memory embeds the
    /// tokens itself; `s > 0`, the memory's first layer reads the base's hidden state after
    /// base layer `s - 1` (what those layers computed is the same for both, so it is computed
    /// once), and the memory's file holds only its own layers.
    #[serde(default)]
    pub shared_layers: usize,
    /// The base layers the memory was initialised from, in its layer order (written by
    /// `server train memory`; informational: the memory holds its own copy of every weight).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_layers: Option<Vec<usize>>,
}

/// A parsed `config.json`.
#[derive(Debug, Clone)]
pub struct MemoryConfig {
    pub graft: GraftBlock,
    /// The Hugging Face part, kept as JSON: parsed only when the weights are safetensors.
    json: Value,
}

impl MemoryConfig {
    /// Parses `bytes` (the file at `path`) and checks the `graft` block on its own.
    pub fn read(path: &Path, bytes: &[u8]) -> Result<Self> {
        let bad = |m: String| PluginError::bad_file(path, m);
        let json: Value = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        let block = json
            .get("graft")
            .ok_or_else(|| bad(format!("no `graft` block (a memory decoder's config needs {{\"graft\": {{\"type\": \"{TYPE}\", \"lambda\": ...}}}})")))?;
        let graft: GraftBlock =
            serde_json::from_value(block.clone()).map_err(|e| bad(format!("graft: {e}")))?;
        if graft.kind != TYPE {
            return Err(bad(format!("graft.type is `{}`, not `{TYPE}`", graft.kind)));
        }
        if !(0.0..=1.0).contains(&graft.lambda) {
            return Err(bad(format!(
                "graft.lambda must be within [0, 1], got {}",
                graft.lambda
            )));
        }
        Ok(Self { graft, json })
    }

    /// The memory's architecture from the Hugging Face fields (safetensors weights).
    pub fn model_config(&self, path: &Path) -> Result<ModelConfig> {
        let bad = |m: String| PluginError::bad_file(path, m);
        let hf: HfConfig = serde_json::from_value(self.json.clone())
            .map_err(|e| bad(format!("not a Hugging Face Llama config: {e}")))?;
        hf.into_config().map_err(|e| bad(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(v: Value) -> Result<MemoryConfig> {
        MemoryConfig::read(Path::new("m/config.json"), v.to_string().as_bytes())
    }

    #[test]
    fn the_graft_block_is_required_typed_and_bounded() {
        let ok = read(json!({"graft": {"type": TYPE, "lambda": 0.3, "tokenizer_hash": "x"}}));
        assert_eq!(ok.unwrap().graft.lambda, 0.3);
        for (v, said) in [
            (json!({"model_type": "llama"}), "no `graft` block"),
            (
                json!({"graft": {"type": "lora", "lambda": 0.3}}),
                "graft.type is `lora`, not `memory_decoder`",
            ),
            (json!({"graft": {"type": TYPE}}), "missing field `lambda`"),
            (
                json!({"graft": {"type": TYPE, "lambda": 1.5}}),
                "within [0, 1]",
            ),
            (
                json!({"graft": {"type": TYPE, "lambda": 0.5, "lamda": 1}}),
                "unknown field `lamda`",
            ),
        ] {
            let e = read(v.clone()).unwrap_err().to_string();
            assert!(e.contains(said) && e.contains("m/config.json"), "{v}: {e}");
        }
    }
}
