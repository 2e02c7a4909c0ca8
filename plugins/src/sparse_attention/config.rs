//! `config.json` of a sparse-attention plug-in: the base model it was trained for, the gate's
//! shape and the defaults a request may override.
//!
//! The gates are in `gates.safetensors` beside it, for every layer `l` from `dense_layers`
//! on (`h` = key/value heads, `g` = query heads per key/value head, `d` = head size,
//! `d_g` = `gate_dim`):
//! - `layers.<l>.q_proj.weight` `(h, d_g, g * d)`: the query branch, one matrix per
//!   key/value head over its group's concatenated pre-RoPE queries;
//! - `layers.<l>.k_proj.weight` `(h, d_g, 3 * d)`: the key branch, over a block's pooled
//!   pre-RoPE keys `[max, min, mean]`;
//! - `layers.<l>.q_norm.weight`, `layers.<l>.k_norm.weight` `(d_g,)`: RMSNorm weights.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::base::{check_made_for, BaseIdentity, BaseModel};
use crate::error::{PluginError, Result};

pub const TYPE: &str = "sparse_attention";
pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "gates.safetensors";

/// Block sizes a file may use (the paper's 16, 32 and 64, and 128).
pub const BLOCK_SIZES: [usize; 4] = [16, 32, 64, 128];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SparseAttentionConfig {
    /// Always [`TYPE`].
    #[serde(rename = "type")]
    pub kind: String,
    pub base_model: BaseIdentity,
    /// Query heads, key/value heads and head size of the base's attention: a file trained on
    /// another head layout is refused by name.
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Keys per block: the unit the gate scores and the kernel reads.
    pub block_size: usize,
    /// Width of the gate's query and key projections (`d_g`).
    pub gate_dim: usize,
    /// RoPE base of the gate's own rotary embedding (over `gate_dim`).
    pub rope_theta: f32,
    pub norm_eps: f64,
    /// Layers `0..dense_layers` always read every key and have no gate.
    pub dense_layers: usize,
    /// Whether the first block (the attention sink) is always read beside the current one.
    pub sink_block: bool,
    /// Tokens of context a decoding token reads per layer and key/value head when a request
    /// names neither a budget nor a threshold (rounded up to whole blocks; the current block
    /// and the sink count in it).
    pub budget: usize,
}

impl SparseAttentionConfig {
    pub fn read(path: &Path, bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| PluginError::bad_file(path, e))
    }

    /// Query heads per key/value head.
    pub fn group(&self) -> usize {
        self.num_heads / self.num_kv_heads.max(1)
    }

    /// Checks the config against itself and against the base model.
    pub fn check(&self, name: &str, base: &BaseModel) -> Result<()> {
        check_made_for(name, &self.kind, TYPE, &self.base_model, base)?;
        let bad = |m: String| Err(PluginError::incompatible(name, m));
        let c = &base.config;
        let heads = (self.num_heads, self.num_kv_heads, self.head_dim);
        if heads != (c.num_heads, c.num_kv_heads, c.head_dim) {
            return bad(format!(
                "made for {} heads, {} key/value heads of size {}; the base model has {}, {} \
                 of size {}",
                heads.0, heads.1, heads.2, c.num_heads, c.num_kv_heads, c.head_dim
            ));
        }
        if !BLOCK_SIZES.contains(&self.block_size) {
            return bad(format!(
                "block_size {} is not one of {BLOCK_SIZES:?}",
                self.block_size
            ));
        }
        if self.gate_dim == 0 || self.gate_dim % 2 == 1 || self.gate_dim > 1024 {
            return bad(format!(
                "gate_dim {} must be even, within [2, 1024]",
                self.gate_dim
            ));
        }
        if self.dense_layers >= c.num_layers {
            return bad(format!(
                "dense_layers {} leaves no gated layer in a model of {} layers",
                self.dense_layers, c.num_layers
            ));
        }
        let finite = self.rope_theta.is_finite() && self.rope_theta > 1.0;
        if !(finite && self.norm_eps > 0.0 && self.norm_eps < 1.0) {
            return bad("rope_theta must be above 1 and norm_eps within (0, 1)".into());
        }
        if self.budget < self.block_size {
            return bad(format!(
                "budget {} is below one block of {}",
                self.budget, self.block_size
            ));
        }
        Ok(())
    }
}
