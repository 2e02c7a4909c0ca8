//! The steering controller of "Guiding Giants: Lightweight Controllers for Weighted Activation
//! Steering in LLMs" (Hegazy et al., arXiv 2505.20309; algorithms.md section 1.2): a small MLP
//! reads the residual stream of a few intermediate layers at the prompt's last token and
//! decides, once per request, a global strength `s` and per-layer weights `w_l`; every later
//! token then gets `Δh_l = s · w_l · α · d_l` added to the output of each steered layer `l`,
//! where `d_l` is that layer's unit refusal direction. Steering thus happens mainly where the
//! prompt is harmful.
//!
//! Reference: the authors' code (`llmsteering/controller/network.py`), with the departures the
//! research notes recommend, each because the released code does not do what the paper says:
//! `s = σ(logit)` gates the patch (the code scales by the raw logit, pushing benign prompts
//! away from refusal); `w_l` are trained to a real signal (see `server train controller`), not
//! left at 0.5 by a regulariser; the decision is made in the prompt's own forward pass at the
//! last input layer, so steered layers after it already act on the last prompt token and
//! every steered layer acts on generated tokens (in the code, which reads the last four layers
//! and resets its state there, only the final layer is ever patched); and each
//! layer has its own refusal direction (mean difference of harmful and harmless activations at
//! that layer) where the paper uses one.
//!
//! Per-request state lives in the request's hook parameters (one decision per request, shared
//! by its `n` choices, which have the same prompt), so nothing outlives the request. A row is
//! treated as prompt while its request has no decision yet or it feeds more than one token;
//! a prompt whose last prefill chunk is a single token therefore uses the decision from the
//! chunk before (one token earlier), a difference too small to matter.

mod config;
pub mod eval;
pub mod recipe;
pub mod train;

use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor};
use models::hooks::HookParams;
use models::{Hook, HookGroup, HookPoints, PrefixReuse};
use serde_json::{Map, Value};

pub use config::{BaseIdentity, ControllerConfig, TYPE};

use crate::base::BaseModel;
use crate::error::{PluginError, Result};
use crate::files::{FileRole, PluginFiles};
use crate::kinds::PluginKind;
use crate::params;
use crate::plugin::Plugin;
use crate::steer::add_along;
use crate::weights;

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// The MLP `concat(h_inputs) -> fc1 -> ReLU -> fc2 -> [s_logit, w_logit_0..L)`.
#[derive(Debug, Clone)]
pub struct ControllerNet {
    /// `(inputs * hidden, units)`, transposed for `x @ w`.
    fc1_t: Tensor,
    fc1_b: Tensor,
    /// `(units, 1 + layers)`.
    fc2_t: Tensor,
    fc2_b: Tensor,
}

/// What the controller decided for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// `σ(s_logit)`: how strongly to steer, 0..1.
    pub strength: f32,
    /// `σ(w_logit_l)` for every layer.
    pub weights: Vec<f32>,
}

impl ControllerNet {
    /// Tensor names: `fc1.weight (units, inputs*hidden)`, `fc1.bias`, `fc2.weight
    /// (1+layers, units)`, `fc2.bias`, as `torch.nn.Linear` stores them.
    pub fn from_tensors(
        get: &dyn Fn(&str, &[usize]) -> Result<Tensor>,
        inputs: usize,
        units: usize,
        layers: usize,
    ) -> Result<Self> {
        Ok(Self {
            fc1_t: get("fc1.weight", &[units, inputs])?.t()?.contiguous()?,
            fc1_b: get("fc1.bias", &[units])?,
            fc2_t: get("fc2.weight", &[1 + layers, units])?.t()?.contiguous()?,
            fc2_b: get("fc2.bias", &[1 + layers])?,
        })
    }

    /// `x`: `(batch, inputs*hidden)`; returns the raw logits `(batch, 1 + layers)`.
    pub fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = x.matmul(&self.fc1_t)?.broadcast_add(&self.fc1_b)?.relu()?;
        h.matmul(&self.fc2_t)?.broadcast_add(&self.fc2_b)
    }

    /// The decision for one feature vector `(1, inputs*hidden)`.
    pub fn decide(&self, x: &Tensor) -> candle_core::Result<Decision> {
        let p: Vec<f32> = candle_nn_sigmoid(&self.logits(x)?)?
            .flatten_all()?
            .to_vec1()?;
        Ok(Decision {
            strength: p.first().copied().unwrap_or(0.0),
            weights: p.get(1..).map(<[f32]>::to_vec).unwrap_or_default(),
        })
    }
}

fn candle_nn_sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    // 1 / (1 + exp(-x)), written out so it has a gradient when the trainer calls `logits`.
    (x.neg()?.exp()? + 1.0)?.recip()
}

/// Per-request parameters and state.
#[derive(Debug, Default)]
pub struct ControllerParams {
    /// Multiplies the config's α (default 1; 0 turns the controller off).
    pub scale: f32,
    /// Generated tokens over which the patch fades: token `t` after the prompt gets
    /// `exp(-t / decay)` of it (`None`: every token gets all of it). A refusal, once begun,
    /// carries on by itself; steering every later token as hard is what makes a small model
    /// loop on refusal words.
    pub decay: Option<f32>,
    state: Mutex<RequestState>,
}

#[derive(Debug, Default)]
struct RequestState {
    /// Last-token activations of the input layers seen so far in this prefill pass.
    captured: Vec<Vec<f32>>,
    decision: Option<Decision>,
    /// Position of the first token after the prompt the decision was made on.
    decided_at: usize,
}

impl ControllerParams {
    pub fn new(scale: f32) -> Self {
        Self {
            scale,
            decay: None,
            state: Mutex::default(),
        }
    }

    /// With the patch fading over `decay` generated tokens.
    pub fn with_decay(mut self, decay: Option<f32>) -> Self {
        self.decay = decay;
        self
    }

    /// The share of the patch the token at `position` gets, the decision having been made
    /// for the token at `decided_at`.
    fn fade(&self, decided_at: usize, position: usize) -> f32 {
        let t = position.saturating_sub(decided_at) as f32;
        self.decay.map_or(1.0, |d| (-t / d).exp())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, RequestState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The decision made for this request, once its prompt has been read.
    pub fn decision(&self) -> Option<Decision> {
        self.state().decision.clone()
    }
}

/// A loaded controller; one [`Hook`] for every request that selects it.
#[derive(Debug)]
pub struct SteeringController {
    name: String,
    config: ControllerConfig,
    net: ControllerNet,
    /// `(layers, hidden)`: each layer's unit direction (zero rows where not steered).
    directions: Tensor,
    bytes: usize,
}

impl SteeringController {
    /// Loads `dir/config.json` and `dir/model.safetensors`, checked against the base model.
    pub fn load(name: &str, dir: &Path, base: &BaseModel, files: &mut PluginFiles) -> Result<Self> {
        let config_path = dir.join(CONFIG_FILE);
        let config =
            ControllerConfig::read(&config_path, &files.read(&config_path, FileRole::Config)?)?;
        config.check(name, base)?;
        let weights = files.read(&dir.join(WEIGHTS_FILE), FileRole::Tensors)?;
        let tensors = safetensors::SafeTensors::deserialize(&weights)
            .map_err(|e| PluginError::bad_file(dir.join(WEIGHTS_FILE), e))?;
        Self::from_safetensors(name, config, &tensors, base)
    }

    fn from_safetensors(
        name: &str,
        config: ControllerConfig,
        tensors: &safetensors::SafeTensors<'_>,
        base: &BaseModel,
    ) -> Result<Self> {
        use candle_core::safetensors::Load;
        const KNOWN: [&str; 5] = [
            "fc1.weight",
            "fc1.bias",
            "fc2.weight",
            "fc2.bias",
            "directions",
        ];
        if let Some(extra) = tensors
            .names()
            .into_iter()
            .find(|n| !KNOWN.iter().any(|k| k == n))
        {
            return Err(PluginError::incompatible(
                name,
                format!("unknown tensor `{extra}` in {WEIGHTS_FILE}"),
            ));
        }
        let get = |tensor: &str, shape: &[usize]| -> Result<Tensor> {
            let view = tensors.tensor(tensor).map_err(|_| {
                PluginError::incompatible(name, format!("tensor `{tensor}` is missing"))
            })?;
            let t = view.load(&base.device)?.to_dtype(DType::F32)?;
            weights::check_tensor(name, &format!("tensor `{tensor}`"), &t)?;
            match t.dims() == shape {
                true => Ok(t),
                false => Err(PluginError::incompatible(
                    name,
                    format!(
                        "tensor `{tensor}` has shape {:?}, expected {shape:?}",
                        t.dims()
                    ),
                )),
            }
        };
        let (hidden, layers) = (base.config.hidden_size, base.config.num_layers);
        let inputs = config.input_layers.len() * hidden;
        let net = ControllerNet::from_tensors(&get, inputs, config.hidden_units, layers)?;
        let directions = get("directions", &[layers, hidden])?;
        let bytes = (inputs * config.hidden_units
            + config.hidden_units * (layers + 2)
            + layers * (hidden + 1)
            + 1)
            * 4;
        Ok(Self {
            name: name.to_string(),
            config,
            net,
            directions,
            bytes,
        })
    }

    pub fn config(&self) -> &ControllerConfig {
        &self.config
    }

    pub fn net(&self) -> &ControllerNet {
        &self.net
    }

    /// Reads the input layer's last-token activation of each prompt row, and decides once the
    /// last input layer has been read.
    fn observe(&self, layer: usize, rows: &[RowView<'_>], h: &Tensor) -> candle_core::Result<()> {
        let inputs = &self.config.input_layers;
        if !inputs.contains(&layer) {
            return Ok(());
        }
        for row in rows.iter().filter(|r| r.is_prompt) {
            let last = h.get(row.end - 1)?.to_vec1::<f32>()?;
            let mut state = row.params.state();
            if inputs.first() == Some(&layer) {
                state.captured.clear();
            }
            state.captured.push(last);
            if inputs.last() == Some(&layer) && state.captured.len() == inputs.len() {
                let features: Vec<f32> = state.captured.drain(..).flatten().collect();
                let x = Tensor::from_vec(features, (1, inputs.len() * h.dim(1)?), h.device())?;
                state.decision = Some(self.net.decide(&x.to_dtype(DType::F32)?)?);
                state.decided_at = row.position + (row.end - row.start);
            }
        }
        Ok(())
    }

    /// Each entry's coefficient on `d_layer`: a prompt row steers only its last token (its
    /// earlier tokens ran before the decision), a generated token always.
    fn coefficients(&self, layer: usize, rows: &[RowView<'_>], n: usize) -> Vec<f32> {
        let mut column = vec![0f32; n];
        for row in rows {
            let Some(d) = row.params.decision() else {
                continue;
            };
            let c = d.strength
                * d.weights.get(layer).copied().unwrap_or(0.0)
                * self.config.alpha
                * row.params.scale;
            let from = if row.is_prompt {
                row.end - 1
            } else {
                row.start
            };
            let decided_at = row.params.state().decided_at;
            for (i, slot) in column.iter_mut().enumerate().take(row.end).skip(from) {
                *slot = c * row.params.fade(decided_at, row.position + i - row.start);
            }
        }
        column
    }
}

/// One row of a hook group as the controller sees it.
struct RowView<'a> {
    params: &'a ControllerParams,
    /// The row's entries in the group's tensor.
    start: usize,
    end: usize,
    /// Sequence position of entry `start`.
    position: usize,
    is_prompt: bool,
}

impl Hook for SteeringController {
    fn name(&self) -> &str {
        &self.name
    }

    fn points(&self) -> HookPoints {
        HookPoints {
            residual: true,
            ..HookPoints::default()
        }
    }

    /// Never: the decision is made at the prompt's last token and steers the prompt's later
    /// positions too, so the same first tokens of another prompt hold other keys and values
    /// (and the decision lives in the request's parameters, which a prefix cannot carry).
    fn prefix_reuse(&self, _params: &HookParams) -> PrefixReuse {
        PrefixReuse::Never
    }

    /// `h`: `(group tokens, hidden)`. At the input layers, records prompt rows' last-token
    /// activations (and decides at the last one); at steered layers returns
    /// `h + c_entry * d_layer`, or `None` where every coefficient is 0.
    fn residual(
        &self,
        layer: usize,
        group: &HookGroup<'_>,
        h: &Tensor,
    ) -> models::Result<Option<Tensor>> {
        let mut rows = Vec::with_capacity(group.rows.len());
        let mut start = 0;
        for (row, &n) in group.rows.iter().zip(&group.lengths) {
            if let Some(params) = row.params.downcast_ref::<ControllerParams>() {
                let is_prompt = n > 1 || params.decision().is_none();
                rows.push(RowView {
                    params,
                    start,
                    end: start + n,
                    position: row.start_position,
                    is_prompt,
                });
            }
            start += n;
        }
        self.observe(layer, &rows, h)?;
        let (first, last) = self.config.steered_layers;
        if !(first..=last).contains(&layer) {
            return Ok(None);
        }
        let column = self.coefficients(layer, &rows, h.dim(0)?);
        add_along(h, column, &self.directions.get(layer)?)
    }
}

impl Plugin for SteeringController {
    fn kind(&self) -> PluginKind {
        PluginKind::Controller
    }

    fn request_params(&self, p: &Map<String, Value>) -> Result<HookParams> {
        params::reject_unknown(&self.name, p, &["scale", "decay"])?;
        let scale = params::number(&self.name, p, "scale", 1.0, (-16.0, 16.0))?;
        // A request's decay replaces the config's; `null` asks for none.
        let decay = match p.get("decay") {
            None => self.config.decay,
            Some(Value::Null) => None,
            Some(_) => Some(params::number(&self.name, p, "decay", 1.0, (0.01, 1e6))?),
        };
        Ok(Arc::new(ControllerParams::new(scale).with_decay(decay)))
    }

    fn resident_bytes(&self) -> usize {
        self.bytes
    }
}

/// `(batch, 1 + layers)` logits to `(strength, weights)` probabilities, for the trainer.
pub fn sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn_sigmoid(x)
}

/// The controller's tensors as the trainer produces them (`torch.nn.Linear` layout).
#[derive(Debug, Clone)]
pub struct ControllerTensors {
    /// `(units, inputs * hidden)`.
    pub fc1_weight: Tensor,
    pub fc1_bias: Tensor,
    /// `(1 + layers, units)`.
    pub fc2_weight: Tensor,
    pub fc2_bias: Tensor,
    /// `(layers, hidden)`, unit rows (zero where not steered).
    pub directions: Tensor,
}

impl ControllerTensors {
    /// Writes `dir/config.json` and `dir/model.safetensors` (f32).
    pub fn save(&self, dir: &Path, config: &ControllerConfig) -> Result<()> {
        let io = |e: std::io::Error| PluginError::bad_file(dir, e);
        std::fs::create_dir_all(dir).map_err(io)?;
        let json = serde_json::to_vec_pretty(config).map_err(|e| PluginError::bad_file(dir, e))?;
        std::fs::write(dir.join(CONFIG_FILE), json).map_err(io)?;
        let tensors = std::collections::HashMap::from([
            ("fc1.weight".to_string(), self.fc1_weight.clone()),
            ("fc1.bias".to_string(), self.fc1_bias.clone()),
            ("fc2.weight".to_string(), self.fc2_weight.clone()),
            ("fc2.bias".to_string(), self.fc2_bias.clone()),
            ("directions".to_string(), self.directions.clone()),
        ]);
        candle_core::safetensors::save(&tensors, dir.join(WEIGHTS_FILE))?;
        Ok(())
    }
}
