//! LoRA adapters in the PEFT format (Hu et al., "LoRA: Low-Rank Adaptation of Large Language
//! Models", arXiv 2106.09685; rsLoRA: Kalajdzievski, arXiv 2312.03732).
//!
//! A targeted projection computes `y = W0 x + s * B (A x)` with `s = alpha / r` (rsLoRA:
//! `alpha / sqrt(r)`) times the request's `scale`. Reference implementation: PEFT
//! `tuners/lora/layer.py` (`Linear.forward`, unmerged path).
//!
//! Serving departs from PEFT in one way: the adapter is never merged into the weights. The
//! base matmul runs once for the whole batch, and the decoder calls this hook once per
//! projection for the rows whose chain holds this adapter (their activations gathered into
//! one matrix), so the delta costs two thin matmuls per adapter group: the segmented form of
//! Punica's SGMV, on whatever device the model is on.
//!
//! Weight layout: graft's decoder keeps q/k rows in Hugging Face's half-split RoPE order for
//! every checkpoint (the GGUF loader undoes llama.cpp's interleaving permutation), so PEFT's
//! `lora_B` rows for `q_proj`/`k_proj` apply as they are. Adding them to the permuted GGUF
//! rows instead would change outputs silently; the reference test against PEFT pins it.

mod config;
mod names;
pub mod tiny;
pub mod train;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::safetensors::Load;
use candle_core::{DType, Tensor};
use models::hooks::HookParams;
use models::kernels::LowRankBf16;
use models::{Hook, HookGroup, HookPoints, PrefixReuse, Projection};
use safetensors::SafeTensors;
use serde_json::{Map, Value};

pub use config::{LoraConfig, Targets, SUPPORTED_MODULES};
pub use names::{module_path, Factor, TensorName};

use crate::base::BaseModel;
use crate::error::{PluginError, Result};
use crate::files::{FileRole, PluginFiles};
use crate::kinds::PluginKind;
use crate::params;
use crate::plugin::Plugin;
use crate::weights;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Per-request parameters: `{"scale": s}` multiplies the adapter's delta (default 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraParams {
    pub scale: f32,
}

/// The scale range a request may ask for; beyond it a value is far more likely a typo than
/// an intent (the adapter's own `alpha / r` is already folded in).
const SCALE_RANGE: (f32, f32) = (-10.0, 10.0);

/// One adapted projection.
#[derive(Debug, Clone)]
enum LoraModule {
    /// On the CPU: bf16 factors read by our kernel (half the memory traffic of f32 per step;
    /// exact for bf16 files) and the config's scaling kept apart so it is never rounded in.
    Cpu { factors: LowRankBf16, scaling: f32 },
    /// On an accelerator: f32 tensors and the device's matmuls.
    Device {
        /// `A^T`: `(in_features, r)`.
        a_t: Tensor,
        /// `s * B^T`: `(r, out_features)`, the config's scaling folded in.
        b_t: Tensor,
    },
}

impl LoraModule {
    /// `a`: `(r, in)`; `b`: `(out, r)`; `scaling`: `alpha / r` or rsLoRA's `alpha / sqrt(r)`.
    fn new(a: &Tensor, b: &Tensor, scaling: f64) -> candle_core::Result<Self> {
        Ok(if a.device().is_cpu() {
            Self::Cpu {
                factors: LowRankBf16::new(a, &b.t()?.contiguous()?)?,
                scaling: scaling as f32,
            }
        } else {
            Self::Device {
                a_t: a.t()?.contiguous()?,
                b_t: (b * scaling)?.t()?.contiguous()?,
            }
        })
    }

    fn bytes(&self) -> usize {
        match self {
            Self::Cpu { factors, .. } => factors.bytes(),
            Self::Device { a_t, b_t } => {
                (a_t.elem_count() + b_t.elem_count()) * DType::F32.size_in_bytes()
            }
        }
    }

    /// `x`: `(tokens, in)`; `scales`: each token's request scale. Returns `(tokens, out)` in
    /// `x`'s dtype.
    fn delta(&self, x: &Tensor, mut scales: Vec<f32>) -> candle_core::Result<Tensor> {
        let x32 = x.to_dtype(DType::F32)?;
        let n = scales.len();
        let delta = match self {
            Self::Cpu { factors, scaling } => {
                scales.iter_mut().for_each(|s| *s *= scaling);
                let xv = x32.flatten_all()?.to_vec1::<f32>()?;
                let d = factors.delta(&xv, &scales);
                Tensor::from_vec(d, (n, factors.out_features()), x.device())?
            }
            Self::Device { a_t, b_t } => {
                let d = x32.matmul(a_t)?.matmul(b_t)?; // (n, r) then (n, out)
                let column = Tensor::from_vec(scales, (n, 1), x.device())?;
                d.broadcast_mul(&column)?
            }
        };
        delta.to_dtype(x.dtype())
    }
}

/// A loaded LoRA adapter; one [`Hook`] serving every request that selects it.
#[derive(Debug)]
pub struct LoraAdapter {
    name: String,
    /// Indexed by `layer * 7 + projection`; `None` where the adapter leaves the base alone.
    modules: Vec<Option<LoraModule>>,
    max_rank: usize,
    bytes: usize,
}

/// The seven projections LoRA can adapt, in the order of [`slot`].
pub const ALL_PROJECTIONS: [Projection; 7] = [
    Projection::Q,
    Projection::K,
    Projection::V,
    Projection::O,
    Projection::Gate,
    Projection::Up,
    Projection::Down,
];

/// Where a projection sits in a per-layer table of the seven adaptable projections
/// (`layer * 7 + index`); `None` for the LM head, which LoRA here never targets.
pub(crate) fn slot(layer: usize, projection: Projection) -> Option<usize> {
    let p = match projection {
        Projection::Q => 0,
        Projection::K => 1,
        Projection::V => 2,
        Projection::O => 3,
        Projection::Gate => 4,
        Projection::Up => 5,
        Projection::Down => 6,
        Projection::LmHead => return None,
    };
    Some(layer * 7 + p)
}

impl LoraAdapter {
    /// Loads `dir/adapter_config.json` and `dir/adapter_model.safetensors` and checks every
    /// tensor against the config and the base model; any mismatch refuses the whole adapter.
    pub fn load(name: &str, dir: &Path, base: &BaseModel, files: &mut PluginFiles) -> Result<Self> {
        let config_path = dir.join(CONFIG_FILE);
        let config = LoraConfig::parse(&config_path, &files.read(&config_path, FileRole::Config)?)?;
        let weights_path = dir.join(WEIGHTS_FILE);
        let weights_bytes = files.read(&weights_path, FileRole::Tensors)?;
        let tensors = SafeTensors::deserialize(&weights_bytes)
            .map_err(|e| PluginError::bad_file(&weights_path, e))?;
        let factors = read_factors(name, &tensors, &config, base)?;
        Self::build(name, factors, &config, base)
    }

    /// Checks each module's factor pair and folds the scaling in.
    fn build(name: &str, factors: Factors, config: &LoraConfig, base: &BaseModel) -> Result<Self> {
        if factors.is_empty() {
            return Err(PluginError::incompatible(
                name,
                "the adapter holds no LoRA tensors",
            ));
        }
        let mut modules = vec![None; base.config.num_layers * 7];
        let (mut max_rank, mut bytes) = (0, 0);
        for ((layer, s), FactorPair { projection, a, b }) in factors {
            let path = module_path(layer, projection);
            let (Some(a), Some(b)) = (a, b) else {
                return Err(PluginError::incompatible(
                    name,
                    format!("{path} has only one of lora_A and lora_B"),
                ));
            };
            let (r, alpha) = config.rank_and_alpha(&path);
            let (out, inp) = base.projection_shape(projection);
            check_shape(name, &path, "lora_A", &a, &[r, inp])?;
            check_shape(name, &path, "lora_B", &b, &[out, r])?;
            let scaling = config.scaling(r, alpha);
            let module = LoraModule::new(&a, &b, scaling)?;
            bytes += module.bytes();
            max_rank = max_rank.max(r);
            modules[s] = Some(module);
        }
        Ok(Self {
            name: name.to_string(),
            modules,
            max_rank,
            bytes,
        })
    }

    fn module(&self, layer: usize, projection: Projection) -> Option<&LoraModule> {
        slot(layer, projection).and_then(|s| self.modules.get(s)?.as_ref())
    }

    /// The largest rank among the adapted modules.
    pub fn max_rank(&self) -> usize {
        self.max_rank
    }

    /// How many projections the adapter changes.
    pub fn adapted_modules(&self) -> usize {
        self.modules.iter().flatten().count()
    }
}

/// The two factors of one module as read so far.
struct FactorPair {
    projection: Projection,
    a: Option<Tensor>,
    b: Option<Tensor>,
}

/// Keyed by `(layer, slot)`, so modules come out in layer order.
type Factors = BTreeMap<(usize, usize), FactorPair>;

/// Every tensor of the file as an `A` or `B` factor of a targeted module of the base model.
fn read_factors(
    name: &str,
    tensors: &SafeTensors<'_>,
    config: &LoraConfig,
    base: &BaseModel,
) -> Result<Factors> {
    let mut factors = Factors::new();
    for (tensor_name, view) in tensors.tensors() {
        let parsed = TensorName::parse(&tensor_name).ok_or_else(|| {
            PluginError::incompatible(
                name,
                format!("tensor `{tensor_name}` is not a LoRA factor of a q/k/v/o/gate/up/down projection"),
            )
        })?;
        let path = parsed.module_path();
        if parsed.layer >= base.config.num_layers {
            return Err(PluginError::incompatible(
                name,
                format!(
                    "tensor `{tensor_name}` is for layer {}, the base model has {} layers",
                    parsed.layer, base.config.num_layers
                ),
            ));
        }
        if !config.targets(&path) {
            return Err(PluginError::incompatible(
                name,
                format!("tensor `{tensor_name}` is for {path}, which target_modules does not list"),
            ));
        }
        if config
            .layers
            .as_ref()
            .is_some_and(|l| !l.contains(&parsed.layer))
        {
            return Err(PluginError::incompatible(
                name,
                format!("tensor `{tensor_name}` is outside layers_to_transform"),
            ));
        }
        let tensor = view
            .load(&base.device)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|e| {
                let e = models::error::candle_message(e);
                PluginError::incompatible(name, format!("tensor `{tensor_name}`: {e}"))
            })?;
        weights::check_tensor(name, &format!("tensor `{tensor_name}`"), &tensor)?;
        let s = slot(parsed.layer, parsed.projection).unwrap_or_default();
        let pair = factors.entry((parsed.layer, s)).or_insert(FactorPair {
            projection: parsed.projection,
            a: None,
            b: None,
        });
        match parsed.factor {
            Factor::A => pair.a = Some(tensor),
            Factor::B => pair.b = Some(tensor),
        }
    }
    Ok(factors)
}

fn check_shape(name: &str, path: &str, factor: &str, t: &Tensor, expected: &[usize]) -> Result<()> {
    if t.dims() == expected {
        return Ok(());
    }
    Err(PluginError::incompatible(
        name,
        format!(
            "{path}.{factor} has shape {:?}, the base model and the config's rank need {expected:?}",
            t.dims()
        ),
    ))
}

impl Hook for LoraAdapter {
    fn name(&self) -> &str {
        &self.name
    }

    fn points(&self) -> HookPoints {
        HookPoints {
            linear: true,
            ..HookPoints::default()
        }
    }

    /// The adapter changes keys and values in proportion to the request's scale.
    fn prefix_reuse(&self, params: &HookParams) -> PrefixReuse {
        crate::params::reuse_keyed_by::<LoraParams>(params)
    }

    fn targets(&self, layer: usize, projection: Projection) -> bool {
        self.module(layer, projection).is_some()
    }

    /// `x`: `(group tokens, in)`; returns `scale_row * s * B A x`, `(group tokens, out)`.
    fn linear_delta(
        &self,
        layer: usize,
        projection: Projection,
        group: &HookGroup<'_>,
        x: &Tensor,
    ) -> models::Result<Option<Tensor>> {
        let Some(m) = self.module(layer, projection) else {
            return Ok(None);
        };
        Ok(Some(m.delta(x, token_scales(group))?))
    }
}

/// Each entry's request `scale` (a row's scale repeated for each of its tokens).
fn token_scales(group: &HookGroup<'_>) -> Vec<f32> {
    group.per_entry(group.rows.iter().map(|r| {
        r.params
            .downcast_ref::<LoraParams>()
            .map_or(1.0, |p| p.scale)
    }))
}

impl Plugin for LoraAdapter {
    fn kind(&self) -> PluginKind {
        PluginKind::Lora
    }

    fn request_params(&self, p: &Map<String, Value>) -> Result<HookParams> {
        params::reject_unknown(&self.name, p, &["scale"])?;
        let scale = params::number(&self.name, p, "scale", 1.0, SCALE_RANGE)?;
        Ok(std::sync::Arc::new(LoraParams { scale }))
    }

    fn resident_bytes(&self) -> usize {
        self.bytes
    }
}
