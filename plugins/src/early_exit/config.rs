//! `config.json` of an early-exit plug-in: the base model it was trained on, the layers that
//! have a predictor, the layers always checked, and the defaults a request may override.
//!
//! The predictors and the draft table are in `predictors.safetensors` beside it:
//! `layers.<l>.fc1.weight` `(hidden_units, 3k)`, `layers.<l>.fc1.bias` `(hidden_units)`,
//! `layers.<l>.fc2.weight` `(1, hidden_units)`, `layers.<l>.fc2.bias` `(1)` for every layer
//! `l` of `layers` (SpecEE's per-layer MLP), and `draft_table` `(vocab, k)` u32.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::base::{check_made_for, BaseIdentity, BaseModel};
use crate::error::{PluginError, Result};

pub const TYPE: &str = "early_exit";
pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "predictors.safetensors";

/// Longest n-gram prompt lookup may match when drafting candidates.
pub const MAX_LOOKUP: usize = 16;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyExitConfig {
    /// Always [`TYPE`].
    #[serde(rename = "type")]
    pub kind: String,
    pub base_model: BaseIdentity,
    /// Layers (0-based) with a predictor, ascending; each at least 1 (its features read the
    /// layer before) and below `num_layers - 2` (an exit later saves less than its check
    /// costs).
    pub layers: Vec<usize>,
    /// Layers whose predictor runs for every token (SpecEE's offline schedule: where most
    /// training exits fell); the last tokens' exit layers add their neighbours online.
    pub offline_layers: Vec<usize>,
    /// Candidate tokens scored at each layer (SpecEE's k).
    pub draft_tokens: usize,
    /// Longest n-gram prompt lookup matches when drafting candidates.
    pub lookup_max: usize,
    pub hidden_units: usize,
    /// Predictor probability above which a layer's top token is checked, when a request
    /// names none.
    pub threshold: f32,
    /// Tokens may leave only in steps running at most this many rows: with more, a row that
    /// leaves costs more (its own LM-head check, a repacked batch, its keys and values
    /// projected alone) than the layers it skips (docs/BENCHMARKS.md, "Early exit").
    #[serde(default = "one")]
    pub max_batch_rows: usize,
}

fn one() -> usize {
    1
}

impl EarlyExitConfig {
    pub fn read(path: &Path, bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| PluginError::bad_file(path, e))
    }

    /// Features a predictor reads: z, p and Δp over the candidates.
    pub fn features(&self) -> usize {
        3 * self.draft_tokens
    }

    /// Checks the config against itself and against the base model.
    pub fn check(&self, name: &str, base: &BaseModel) -> Result<()> {
        check_made_for(name, &self.kind, TYPE, &self.base_model, base)?;
        let bad = |m: String| Err(PluginError::incompatible(name, m));
        let expected = &self.base_model;
        let top = expected.num_layers.saturating_sub(3);
        let ascending = |l: &[usize]| l.windows(2).all(|w| w[0] < w[1]);
        if self.layers.is_empty() || !ascending(&self.layers) {
            return bad("layers must be non-empty and ascending without repeats".into());
        }
        if self.layers[0] == 0 || self.layers[self.layers.len() - 1] > top {
            return bad(format!(
                "layers {:?} must lie within [1, {top}] for a model of {} layers",
                self.layers, expected.num_layers
            ));
        }
        if !ascending(&self.offline_layers)
            || !self.offline_layers.iter().all(|l| self.layers.contains(l))
        {
            return bad("offline_layers must be ascending and each one of layers".into());
        }
        if !(1..=16).contains(&self.draft_tokens) || !(1..=MAX_LOOKUP).contains(&self.lookup_max) {
            return bad("draft_tokens and lookup_max must lie within [1, 16]".into());
        }
        if self.hidden_units == 0
            || self.max_batch_rows == 0
            || !(self.threshold > 0.0 && self.threshold <= 1.0)
        {
            return bad(
                "hidden_units and max_batch_rows must be positive, threshold within (0, 1]".into(),
            );
        }
        Ok(())
    }
}
