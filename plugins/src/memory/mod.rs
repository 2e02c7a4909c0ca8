//! Memory decoders (Cao et al., "Memory Decoder: A Pretrained, Plug-and-Play Memory for Large
//! Language Models", arXiv 2508.09874): a small causal LM with the base model's vocabulary,
//! trained on a domain, run beside the frozen base on exactly the same tokens, its next-token
//! distribution mixed into the base's ([`mix`]). Reference implementation:
//! LUMIA-Group/MemoryDecoder `demo/memDec.py` (two models, two independent KV caches, the
//! mixture `logaddexp` of the weighted log-softmaxes).
//!
//! Serving: the memory is a [`models::Llama`] loaded through the base's own loaders (a Hugging
//! Face folder or a GGUF, quantized or not). Its KV cache for a sequence is that sequence's
//! [`MemoryState`], kept in the base cache's plug-in state, so it is counted, forked, cut back
//! and freed with the base's. The every-token hook ([`Hook::step_tokens`]) runs the memory over
//! the group's rows (prefill chunks and decode tokens alike) in one batched forward pass, asking
//! for logits exactly where the base will give them; the logits hook mixes them with the
//! base's logits (per-row λ and T) and returns the mixture's log-probabilities.
//!
//! Departures from the reference: the mixture replaces the logits inside the server, so every
//! reported log-prob (`logprobs`, `top_logprobs`, echoed prompt log-probs) is the mixture's;
//! rows with different memories, λ or none share one step. In a chain the memory should come
//! last: hooks after it would change log-probabilities, not logits. The base tokenizer's
//! identity (`graft.tokenizer_hash`, [`models::Tokenizer::identity`]) must equal the served
//! model's when the file records one.

mod config;
pub mod corpus;
pub mod datastore;
pub mod eval;
pub mod knn;
mod mix;
mod state;
pub mod targets;
pub mod tiny;
pub mod train;
pub mod work;

use std::path::Path;
use std::sync::{Arc, MutexGuard, PoisonError};

use candle_core::Tensor;
use models::hooks::HookParams;
use models::loader::gguf::GgufSource;
use models::loader::safetensors::SafetensorsSource;
use models::loader::WeightSource;
use models::{
    BatchRow, Hook, HookGroup, HookPoints, HookState, Llama, ModelConfig, ModelError, PrefixReuse,
};
use serde_json::{Map, Value};

pub use config::{GraftBlock, MemoryConfig, TYPE};
pub use mix::mix;
pub use state::MemoryState;

use crate::base::BaseModel;
use crate::error::{PluginError, Result};
use crate::files::{FileRole, PluginFiles};
use crate::kinds::PluginKind;
use crate::params;
use crate::plugin::Plugin;

pub const CONFIG_FILE: &str = "config.json";
pub const SAFETENSORS_FILE: &str = "model.safetensors";
pub const GGUF_FILE: &str = "model.gguf";

/// Largest memory temperature a request may ask for: beyond it the memory's distribution is
/// flat to within f32 rounding.
const MAX_TEMPERATURE: f32 = 100.0;

/// Per-request parameters: the mixing weight λ and the memory's temperature T.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryParams {
    pub lambda: f32,
    pub temperature: f32,
}

/// A loaded memory decoder; one [`Hook`] serving every request that selects it.
#[derive(Debug)]
pub struct MemoryDecoder {
    name: String,
    model: Llama,
    graft: GraftBlock,
    bytes: usize,
}

impl MemoryDecoder {
    /// Loads `dir/config.json` and `dir/model.safetensors` or `dir/model.gguf` (exactly one)
    /// and checks the memory against the base model (same vocabulary, a context at least as
    /// long). Every file is read once, through `files`.
    pub fn load(name: &str, dir: &Path, base: &BaseModel, files: &mut PluginFiles) -> Result<Self> {
        let config_path = dir.join(CONFIG_FILE);
        let config =
            MemoryConfig::read(&config_path, &files.read(&config_path, FileRole::Config)?)?;
        check_tokenizer(name, config.graft.tokenizer_hash.as_deref(), base)?;
        let (st, gguf) = (dir.join(SAFETENSORS_FILE), dir.join(GGUF_FILE));
        let (mut source, weights, bytes): (Box<dyn WeightSource>, _, _) =
            match (st.exists(), gguf.exists()) {
                (true, true) => {
                    return Err(PluginError::bad_file(
                        dir,
                        format!("holds both {SAFETENSORS_FILE} and {GGUF_FILE}; keep one"),
                    ))
                }
                (false, false) => {
                    return Err(PluginError::bad_file(
                        dir,
                        format!("holds no memory weights ({SAFETENSORS_FILE} or {GGUF_FILE})"),
                    ))
                }
                (true, false) => {
                    let model_config = config.model_config(&config_path)?;
                    check_fits(name, &model_config, config.graft.shared_layers, base)?;
                    let bytes = files.read(&st, FileRole::Tensors)?;
                    // Resident as f32 whatever the file's float type.
                    let resident = parameter_count(&model_config) * 4;
                    let src = SafetensorsSource::from_bytes(model_config, bytes, &st, &base.device)
                        .map_err(|e| PluginError::bad_file(&st, e))?;
                    (Box::new(src), st, resident)
                }
                (false, true) => {
                    let bytes = files.read(&gguf, FileRole::Tensors)?;
                    // Quantized matrices stay quantized: about the file's size.
                    let resident = bytes.len();
                    let src = GgufSource::from_bytes(bytes, &gguf, &base.device)
                        .map_err(|e| PluginError::bad_file(&gguf, e))?;
                    check_fits(name, src.config(), config.graft.shared_layers, base)?;
                    (Box::new(src), gguf, resident)
                }
            };
        let mut model = Llama::load(source.as_mut(), base.config.max_position_embeddings)
            .map_err(|e| PluginError::bad_file(&weights, e))?;
        // Its cache holds keys and values as the base's does (a memory that is the base model
        // itself then mixes exactly the base's distribution).
        model
            .set_kv_dtype(base.kv_dtype)
            .map_err(|e| PluginError::bad_file(&weights, e))?;
        Ok(Self {
            name: name.to_string(),
            model,
            graft: config.graft,
            bytes,
        })
    }

    /// The memory's own decoder.
    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// The config's `graft` block (default λ, tokenizer identity).
    pub fn graft(&self) -> &GraftBlock {
        &self.graft
    }

    /// This row's λ and T (the defaults for parameters another hook made, which never happens
    /// for a chain the registry resolved).
    fn params_of(&self, params: &HookParams) -> MemoryParams {
        params
            .downcast_ref::<MemoryParams>()
            .copied()
            .unwrap_or(MemoryParams {
                lambda: self.graft.lambda,
                temperature: 1.0,
            })
    }

    /// Runs the memory over the group's rows in one batched step, each row on its own memory
    /// cache (its tokens, or `inputs` in place of their embeddings), and leaves its logits,
    /// where the base will give logits, in the row's state.
    fn run(&self, group: &HookGroup<'_>, inputs: Option<&Tensor>) -> models::Result<()> {
        let mut guards = lock_rows(group, self)?;
        let mut states = Vec::with_capacity(guards.len());
        for guard in guards.iter_mut() {
            let any: &mut dyn std::any::Any = guard.as_mut();
            let state = any
                .downcast_mut::<MemoryState>()
                .ok_or_else(|| self.hook_error("the row's state is not a memory's"))?;
            states.push(state);
        }
        let mut rows: Vec<BatchRow<'_>> = group
            .rows
            .iter()
            .zip(states.iter_mut())
            .map(|(row, state)| BatchRow {
                seq_id: row.seq_id,
                tokens: row.tokens,
                cache: &mut state.cache,
                hooks: &[],
                logits: row.logits,
            })
            .collect();
        let logits = match inputs {
            Some(x) => self.model.forward_from_hidden(&mut rows, x)?,
            None => self.model.forward(&mut rows)?,
        };
        drop(rows);
        for (state, logits) in states.iter_mut().zip(logits) {
            state.logits = logits;
        }
        Ok(())
    }

    fn hook_error(&self, message: impl ToString) -> ModelError {
        ModelError::Hook {
            hook: self.name.clone(),
            message: message.to_string(),
        }
    }
}

/// The memory must share the base's vocabulary (the mixture is over one vocabulary) and hold
/// at least the base's context (a row past the memory's context would fail its whole batch).
/// A memory trained over another tokenizer's ids would mix the wrong tokens: when both sides
/// know their tokenizer's identity, they must agree.
fn check_tokenizer(name: &str, memory: Option<&str>, base: &BaseModel) -> Result<()> {
    match (memory, base.tokenizer_hash.as_deref()) {
        (Some(m), Some(b)) if m != b => Err(PluginError::incompatible(
            name,
            format!("the memory was trained with tokenizer {m}, the base model's is {b}"),
        )),
        _ => Ok(()),
    }
}

fn check_fits(name: &str, memory: &ModelConfig, shared: usize, base: &BaseModel) -> Result<()> {
    let (m, b) = (memory, &base.config);
    if shared > b.num_layers {
        return Err(PluginError::incompatible(
            name,
            format!(
                "the memory shares {shared} base layers; the base model has {}",
                b.num_layers
            ),
        ));
    }
    if shared > 0 && m.hidden_size != b.hidden_size {
        return Err(PluginError::incompatible(
            name,
            format!(
                "the memory reads the base's hidden states (shared_layers {shared}) but its \
                 hidden size is {}, the base model's {}",
                m.hidden_size, b.hidden_size
            ),
        ));
    }
    if m.vocab_size != b.vocab_size {
        return Err(PluginError::incompatible(
            name,
            format!(
                "the memory's vocabulary has {} tokens, the base model's has {}",
                m.vocab_size, b.vocab_size
            ),
        ));
    }
    if m.max_position_embeddings < b.max_position_embeddings {
        return Err(PluginError::incompatible(
            name,
            format!(
                "the memory's context is {} positions, shorter than the base model's {}",
                m.max_position_embeddings, b.max_position_embeddings
            ),
        ));
    }
    Ok(())
}

/// Parameters of a Llama-family model of this shape (biases and norms included).
fn parameter_count(c: &ModelConfig) -> usize {
    let (h, d) = (c.hidden_size, c.head_dim);
    let q = c.num_heads * d;
    let kv = c.num_kv_heads * d;
    let bias = if c.attention_bias { q + 2 * kv } else { 0 };
    let layer = 2 * h * q + 2 * h * kv + 3 * h * c.intermediate_size + 2 * h + bias;
    let head = if c.tie_word_embeddings { 0 } else { 1 };
    (1 + head) * c.vocab_size * h + c.num_layers * layer + h
}

/// Locks every row's state; the forward pass is the only user during a step.
fn lock_rows<'g>(
    group: &'g HookGroup<'_>,
    hook: &MemoryDecoder,
) -> models::Result<Vec<MutexGuard<'g, Box<dyn HookState>>>> {
    group
        .rows
        .iter()
        .map(|row| {
            let cell = row
                .state
                .ok_or_else(|| hook.hook_error("the row has no memory state"))?;
            Ok(cell.lock().unwrap_or_else(PoisonError::into_inner))
        })
        .collect()
}

impl Hook for MemoryDecoder {
    fn name(&self) -> &str {
        &self.name
    }

    fn points(&self) -> HookPoints {
        let shares = self.graft.shared_layers > 0;
        HookPoints {
            tokens: !shares,
            residual: shares,
            logits: true,
            ..HookPoints::default()
        }
    }

    /// Keyed, with an empty key: the memory's own cache must hold the prefix too, so only
    /// chains with this memory share prefixes; λ and T act on the mixture alone.
    fn prefix_reuse(&self, _params: &HookParams) -> PrefixReuse {
        PrefixReuse::Keyed(String::new())
    }

    fn new_state(&self, _params: &HookParams) -> models::Result<Option<Box<dyn HookState>>> {
        Ok(Some(Box::new(MemoryState {
            cache: self.model.new_cache(),
            logits: None,
        })))
    }

    fn state_bytes_per_token(&self, _params: &HookParams) -> usize {
        self.model.kv_bytes_per_token()
    }

    /// Without shared layers: runs the memory over every row's tokens (see [`Self::run`]).
    fn step_tokens(&self, group: &HookGroup<'_>) -> models::Result<()> {
        self.run(group, None)
    }

    /// With `s` shared layers: after base layer `s - 1`, runs the memory on the base's hidden
    /// states `h` `(group tokens, hidden)`; leaves `h` as it is.
    fn residual(
        &self,
        layer: usize,
        group: &HookGroup<'_>,
        h: &Tensor,
    ) -> models::Result<Option<Tensor>> {
        if layer + 1 == self.graft.shared_layers {
            self.run(group, Some(h))?;
        }
        Ok(None)
    }

    /// `logits`: the base's, `(group entries, vocab)`. Returns the mixture's log-probabilities.
    fn logits(&self, group: &HookGroup<'_>, logits: &Tensor) -> models::Result<Option<Tensor>> {
        let mut parts = Vec::with_capacity(group.rows.len());
        for (row, &n) in group.rows.iter().zip(&group.lengths) {
            let z = row
                .with_state(&self.name, |s: &mut MemoryState| s.logits.take())?
                .filter(|z| z.dim(0).is_ok_and(|d| d == n))
                .ok_or_else(|| self.hook_error("the memory gave no logits for this step"))?;
            parts.push(z);
        }
        let memory = match parts.len() {
            1 => parts.remove(0),
            _ => Tensor::cat(&parts, 0)?,
        };
        let p: Vec<MemoryParams> = group
            .rows
            .iter()
            .map(|r| self.params_of(r.params))
            .collect();
        let lambda = group.per_entry(p.iter().map(|p| p.lambda));
        let temperature = group.per_entry(p.iter().map(|p| p.temperature));
        Ok(Some(mix(logits, &memory, &lambda, &temperature)?))
    }
}

impl Plugin for MemoryDecoder {
    fn kind(&self) -> PluginKind {
        PluginKind::Memory
    }

    fn request_params(&self, p: &Map<String, Value>) -> Result<HookParams> {
        params::reject_unknown(&self.name, p, &["lambda", "temperature"])?;
        let lambda = params::number(&self.name, p, "lambda", self.graft.lambda, (0.0, 1.0))?;
        let temperature =
            params::number(&self.name, p, "temperature", 1.0, (0.0, MAX_TEMPERATURE))?;
        if temperature <= 0.0 {
            return Err(PluginError::BadParameter {
                plugin: self.name.clone(),
                param: "temperature".into(),
                message: format!("must be greater than 0 (and at most {MAX_TEMPERATURE})"),
            });
        }
        Ok(Arc::new(MemoryParams {
            lambda,
            temperature,
        }))
    }

    fn resident_bytes(&self) -> usize {
        self.bytes
    }
}
