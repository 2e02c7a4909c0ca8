//! The Llama-family decoder (Touvron et al., "LLaMA", arXiv 2302.13971; Llama 2/3, Mistral,
//! Qwen2 and SmolLM share it): pre-RMSNorm blocks of grouped-query attention with RoPE and a
//! SwiGLU MLP, tied or untied LM head.
//!
//! Reference implementation: transformers `models/llama/modeling_llama.py`; the shapes and
//! module names below mirror it. Departures, each for serving: the forward pass takes a
//! packed batch of rows from different sequences (see `batch`), the KV caches live outside
//! the weights (one per sequence), and plug-in hooks run at the points `hooks` documents.

use candle_core::{DType, Device, Tensor};

use crate::attention;
use crate::attention::{HeadKeys, QueryPositions};
use crate::attention_probe::AttentionProbe;
use crate::batch::{BatchRow, LogitsWanted, Packing, RowInfo};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::hook_plan::{plan, PlannedGroup};
use crate::hook_state::ChainState;
use crate::hooks::{Exit, HookPoints, Projection};
use crate::kv_cache::{KvCache, KvDtype};
use crate::linear::{ActivationQuantization, Linear};
use crate::loader::{LayerWeight, WeightName, WeightSource};
use crate::output_head::OutputHead;
use crate::rope::Rope;

/// `q_proj`, `k_proj`, `v_proj`, `o_proj` of one layer.
#[derive(Debug, Clone)]
pub struct Attention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
}

/// The SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub input_norm: Tensor,
    pub attn: Attention,
    pub post_attention_norm: Tensor,
    pub mlp: Mlp,
}

/// The whole decoder. Immutable once loaded; all per-sequence state is in [`KvCache`]s.
#[derive(Debug, Clone)]
pub struct Llama {
    pub config: ModelConfig,
    pub embed_tokens: Linear,
    pub layers: Vec<DecoderLayer>,
    pub norm: Tensor,
    pub lm_head: Linear,
    rope: Rope,
    device: Device,
    /// How new sequences' caches store keys and values (f32 or f16).
    kv_dtype: KvDtype,
}

impl DecoderLayer {
    fn load(src: &mut dyn WeightSource, cfg: &ModelConfig, i: usize) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let name = |w| WeightName::Layer(i, w);
        let bias = cfg.attention_bias;
        // Projections of the same input are loaded together, so the source can stack them
        // into one matmul (q/k/v, gate/up).
        let [q, k, v] = load_together(
            src,
            [
                (name(LayerWeight::Q), cfg.num_heads * d, h, bias),
                (name(LayerWeight::K), cfg.num_kv_heads * d, h, bias),
                (name(LayerWeight::V), cfg.num_kv_heads * d, h, bias),
            ],
        )?;
        let [gate, up] = load_together(
            src,
            [
                (name(LayerWeight::Gate), cfg.intermediate_size, h, false),
                (name(LayerWeight::Up), cfg.intermediate_size, h, false),
            ],
        )?;
        Ok(Self {
            input_norm: src.vector(name(LayerWeight::InputNorm), h)?,
            attn: Attention {
                q,
                k,
                v,
                o: src.linear(name(LayerWeight::O), h, cfg.num_heads * d, false)?,
            },
            post_attention_norm: src.vector(name(LayerWeight::PostAttentionNorm), h)?,
            mlp: Mlp {
                gate,
                up,
                down: src.linear(name(LayerWeight::Down), h, cfg.intermediate_size, false)?,
            },
        })
    }
}

/// [`WeightSource::linears`] for a fixed number of parts.
fn load_together<const N: usize>(
    src: &mut dyn WeightSource,
    parts: [(WeightName, usize, usize, bool); N],
) -> Result<[Linear; N]> {
    let loaded = src.linears(&parts)?;
    let got = loaded.len();
    loaded
        .try_into()
        .map_err(|_| ModelError::Config(format!("weight source gave {got} of {N} projections")))
}

impl Llama {
    /// Builds the decoder from any weight source; `max_positions` bounds the RoPE tables
    /// (and so the longest sequence this instance serves).
    pub fn load(src: &mut dyn WeightSource, max_positions: usize) -> Result<Self> {
        let cfg = src.config().clone();
        cfg.validate()?;
        let device = src.device().clone();
        let embed_tokens = src.embedding(cfg.vocab_size, cfg.hidden_size)?;
        let layers = (0..cfg.num_layers)
            .map(|i| DecoderLayer::load(src, &cfg, i))
            .collect::<Result<Vec<_>>>()?;
        let norm = src.vector(WeightName::Norm, cfg.hidden_size)?;
        let lm_head = match cfg.tie_word_embeddings {
            true => embed_tokens.clone(),
            false => src.linear(WeightName::LmHead, cfg.vocab_size, cfg.hidden_size, false)?,
        };
        let rope = Rope::new(
            &cfg,
            max_positions.min(cfg.max_position_embeddings),
            &device,
        )?;
        Ok(Self {
            config: cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            device,
            kv_dtype: KvDtype::F32,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The longest sequence (prompt and generated tokens) this instance can hold.
    pub fn max_positions(&self) -> usize {
        self.rope.max_positions()
    }

    /// Chooses how every projection's activations are quantized for the 8-bit CPU kernels
    /// ([`ActivationQuantization`]); the default is two passes.
    pub fn set_activation_quantization(&mut self, mode: ActivationQuantization) {
        for layer in &mut self.layers {
            let (a, m) = (&mut layer.attn, &mut layer.mlp);
            for linear in [
                &mut a.q,
                &mut a.k,
                &mut a.v,
                &mut a.o,
                &mut m.gate,
                &mut m.up,
                &mut m.down,
            ] {
                linear.set_activation_quantization(mode);
            }
        }
        self.lm_head.set_activation_quantization(mode);
    }

    /// The attention of the layer after `layer`, as a pruning hook after `layer` reads it.
    pub fn attention_probe(&self, layer: usize) -> Result<AttentionProbe<'_>> {
        let next = self
            .layers
            .get(layer + 1)
            .ok_or_else(|| ModelError::Batch(format!("no layer after layer {layer} to probe")))?;
        Ok(AttentionProbe::new(next, &self.rope, &self.config))
    }

    /// The final norm and LM head, as early-exit hooks read them.
    pub fn output_head(&self) -> OutputHead<'_> {
        OutputHead::new(&self.norm, self.config.rms_norm_eps as f64, &self.lm_head)
    }

    /// A fresh, empty cache for a new sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(&self.config, self.kv_dtype, &self.device)
    }

    /// Stores new sequences' keys and values in `dtype` (see [`KvDtype`]; each key and value
    /// rounded once, when written). Caches made before keep theirs.
    pub fn set_kv_dtype(&mut self, dtype: KvDtype) -> Result<()> {
        dtype.check(self.config.head_dim, &self.device)?;
        self.kv_dtype = dtype;
        Ok(())
    }

    pub fn kv_dtype(&self) -> KvDtype {
        self.kv_dtype
    }

    /// Bytes of KV cache one token occupies in this model's caches.
    pub fn kv_bytes_per_token(&self) -> usize {
        let c = &self.config;
        2 * c.num_layers * c.num_kv_heads * self.kv_dtype.row_bytes(c.head_dim)
    }

    /// One forward step over a batch. Each row feeds its tokens at positions starting from
    /// its cache length, appends them to its cache, and gets logits for the positions it
    /// asked for: `(n_positions, vocab)` f32, or `None` for rows that asked for none.
    /// On error no cache grows (positions written are not committed).
    pub fn forward(&self, batch: &mut [BatchRow<'_>]) -> Result<Vec<Option<Tensor>>> {
        self.forward_inputs(batch, None)
    }

    /// [`Llama::forward`] with `inputs` entering layer 0 in place of the tokens' embeddings:
    /// `(total tokens, hidden)`, the rows' tokens in batch order (a memory decoder that reads
    /// the base model's hidden states after the layers it shares). The rows' tokens still give
    /// positions and what hooks see.
    pub fn forward_from_hidden(
        &self,
        batch: &mut [BatchRow<'_>],
        inputs: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        let tokens: usize = batch.iter().map(|r| r.tokens.len()).sum();
        if inputs.dims() != [tokens, self.config.hidden_size] {
            return Err(ModelError::Batch(format!(
                "inputs of shape {:?} for {tokens} tokens of hidden size {}",
                inputs.dims(),
                self.config.hidden_size
            )));
        }
        self.forward_inputs(batch, Some(inputs))
    }

    fn forward_inputs(
        &self,
        batch: &mut [BatchRow<'_>],
        inputs: Option<&Tensor>,
    ) -> Result<Vec<Option<Tensor>>> {
        self.validate(batch)?;
        let states = take_states(batch)?;
        let out = self.forward_rows(batch, &states, inputs);
        for (row, state) in batch.iter_mut().zip(states) {
            *row.cache.plugins_mut() = state;
        }
        out
    }

    /// [`Llama::forward`] with the rows' plug-in states held apart from their caches, so
    /// hooks can read them while attention appends to the caches.
    fn forward_rows(
        &self,
        batch: &mut [BatchRow<'_>],
        states: &[ChainState],
        inputs: Option<&Tensor>,
    ) -> Result<Vec<Option<Tensor>>> {
        let rows: Vec<RowInfo<'_>> = batch
            .iter()
            .zip(states)
            .map(|(row, state)| RowInfo::of(row, state))
            .collect();
        let mut step = Step::new(self, &rows)?;
        step.token_hooks()?;
        let mut x = match inputs {
            Some(x) => x.to_device(&self.device)?,
            None => {
                let ids: Vec<u32> = rows.iter().flat_map(|r| r.tokens.iter().copied()).collect();
                self.embed_tokens
                    .embedding(&Tensor::new(ids.as_slice(), &self.device)?)?
            }
        };
        x = step.embedding_hooks(x)?;
        for (l, layer) in self.layers.iter().enumerate() {
            step.propagate_exited_kv(self, l, layer, batch)?;
            if step.packing.rows.is_empty() {
                continue; // every row exited early
            }
            x = self.layer_forward(l, layer, x, &step, batch)?;
            x = step.residual_hooks(l, x)?;
            x = step.early_exits(self, l, x)?;
            x = step.prune_tokens(self, l, x)?;
        }
        for row in batch.iter_mut() {
            row.cache.commit(row.tokens.len());
        }
        step.logits(self, batch, &x)
    }

    fn validate(&self, batch: &[BatchRow<'_>]) -> Result<()> {
        let vocab = self.config.vocab_size;
        for row in batch {
            if row.tokens.is_empty() {
                return Err(ModelError::Batch(format!(
                    "row of sequence {} has no tokens",
                    row.seq_id
                )));
            }
            if let Some(&id) = row.tokens.iter().find(|&&id| id as usize >= vocab) {
                return Err(ModelError::TokenOutOfRange {
                    id,
                    vocab_size: vocab,
                });
            }
            let end = row.cache.len() + row.tokens.len();
            if end > self.max_positions() {
                return Err(ModelError::ContextOverflow {
                    position: end,
                    context: self.max_positions(),
                });
            }
        }
        Ok(())
    }

    /// One decoder block over the packed active tokens `x`: `(n_tokens, hidden)`.
    fn layer_forward(
        &self,
        l: usize,
        layer: &DecoderLayer,
        x: Tensor,
        step: &Step<'_>,
        batch: &mut [BatchRow<'_>],
    ) -> Result<Tensor> {
        let eps = self.config.rms_norm_eps;
        let h = candle_nn::ops::rms_norm(&x, &layer.input_norm, eps)?;
        let attn = self.self_attention(l, layer, &h, step, batch)?;
        let x = (x + step.project(l, Projection::O, &layer.attn.o, &attn)?)?;
        let h = candle_nn::ops::rms_norm(&x, &layer.post_attention_norm, eps)?;
        let mlp = &layer.mlp;
        let [gate, up] = step.project_stacked(
            l,
            [(Projection::Gate, &mlp.gate), (Projection::Up, &mlp.up)],
            &h,
        )?;
        let act = crate::kernels::swiglu::swiglu(&gate, &up)?;
        Ok((x + step.project(l, Projection::Down, &layer.mlp.down, &act)?)?)
    }

    /// Projects q/k/v for all active tokens, then attends row by row against each row's
    /// cache. Returns `(n_tokens, n_heads * head_dim)`.
    fn self_attention(
        &self,
        l: usize,
        layer: &DecoderLayer,
        h: &Tensor,
        step: &Step<'_>,
        batch: &mut [BatchRow<'_>],
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let n = h.dim(0)?;
        let a = &layer.attn;
        let qkv = [
            (Projection::Q, &a.q),
            (Projection::K, &a.k),
            (Projection::V, &a.v),
        ];
        let [q, k, v] = step.project_stacked(l, qkv, h)?;
        // Attention hooks read queries and keys before RoPE (a gate compares directions, not
        // positions); the cache stores keys after it.
        let q_pre = q.reshape((n, cfg.num_heads, cfg.head_dim))?;
        let k_pre = k.reshape((n, cfg.num_kv_heads, cfg.head_dim))?;
        let q = Rope::apply(&q_pre, &step.cos, &step.sin)?;
        let k = Rope::apply(&k_pre, &step.cos, &step.sin)?;
        let v = v.reshape((n, cfg.num_kv_heads, cfg.head_dim))?;
        let mut outs = Vec::with_capacity(step.packing.rows.len());
        for (slot, &r) in step.packing.rows.iter().enumerate() {
            let (off, len) = (step.packing.offsets[slot], step.packing.lengths[slot]);
            let k_new = k.narrow(0, off, len)?.transpose(0, 1)?; // (n_kv, len, d)
            let v_new = v.narrow(0, off, len)?.transpose(0, 1)?;
            let kept = step.kept[r].as_deref();
            let view = batch[r].cache.append_at(l, &k_new, &v_new, kept)?;
            let pre = (&q_pre.narrow(0, off, len)?, &k_pre.narrow(0, off, len)?);
            let selected = step.selected_keys(l, r, pre, view.k.dim(1)?)?;
            let q_row = q.narrow(0, off, len)?;
            let queries = match kept {
                Some(positions) => QueryPositions::At(positions),
                None => QueryPositions::From(step.rows[r].start),
            };
            outs.push(attention::attend(
                &q_row,
                &view.k,
                &view.v,
                view.positions,
                selected.as_ref(),
                queries,
            )?);
        }
        Ok(match outs.len() {
            1 => outs.remove(0),
            _ => Tensor::cat(&outs, 0)?,
        })
    }
}

/// Moves every row's plug-in state out of its cache for the step, making it on the row's
/// first step (the engine makes it at admission already, so a failure there fails one
/// sequence; here it fails the batch). On error every cache gets its state back.
fn take_states(batch: &mut [BatchRow<'_>]) -> Result<Vec<ChainState>> {
    let mut states = Vec::with_capacity(batch.len());
    for i in 0..batch.len() {
        let row = &mut batch[i];
        row.cache.discard_pending();
        let mut state = std::mem::take(row.cache.plugins_mut());
        if let Err(e) = state.attach(row.hooks) {
            *row.cache.plugins_mut() = state;
            for (row, state) in batch.iter_mut().zip(states) {
                *row.cache.plugins_mut() = state;
            }
            return Err(e);
        }
        states.push(state);
    }
    Ok(states)
}

/// Why a pruning hook's `kept` offsets (into a row's `len` tokens in the stack) cannot be
/// applied to a row wanting `logits`, if they cannot.
fn check_kept(kept: &[usize], len: usize, logits: LogitsWanted) -> std::result::Result<(), String> {
    if kept.is_empty() || kept.windows(2).any(|w| w[0] >= w[1]) || kept[kept.len() - 1] >= len {
        return Err(format!(
            "kept offsets must be ascending, distinct, at least one and below {len}"
        ));
    }
    match logits {
        LogitsWanted::All | LogitsWanted::Hidden => {
            Err("a row wanting every position's output cannot be pruned".into())
        }
        LogitsWanted::Last if kept[kept.len() - 1] + 1 != len => {
            Err("a row wanting logits must keep its last token".into())
        }
        _ => Ok(()),
    }
}

/// The tensors stacked along dimension 0 (one tensor is returned as is).
fn cat(mut parts: Vec<Tensor>) -> Result<Tensor> {
    Ok(match parts.len() {
        1 => parts.remove(0),
        _ => Tensor::cat(&parts, 0)?,
    })
}

fn hook_error(hook: &str, message: String) -> ModelError {
    ModelError::Hook {
        hook: hook.to_string(),
        message,
    }
}

/// `(batch row, entries)`: how many logit positions a row has in a stacked logits tensor.
type RowEntries = (usize, usize);

/// A row that left the layer stack early, with its hidden states at the exit layer.
struct Exited {
    row: usize,
    hidden: Tensor,
    positions: Tensor,
    /// Whether its later layers get keys and values ([`Exit::Propagate`]).
    propagate: bool,
    /// The logits of its last position, when an [`Exit::IfTopIn`] check computed them.
    last_logits: Option<Tensor>,
}

/// Per-step state: which rows are still active, where their tokens sit, RoPE tables for
/// them, and the hook groups of each point.
struct Step<'a> {
    rows: &'a [RowInfo<'a>],
    packing: Packing,
    cos: Tensor,
    sin: Tensor,
    linear: Vec<PlannedGroup<'a>>,
    residual: Vec<PlannedGroup<'a>>,
    exit: Vec<PlannedGroup<'a>>,
    prune: Vec<PlannedGroup<'a>>,
    exited: Vec<Exited>,
    /// Per batch row, the positions of its tokens still in the forward pass once a pruning
    /// hook removed some; `None` while all are.
    kept: Vec<Option<Vec<u32>>>,
    device: Device,
}

impl<'a> Step<'a> {
    fn new(model: &Llama, rows: &'a [RowInfo<'a>]) -> Result<Self> {
        let active: Vec<usize> = (0..rows.len()).collect();
        let mut step = Self {
            rows,
            packing: Packing::new(rows, &active, &[], &model.device)?,
            cos: Tensor::zeros(1, DType::F32, &model.device)?,
            sin: Tensor::zeros(1, DType::F32, &model.device)?,
            linear: Vec::new(),
            residual: Vec::new(),
            exit: Vec::new(),
            prune: Vec::new(),
            exited: Vec::new(),
            kept: vec![None; rows.len()],
            device: model.device.clone(),
        };
        step.repack(model, &active)?;
        Ok(step)
    }

    /// Recomputes everything that depends on the active row set.
    fn repack(&mut self, model: &Llama, active: &[usize]) -> Result<()> {
        self.packing = Packing::new(self.rows, active, &self.kept, &self.device)?;
        (self.cos, self.sin) = model.rope.tables(&self.packing.positions)?;
        let (rows, device, lengths) =
            (self.rows, self.device.clone(), self.packing.lengths.clone());
        let groups = |p: fn(&HookPoints) -> bool| plan(rows, active, &lengths, p, &device);
        let (linear, residual, exit, prune) = (
            groups(|p| p.linear)?,
            groups(|p| p.residual)?,
            groups(|p| p.early_exit)?,
            groups(|p| p.prune)?,
        );
        (self.linear, self.residual, self.exit, self.prune) = (linear, residual, exit, prune);
        Ok(())
    }

    /// `linear(x)` plus the deltas of the hooks targeting this projection.
    fn project(&self, l: usize, proj: Projection, linear: &Linear, x: &Tensor) -> Result<Tensor> {
        self.linear_deltas(l, proj, linear.forward(x)?, x)
    }

    /// [`Self::project`] for several projections of the same input, computed as one matmul
    /// where their weights are stacked (see `Linear::from_qtensors_stacked`).
    fn project_stacked<const N: usize>(
        &self,
        l: usize,
        parts: [(Projection, &Linear); N],
        x: &Tensor,
    ) -> Result<[Tensor; N]> {
        let ys = Linear::forward_stacked(&parts.map(|(_, linear)| linear), x)?;
        let mut out = Vec::with_capacity(N);
        for ((proj, _), y) in parts.into_iter().zip(ys) {
            out.push(self.linear_deltas(l, proj, y, x)?);
        }
        out.try_into()
            .map_err(|_| ModelError::Batch("stacked projection lost a part".into()))
    }

    /// `y` (projection `proj` of `x`) plus the deltas of the hooks targeting it.
    fn linear_deltas(
        &self,
        l: usize,
        proj: Projection,
        mut y: Tensor,
        x: &Tensor,
    ) -> Result<Tensor> {
        for g in self.linear.iter().filter(|g| g.hook.targets(l, proj)) {
            if let Some(delta) = g.hook.linear_delta(l, proj, &g.group, &g.gather(x)?)? {
                y = g.add(&y, &delta)?;
            }
        }
        Ok(y)
    }

    /// Every row's tokens to the hooks that watch them ([`crate::Hook::step_tokens`]), once
    /// per step, before anything else runs.
    fn token_hooks(&self) -> Result<()> {
        let groups = plan(
            self.rows,
            &self.packing.rows,
            &self.packing.lengths,
            |p| p.tokens,
            &self.device,
        )?;
        for g in &groups {
            g.hook.step_tokens(&g.group)?;
        }
        Ok(())
    }

    /// The keys row `r` reads in layer `l`, per key/value head, as its attention hooks chose
    /// them from the row's pre-RoPE queries and keys `pre` (several hooks: what all of them
    /// chose); `None` for every key.
    fn selected_keys(
        &self,
        l: usize,
        r: usize,
        pre: (&Tensor, &Tensor),
        slots: usize,
    ) -> Result<Option<HeadKeys>> {
        let row = &self.rows[r];
        let n_kv = pre.1.dim(1)?;
        let mut selected: Option<HeadKeys> = None;
        for (p, call) in row.hooks.iter().enumerate() {
            if !call.hook.points().attention {
                continue;
            }
            let Some(hook_row) = row.hook_row(p) else {
                continue;
            };
            if self.kept[r].is_some() {
                // Its state follows every position of the row; a pruned row has gaps.
                return Err(hook_error(
                    call.hook.name(),
                    "attention hooks do not run on a row whose tokens a pruning hook removed"
                        .into(),
                ));
            }
            let Some(blocks) = call
                .hook
                .attention_blocks(l, &hook_row, pre.0, pre.1, slots)?
            else {
                continue;
            };
            let named = |e: ModelError| hook_error(call.hook.name(), e.to_string());
            let size = u32::try_from(blocks.block_size).unwrap_or(u32::MAX);
            let keys = HeadKeys::from_blocks(size, slots as u32, &blocks.per_kv_head)
                .and_then(|keys| keys.check(n_kv, slots).map(|()| keys))
                .map_err(named)?;
            selected = Some(match selected {
                None => keys,
                Some(prev) => prev.intersect(&keys),
            });
        }
        Ok(selected)
    }

    fn embedding_hooks(&self, mut x: Tensor) -> Result<Tensor> {
        let active = self.packing.rows.clone();
        let groups = plan(
            self.rows,
            &active,
            &self.packing.lengths,
            |p| p.embeddings,
            &self.device,
        )?;
        for g in &groups {
            let old = g.gather(&x)?;
            if let Some(new) = g.hook.embeddings(&g.group, &old)? {
                x = g.replace(&x, &new)?;
            }
        }
        Ok(x)
    }

    fn residual_hooks(&self, l: usize, mut x: Tensor) -> Result<Tensor> {
        for g in &self.residual {
            let old = g.gather(&x)?;
            if let Some(new) = g.hook.residual(l, &g.group, &old)? {
                x = g.replace(&x, &new)?;
            }
        }
        Ok(x)
    }

    /// Asks early-exit hooks which rows leave after layer `l`; removes those rows from the
    /// packed batch, keeping their hidden states for the LM head and for the keys and values
    /// of the layers they skip.
    fn early_exits(&mut self, model: &Llama, l: usize, x: Tensor) -> Result<Tensor> {
        if self.exit.is_empty() || l + 1 == model.layers.len() {
            return Ok(x);
        }
        let head = model.output_head();
        let mut leaving = vec![Exit::Stay; self.packing.rows.len()];
        for g in &self.exit {
            if let Some(exits) = g.hook.early_exit(l, &g.group, &g.gather(&x)?, &head)? {
                if exits.len() != g.slots.len() {
                    return Err(hook_error(
                        g.hook.name(),
                        format!("{} exits for {} rows", exits.len(), g.slots.len()),
                    ));
                }
                for (&slot, exit) in g.slots.iter().zip(exits) {
                    if leaving[slot] == Exit::Stay {
                        leaving[slot] = exit;
                    }
                }
            }
        }
        let checked = self.check_exits(model, &x, &mut leaving)?;
        if leaving.iter().all(|e| *e == Exit::Stay) {
            return Ok(x);
        }
        let stays = |s: &usize| leaving[*s] == Exit::Stay;
        let stay: Vec<usize> = (0..leaving.len()).filter(stays).collect();
        for slot in (0..leaving.len()).filter(|s| !stays(s)) {
            let (off, len) = (self.packing.offsets[slot], self.packing.lengths[slot]);
            self.exited.push(Exited {
                row: self.packing.rows[slot],
                hidden: x.narrow(0, off, len)?,
                positions: self.packing.positions.narrow(0, off, len)?,
                propagate: leaving[slot] != Exit::Skip,
                last_logits: checked[slot].clone(),
            });
        }
        let x = x.index_select(&self.packing.token_index(&stay, &self.device)?, 0)?;
        let active: Vec<usize> = stay.iter().map(|&s| self.packing.rows[s]).collect();
        self.repack(model, &active)?;
        Ok(x)
    }

    /// Asks pruning hooks which tokens of each row stay after layer `l`; removes the others
    /// from the packed batch (a row pruned by several hooks keeps what all of them keep).
    fn prune_tokens(&mut self, model: &Llama, l: usize, x: Tensor) -> Result<Tensor> {
        if self.prune.is_empty() || l + 1 == model.layers.len() {
            return Ok(x);
        }
        let mut keep: Vec<Option<Vec<usize>>> = vec![None; self.packing.rows.len()];
        let probe = model.attention_probe(l)?;
        for g in &self.prune {
            let Some(per_row) = g.hook.prune(l, &g.group, &g.gather(&x)?, &probe)? else {
                continue;
            };
            if per_row.len() != g.slots.len() {
                let message = format!("{} keep lists for {} rows", per_row.len(), g.slots.len());
                return Err(hook_error(g.hook.name(), message));
            }
            for (&slot, kept) in g.slots.iter().zip(per_row) {
                let Some(kept) = kept else { continue };
                let row = &self.rows[self.packing.rows[slot]];
                check_kept(&kept, self.packing.lengths[slot], row.logits)
                    .map_err(|m| hook_error(g.hook.name(), m))?;
                keep[slot] = Some(match keep[slot].take() {
                    None => kept,
                    Some(prev) => prev.into_iter().filter(|i| kept.contains(i)).collect(),
                });
            }
        }
        if keep.iter().all(Option::is_none) {
            return Ok(x);
        }
        let positions = self.packing.positions.to_vec1::<u32>()?;
        let mut index = Vec::with_capacity(positions.len());
        for (slot, kept) in keep.into_iter().enumerate() {
            let (off, len) = (self.packing.offsets[slot], self.packing.lengths[slot]);
            let Some(kept) = kept else {
                index.extend((off..off + len).map(|i| i as u32));
                continue;
            };
            index.extend(kept.iter().map(|&i| (off + i) as u32));
            let r = self.packing.rows[slot];
            self.kept[r] = Some(kept.iter().map(|&i| positions[off + i]).collect());
        }
        let x = x.index_select(&Tensor::new(index.as_slice(), &self.device)?, 0)?;
        let active = self.packing.rows.clone();
        self.repack(model, &active)?;
        Ok(x)
    }

    /// Settles every [`Exit::IfTopIn`] in `leaving`: one LM-head pass over those rows' last
    /// positions, then [`Exit::Propagate`] where the top token is a candidate, else
    /// [`Exit::Stay`]. Returns the computed logits `(1, vocab)` of the rows that leave.
    fn check_exits(
        &self,
        model: &Llama,
        x: &Tensor,
        leaving: &mut [Exit],
    ) -> Result<Vec<Option<Tensor>>> {
        let mut logits = vec![None; leaving.len()];
        let slots: Vec<usize> = (0..leaving.len())
            .filter(|&s| matches!(leaving[s], Exit::IfTopIn(_)))
            .collect();
        if slots.is_empty() {
            return Ok(logits);
        }
        let last = |s: usize| self.packing.offsets[s] + self.packing.lengths[s] - 1;
        let index: Vec<u32> = slots.iter().map(|&s| last(s) as u32).collect();
        let h = x.index_select(&Tensor::new(index.as_slice(), &self.device)?, 0)?;
        let h = candle_nn::ops::rms_norm(&h, &model.norm, model.config.rms_norm_eps)?;
        let rows: Vec<usize> = slots.iter().map(|&s| self.packing.rows[s]).collect();
        let head = self.lm_head(model, &rows, &vec![1; rows.len()], &h)?;
        let top = head.argmax(1)?.to_vec1::<u32>()?;
        for (i, &s) in slots.iter().enumerate() {
            let confirmed = matches!(&leaving[s], Exit::IfTopIn(c) if c.contains(&top[i]));
            leaving[s] = if confirmed {
                Exit::Propagate
            } else {
                Exit::Stay
            };
            logits[s] = confirmed.then(|| head.narrow(0, i, 1)).transpose()?;
        }
        Ok(logits)
    }

    /// Writes layer `l`'s keys and values for rows that exited before it, computed from
    /// their exit hidden states, so their later tokens find a complete cache.
    fn propagate_exited_kv(
        &self,
        model: &Llama,
        l: usize,
        layer: &DecoderLayer,
        batch: &mut [BatchRow<'_>],
    ) -> Result<()> {
        let cfg = &model.config;
        for e in self.exited.iter().filter(|e| e.propagate) {
            let n = e.hidden.dim(0)?;
            let h = candle_nn::ops::rms_norm(&e.hidden, &layer.input_norm, cfg.rms_norm_eps)?;
            let (cos, sin) = model.rope.tables(&e.positions)?;
            let k = layer
                .attn
                .k
                .forward(&h)?
                .reshape((n, cfg.num_kv_heads, cfg.head_dim))?;
            let k = Rope::apply(&k, &cos, &sin)?.transpose(0, 1)?;
            let v = layer
                .attn
                .v
                .forward(&h)?
                .reshape((n, cfg.num_kv_heads, cfg.head_dim))?;
            let kept = self.kept[e.row].as_deref();
            batch[e.row]
                .cache
                .append_at(l, &k, &v.transpose(0, 1)?, kept)?;
        }
        Ok(())
    }

    /// Final norm, LM head and logits hooks for every position a row asked for. Rows whose
    /// exit check already computed their one wanted position's logits reuse them.
    fn logits(
        &self,
        model: &Llama,
        batch: &[BatchRow<'_>],
        x: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        let mut out: Vec<Option<Tensor>> = vec![None; batch.len()];
        for (r, row) in batch.iter().enumerate() {
            if row.logits == LogitsWanted::Hidden {
                let h = self.final_hidden(r, x)?;
                out[r] = Some(candle_nn::ops::rms_norm(
                    &h,
                    &model.norm,
                    model.config.rms_norm_eps,
                )?);
            }
        }
        let Some((wanted, mut logits)) = self.head_logits(model, batch, x)? else {
            return Ok(out);
        };
        let rows: Vec<usize> = wanted.iter().map(|w| w.0).collect();
        let lengths: Vec<usize> = wanted.iter().map(|w| w.1).collect();
        for g in plan(self.rows, &rows, &lengths, |p| p.logits, &self.device)? {
            let old = g.gather(&logits)?;
            if let Some(new) = g.hook.logits(&g.group, &old)? {
                logits = g.replace(&logits, &new)?;
            }
        }
        let mut offset = 0;
        for (r, len) in wanted {
            out[r] = Some(logits.narrow(0, offset, len)?);
            offset += len;
        }
        Ok(out)
    }

    /// The LM head's logits of every wanted position, stacked in row order, with
    /// `(batch row, entries)` per row that wants any; `None` when none does. A row whose
    /// exit check computed its one wanted position's logits keeps them.
    fn head_logits(
        &self,
        model: &Llama,
        batch: &[BatchRow<'_>],
        x: &Tensor,
    ) -> Result<Option<(Vec<RowEntries>, Tensor)>> {
        let mut wanted = Vec::new();
        let mut checked: Vec<Option<Tensor>> = Vec::new();
        let (mut hidden, mut hidden_rows, mut hidden_lengths) =
            (Vec::new(), Vec::new(), Vec::new());
        for (r, row) in batch.iter().enumerate() {
            let offsets = row.logit_offsets();
            if offsets.is_empty() {
                continue;
            }
            wanted.push((r, offsets.len()));
            let exit = self.exited.iter().find(|e| e.row == r);
            match exit.and_then(|e| e.last_logits.as_ref()) {
                Some(l) if offsets.start + 1 == row.tokens.len() => checked.push(Some(l.clone())),
                _ => {
                    checked.push(None);
                    // The wanted positions end the row (the last, or all), pruned or not.
                    let h = self.final_hidden(r, x)?;
                    hidden.push(h.narrow(0, h.dim(0)? - offsets.len(), offsets.len())?);
                    hidden_rows.push(r);
                    hidden_lengths.push(offsets.len());
                }
            }
        }
        if wanted.is_empty() {
            return Ok(None);
        }
        let computed = match hidden.len() {
            0 => None,
            _ => {
                let h = cat(hidden)?;
                let h = candle_nn::ops::rms_norm(&h, &model.norm, model.config.rms_norm_eps)?;
                Some(self.lm_head(model, &hidden_rows, &hidden_lengths, &h)?)
            }
        };
        let mut parts = Vec::with_capacity(wanted.len());
        let mut offset = 0;
        for (c, &(_, len)) in checked.into_iter().zip(&wanted) {
            parts.push(match (c, &computed) {
                (Some(l), _) => l,
                (None, Some(all)) => {
                    offset += len;
                    all.narrow(0, offset - len, len)?
                }
                (None, None) => return Err(ModelError::Batch("logits lost a row".into())),
            });
        }
        Ok(Some((wanted, cat(parts)?)))
    }

    fn lm_head(
        &self,
        model: &Llama,
        rows: &[usize],
        lengths: &[usize],
        h: &Tensor,
    ) -> Result<Tensor> {
        let mut logits = model.lm_head.forward(h)?;
        for g in plan(self.rows, rows, lengths, |p| p.linear, &self.device)? {
            if g.hook.targets(0, Projection::LmHead) {
                if let Some(delta) =
                    g.hook
                        .linear_delta(0, Projection::LmHead, &g.group, &g.gather(h)?)?
                {
                    logits = g.add(&logits, &delta)?;
                }
            }
        }
        Ok(logits)
    }

    /// Hidden states of batch row `r` after its last layer: from the exit record if it left
    /// early, else from the packed output `x`.
    fn final_hidden(&self, r: usize, x: &Tensor) -> Result<Tensor> {
        if let Some(e) = self.exited.iter().find(|e| e.row == r) {
            return Ok(e.hidden.clone());
        }
        let slot = self
            .packing
            .rows
            .iter()
            .position(|&a| a == r)
            .ok_or_else(|| ModelError::Batch(format!("row {r} is neither active nor exited")))?;
        Ok(x.narrow(0, self.packing.offsets[slot], self.packing.lengths[slot])?)
    }
}
