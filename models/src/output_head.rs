//! The model's output head (final RMSNorm and LM head) as an early-exit hook reads it.
//!
//! SpecEE's predictors score a few draft tokens against an intermediate layer's hidden state
//! through the model's own head: `z = E_D · norm(h_l)`, with `E_D` the LM-head rows of the
//! drafts. A hook gets this view instead of a copy of the weights, so a predictor file holds
//! only the predictors, and a quantized head is read (and dequantized) a few rows at a time.

use candle_core::{Device, Tensor};

use crate::error::Result;
use crate::linear::Linear;

/// A borrowed view of the final norm and the LM head, valid for one forward step.
#[derive(Debug, Clone, Copy)]
pub struct OutputHead<'a> {
    norm: &'a Tensor,
    eps: f64,
    lm_head: &'a Linear,
}

impl<'a> OutputHead<'a> {
    pub(crate) fn new(norm: &'a Tensor, eps: f64, lm_head: &'a Linear) -> Self {
        Self { norm, eps, lm_head }
    }

    /// The final norm's weight as host floats, `hidden` long, and its epsilon.
    pub fn norm_weight(&self) -> Result<(Vec<f32>, f64)> {
        Ok((
            self.norm.to_device(&Device::Cpu)?.to_vec1::<f32>()?,
            self.eps,
        ))
    }

    /// The LM-head rows of `tokens`, dequantized to host floats: `(tokens.len(), hidden)`
    /// row-major. The logit of token `t` for a normed hidden state `x` is `rows[t] · x`
    /// (the head has no bias).
    pub fn token_rows(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        let ids = Tensor::new(tokens, self.norm.device())?;
        let rows = self.lm_head.embedding(&ids)?.to_device(&Device::Cpu)?;
        Ok(rows.flatten_all()?.to_vec1::<f32>()?)
    }

    /// Vocabulary size: the head's rows.
    pub fn vocab_size(&self) -> usize {
        self.lm_head.out_features()
    }
}
