//! `config.json` of a vision-pruning plug-in: the base model, the layer after which image
//! tokens are pruned, the image token, how the kept ones are chosen, and the kept fraction a
//! request gets when it names none.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::module::ModuleShape;
use crate::base::{check_made_for, BaseIdentity, BaseModel};
use crate::error::{PluginError, Result};

pub const TYPE: &str = "vision_prune";
pub const CONFIG_FILE: &str = "config.json";

/// How the image tokens that stay are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scorer {
    /// A seeded random subset: the baseline a learned choice must beat (LVPruning's "random
    /// pruning"), and what the prefill speed of a keep ratio is measured with (it does not
    /// depend on which tokens stay).
    Random,
    /// FastV (Chen et al. 2024): the image tokens the prompt's last token attends to most, on
    /// average over the heads of the layer after the pruning layer. Needs the instruction in
    /// the same prefill chunk as the image, as every language-guided choice does.
    Attention,
    /// LVPruning: a trained decision module ([`super::module`]) scores each image token
    /// against the instruction; the highest scores stay.
    Learned,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisionPruneConfig {
    /// Always [`TYPE`].
    #[serde(rename = "type")]
    pub kind: String,
    pub base_model: BaseIdentity,
    /// Image tokens are pruned after this layer (0-based; LVPruning's middle layer): the
    /// layers after it neither compute the dropped ones nor keep their keys and values.
    pub layer: usize,
    /// The token id each image feature is spliced at (the vision tower's `image_token_id`).
    pub image_token_id: u32,
    pub scorer: Scorer,
    /// Fraction of each prompt's image tokens kept when a request names none, in (0, 1]:
    /// for a trained module, the fraction it was trained to keep.
    pub keep: f32,
    /// The decision module's size, with the `learned` scorer (its weights are in
    /// [`super::module::WEIGHTS_FILE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<ModuleShape>,
}

impl VisionPruneConfig {
    pub fn read(path: &Path, bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| PluginError::bad_file(path, e))
    }

    /// Checks the config against itself and against the base model.
    pub fn check(&self, name: &str, base: &BaseModel) -> Result<()> {
        check_made_for(name, &self.kind, TYPE, &self.base_model, base)?;
        let bad = |m: String| Err(PluginError::incompatible(name, m));
        let layers = base.config.num_layers;
        if self.layer + 1 >= layers {
            return bad(format!(
                "layer {} leaves no layer after it to save (the model has {layers})",
                self.layer
            ));
        }
        if self.image_token_id as usize >= base.config.vocab_size {
            return bad(format!(
                "image_token_id {} is outside the vocabulary of {}",
                self.image_token_id, base.config.vocab_size
            ));
        }
        if !(self.keep > 0.0 && self.keep <= 1.0) {
            return bad(format!("keep must lie within (0, 1], got {}", self.keep));
        }
        match (self.scorer, self.module) {
            (Scorer::Learned, None) => bad("the learned scorer needs a `module` shape".into()),
            (Scorer::Learned, Some(m)) => m.problem().map_or(Ok(()), bad),
            (_, Some(_)) => bad("`module` is read only by the learned scorer".into()),
            (_, None) => Ok(()),
        }
    }
}
