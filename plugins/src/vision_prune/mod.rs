//! Vision-token pruning (LVPruning, Sun et al. 2024, "An Effective yet Simple Language-Guided
//! Vision Token Pruning Approach for Multi-modal Large Language Models"): after a middle layer,
//! most of a prompt's image tokens leave the forward pass, so the later layers' prefill and
//! every decode step read fewer tokens. The model is unchanged; what is removed is chosen per
//! prompt.
//!
//! `{"type": "vision_prune", "name": ..., "keep": 0.25, "seed": 0}`. The plug-in stands on the
//! runtime's pruning hook ([`models::Hook::prune`]): the kept tokens keep their positions,
//! later layers store only their keys and values, and rows with and without pruning share a
//! step. It prunes a prompt's last prefill chunk (the one whose logits are wanted), so a prompt
//! longer than one chunk keeps the image tokens of its earlier chunks. Scorers: `random` (the
//! baseline, and what prefill speed is measured with). LVPruning's learned decision modules
//! (cross-attention from image tokens to the instruction) and their trainer are not built yet.

pub mod choose;
pub mod config;
pub mod flops;

use std::path::Path;
use std::sync::Arc;

use candle_core::Tensor;
use models::hooks::{HookGroup, HookParams, HookPoints};
use models::{Hook, LogitsWanted};
use serde_json::{Map, Value};

use crate::base::BaseModel;
use crate::error::Result;
use crate::files::{FileRole, PluginFiles};
use crate::kinds::PluginKind;
use crate::params;
use crate::plugin::Plugin;
pub use config::{Scorer, VisionPruneConfig, CONFIG_FILE, TYPE};

/// What a request asked for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PruneParams {
    /// Fraction of each prompt's image tokens kept, in (0, 1].
    pub keep: f32,
    /// Seed of the random scorer.
    pub seed: u64,
}

/// A loaded vision-pruning plug-in.
#[derive(Debug)]
pub struct VisionPrune {
    name: String,
    config: VisionPruneConfig,
}

impl VisionPrune {
    pub fn load(name: &str, dir: &Path, base: &BaseModel, files: &mut PluginFiles) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        let config = VisionPruneConfig::read(&path, &files.read(&path, FileRole::Config)?)?;
        Self::new(name, config, base)
    }

    /// A plug-in from its config, checked like a loaded one.
    pub fn new(name: &str, config: VisionPruneConfig, base: &BaseModel) -> Result<Self> {
        config.check(name, base)?;
        Ok(Self {
            name: name.to_string(),
            config,
        })
    }

    /// The offsets of a row's `len` tokens that stay, or `None` for all of them.
    fn keep(&self, tokens: &[u32], len: usize, p: &PruneParams) -> Option<Vec<usize>> {
        if p.keep >= 1.0 || len != tokens.len() {
            // Keeping everything, or a row another hook already pruned: leave it whole.
            return None;
        }
        let images = choose::image_offsets(tokens, self.config.image_token_id);
        if images.is_empty() {
            return None;
        }
        Some(match self.config.scorer {
            Scorer::Random => choose::keep_random(len, &images, p.keep, p.seed),
        })
    }
}

impl Hook for VisionPrune {
    fn name(&self) -> &str {
        &self.name
    }

    fn points(&self) -> HookPoints {
        HookPoints {
            prune: true,
            ..HookPoints::default()
        }
    }

    /// After [`VisionPruneConfig::layer`], for each row feeding the last chunk of a prompt
    /// (it wants its last position's logits) that holds image tokens.
    fn prune(
        &self,
        layer: usize,
        group: &HookGroup<'_>,
        _h: &Tensor,
    ) -> models::Result<Option<Vec<Option<Vec<usize>>>>> {
        if layer != self.config.layer {
            return Ok(None);
        }
        let kept = group
            .rows
            .iter()
            .zip(&group.lengths)
            .map(|(row, &len)| {
                let p = row.params.downcast_ref::<PruneParams>()?;
                (row.logits == LogitsWanted::Last)
                    .then(|| self.keep(row.tokens, len, p))
                    .flatten()
            })
            .collect();
        Ok(Some(kept))
    }
}

impl Plugin for VisionPrune {
    fn kind(&self) -> PluginKind {
        PluginKind::VisionPrune
    }

    fn request_params(&self, p: &Map<String, Value>) -> Result<HookParams> {
        params::reject_unknown(&self.name, p, &["keep", "seed"])?;
        let keep = params::number(&self.name, p, "keep", self.config.keep, (1e-6, 1.0))?;
        let seed = params::count(&self.name, p, "seed", (0, usize::MAX))?.unwrap_or(0);
        Ok(Arc::new(PruneParams {
            keep,
            seed: seed as u64,
        }))
    }

    fn resident_bytes(&self) -> usize {
        0
    }
}
