//! The key/value cache of one sequence, kept outside the weights, and its plug-in state.
//!
//! Each sequence owns a `KvCache`; the engine keeps them by sequence id and hands the decoder
//! one per batch row, so a single set of weights serves many conversations at once. Storage
//! per layer is `(n_kv_heads, capacity, head_dim)`: appending writes in place, and the
//! stored slots read back as a view whose rows are contiguous, as attention's matmul wants.
//! Capacity doubles when full, so appends cost amortised O(new tokens). Dropping the cache
//! releases its memory, plug-in state included.
//!
//! Layers keep their own lengths. Normally every layer holds every position `0..len`, but a
//! token may leave keys and values in some layers and not others (an early-exit draft that
//! skips its last layers, a pruned vision token): such a layer then records the position of
//! each of its slots, attention reads those positions for causality, and RoPE never notices
//! (keys are rotated by their own position before they are stored). A layer returns to the
//! plain layout as soon as its slots are `0..n` again.
//!
//! [`KvCache::truncate`] cuts everything (every layer and every plug-in state) back to a
//! position, as if the later tokens had never been fed: speculative decoding's rejected
//! drafts. [`KvCache::fork`] copies it for the `n > 1` choices of one request, and
//! [`KvCache::fork_prefix`] copies its first positions for a request that shares them.

mod dtype;

use candle_core::{Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::hook_state::ChainState;

pub use dtype::KvDtype;
pub(crate) use dtype::{dequantize_q8, Q8_BLOCK, Q8_BLOCK_BYTES};

/// Smallest allocation, in positions; keeps one-token decode steps from reallocating.
const MIN_CAPACITY: usize = 64;

/// One layer's keys and values.
#[derive(Debug)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
    capacity: usize,
    /// Committed slots.
    len: usize,
    /// Slots written by the current step, past `len`; visible after [`KvCache::commit`].
    pending: usize,
    /// The position of every slot (committed and pending), ascending; `None` while slot `j`
    /// holds position `j`.
    positions: Option<Vec<u32>>,
}

#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    /// Positions fed so far (the next token's position), whatever each layer kept.
    len: usize,
    num_kv_heads: usize,
    head_dim: usize,
    dtype: KvDtype,
    device: Device,
    /// The plug-in states of this sequence's chain (see [`crate::hook_state`]).
    plugins: ChainState,
}

/// What [`KvCache::append`] hands to attention: every slot of the layer so far.
#[derive(Debug)]
pub struct LayerView<'a> {
    /// `(n_kv_heads, slots, row)`, a row being one head's `head_dim` values as the cache's
    /// [`KvDtype`] stores them.
    pub k: Tensor,
    pub v: Tensor,
    /// The position of each slot, or `None` when slot `j` is position `j`.
    pub positions: Option<&'a [u32]>,
}

impl KvCache {
    /// An empty cache; nothing is allocated until the first append.
    pub fn new(cfg: &ModelConfig, dtype: KvDtype, device: &Device) -> Self {
        Self {
            layers: (0..cfg.num_layers).map(|_| None).collect(),
            len: 0,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            dtype,
            device: device.clone(),
            plugins: ChainState::default(),
        }
    }

    /// Positions fed (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Slots layer `layer` holds: [`KvCache::len`] unless tokens skipped the layer.
    pub fn layer_len(&self, layer: usize) -> usize {
        self.layer(layer).map_or(0, |l| l.len)
    }

    /// The positions layer `layer` holds, in order.
    pub fn layer_positions(&self, layer: usize) -> Vec<u32> {
        match self.layer(layer) {
            None => Vec::new(),
            Some(l) => match &l.positions {
                Some(p) => p[..l.len].to_vec(),
                None => (0..l.len as u32).collect(),
            },
        }
    }

    /// Copies of layer `layer`'s committed keys and values, `(n_kv_heads, slots, head_dim)`
    /// each, in f32 whatever the cache holds (`None` before the layer was written).
    pub fn layer_kv(&self, layer: usize) -> Result<Option<(Tensor, Tensor)>> {
        let Some(l) = self.layer(layer) else {
            return Ok(None);
        };
        let read = |t: &Tensor| -> Result<Tensor> {
            let stored = t.narrow(1, 0, l.len)?;
            Ok(self.dtype.load(&stored, self.head_dim)?.contiguous()?)
        };
        Ok(Some((read(&l.k)?, read(&l.v)?)))
    }

    fn layer(&self, layer: usize) -> Option<&LayerKv> {
        self.layers.get(layer)?.as_ref()
    }

    /// The plug-in states of this sequence.
    pub fn plugins(&self) -> &ChainState {
        &self.plugins
    }

    pub fn plugins_mut(&mut self) -> &mut ChainState {
        &mut self.plugins
    }

    /// Bytes currently allocated for keys and values of all layers, plus plug-in state.
    pub fn allocated_bytes(&self) -> usize {
        let per_slot = 2 * self.num_kv_heads * self.dtype.row_bytes(self.head_dim);
        let kv: usize = self.layers.iter().flatten().map(|l| l.capacity).sum();
        kv * per_slot + self.plugins.allocated_bytes()
    }

    /// Makes room in every layer for `additional` more slots than it holds.
    pub fn reserve(&mut self, additional: usize) -> Result<()> {
        for layer in 0..self.layers.len() {
            self.reserve_layer(layer, additional)?;
        }
        Ok(())
    }

    fn reserve_layer(&mut self, layer: usize, additional: usize) -> Result<()> {
        let shape = |capacity| {
            (
                self.num_kv_heads,
                capacity,
                self.dtype.row_len(self.head_dim),
            )
        };
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| ModelError::Batch(format!("no cache for layer {layer}")))?;
        let (len, capacity) = slot.as_ref().map_or((0, 0), |l| (l.len, l.capacity));
        let needed = len + additional;
        if needed <= capacity {
            return Ok(());
        }
        let new_capacity = needed.max(2 * capacity).max(MIN_CAPACITY);
        let storage = self.dtype.storage();
        let k = Tensor::zeros(shape(new_capacity), storage, &self.device)?;
        let v = Tensor::zeros(shape(new_capacity), storage, &self.device)?;
        match slot {
            Some(old) => {
                if old.len > 0 {
                    k.slice_set(&old.k.narrow(1, 0, old.len)?.contiguous()?, 1, 0)?;
                    v.slice_set(&old.v.narrow(1, 0, old.len)?.contiguous()?, 1, 0)?;
                }
                (old.k, old.v, old.capacity) = (k, v, new_capacity);
            }
            None => {
                *slot = Some(LayerKv {
                    k,
                    v,
                    capacity: new_capacity,
                    len: 0,
                    pending: 0,
                    positions: None,
                })
            }
        }
        Ok(())
    }

    /// Writes `k`, `v` of shape `(n_kv_heads, n_new, head_dim)` for `layer`, as positions
    /// `len..len + n_new` of the sequence, and returns every slot of the layer so far. The
    /// new slots become part of the layer only at [`KvCache::commit`], after the whole step
    /// succeeded; a layer is written at most once per step (a later write replaces the
    /// uncommitted one, so a failed step leaves nothing behind).
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<LayerView<'_>> {
        self.append_at(layer, k, v, None)
    }

    /// [`KvCache::append`] for some of the step's positions only: `positions` (ascending,
    /// within `len..`, one per new slot) when a pruning hook removed the step's other tokens
    /// from this layer; `None` for every position `len..len + n_new`.
    pub fn append_at(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        positions: Option<&[u32]>,
    ) -> Result<LayerView<'_>> {
        let n_new = k.dim(1)?;
        let start = self.len;
        if let Some(p) = positions {
            let ascending = p.windows(2).all(|w| w[0] < w[1]);
            if p.len() != n_new || !ascending || p.first().is_some_and(|&f| (f as usize) < start) {
                return Err(ModelError::Batch(format!(
                    "{} positions for {n_new} new slots of a cache of {start}",
                    p.len()
                )));
            }
        }
        self.reserve_layer(layer, n_new)?;
        let (dtype, l) = (self.dtype, self.layer_mut(layer)?);
        l.k.slice_set(&dtype.store(k)?.contiguous()?, 1, l.len)?;
        l.v.slice_set(&dtype.store(v)?.contiguous()?, 1, l.len)?;
        l.pending = n_new;
        let contiguous = positions.is_none_or(|p| {
            p.first() == Some(&(start as u32)) && p.last() == Some(&((start + n_new - 1) as u32))
        });
        if l.positions.is_none() && (l.len != start || !contiguous) {
            // Tokens skipped this layer since it was last written: slots stop being positions.
            l.positions = Some((0..l.len as u32).collect());
        }
        if let Some(p) = &mut l.positions {
            p.truncate(l.len);
            match positions {
                Some(new) => p.extend_from_slice(new),
                None => p.extend(start as u32..(start + n_new) as u32),
            }
        }
        let total = l.len + n_new;
        Ok(LayerView {
            k: l.k.narrow(1, 0, total)?,
            v: l.v.narrow(1, 0, total)?,
            positions: l.positions.as_deref(),
        })
    }

    fn layer_mut(&mut self, layer: usize) -> Result<&mut LayerKv> {
        self.layers
            .get_mut(layer)
            .and_then(|s| s.as_mut())
            .ok_or_else(|| ModelError::Batch(format!("no cache for layer {layer}")))
    }

    /// Drops what a failed step wrote (called before each step, so a layer that the next step
    /// leaves alone cannot commit stale slots).
    pub(crate) fn discard_pending(&mut self) {
        for l in self.layers.iter_mut().flatten() {
            l.pending = 0;
        }
    }

    /// Makes the step's writes visible: the sequence is `n_new` positions longer, and each
    /// layer keeps the slots written to it in this step (all of them, unless tokens skipped it).
    pub fn commit(&mut self, n_new: usize) {
        self.len += n_new;
        for l in self.layers.iter_mut().flatten() {
            l.len += std::mem::take(&mut l.pending);
        }
    }

    /// Forgets positions `len` and later in every layer and every plug-in state, as if they
    /// had never been fed (rejected speculative tokens); memory is kept. Feeding the same
    /// tokens again gives the same bits as the first time.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        for l in self.layers.iter_mut().flatten() {
            l.pending = 0;
            l.len = match &mut l.positions {
                None => l.len.min(len),
                Some(p) => {
                    p.truncate(l.len);
                    let kept = p.partition_point(|&x| (x as usize) < len);
                    p.truncate(kept);
                    kept
                }
            };
            // Slots `0..n` holding positions `0..n` are the plain layout again.
            if l.positions.as_ref().is_some_and(|p| is_identity(p)) {
                l.positions = None;
            }
        }
        self.len = self.len.min(len);
        self.plugins.truncate(len)
    }

    /// An independent copy of the committed contents (keys, values, plug-in state), for the
    /// choices of an `n > 1` request after their shared prompt.
    pub fn fork(&self) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|slot| slot.as_ref().map(|l| l.copy(l.len, l.capacity)).transpose())
            .collect::<Result<Vec<_>>>()?;
        Ok(self.with_contents(layers, self.len, self.plugins.fork()?))
    }

    /// An independent copy of positions `0..len` only (keys, values, and plug-in state cut
    /// back to `len`), allocated for just those: what a later request sharing this sequence's
    /// first `len` tokens starts from (automatic prefix caching). Feeding it the rest of that
    /// request gives the same bits as feeding the whole request to an empty cache.
    pub fn fork_prefix(&self, len: usize) -> Result<Self> {
        let len = len.min(self.len);
        let layers = self
            .layers
            .iter()
            .map(|slot| {
                slot.as_ref()
                    .map(|l| {
                        let kept = l.slots_before(len);
                        l.copy(kept, kept.max(MIN_CAPACITY))
                    })
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        let mut plugins = self.plugins.fork()?;
        plugins.truncate(len)?;
        Ok(self.with_contents(layers, len, plugins))
    }

    fn with_contents(&self, layers: Vec<Option<LayerKv>>, len: usize, plugins: ChainState) -> Self {
        Self {
            layers,
            len,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            dtype: self.dtype,
            device: self.device.clone(),
            plugins,
        }
    }
}

impl LayerKv {
    /// Committed slots holding positions before `len`.
    fn slots_before(&self, len: usize) -> usize {
        match &self.positions {
            None => self.len.min(len),
            Some(p) => p[..self.len].partition_point(|&x| (x as usize) < len),
        }
    }

    /// A copy of the first `kept` committed slots in new storage of `capacity` slots.
    fn copy(&self, kept: usize, capacity: usize) -> Result<Self> {
        let copy = |t: &Tensor| -> Result<Tensor> {
            let (heads, _, dim) = t.dims3()?;
            let all = Tensor::zeros((heads, capacity, dim), t.dtype(), t.device())?;
            if kept > 0 {
                all.slice_set(&t.narrow(1, 0, kept)?.contiguous()?, 1, 0)?;
            }
            Ok(all)
        };
        let positions = self.positions.as_ref().map(|p| p[..kept].to_vec());
        Ok(Self {
            k: copy(&self.k)?,
            v: copy(&self.v)?,
            capacity,
            len: kept,
            pending: 0,
            positions: positions.filter(|p| !is_identity(p)),
        })
    }
}

/// Whether ascending, distinct positions are exactly `0..n`.
fn is_identity(positions: &[u32]) -> bool {
    positions
        .last()
        .is_none_or(|&p| p as usize + 1 == positions.len())
}

#[cfg(test)]
mod tests;
