//! What a memory decoder keeps for one sequence: its own KV cache, fed exactly the tokens the
//! base model is fed, and the logits the last step left for the logits hook to mix.
//!
//! The state lives in the sequence's [`models::KvCache`] (see [`models::hook_state`]), so the
//! memory's cache is counted with the base's, copied for `n > 1` choices, cut back with the
//! base's cache and freed with it, however the sequence ends.

use candle_core::Tensor;
use models::{HookState, KvCache};

#[derive(Debug)]
pub struct MemoryState {
    /// The memory model's keys and values for this sequence.
    pub cache: KvCache,
    /// The memory's logits for the positions the base gives logits for in the current step,
    /// `(positions, vocab)`: set by `step_tokens`, taken by the logits hook.
    pub logits: Option<Tensor>,
}

impl HookState for MemoryState {
    fn allocated_bytes(&self) -> usize {
        let logits = self
            .logits
            .as_ref()
            .map_or(0, |t| t.elem_count() * t.dtype().size_in_bytes());
        self.cache.allocated_bytes() + logits
    }

    fn fork(&self) -> models::Result<Box<dyn HookState>> {
        // Forks happen between steps, when the logits of the last one were already mixed.
        Ok(Box::new(Self {
            cache: self.cache.fork()?,
            logits: None,
        }))
    }

    fn truncate(&mut self, len: usize) -> models::Result<()> {
        self.logits = None;
        self.cache.truncate(len)
    }
}
