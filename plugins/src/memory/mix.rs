//! The mixture of the base's and the memory's next-token distributions (Memory Decoder,
//! Cao et al., arXiv 2508.09874; `demo/memDec.py` of LUMIA-Group/MemoryDecoder):
//!
//! `log p = logaddexp(log(1 - λ) + log_softmax(z_base), log λ + log_softmax(z_mem / T))`
//!
//! computed per entry with that entry's λ and T, so a row's result never depends on which
//! rows share its group. λ = 0 gives `log_softmax(z_base)` and λ = 1 `log_softmax(z_mem / T)`
//! exactly (the other term is `-inf`). The result is log-probabilities, a valid replacement for
//! logits: sampling and reported log-probs then follow the mixture.

use candle_core::{DType, Tensor, D};

/// `base`, `memory`: `(entries, vocab)` logits; `lambda`, `temperature`: one value per entry.
/// Returns `(entries, vocab)` f32 log-probabilities of the mixture.
pub fn mix(
    base: &Tensor,
    memory: &Tensor,
    lambda: &[f32],
    temperature: &[f32],
) -> candle_core::Result<Tensor> {
    let n = base.dim(0)?;
    let column = |v: Vec<f32>| Tensor::from_vec(v, (n, 1), base.device());
    let log_base_weight = column(lambda.iter().map(|l| (1.0 - l).ln()).collect())?;
    let log_memory_weight = column(lambda.iter().map(|l| l.ln()).collect())?;
    let temperature = column(temperature.to_vec())?;
    let a = candle_nn::ops::log_softmax(&base.to_dtype(DType::F32)?, D::Minus1)?
        .broadcast_add(&log_base_weight)?;
    let memory = memory.to_dtype(DType::F32)?.broadcast_div(&temperature)?;
    let b = candle_nn::ops::log_softmax(&memory, D::Minus1)?.broadcast_add(&log_memory_weight)?;
    logaddexp(&a, &b)
}

/// `log(exp(a) + exp(b))` elementwise, without overflow, and `-inf` where both are `-inf`
/// (a token an earlier hook ruled out, at λ = 0 or 1): the maximum is floored at the
/// smallest finite f32 so that `a - m` is never `-inf - -inf`.
fn logaddexp(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let m = a.maximum(b)?.maximum(f32::MIN)?;
    let sum = (a.broadcast_sub(&m)?.exp()? + b.broadcast_sub(&m)?.exp()?)?;
    sum.log()? + m
}
