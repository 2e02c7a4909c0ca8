//! The key/value cache of one sequence, kept outside the weights.
//!
//! Each sequence owns a `KvCache`; the engine keeps them by sequence id and hands the decoder
//! one per batch row, so a single set of weights serves many conversations at once. Storage
//! per layer is `(n_kv_heads, capacity, head_dim)`: appending writes in place, and the
//! first `len` positions read back as a view whose rows are contiguous, as attention's
//! matmul wants. Capacity doubles when full, so appends cost amortised O(new tokens).
//! Dropping the cache releases its memory.

use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

/// Smallest allocation, in positions; keeps one-token decode steps from reallocating.
const MIN_CAPACITY: usize = 64;

#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
    capacity: usize,
    num_kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
}

impl KvCache {
    /// An empty cache; nothing is allocated until the first append.
    pub fn new(cfg: &ModelConfig, dtype: DType, device: &Device) -> Self {
        Self {
            layers: (0..cfg.num_layers).map(|_| None).collect(),
            len: 0,
            capacity: 0,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            dtype,
            device: device.clone(),
        }
    }

    /// Positions stored (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes currently allocated for keys and values of all layers.
    pub fn allocated_bytes(&self) -> usize {
        let per_layer =
            2 * self.num_kv_heads * self.capacity * self.head_dim * self.dtype.size_in_bytes();
        per_layer * self.layers.len()
    }

    /// Makes room for `additional` positions past `len` in every layer.
    pub fn reserve(&mut self, additional: usize) -> Result<()> {
        let needed = self.len + additional;
        if needed <= self.capacity {
            return Ok(());
        }
        let new_capacity = needed.max(2 * self.capacity).max(MIN_CAPACITY);
        let shape = (self.num_kv_heads, new_capacity, self.head_dim);
        for slot in self.layers.iter_mut() {
            let k = Tensor::zeros(shape, self.dtype, &self.device)?;
            let v = Tensor::zeros(shape, self.dtype, &self.device)?;
            if let (Some((old_k, old_v)), true) = (slot.as_ref(), self.len > 0) {
                k.slice_set(&old_k.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                v.slice_set(&old_v.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
            }
            *slot = Some((k, v));
        }
        self.capacity = new_capacity;
        Ok(())
    }

    /// Writes `k`, `v` of shape `(n_kv_heads, n_new, head_dim)` for `layer` at positions
    /// `len..len + n_new` and returns views of every position so far, each
    /// `(n_kv_heads, len + n_new, head_dim)`. The new positions become part of `len` only
    /// at [`KvCache::commit`], after all layers have written theirs.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n_new = k.dim(1)?;
        self.reserve(n_new)?;
        let slot = self.layers.get(layer).and_then(|s| s.as_ref());
        let (ck, cv) =
            slot.ok_or_else(|| ModelError::Batch(format!("no cache for layer {layer}")))?;
        ck.slice_set(&k.to_dtype(self.dtype)?.contiguous()?, 1, self.len)?;
        cv.slice_set(&v.to_dtype(self.dtype)?.contiguous()?, 1, self.len)?;
        let total = self.len + n_new;
        Ok((ck.narrow(1, 0, total)?, cv.narrow(1, 0, total)?))
    }

    /// Makes the `n_new` positions written by the last appends visible.
    pub fn commit(&mut self, n_new: usize) {
        self.len += n_new;
    }

    /// Forgets positions from `len` on (speculative decoding's rejected tokens); memory is kept.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Architecture, RopeScaling};

    fn cfg() -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Llama,
            hidden_size: 8,
            intermediate_size: 16,
            num_layers: 2,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 2,
            vocab_size: 10,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: RopeScaling::None,
            max_position_embeddings: 1024,
            tie_word_embeddings: true,
            attention_bias: false,
        }
    }

    fn kv(values: &[f32]) -> Tensor {
        Tensor::from_vec(values.to_vec(), (1, values.len() / 2, 2), &Device::Cpu).expect("tensor")
    }

    #[test]
    fn appends_accumulate_across_growth() -> Result<()> {
        let mut cache = KvCache::new(&cfg(), DType::F32, &Device::Cpu);
        let first: Vec<f32> = (0..2 * 60).map(|i| i as f32).collect();
        for layer in 0..2 {
            cache.append(layer, &kv(&first), &kv(&first))?;
        }
        cache.commit(60);
        // 60 + 10 positions exceed the first allocation of 64 and force a copy.
        let second: Vec<f32> = (0..2 * 10).map(|i| 1000.0 + i as f32).collect();
        let (k, _) = cache.append(1, &kv(&second), &kv(&second))?;
        assert_eq!(k.dims(), &[1, 70, 2]);
        let flat = k.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(&flat[..120], &first[..]);
        assert_eq!(&flat[120..], &second[..]);
        assert!(cache.allocated_bytes() >= 2 * 2 * 70 * 2 * 4);
        Ok(())
    }

    #[test]
    fn uncommitted_positions_are_overwritten() -> Result<()> {
        let mut cache = KvCache::new(&cfg(), DType::F32, &Device::Cpu);
        cache.append(0, &kv(&[1., 2.]), &kv(&[1., 2.]))?;
        let (k, _) = cache.append(0, &kv(&[3., 4.]), &kv(&[3., 4.]))?;
        assert_eq!(k.flatten_all()?.to_vec1::<f32>()?, vec![3., 4.]);
        assert_eq!(cache.len(), 0);
        Ok(())
    }
}
