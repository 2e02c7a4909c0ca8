//! A forward step's batch: rows from different sequences, each at its own position, packed
//! into one token matrix.
//!
//! Linear layers (most of the compute) run once over all rows' tokens stacked together;
//! attention then runs per row against that row's own KV cache. A row may be a prefill chunk
//! of many tokens or a single decode token; both kinds share a step.

use candle_core::{Device, Tensor};

use crate::hook_state::ChainState;
use crate::hooks::{HookCall, HookRow};
use crate::kv_cache::KvCache;

/// Which positions of a row need logits after the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    /// None: an intermediate prefill chunk (skips the LM head entirely).
    None,
    /// The last position: what sampling needs.
    Last,
    /// Every position: prompt log-probs (`echo`), perplexity, training checks.
    All,
    /// No logits: every position's final hidden state instead, after the final norm (what
    /// the LM head would read), `(row tokens, hidden)`: embeddings. Logits hooks do not run
    /// on them.
    Hidden,
}

/// One row of a forward step.
pub struct BatchRow<'a> {
    /// The engine's sequence id, passed to hooks that keep per-sequence state.
    pub seq_id: u64,
    /// The tokens to feed, starting at position `cache.len()`.
    pub tokens: &'a [u32],
    /// The sequence's cache (and its plug-in state); the step appends `tokens.len()`
    /// positions to it.
    pub cache: &'a mut KvCache,
    /// The row's plug-in chain, in order (empty: the base model).
    pub hooks: &'a [HookCall],
    pub logits: LogitsWanted,
}

impl BatchRow<'_> {
    /// Positions needing logits, as offsets into the row's tokens.
    pub(crate) fn logit_offsets(&self) -> std::ops::Range<usize> {
        let n = self.tokens.len();
        match self.logits {
            LogitsWanted::None | LogitsWanted::Hidden => 0..0,
            LogitsWanted::Last => n - 1..n,
            LogitsWanted::All => 0..n,
        }
    }
}

/// The parts of a row that hooks and packing read, copied out of the [`BatchRow`] so the
/// rows' caches stay free to be borrowed mutably during the step. The plug-in state is moved
/// out of the cache for the step (see `Llama::forward`) and borrowed from there.
#[derive(Clone, Copy)]
pub(crate) struct RowInfo<'a> {
    pub seq_id: u64,
    pub tokens: &'a [u32],
    pub hooks: &'a [HookCall],
    pub start: usize,
    pub logits: LogitsWanted,
    pub state: &'a ChainState,
}

impl<'a> RowInfo<'a> {
    pub fn of(row: &BatchRow<'a>, state: &'a ChainState) -> Self {
        Self {
            seq_id: row.seq_id,
            tokens: row.tokens,
            hooks: row.hooks,
            start: row.cache.len(),
            logits: row.logits,
            state,
        }
    }

    /// The row as the hook at chain position `position` sees it.
    pub fn hook_row(&self, position: usize) -> Option<HookRow<'a>> {
        let call = self.hooks.get(position)?;
        Some(HookRow {
            seq_id: self.seq_id,
            tokens: self.tokens,
            start_position: self.start,
            params: &call.params,
            logits: self.logits,
            state: self.state.slot(self.hooks, position),
        })
    }
}

/// Where the active rows' tokens sit in the packed `(n_tokens, hidden)` matrix.
#[derive(Debug, Clone)]
pub(crate) struct Packing {
    /// Batch row index of each active row, in packed order.
    pub rows: Vec<usize>,
    /// First packed token of each active row.
    pub offsets: Vec<usize>,
    /// Token count of each active row.
    pub lengths: Vec<usize>,
    /// Position of every packed token, `(n_tokens,)` u32.
    pub positions: Tensor,
}

impl Packing {
    /// Packs `active` rows (batch indices, in order) of the batch; `kept[r]`, when given, lists
    /// the positions of the tokens of row `r` still in the forward pass (a pruning hook removed
    /// the others), else every token is.
    pub fn new(
        rows: &[RowInfo<'_>],
        active: &[usize],
        kept: &[Option<Vec<u32>>],
        device: &Device,
    ) -> candle_core::Result<Self> {
        let mut offsets = Vec::with_capacity(active.len());
        let mut lengths = Vec::with_capacity(active.len());
        let mut positions = Vec::new();
        for &r in active {
            offsets.push(positions.len());
            match kept.get(r).and_then(Option::as_ref) {
                Some(p) => {
                    lengths.push(p.len());
                    positions.extend_from_slice(p);
                }
                None => {
                    let row = &rows[r];
                    lengths.push(row.tokens.len());
                    let start = row.start as u32;
                    positions.extend(start..start + row.tokens.len() as u32);
                }
            }
        }
        let positions = Tensor::new(positions.as_slice(), device)?;
        Ok(Self {
            rows: active.to_vec(),
            offsets,
            lengths,
            positions,
        })
    }

    /// Packed token indices of the given active-row slots, `(n,)` u32.
    pub fn token_index(&self, slots: &[usize], device: &Device) -> candle_core::Result<Tensor> {
        let idx: Vec<u32> = slots
            .iter()
            .flat_map(|&s| (self.offsets[s]..self.offsets[s] + self.lengths[s]).map(|i| i as u32))
            .collect();
        Tensor::new(idx.as_slice(), device)
    }
}
