//! What the trainer and the evaluation read from the frozen model: per layer, the pre-RoPE
//! keys of a whole sequence and the pre-RoPE queries of some positions (a hook at the
//! attention point of a dense prefill), and from them the true attention those queries pay
//! each block of keys.

use std::sync::Mutex;

use candle_core::{Device, Tensor, D};
use models::hooks::{HookParams, HookPoints};
use models::rope::Rope;
use models::{Hook, HookRow, KeyBlocks, Llama};

use crate::train::Result;

/// One layer of one sequence, as the model computed it.
#[derive(Debug, Clone)]
pub struct LayerCapture {
    /// Pre-RoPE keys of every position, `(T, h, d)`.
    pub keys: Tensor,
    /// Pre-RoPE queries of the sampled positions, `(N, n_heads, d)`.
    pub queries: Tensor,
}

/// A hook that keeps what [`LayerCapture`] holds for one whole-sequence row and changes
/// nothing.
#[derive(Debug)]
struct Capture {
    positions: Tensor,
    layers: Mutex<Vec<Option<LayerCapture>>>,
}

impl Hook for Capture {
    fn name(&self) -> &str {
        "capture"
    }

    fn points(&self) -> HookPoints {
        HookPoints {
            attention: true,
            ..HookPoints::default()
        }
    }

    fn attention_blocks(
        &self,
        layer: usize,
        _row: &HookRow<'_>,
        q: &Tensor,
        k: &Tensor,
        _slots: usize,
    ) -> models::Result<Option<KeyBlocks>> {
        let capture = LayerCapture {
            keys: k.contiguous()?,
            queries: q.index_select(&self.positions, 0)?,
        };
        let mut layers = self.layers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = layers.get_mut(layer) {
            *slot = Some(capture);
        }
        Ok(None)
    }
}

/// Runs `tokens` through `model` in one dense prefill row and returns every layer's keys and
/// the queries at `positions`.
pub fn capture(model: &Llama, tokens: &[u32], positions: &[usize]) -> Result<Vec<LayerCapture>> {
    let index: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
    let hook = std::sync::Arc::new(Capture {
        positions: Tensor::new(index.as_slice(), &Device::Cpu)?,
        layers: Mutex::new(vec![None; model.config.num_layers]),
    });
    let call = models::HookCall::new(hook.clone(), std::sync::Arc::new(()) as HookParams);
    crate::train::prefill(model, &[tokens], &[call])?;
    let layers = std::mem::take(&mut *hook.layers.lock().unwrap_or_else(|p| p.into_inner()));
    layers
        .into_iter()
        .enumerate()
        .map(|(l, c)| {
            c.ok_or_else(|| {
                crate::train::TrainError::BadOption(format!("layer {l} was not captured"))
            })
        })
        .collect()
}

/// The attention the sampled queries of one layer pay the blocks of keys, per key/value head.
#[derive(Debug, Clone)]
pub struct BlockTruth {
    /// SeerAttention-R's ground truth, `(h, N, B)`: each block's largest attention
    /// probability over its keys and the group's query heads, kept for the blocks strictly
    /// before the query's own and renormalised to sum 1.
    pub target: Tensor,
    /// The same for the attention mass (summed over a block's keys, averaged over the
    /// group) instead of the peak: `server train sparse-attention --target mass`.
    pub mass_target: Tensor,
    /// Attention mass per block, `(h, N, B)`: probabilities summed over the block's keys and
    /// averaged over the group's query heads (every visible block, the query's own included:
    /// each row sums to 1). What a selection of blocks recalls.
    pub mass: Tensor,
}

/// The true attention of `queries` at `positions` over `keys` (a [`LayerCapture`]), after
/// the model's RoPE, in blocks of `block` keys (`T` a multiple of it).
pub fn block_truth(
    rope: &Rope,
    capture: &LayerCapture,
    positions: &[usize],
    block: usize,
) -> Result<BlockTruth> {
    let (t, h, d) = capture.keys.dims3()?;
    let (n, heads, _) = capture.queries.dims3()?;
    let g = heads / h;
    let dev = capture.keys.device();
    let key_pos = Tensor::arange(0u32, t as u32, dev)?;
    let (cos, sin) = rope.tables(&key_pos)?;
    let k = Rope::apply(&capture.keys, &cos, &sin)?
        .transpose(0, 1)?
        .contiguous()?; // (h, T, d)
    let q_pos: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
    let (cos, sin) = rope.tables(&Tensor::new(q_pos.as_slice(), dev)?)?;
    let q = Rope::apply(&capture.queries, &cos, &sin)?
        .reshape((n, h, g, d))?
        .transpose(0, 1)?
        .reshape((h, n * g, d))?;
    let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?.reshape((h, n, g, t))?;
    let mut causal = vec![0f32; n * t];
    for (i, &p) in positions.iter().enumerate() {
        causal[i * t + p + 1..(i + 1) * t].fill(f32::NEG_INFINITY);
    }
    let causal = Tensor::from_vec(causal, (1, n, 1, t), dev)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&causal)?)?;
    let blocks = t / block;
    let pooled = probs.reshape((h, n, g, blocks, block))?;
    let mass = (pooled.sum(D::Minus1)?.sum(2)? / g as f64)?;
    let peak = pooled.max(D::Minus1)?.max(2)?; // (h, n, B)
    let mut earlier = vec![0f32; n * blocks];
    for (i, &p) in positions.iter().enumerate() {
        earlier[i * blocks..i * blocks + p / block].fill(1.0);
    }
    let earlier = Tensor::from_vec(earlier, (1, n, blocks), dev)?;
    let renormalised = |x: &Tensor| -> candle_core::Result<Tensor> {
        let kept = x.broadcast_mul(&earlier)?;
        kept.broadcast_div(&kept.sum_keepdim(D::Minus1)?.clamp(1e-30, f64::MAX)?)
    };
    Ok(BlockTruth {
        target: renormalised(&peak)?,
        mass_target: renormalised(&mass)?,
        mass,
    })
}

/// Each block's keys pooled per key/value head, `(B, h, 3d)`: `[max, min, mean]` per channel
/// (the gate's key-branch input).
pub fn pooled_blocks(keys: &Tensor, block: usize) -> Result<Tensor> {
    let (t, h, d) = keys.dims3()?;
    let b = keys.reshape((t / block, block, h, d))?;
    Ok(Tensor::cat(&[b.max(1)?, b.min(1)?, b.mean(1)?], D::Minus1)?)
}
