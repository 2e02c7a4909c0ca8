//! The next layer's attention as a pruning hook reads it: FastV's score (Chen et al. 2024, "An
//! Image is Worth 1/2 Tokens After Layer 2"): image tokens that the prompt's last token hardly
//! attends to are the ones to drop.
//!
//! Like [`crate::OutputHead`] for early exit, a hook gets this borrowed view instead of a copy
//! of the weights, so a pruning plug-in that scores by attention needs no file of its own.

use candle_core::{Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::llama::DecoderLayer;
use crate::rope::Rope;

/// The layer after a pruning layer, valid for one forward step.
#[derive(Debug, Clone, Copy)]
pub struct AttentionProbe<'a> {
    layer: &'a DecoderLayer,
    rope: &'a Rope,
    config: &'a ModelConfig,
}

impl<'a> AttentionProbe<'a> {
    pub(crate) fn new(layer: &'a DecoderLayer, rope: &'a Rope, config: &'a ModelConfig) -> Self {
        Self {
            layer,
            rope,
            config,
        }
    }

    /// `h`: one row's hidden states after the pruning layer, `(tokens, hidden)`, at
    /// `positions` (ascending, one per token). Returns `(tokens,)`: the attention the next
    /// layer's heads pay, averaged over heads, from the last token to each token of `h`
    /// (itself included). The softmax runs over these tokens only, so a prompt's earlier
    /// prefill chunks are not seen, and linear hooks (LoRA) are not applied.
    pub fn last_token_attention(&self, h: &Tensor, positions: &[u32]) -> Result<Tensor> {
        let c = self.config;
        let n = h.dim(0)?;
        if n == 0 || positions.len() != n {
            return Err(ModelError::Batch(format!(
                "{} positions for {n} hidden states",
                positions.len()
            )));
        }
        let (d, n_kv, n_heads) = (c.head_dim, c.num_kv_heads, c.num_heads);
        let normed = candle_nn::ops::rms_norm(h, &self.layer.input_norm, c.rms_norm_eps)?;
        let (cos, sin) = self.rope.tables(&Tensor::new(positions, h.device())?)?;
        let last = normed.narrow(0, n - 1, 1)?;
        let q = self.layer.attn.q.forward(&last)?.reshape((1, n_heads, d))?;
        let q = Rope::apply(&q, &cos.narrow(0, n - 1, 1)?, &sin.narrow(0, n - 1, 1)?)?;
        let k = self.layer.attn.k.forward(&normed)?.reshape((n, n_kv, d))?;
        let k = Rope::apply(&k, &cos, &sin)?.transpose(0, 1)?.contiguous()?; // (n_kv, n, d)
        let q = q.reshape((n_kv, n_heads / n_kv, d))?;
        let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?; // (n_kv, group, n)
        let p = candle_nn::ops::softmax_last_dim(&scores)?;
        Ok(p.reshape((n_heads, n))?.mean(0)?.to_device(&Device::Cpu)?)
    }
}
