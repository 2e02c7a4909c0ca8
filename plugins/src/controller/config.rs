//! `config.json` of a steering controller: what it reads, what it steers, and the base model it
//! was trained on (checked at load: a controller trained on another model would read and write
//! activations it knows nothing about).

use std::path::Path;

use serde::{Deserialize, Serialize};

pub use crate::base::BaseIdentity;
use crate::base::{check_made_for, BaseModel};
use crate::error::{PluginError, Result};

pub const TYPE: &str = "steering_controller";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// Always [`TYPE`].
    #[serde(rename = "type")]
    pub kind: String,
    pub base_model: BaseIdentity,
    /// Layers whose output at the last prompt token the controller reads, ascending.
    pub input_layers: Vec<usize>,
    /// Inclusive range of layers it steers. The decision is made at the last input layer, so
    /// on the last prompt token only the steered layers after it act; generated tokens get
    /// every steered layer.
    pub steered_layers: (usize, usize),
    /// Width of the controller's hidden layer.
    pub hidden_units: usize,
    /// The patch scale α of `Δh_l = s · w_l · α · d_l`.
    pub alpha: f32,
    /// The default decay τ of the patch over generated tokens (token `t` gets `exp(-t/τ)` of
    /// it) when a request names none; absent: the full patch on every token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decay: Option<f32>,
}

impl ControllerConfig {
    pub fn read(path: &Path, bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| PluginError::bad_file(path, e))
    }

    /// Checks the config against itself and against the base model.
    pub fn check(&self, name: &str, base: &BaseModel) -> Result<()> {
        check_made_for(name, &self.kind, TYPE, &self.base_model, base)?;
        let bad = |m: String| Err(PluginError::incompatible(name, m));
        let expected = &self.base_model;
        let last_input = self.input_layers.iter().copied().max();
        let (first, last) = self.steered_layers;
        let sorted = self.input_layers.windows(2).all(|w| w[0] < w[1]);
        match last_input {
            None => bad("input_layers is empty".into()),
            Some(_) if !sorted => bad("input_layers must be ascending without repeats".into()),
            Some(l) if l >= expected.num_layers || first > last || last >= expected.num_layers => bad(format!(
                "input layers up to {l} and steered_layers [{first}, {last}] must lie below layer {}",
                expected.num_layers
            )),
            Some(_) if self.hidden_units == 0 || !self.alpha.is_finite() => {
                bad("hidden_units must be positive and alpha finite".into())
            }
            Some(_) if self.decay.is_some_and(|d| !(d.is_finite() && d > 0.0)) => {
                bad(format!("decay must be positive, not {:?}", self.decay))
            }
            Some(_) => Ok(()),
        }
    }
}
