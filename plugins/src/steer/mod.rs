//! Steering vectors: a fixed direction added to the residual stream after chosen decoder layers
//! (activation addition; Turner et al., arXiv 2308.10248; the llama.cpp / repeng control
//! vectors, algorithms.md section 1.3). Reference implementation: llama.cpp's
//! `llama_adapter_cvec::apply_to`, which adds `direction.N` to the output of layer N at every
//! position, prompt and generated.
//!
//! Per request: `scale` (negative steers away; default 1) multiplies the file's directions, and
//! `layers: [first, last]` (inclusive, 0-based) keeps only the directions in that range (default:
//! every layer in the file). Rows with different vectors, scales or ranges share a step: the
//! decoder groups rows by vector, and within a group each row gets its own coefficient.
//!
//! Because prompt positions are steered too, the KV cache of a steered request differs from the
//! base model's; graft keeps one cache per sequence and a sequence's chain never changes, so
//! nothing is shared that should not be.

mod file;
pub mod train;

use std::path::Path;
use std::sync::Arc;

use candle_core::Tensor;
use models::hooks::HookParams;
use models::{Hook, HookGroup, HookPoints, PrefixReuse};
use serde_json::{Map, Value};

pub use file::{ControlVector, ARCHITECTURE};

use crate::base::BaseModel;
use crate::error::{PluginError, Result};
use crate::files::{FileRole, PluginFiles};
use crate::kinds::PluginKind;
use crate::params;
use crate::plugin::Plugin;
use crate::weights;

/// The coefficient range a request may ask for: unit directions need coefficients of a few
/// units on small models; beyond this a value is a typo, not an intent.
const SCALE_RANGE: (f32, f32) = (-64.0, 64.0);

/// Per-request parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SteerParams {
    pub scale: f32,
    /// Inclusive layer range whose directions apply.
    pub first: usize,
    pub last: usize,
}

impl SteerParams {
    fn coefficient(&self, layer: usize) -> f32 {
        match (self.first..=self.last).contains(&layer) {
            true => self.scale,
            false => 0.0,
        }
    }
}

/// A loaded control vector; one [`Hook`] for every request that selects it.
#[derive(Debug)]
pub struct SteeringVector {
    name: String,
    /// Indexed by layer: the direction as `(1, hidden)`, on the model's device.
    directions: Vec<Option<Tensor>>,
    /// First and last layer that have a direction.
    span: (usize, usize),
    bytes: usize,
}

impl SteeringVector {
    /// Loads a control-vector GGUF and checks it against the base model's shape.
    pub fn load(
        name: &str,
        path: &Path,
        base: &BaseModel,
        files: &mut PluginFiles,
    ) -> Result<Self> {
        let bytes = files.read(path, FileRole::Tensors)?;
        Self::from_control_vector(name, &ControlVector::parse(path, &bytes)?, base)
    }

    pub fn from_control_vector(name: &str, cv: &ControlVector, base: &BaseModel) -> Result<Self> {
        let (layers, hidden) = (base.config.num_layers, base.config.hidden_size);
        let mut directions = vec![None; layers];
        for (&layer, values) in &cv.directions {
            if layer >= layers {
                let m = format!("direction.{layer} is beyond the base model's {layers} layers");
                return Err(PluginError::incompatible(name, m));
            }
            if values.len() != hidden {
                let m = format!(
                    "direction.{layer} has {} values, the base model's hidden size is {hidden}",
                    values.len()
                );
                return Err(PluginError::incompatible(name, m));
            }
            weights::check_values(name, &format!("direction.{layer}"), values)?;
            directions[layer] = Some(Tensor::from_slice(values, (1, hidden), &base.device)?);
        }
        let first = cv.directions.keys().next().copied().unwrap_or(1);
        let last = cv.directions.keys().next_back().copied().unwrap_or(first);
        Ok(Self {
            name: name.to_string(),
            directions,
            span: (first, last),
            bytes: cv.directions.len() * hidden * 4,
        })
    }

    /// The first and last layer with a direction.
    pub fn span(&self) -> (usize, usize) {
        self.span
    }
}

impl Hook for SteeringVector {
    fn name(&self) -> &str {
        &self.name
    }

    fn points(&self) -> HookPoints {
        HookPoints {
            residual: true,
            ..HookPoints::default()
        }
    }

    /// The vector changes keys and values of the layers after the ones it steers, by scale.
    fn prefix_reuse(&self, params: &HookParams) -> PrefixReuse {
        crate::params::reuse_keyed_by::<SteerParams>(params)
    }

    /// `h`: `(group tokens, hidden)`; returns `h + c_row * direction[layer]`, each row's
    /// coefficient `c_row` from its scale and layer range, or `None` when every `c_row` is 0.
    fn residual(
        &self,
        layer: usize,
        group: &HookGroup<'_>,
        h: &Tensor,
    ) -> models::Result<Option<Tensor>> {
        let Some(Some(dir)) = self.directions.get(layer) else {
            return Ok(None);
        };
        let per_entry = group.per_entry(group.rows.iter().map(|r| {
            r.params
                .downcast_ref::<SteerParams>()
                .map_or(0.0, |p| p.coefficient(layer))
        }));
        add_along(h, per_entry, dir)
    }
}

/// `h + c_e * direction` for every entry `e` of `h` (`(entries, hidden)`; `per_entry[e] = c_e`,
/// `direction`: `(hidden,)` or `(1, hidden)`), or `None` when every coefficient is 0 so the
/// residual is left as it is. The residual add of every steering plug-in.
pub(crate) fn add_along(
    h: &Tensor,
    per_entry: Vec<f32>,
    direction: &Tensor,
) -> models::Result<Option<Tensor>> {
    let Some(&first) = per_entry.first() else {
        return Ok(None);
    };
    if per_entry.iter().all(|&c| c == 0.0) {
        return Ok(None);
    }
    let direction = direction.to_dtype(h.dtype())?;
    if per_entry.iter().all(|&c| c == first) {
        return Ok(Some(h.broadcast_add(&(direction * f64::from(first))?)?));
    }
    let column = Tensor::from_vec(per_entry, (h.dim(0)?, 1), h.device())?.to_dtype(h.dtype())?;
    Ok(Some((h + column.broadcast_mul(&direction)?)?))
}

impl Plugin for SteeringVector {
    fn kind(&self) -> PluginKind {
        PluginKind::Steer
    }

    fn request_params(&self, p: &Map<String, Value>) -> Result<HookParams> {
        params::reject_unknown(&self.name, p, &["scale", "layers"])?;
        let scale = params::number(&self.name, p, "scale", 1.0, SCALE_RANGE)?;
        let (first, last) = match p.get("layers") {
            None => self.span,
            Some(v) => params::layer_range(&self.name, v, self.directions.len())?,
        };
        if !(first..=last).any(|l| self.directions.get(l).is_some_and(Option::is_some)) {
            let (a, b) = self.span;
            let message = format!(
                "[{first}, {last}] selects no direction of this vector (it has layers {a}..={b})"
            );
            return Err(PluginError::BadParameter {
                plugin: self.name.clone(),
                param: "layers".into(),
                message,
            });
        }
        Ok(Arc::new(SteerParams { scale, first, last }))
    }

    fn resident_bytes(&self) -> usize {
        self.bytes
    }
}

/// A unit vector of `hidden` values, for tests and the random-direction control.
pub fn unit(values: Vec<f32>) -> Vec<f32> {
    let norm = values.iter().map(|v| v * v).sum::<f32>().sqrt();
    match norm > 0.0 {
        true => values.into_iter().map(|v| v / norm).collect(),
        false => values,
    }
}
