//! Vision-token pruning (LVPruning, Sun et al. 2024, "An Effective yet Simple Language-Guided
//! Vision Token Pruning Approach for Multi-modal Large Language Models"): after a middle layer,
//! most of a prompt's image tokens leave the forward pass, so the later layers' prefill and
//! every decode step read fewer tokens. The model is unchanged; what is removed is chosen per
//! prompt.
//!
//! `{"type": "vision_prune", "name": ..., "keep": 0.25, "seed": 0}`. The plug-in stands on the
//! runtime's pruning hook ([`models::Hook::prune`]): the kept tokens keep their positions,
//! later layers store only their keys and values, and rows with and without pruning share a
//! step. It prunes the prefill chunk whose logits are wanted and asks for the whole prompt in
//! one step ([`models::Hook::whole_prompt`]), which the scheduler grants where a step can hold
//! it; a prompt too long for that keeps the image tokens of its earlier chunks. Scorers: `random` (the
//! baseline, and what prefill speed is measured with), `attention` (FastV: the image tokens
//! the prompt's last token attends to most in the next layer) and `learned` (LVPruning's
//! decision module, [`module`], trained by [`train`] with `server train vision-prune`).

pub mod choose;
pub mod config;
pub mod eval;
pub mod flops;
pub mod module;
pub mod train;

use std::path::Path;
use std::sync::Arc;

use candle_core::Tensor;
use models::hooks::{HookGroup, HookParams, HookPoints, HookRow};
use models::{AttentionProbe, Hook, LogitsWanted};
use serde_json::{Map, Value};

use crate::base::BaseModel;
use crate::error::{PluginError, Result};
use crate::files::{FileRole, PluginFiles};
use crate::kinds::PluginKind;
use crate::params;
use crate::plugin::Plugin;
pub use config::{Scorer, VisionPruneConfig, CONFIG_FILE, TYPE};
use module::{DecisionModule, WEIGHTS_FILE};

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
    /// With the `learned` scorer, on the base model's device.
    module: Option<DecisionModule>,
}

impl VisionPrune {
    /// Loads `dir/config.json` and, for the `learned` scorer, `dir/decision.safetensors`.
    pub fn load(name: &str, dir: &Path, base: &BaseModel, files: &mut PluginFiles) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        let config = VisionPruneConfig::read(&path, &files.read(&path, FileRole::Config)?)?;
        config.check(name, base)?;
        let module = match config.module {
            Some(shape) => {
                let path = dir.join(WEIGHTS_FILE);
                let bytes = files.read(&path, FileRole::Tensors)?;
                Some(read_module(name, &path, &bytes, shape, base)?)
            }
            None => None,
        };
        Self::new(name, config, module, base)
    }

    /// A plug-in from its config (and trained module), checked like a loaded one.
    pub fn new(
        name: &str,
        config: VisionPruneConfig,
        module: Option<DecisionModule>,
        base: &BaseModel,
    ) -> Result<Self> {
        config.check(name, base)?;
        let module = match (config.module, module) {
            (Some(shape), Some(m)) if m.shape() == shape => Some(m.to_device(&base.device)?),
            (None, None) => None,
            _ => {
                return Err(PluginError::incompatible(
                    name,
                    "the decision module does not match config.json's `module`",
                ))
            }
        };
        Ok(Self {
            name: name.to_string(),
            config,
            module,
        })
    }

    pub fn config(&self) -> &VisionPruneConfig {
        &self.config
    }

    /// Writes `dir/config.json` and, with a module, `dir/decision.safetensors`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        crate::files::write_config(dir, &self.config)?;
        if let Some(m) = &self.module {
            let tensors: std::collections::HashMap<String, Tensor> =
                m.weights().iter().cloned().collect();
            candle_core::safetensors::save(&tensors, dir.join(WEIGHTS_FILE))?;
        }
        Ok(())
    }

    /// The offsets of a whole row's tokens that stay, or `None` for all of them. `h`: the
    /// row's hidden states after the pruning layer.
    fn keep(
        &self,
        row: &HookRow<'_>,
        h: &Tensor,
        p: &PruneParams,
        probe: &AttentionProbe<'_>,
    ) -> models::Result<Option<Vec<usize>>> {
        let images = choose::image_offsets(row.tokens, self.config.image_token_id);
        if p.keep >= 1.0 || images.is_empty() {
            return Ok(None);
        }
        let len = row.tokens.len();
        Ok(Some(match self.config.scorer {
            Scorer::Random => choose::keep_random(len, &images, p.keep, p.seed),
            Scorer::Attention => {
                let positions: Vec<u32> = row.positions().map(|p| p as u32).collect();
                let attention = probe
                    .last_token_attention(h, &positions)?
                    .to_vec1::<f32>()?;
                choose::keep_top(len, &images, p.keep, &attention)
            }
            Scorer::Learned => {
                let logits = self.learned_scores(row.tokens, &images, h)?;
                choose::keep_top(len, &images, p.keep, &logits)
            }
        }))
    }

    /// The decision module's keep logits, indexed by offset (text offsets score -inf): image
    /// tokens read the instruction, every text token after the first image token.
    fn learned_scores(
        &self,
        tokens: &[u32],
        images: &[usize],
        h: &Tensor,
    ) -> models::Result<Vec<f32>> {
        let module = self
            .module
            .as_ref()
            .ok_or_else(|| models::ModelError::Hook {
                hook: self.name.clone(),
                message: "the learned scorer has no decision module".into(),
            })?;
        let instruction = choose::instruction_offsets(tokens.len(), images);
        Ok(module.scores(h, tokens.len(), images, &instruction)?)
    }
}

/// The decision module in `bytes` (`path`), every tensor's name, shape and values checked.
fn read_module(
    name: &str,
    path: &Path,
    bytes: &[u8],
    shape: module::ModuleShape,
    base: &BaseModel,
) -> Result<DecisionModule> {
    use candle_core::safetensors::Load;
    let tensors =
        safetensors::SafeTensors::deserialize(bytes).map_err(|e| PluginError::bad_file(path, e))?;
    let weights = shape
        .weights(base.config.hidden_size)
        .into_iter()
        .map(|(tensor, dims)| {
            let missing = || {
                PluginError::incompatible(
                    name,
                    format!("tensor `{tensor}` is missing from {WEIGHTS_FILE}"),
                )
            };
            let t = tensors.tensor(tensor).map_err(|_| missing())?;
            let t = t
                .load(&candle_core::Device::Cpu)?
                .to_dtype(candle_core::DType::F32)?;
            if t.dims() != dims.as_slice() {
                return Err(PluginError::incompatible(
                    name,
                    format!(
                        "tensor `{tensor}` has shape {:?}, expected {dims:?}",
                        t.dims()
                    ),
                ));
            }
            crate::weights::check_tensor(name, &format!("tensor `{tensor}`"), &t)?;
            Ok((tensor.to_string(), t))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(DecisionModule::new(shape, weights))
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

    /// The choice reads the instruction after the image: the prompt must come in one step.
    fn whole_prompt(&self, _params: &HookParams) -> bool {
        true
    }

    /// After [`VisionPruneConfig::layer`], for each row feeding the last chunk of a prompt
    /// (it wants its last position's logits) that holds image tokens.
    fn prune(
        &self,
        layer: usize,
        group: &HookGroup<'_>,
        h: &Tensor,
        probe: &AttentionProbe<'_>,
    ) -> models::Result<Option<Vec<Option<Vec<usize>>>>> {
        if layer != self.config.layer {
            return Ok(None);
        }
        let mut kept = Vec::with_capacity(group.rows.len());
        let mut offset = 0;
        for (row, &len) in group.rows.iter().zip(&group.lengths) {
            let p = row.params.downcast_ref::<PruneParams>();
            let wanted = row.logits == LogitsWanted::Last && len == row.tokens.len();
            kept.push(match p.filter(|_| wanted) {
                Some(p) => self.keep(row, &h.narrow(0, offset, len)?, p, probe)?,
                None => None,
            });
            offset += len;
        }
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

    /// The decision module's weights (f32); the built-in scorers hold none.
    fn resident_bytes(&self) -> usize {
        self.module.as_ref().map_or(0, |m| {
            m.weights()
                .iter()
                .map(|(_, t)| t.elem_count())
                .sum::<usize>()
                * 4
        })
    }
}
