//! Learned block-sparse attention for decoding (SeerAttention-R, Gao et al. 2025): a small
//! gate per layer, trained by self-distillation from the frozen model's own attention, picks
//! which blocks of the KV cache a decoding token reads; the attention kernel reads only
//! those (the others are never touched, not masked).
//!
//! Per row and layer ([`SparseAttention`] as a [`Hook`], at the attention point, with the
//! row's pre-RoPE queries and keys):
//! 1. every token's keys go into the row's [`SparseState`]: when a block of `block_size` keys
//!    closes, it is pooled (max, min, mean per channel), projected and rotated into one
//!    compressed key per key/value head ([`gate`]);
//! 2. prefill chunks (and verification rows of several tokens) read densely;
//! 3. a decode token projects its queries, scores the closed blocks per key/value head and
//!    reads the current block, the sink block if the file says so, and the blocks its budget
//!    or threshold picks ([`select`]); the group's query heads share the choice. Layers below
//!    `dense_layers` and contexts the budget covers read every key.
//!
//! Request: `{"type": "sparse_attention", "name": ..., "budget": 1024}` or `"threshold":
//! 0.004`. Files: [`config`] (`config.json`) and `gates.safetensors`, written by
//! `server train sparse-attention` ([`train`]); `server eval long-context` measures it
//! ([`eval`]).

pub mod capture;
pub mod config;
pub mod eval;
pub mod gate;
pub mod oracle;
pub mod select;
pub mod state;
pub mod train;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use models::hooks::{HookParams, HookPoints};
use models::{Hook, HookRow, HookState, KeyBlocks, LogitsWanted, PrefixReuse};
use serde_json::{Map, Value};

pub use config::{SparseAttentionConfig, CONFIG_FILE, TYPE, WEIGHTS_FILE};
use gate::{GateShape, LayerGate};
pub use select::Budget;
pub use state::SparseState;

use crate::base::BaseModel;
use crate::error::{PluginError, Result};
use crate::files::{FileRole, PluginFiles};
use crate::kinds::PluginKind;
use crate::params;
use crate::plugin::{Plugin, PluginCounter};
use crate::weights;

/// A loaded set of gates; one [`Hook`] serving every request that selects it.
#[derive(Debug)]
pub struct SparseAttention {
    name: String,
    config: SparseAttentionConfig,
    shape: GateShape,
    /// Indexed by layer; `None` for the dense layers.
    gates: Vec<Option<LayerGate>>,
    counters: Counters,
}

/// Keys of the context decode steps could have read, and keys they read, over every gated
/// layer and key/value head since the plug-in was loaded.
#[derive(Debug, Default)]
struct Counters {
    decode_tokens: AtomicU64,
    keys_in_context: AtomicU64,
    keys_read: AtomicU64,
}

impl SparseAttention {
    /// Loads `dir/config.json` and `dir/gates.safetensors`, checked against the base.
    pub fn load(name: &str, dir: &Path, base: &BaseModel, files: &mut PluginFiles) -> Result<Self> {
        let config_path = dir.join(CONFIG_FILE);
        let config = SparseAttentionConfig::read(
            &config_path,
            &files.read(&config_path, FileRole::Config)?,
        )?;
        config.check(name, base)?;
        let path = dir.join(WEIGHTS_FILE);
        let bytes = files.read(&path, FileRole::Tensors)?;
        let tensors = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| PluginError::bad_file(&path, e))?;
        let gates = read_gates(name, &config, &tensors, base.config.num_layers)?;
        Self::new(name, config, gates, base)
    }

    /// A plug-in from its parts (what the trainer made), checked like a loaded one: `gates`
    /// holds one gate per layer from `dense_layers` on.
    pub fn new(
        name: &str,
        config: SparseAttentionConfig,
        gates: HashMap<usize, LayerGate>,
        base: &BaseModel,
    ) -> Result<Self> {
        config.check(name, base)?;
        let shape = shape_of(&config);
        let layers = base.config.num_layers;
        let mut by_layer = vec![None; layers];
        for (l, gate) in gates {
            if l < config.dense_layers || l >= layers {
                return Err(PluginError::incompatible(
                    name,
                    format!(
                        "a gate for layer {l}, outside {}..{layers}",
                        config.dense_layers
                    ),
                ));
            }
            check_gate(name, &shape, l, &gate)?;
            by_layer[l] = Some(gate);
        }
        if let Some(l) = (config.dense_layers..layers).find(|&l| by_layer[l].is_none()) {
            return Err(PluginError::incompatible(
                name,
                format!("layer {l} has no gate"),
            ));
        }
        Ok(Self {
            name: name.to_string(),
            config,
            shape,
            gates: by_layer,
            counters: Counters::default(),
        })
    }

    pub fn config(&self) -> &SparseAttentionConfig {
        &self.config
    }

    pub fn shape(&self) -> &GateShape {
        &self.shape
    }

    pub fn gate(&self, layer: usize) -> Option<&LayerGate> {
        self.gates.get(layer)?.as_ref()
    }

    /// Keys of the context decode steps could have read and keys they read (gated layers,
    /// every key/value head), and decode tokens, since the plug-in was loaded.
    pub fn reads(&self) -> (u64, u64, u64) {
        let c = &self.counters;
        (
            c.decode_tokens.load(Ordering::Relaxed),
            c.keys_in_context.load(Ordering::Relaxed),
            c.keys_read.load(Ordering::Relaxed),
        )
    }

    /// Writes `dir/config.json` and `dir/gates.safetensors`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        crate::files::write_config(dir, &self.config)?;
        let s = &self.shape;
        let (h, dg) = (s.kv_heads, s.gate_dim);
        let cpu = Device::Cpu;
        let mut tensors = HashMap::new();
        for (l, gate) in self.gates.iter().enumerate() {
            let Some(g) = gate else { continue };
            let key = |part: &str| format!("layers.{l}.{part}");
            let q = (h, dg, s.query_inputs());
            let k = (h, dg, s.key_inputs());
            tensors.insert(
                key("q_proj.weight"),
                Tensor::from_slice(&g.q_proj, q, &cpu)?,
            );
            tensors.insert(
                key("k_proj.weight"),
                Tensor::from_slice(&g.k_proj, k, &cpu)?,
            );
            tensors.insert(
                key("q_norm.weight"),
                Tensor::from_slice(&g.q_norm, dg, &cpu)?,
            );
            tensors.insert(
                key("k_norm.weight"),
                Tensor::from_slice(&g.k_norm, dg, &cpu)?,
            );
        }
        candle_core::safetensors::save(&tensors, dir.join(WEIGHTS_FILE))?;
        Ok(())
    }

    /// This row's budget (the file's default for parameters another hook made, which never
    /// happens for a chain the registry resolved).
    fn budget_of(&self, params: &HookParams) -> Budget {
        params
            .downcast_ref::<Budget>()
            .copied()
            .unwrap_or(Budget::Tokens(self.config.budget))
    }

    /// The blocks a decode token of layer `l` reads, per key/value head, or `None` for all:
    /// `q` its pre-RoPE queries `(n_heads, d)` at `position`.
    fn choose(
        &self,
        gate: &LayerGate,
        keys: &state::LayerKeys,
        q: &[f32],
        position: usize,
        budget: Budget,
    ) -> Option<KeyBlocks> {
        let b = self.config.block_size;
        let current = position / b;
        // The token's own block is read whole and not scored, even when it just closed.
        let closed = current * self.shape.kv_heads * self.shape.gate_dim;
        if keys.dense || keys.compressed.len() < closed || budget.covers(current + 1, b) {
            return None;
        }
        let q_gate = gate.query(&self.shape, q, position);
        let per_kv_head: Vec<Vec<u32>> = (0..self.shape.kv_heads)
            .map(|h| {
                let scores = gate::scores(&self.shape, &q_gate, &keys.compressed[..closed], h);
                let mut chosen =
                    select::select(&scores, current, budget, b, self.config.sink_block);
                if !keys.forced.is_empty() {
                    chosen.extend(&keys.forced);
                    chosen.sort_unstable();
                    chosen.dedup();
                }
                chosen
            })
            .collect();
        let read: usize = per_kv_head
            .iter()
            .flatten()
            .map(|&j| b.min(position + 1 - j as usize * b))
            .sum();
        let c = &self.counters;
        c.keys_in_context.fetch_add(
            ((position + 1) * self.shape.kv_heads) as u64,
            Ordering::Relaxed,
        );
        c.keys_read.fetch_add(read as u64, Ordering::Relaxed);
        Some(KeyBlocks {
            block_size: b,
            per_kv_head,
        })
    }
}

fn shape_of(c: &SparseAttentionConfig) -> GateShape {
    GateShape::with_theta(
        c.num_kv_heads,
        c.group(),
        c.head_dim,
        c.gate_dim,
        c.rope_theta,
        c.norm_eps,
    )
}

/// Checks one gate's sizes and values.
fn check_gate(name: &str, s: &GateShape, l: usize, g: &LayerGate) -> Result<()> {
    let sizes = [
        (
            "q_proj",
            g.q_proj.len(),
            s.kv_heads * s.gate_dim * s.query_inputs(),
        ),
        (
            "k_proj",
            g.k_proj.len(),
            s.kv_heads * s.gate_dim * s.key_inputs(),
        ),
        ("q_norm", g.q_norm.len(), s.gate_dim),
        ("k_norm", g.k_norm.len(), s.gate_dim),
    ];
    for (part, len, want) in sizes {
        if len != want {
            return Err(PluginError::incompatible(
                name,
                format!("layer {l}'s {part} holds {len} values, expected {want}"),
            ));
        }
    }
    for (part, values) in [("q_proj", &g.q_proj), ("k_proj", &g.k_proj)] {
        weights::check_values(name, &format!("layers.{l}.{part}.weight"), values)?;
    }
    weights::check_values(name, &format!("layers.{l}.q_norm.weight"), &g.q_norm)?;
    weights::check_values(name, &format!("layers.{l}.k_norm.weight"), &g.k_norm)
}

/// The gates of `gates.safetensors`, every tensor's shape checked, no tensor unknown.
fn read_gates(
    name: &str,
    config: &SparseAttentionConfig,
    tensors: &safetensors::SafeTensors<'_>,
    layers: usize,
) -> Result<HashMap<usize, LayerGate>> {
    use candle_core::safetensors::Load;
    let s = shape_of(config);
    let (h, dg) = (s.kv_heads, s.gate_dim);
    let get = |tensor: &str, shape: &[usize]| -> Result<Vec<f32>> {
        let view = tensors.tensor(tensor).map_err(|_| {
            PluginError::incompatible(
                name,
                format!("tensor `{tensor}` is missing from {WEIGHTS_FILE}"),
            )
        })?;
        let t = view.load(&Device::Cpu)?.to_dtype(candle_core::DType::F32)?;
        if t.dims() != shape {
            return Err(PluginError::incompatible(
                name,
                format!(
                    "tensor `{tensor}` has shape {:?}, expected {shape:?}",
                    t.dims()
                ),
            ));
        }
        Ok(t.flatten_all()?.to_vec1::<f32>()?)
    };
    let mut gates = HashMap::new();
    for l in config.dense_layers..layers {
        let key = |part: &str| format!("layers.{l}.{part}");
        gates.insert(
            l,
            LayerGate {
                q_proj: get(&key("q_proj.weight"), &[h, dg, s.query_inputs()])?,
                k_proj: get(&key("k_proj.weight"), &[h, dg, s.key_inputs()])?,
                q_norm: get(&key("q_norm.weight"), &[dg])?,
                k_norm: get(&key("k_norm.weight"), &[dg])?,
            },
        );
    }
    let known =
        |n: &str| (config.dense_layers..layers).any(|l| n.starts_with(&format!("layers.{l}.")));
    if let Some(extra) = tensors.names().into_iter().find(|n| !known(n)) {
        return Err(PluginError::incompatible(
            name,
            format!("unknown tensor `{extra}` in {WEIGHTS_FILE} (a layer the model or the config does not have?)"),
        ));
    }
    Ok(gates)
}

impl Hook for SparseAttention {
    fn name(&self) -> &str {
        &self.name
    }

    fn points(&self) -> HookPoints {
        HookPoints {
            attention: true,
            ..HookPoints::default()
        }
    }

    /// Prompt positions only: prefill reads densely, so a prompt's keys and values are the
    /// base model's, but a decode step that read sparsely leaves keys and values in the later
    /// layers that a dense prefill of the same tokens would not. The budget changes nothing
    /// a prompt leaves.
    fn prefix_reuse(&self, _params: &HookParams) -> PrefixReuse {
        PrefixReuse::PromptOnly(String::new())
    }

    fn new_state(&self, _params: &HookParams) -> models::Result<Option<Box<dyn HookState>>> {
        let block = self.config.block_size;
        let state = SparseState::new(self.gates.len(), self.shape.clone(), block);
        Ok(Some(Box::new(state)))
    }

    /// One compressed key per block, key/value head and gated layer.
    fn state_bytes_per_token(&self, _params: &HookParams) -> usize {
        let gated = self.gates.len() - self.config.dense_layers;
        (gated * self.shape.kv_heads * self.shape.gate_dim * 4).div_ceil(self.config.block_size)
    }

    fn attention_blocks(
        &self,
        layer: usize,
        row: &HookRow<'_>,
        q: &Tensor,
        k: &Tensor,
        slots: usize,
    ) -> models::Result<Option<KeyBlocks>> {
        let Some(gate) = self.gate(layer) else {
            return Ok(None);
        };
        let keys = k.flatten_all()?.to_vec1::<f32>()?;
        let start = row.start_position;
        let decoding = row.tokens.len() == 1 && row.logits != LogitsWanted::None;
        let query = match decoding {
            true => Some(q.flatten_all()?.to_vec1::<f32>()?),
            false => None,
        };
        let budget = self.budget_of(row.params);
        let b = self.config.block_size;
        row.with_state(&self.name, |s: &mut SparseState| {
            let lk = &mut s.layers[layer];
            lk.feed(&self.shape, gate, b, &keys, start);
            // Slots other than positions: the layer's cache skipped some (an early exit's
            // drafts); the blocks would not line up, so this step reads densely.
            match query {
                Some(q) if slots == lk.fed => self.choose(gate, lk, &q, start, budget),
                _ => None,
            }
        })
        .inspect(|chosen| {
            if decoding && layer == self.config.dense_layers && chosen.is_some() {
                self.counters.decode_tokens.fetch_add(1, Ordering::Relaxed);
            }
        })
    }
}

impl Plugin for SparseAttention {
    fn kind(&self) -> PluginKind {
        PluginKind::SparseAttention
    }

    fn request_params(&self, p: &Map<String, Value>) -> Result<HookParams> {
        params::reject_unknown(&self.name, p, &["budget", "threshold"])?;
        let bad = |param: &str, message: String| PluginError::BadParameter {
            plugin: self.name.clone(),
            param: param.into(),
            message,
        };
        let b = self.config.block_size;
        let budget = params::count(&self.name, p, "budget", (b, 1 << 24))?;
        let budget = match (budget, p.contains_key("threshold")) {
            (Some(_), true) => {
                return Err(bad(
                    "threshold",
                    "give either budget or threshold, not both".into(),
                ))
            }
            (Some(t), false) => Budget::Tokens(t),
            (None, true) => {
                let tau = params::number(&self.name, p, "threshold", 0.0, (0.0, 1.0))?;
                if tau <= 0.0 || tau >= 1.0 {
                    return Err(bad(
                        "threshold",
                        format!("must be within (0, 1), got {tau}"),
                    ));
                }
                Budget::Threshold(tau)
            }
            (None, false) => Budget::Tokens(self.config.budget),
        };
        Ok(Arc::new(budget))
    }

    /// `graft_sparse_attention_decode_tokens_total`, `..._keys_in_context_total` and
    /// `..._keys_read_total` (their ratio is the fraction of the cache decode steps read).
    fn counters(&self) -> Vec<PluginCounter> {
        let (tokens, context, read) = self.reads();
        let counter = |metric, help, value| PluginCounter {
            metric,
            help,
            labels: Vec::new(),
            value,
        };
        vec![
            counter(
                "graft_sparse_attention_decode_tokens_total",
                "Decode tokens that read a sparse selection of the cache",
                tokens,
            ),
            counter(
                "graft_sparse_attention_keys_in_context_total",
                "Keys those tokens could have read, over gated layers and key/value heads",
                context,
            ),
            counter(
                "graft_sparse_attention_keys_read_total",
                "Keys those tokens read, over gated layers and key/value heads",
                read,
            ),
        ]
    }

    fn resident_bytes(&self) -> usize {
        self.gates
            .iter()
            .flatten()
            .map(LayerGate::parameters)
            .sum::<usize>()
            * 4
    }
}
