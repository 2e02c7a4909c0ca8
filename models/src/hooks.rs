//! Hook points: where plug-ins act inside the forward pass.
//!
//! A plug-in implements [`Hook`]; every method has a no-op default, so a plug-in overrides
//! only the points it uses and declares them in [`Hook::points`] (the decoder never gathers
//! activations for a point a hook does not use). Each batch row carries its own ordered chain
//! of [`HookCall`]s (a hook plus that request's parameters), so one batch mixes rows with
//! different chains or none. For each hook point the decoder groups the rows whose chain
//! holds the same hook at the same chain position and calls the hook once per group with just
//! those rows' activations (a LoRA adapter shared by five requests runs one matmul, not five).
//! Rows with an empty chain cost nothing: with no hooks in the batch no group exists and no
//! hook code runs.
//!
//! A hook that needs memory of its own for a sequence (a second model's KV cache, compressed
//! keys, exit history) creates it in [`Hook::new_state`] and reaches it from each call through
//! [`HookRow::with_state`]; see [`crate::hook_state`] for its life cycle.
//!
//! Every hook must mix: rows with and without it, and rows with different parameters, share
//! one step. A plug-in that could not (say, one that needs the whole batch to itself) is
//! not a hook but a different model.
//!
//! The trait follows ripgrep's `Sink`: each method documents when it runs, the shapes it
//! sees, and what its return value means.

use std::any::Any;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use candle_core::Tensor;

use crate::attention_probe::AttentionProbe;
use crate::batch::LogitsWanted;
use crate::error::Result;
use crate::hook_state::{self, HookState};
use crate::output_head::OutputHead;

/// The projections a linear-delta hook can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Projection {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
    LmHead,
}

impl Projection {
    /// The Hugging Face module name (`q_proj`, ..., `lm_head`), as PEFT's `target_modules`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Q => "q_proj",
            Self::K => "k_proj",
            Self::V => "v_proj",
            Self::O => "o_proj",
            Self::Gate => "gate_proj",
            Self::Up => "up_proj",
            Self::Down => "down_proj",
            Self::LmHead => "lm_head",
        }
    }
}

/// Which hook points a hook uses. The decoder consults this once per step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HookPoints {
    /// [`Hook::step_tokens`]: every row's tokens, every step.
    pub tokens: bool,
    pub embeddings: bool,
    pub linear: bool,
    pub attention: bool,
    pub residual: bool,
    pub early_exit: bool,
    /// [`Hook::prune`]: removes tokens of prefill rows from the layers after one.
    pub prune: bool,
    pub logits: bool,
    /// [`Hook::draft`]: proposes tokens for the next step to verify. Called by the engine
    /// between steps, never by the forward pass.
    pub draft: bool,
}

/// Per-request parameters of one hook in one row's chain (a LoRA scale, steering layers...).
/// The hook that made them downcasts them back.
pub type HookParams = Arc<dyn Any + Send + Sync>;

/// One entry of a row's plug-in chain.
#[derive(Clone)]
pub struct HookCall {
    pub hook: Arc<dyn Hook>,
    pub params: HookParams,
}

impl HookCall {
    pub fn new(hook: Arc<dyn Hook>, params: HookParams) -> Self {
        Self { hook, params }
    }

    /// A call without parameters.
    pub fn bare(hook: Arc<dyn Hook>) -> Self {
        Self::new(hook, Arc::new(()))
    }
}

impl Debug for HookCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HookCall")
            .field("hook", &self.hook.name())
            .finish()
    }
}

/// One batch row as a hook sees it.
#[derive(Debug, Clone)]
pub struct HookRow<'a> {
    /// The engine's sequence id, stable across steps (for hooks that keep per-sequence state).
    pub seq_id: u64,
    /// The tokens this row feeds in this step.
    pub tokens: &'a [u32],
    /// Position of `tokens[0]` in the sequence.
    pub start_position: usize,
    /// This row's parameters for the hook being called.
    pub params: &'a HookParams,
    /// Which of `tokens` get logits after this step.
    pub logits: LogitsWanted,
    /// This row's state for the hook being called, if [`Hook::new_state`] made one.
    pub state: Option<&'a Mutex<Box<dyn HookState>>>,
}

impl HookRow<'_> {
    /// Positions of this row's tokens.
    pub fn positions(&self) -> std::ops::Range<usize> {
        self.start_position..self.start_position + self.tokens.len()
    }

    /// Runs `f` on this row's state, which must be the `T` the hook's `new_state` made.
    pub fn with_state<T: HookState, R>(
        &self,
        hook: &str,
        f: impl FnOnce(&mut T) -> R,
    ) -> Result<R> {
        hook_state::with_state(self.state, hook, f)
    }
}

/// The rows one hook is called for. Tensors handed to the hook hold these rows' activations
/// stacked in row order: row `i` owns `lengths[i]` consecutive entries.
#[derive(Debug, Clone)]
pub struct HookGroup<'a> {
    pub rows: Vec<HookRow<'a>>,
    pub lengths: Vec<usize>,
    /// Rows the step is running at this point, with and without this hook (rows that left
    /// early no longer count): what a hook whose cost depends on the batch can decide by.
    pub step_rows: usize,
}

impl HookGroup<'_> {
    /// Total entries across rows (the first dimension of the tensors the hook receives).
    pub fn len(&self) -> usize {
        self.lengths.iter().sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One value per row, repeated for each of that row's entries: a per-entry column.
    pub fn per_entry(&self, per_row: impl IntoIterator<Item = f32>) -> Vec<f32> {
        per_row
            .into_iter()
            .zip(&self.lengths)
            .flat_map(|(v, &n)| std::iter::repeat_n(v, n))
            .collect()
    }
}

/// A plug-in's presence inside the forward pass. All methods but `name` and `points` default
/// to "leave the model unchanged".
pub trait Hook: Send + Sync {
    /// A short name for logs and errors.
    fn name(&self) -> &str;

    /// The hook points this hook uses; the others are never called.
    fn points(&self) -> HookPoints;

    /// Runs once when a sequence starts (before its first step), for this hook's entry of the
    /// sequence's chain. Returns the state this hook keeps for that sequence, or `None`.
    /// An error fails that sequence alone.
    fn new_state(&self, _params: &HookParams) -> Result<Option<Box<dyn HookState>>> {
        Ok(None)
    }

    /// Whether a prefix cached by another request (its keys and values, and this hook's state
    /// for it) may serve a request whose chain holds this hook with these parameters: the
    /// engine's automatic prefix caching reuses a prefix only where every hook of both chains
    /// agrees (see [`PrefixReuse`]). The default, [`PrefixReuse::Never`], is the safe answer
    /// for a hook that has not thought about it.
    fn prefix_reuse(&self, _params: &HookParams) -> PrefixReuse {
        PrefixReuse::Never
    }

    /// Whether this hook needs a sequence's whole prompt in one prefill step (a pruning hook
    /// that decides which image tokens stay from the instruction after them). The engine then
    /// feeds such a prompt in one step where the step's token budget can ever hold it (at most
    /// `max_batch_tokens - max_running` tokens), else in chunks as any other.
    fn whole_prompt(&self, _params: &HookParams) -> bool {
        false
    }

    /// Bytes of state this hook will hold per position of a sequence with these parameters,
    /// an estimate the scheduler adds to the sequence's KV claim before it is admitted (what
    /// the state actually holds is counted from [`HookState::allocated_bytes`] once it runs).
    fn state_bytes_per_token(&self, _params: &HookParams) -> usize {
        0
    }

    /// Runs once per step for every row of the group, before token embedding: each row's
    /// `tokens` at `start_position`, whether it is a prefill chunk or a decode token and
    /// whether or not it wants logits ([`HookRow::logits`] says which positions will). So a
    /// second model beside the base (a memory decoder) sees exactly the tokens the base sees,
    /// in every chunking, and can prepare what [`Hook::logits`] will need in the row's state.
    fn step_tokens(&self, _group: &HookGroup<'_>) -> Result<()> {
        Ok(())
    }

    /// Runs once per step after token embedding, before layer 0.
    /// `x`: `(group tokens, hidden)`. Returns a replacement of the same shape, or `None`.
    fn embeddings(&self, _group: &HookGroup<'_>, _x: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Whether [`Hook::linear_delta`] acts on this projection of this layer (`layer` is
    /// ignored for `LmHead`); saves gathering inputs for projections an adapter leaves alone.
    fn targets(&self, _layer: usize, _projection: Projection) -> bool {
        false
    }

    /// Runs on every targeted projection of every layer, after the base matmul.
    /// `x`: the projection's input, `(group tokens, in)`. Returns `(group tokens, out)` to add
    /// to the base output, or `None`.
    fn linear_delta(
        &self,
        _layer: usize,
        _projection: Projection,
        _group: &HookGroup<'_>,
        _x: &Tensor,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Runs inside attention, per layer and per row, before the row attends. `q`: the row's
    /// queries before RoPE, `(row tokens, n_heads, head_dim)`; `k`: the row's new keys
    /// before RoPE, `(row tokens, n_kv_heads, head_dim)` (a gate keeps its own compressed
    /// copy of them in its state); the tokens' positions are [`HookRow::positions`]; `slots`:
    /// how many keys the layer's cache holds with the row's new ones (attention reads slots
    /// `0..slots`, see [`crate::KvCache::layer_positions`]).
    /// Returns which blocks of slots each key/value head reads, or `None` for all of them.
    /// The kernel reads only the chosen blocks; causality still applies within them. Rows
    /// whose chain holds several selecting hooks read the intersection.
    fn attention_blocks(
        &self,
        _layer: usize,
        _row: &HookRow<'_>,
        _q: &Tensor,
        _k: &Tensor,
        _slots: usize,
    ) -> Result<Option<KeyBlocks>> {
        Ok(None)
    }

    /// Runs after decoder layer `layer` (0-based; its output is the residual stream, as HF
    /// `hidden_states[layer + 1]`). `h`: `(group tokens, hidden)`. Returns a replacement of the
    /// same shape, or `None`.
    fn residual(
        &self,
        _layer: usize,
        _group: &HookGroup<'_>,
        _h: &Tensor,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Runs after decoder layer `layer`, after the residual hooks, for the rows still in the
    /// stack (never after the last layer). `h`: `(group tokens, hidden)`; `head`: the model's
    /// final norm and LM head, for scoring candidate tokens at this layer. Returns one
    /// [`Exit`] per row of the group (`None`: every row stays). A row that exits gets its
    /// logits from this layer's output. With several hooks the first that exits a row
    /// decides how.
    fn early_exit(
        &self,
        _layer: usize,
        _group: &HookGroup<'_>,
        _h: &Tensor,
        _head: &OutputHead<'_>,
    ) -> Result<Option<Vec<Exit>>> {
        Ok(None)
    }

    /// Runs after decoder layer `layer`, after the residual and early-exit hooks, for the rows
    /// still in the stack. `h`: `(group tokens, hidden)`, the rows' tokens that are still in
    /// the forward pass (all of them, unless a pruning hook at an earlier layer removed some).
    /// Returns, per row of the group, the offsets into those tokens to keep (ascending), or
    /// `None` to keep them all; `None` overall keeps every row whole. Removed tokens leave the
    /// forward pass: the later layers neither compute them nor store their keys and values, so
    /// the row's later tokens and decode steps never attend to them there; the kept tokens
    /// keep their positions. A row that wants logits must keep its last token, and a row that
    /// wants every position's logits or hidden states cannot be pruned (the step fails, naming
    /// the hook). Meant for prefill: vision-token pruning. `probe`: the next layer's attention,
    /// for scoring tokens by what the last one attends to (FastV).
    fn prune(
        &self,
        _layer: usize,
        _group: &HookGroup<'_>,
        _h: &Tensor,
        _probe: &AttentionProbe<'_>,
    ) -> Result<Option<Vec<Option<Vec<usize>>>>> {
        Ok(None)
    }

    /// Runs on the final logits, before sampling. `logits`: `(group entries, vocab)`, one
    /// entry per position whose logits were asked for. Returns a replacement, or `None`.
    fn logits(&self, _group: &HookGroup<'_>, _logits: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Runs in the engine between steps, not in the forward pass: after a decoding sequence
    /// has sampled, proposes up to `max` tokens to follow `tokens` (the whole sequence so far,
    /// prompt then generated, the last sampled token included). The next step feeds the last
    /// token and the drafts in one row with logits at every position; the sequence samples
    /// them in order as it would one by one, keeps the drafts that equal its own samples and
    /// cuts the cache back after the first that does not ([`crate::KvCache::truncate`]), so
    /// the output is what it would be without drafts. Returns the drafts, at most `max`;
    /// empty for none. With several drafting hooks the first non-empty proposal is fed.
    fn draft(&self, _params: &HookParams, _tokens: &[u32], _max: usize) -> Vec<u32> {
        Vec::new()
    }
}

/// What a hook means for reusing cached prefixes ([`Hook::prefix_reuse`]).
///
/// A cached prefix holds what the forward pass left for its positions: every layer's keys and
/// values, and the state of each hook that keeps one. A request may reuse it only if its own
/// chain would have left the same: the same hooks (the same loaded objects, so a plug-in
/// replaced under its name never matches its old prefixes), in the same order, with the same
/// key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PrefixReuse {
    /// Changes nothing a prefix holds and keeps no state that depends on it (a drafter, a
    /// hook on the final logits only): chains with and without it share prefixes.
    Neutral,
    /// Prefixes are shared only with chains holding this hook with the same key: whatever of
    /// the parameters changes keys, values or the hook's state (a LoRA scale, steering
    /// layers); an empty key when none does (a memory decoder's mixing weight).
    Keyed(String),
    /// As [`PrefixReuse::Keyed`], but only the prompt's positions are kept for reuse: the
    /// hook changes what decode steps leave (an early exit propagates keys and values from
    /// an intermediate layer), so a later request's prefill of the same tokens would differ.
    PromptOnly(String),
    /// No prefix is reused for a request with this hook, nor kept from one.
    Never,
}

/// What an early-exit hook decides for one row after a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Go on through the next layer.
    Stay,
    /// Leave; the later layers still get the row's keys and values, computed from this
    /// layer's output (CALM's state propagation), so later tokens find every layer complete.
    Propagate,
    /// Leave without keys and values in the later layers: their caches skip the row's
    /// positions (a draft token that a verification row will replace after
    /// [`crate::KvCache::truncate`]).
    Skip,
    /// Leave as [`Exit::Propagate`] if the top token of this layer's logits at the row's last
    /// position (final norm and LM head, the head's linear hooks included) is one of these
    /// candidates, else stay (SpecEE's check of a predictor that fired). The logits computed
    /// for the check become the row's logits, so a confirmed exit costs no second LM head.
    IfTopIn(Vec<u32>),
}

/// Which blocks of a layer's cache slots each key/value head reads (a sparse-attention
/// choice): `per_kv_head[h]` lists block indices, ascending; block `b` is slots
/// `b * block_size..(b + 1) * block_size` (the last block may be short).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyBlocks {
    pub block_size: usize,
    pub per_kv_head: Vec<Vec<u32>>,
}

/// A hook that declares every point and changes nothing: the invariant tests check that a
/// chain of these gives bit-identical output to an empty chain.
#[derive(Debug, Default)]
pub struct NoOpHook;

impl Hook for NoOpHook {
    fn name(&self) -> &str {
        "noop"
    }

    fn points(&self) -> HookPoints {
        HookPoints {
            tokens: true,
            embeddings: true,
            linear: true,
            attention: true,
            residual: true,
            early_exit: true,
            prune: true,
            logits: true,
            draft: true,
        }
    }

    fn targets(&self, _layer: usize, _projection: Projection) -> bool {
        true
    }
}
