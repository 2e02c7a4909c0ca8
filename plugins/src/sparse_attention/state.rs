//! What the gate keeps for one sequence: per layer, the compressed key of every closed block
//! (SeerAttention-R's K compression cache) and the raw pre-RoPE keys the next compression
//! and a rollback need.
//!
//! A block closes when its last key arrives, in a prefill chunk or a decode step alike, so the
//! cache after a prefill equals the one built token by token. The raw keys kept are those of
//! the last closed block and of the open one (at most two blocks): a rollback of rejected
//! speculative tokens ([`HookState::truncate`]) that reopens the last closed block recomputes
//! it from them. A cut further back (a cached prefix reused at its length) keeps every block
//! before the cut, but the block it cuts through has lost its first keys: that block is read
//! whole by every later token, whatever the gate says (one block more than the budget).
//! Keys that do not follow the ones the state has seen leave the layer reading densely for
//! the rest of the sequence: slower, never wrong.

use models::HookState;

use super::gate::{pool, GateShape, LayerGate};

/// One layer's compressed keys for one sequence.
#[derive(Debug, Clone, Default)]
pub struct LayerKeys {
    /// Keys seen: positions `0..fed`.
    pub fed: usize,
    /// `(closed blocks, h, d_g)`: block `j` covers positions `j*b..(j+1)*b`.
    pub compressed: Vec<f32>,
    /// Pre-RoPE keys `(n, h, d)` of positions `raw_start..fed`.
    raw: Vec<f32>,
    raw_start: usize,
    /// Blocks read by every token whatever their score: cut through by a truncation that
    /// reached past the raw keys, so their compressed keys miss some of their keys.
    pub forced: Vec<u32>,
    /// The layer no longer knows its blocks and reads every key.
    pub dense: bool,
}

impl LayerKeys {
    /// Appends keys `(n, h, d)` of positions `start..start + n`, closing and compressing each
    /// block they fill.
    pub fn feed(
        &mut self,
        shape: &GateShape,
        gate: &LayerGate,
        block: usize,
        keys: &[f32],
        start: usize,
    ) {
        if self.dense {
            return;
        }
        if start != self.fed {
            self.dense = true;
            return;
        }
        let width = shape.kv_heads * shape.head_dim;
        for token in keys.chunks_exact(width) {
            self.raw.extend_from_slice(token);
            self.fed += 1;
            if self.fed.is_multiple_of(block) {
                self.close(shape, gate, block);
            }
        }
    }

    /// Compresses the block that just filled and forgets the raw keys before it.
    fn close(&mut self, shape: &GateShape, gate: &LayerGate, block: usize) {
        let width = shape.kv_heads * shape.head_dim;
        let first = self.fed - block;
        // After a cut into this block its raw keys start later (and the block is forced).
        let from = first.saturating_sub(self.raw_start) * width;
        let pooled = pool(&self.raw[from..], shape.kv_heads, shape.head_dim);
        self.compressed.extend(gate.key(shape, &pooled, first));
        self.raw.drain(..from);
        self.raw_start = self.raw_start.max(first);
    }

    /// Forgets positions `len..`; see the module documentation.
    fn truncate(&mut self, len: usize, compressed_width: usize, width: usize, block: usize) {
        if len >= self.fed || self.dense {
            return;
        }
        self.compressed.truncate(len / block * compressed_width);
        self.forced.retain(|&j| (j as usize) < len.div_ceil(block));
        if len >= self.raw_start {
            self.raw.truncate((len - self.raw_start) * width);
        } else {
            self.raw.clear();
            self.raw_start = len;
            let cut = (len / block) as u32;
            if !len.is_multiple_of(block) && !self.forced.contains(&cut) {
                self.forced.push(cut);
            }
        }
        self.fed = len;
    }
}

/// A sequence's [`LayerKeys`], one per layer (empty for the dense ones).
#[derive(Debug, Clone)]
pub struct SparseState {
    pub layers: Vec<LayerKeys>,
    shape: GateShape,
    block: usize,
}

impl SparseState {
    pub fn new(layers: usize, shape: GateShape, block: usize) -> Self {
        Self {
            layers: vec![LayerKeys::default(); layers],
            shape,
            block,
        }
    }
}

impl HookState for SparseState {
    fn allocated_bytes(&self) -> usize {
        let floats: usize = self
            .layers
            .iter()
            .map(|l| l.compressed.capacity() + l.raw.capacity())
            .sum();
        floats * 4
    }

    fn fork(&self) -> models::Result<Box<dyn HookState>> {
        Ok(Box::new(self.clone()))
    }

    fn truncate(&mut self, len: usize) -> models::Result<()> {
        let compressed = self.shape.kv_heads * self.shape.gate_dim;
        let width = self.shape.kv_heads * self.shape.head_dim;
        for layer in &mut self.layers {
            layer.truncate(len, compressed, width, self.block);
        }
        Ok(())
    }
}
