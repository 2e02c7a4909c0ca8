//! Rotary position embeddings (Su et al., "RoFormer", arXiv 2104.09864) in the half-split
//! layout of Hugging Face `transformers` (`rotate_half`).
//!
//! GGUF Llama checkpoints store q/k rows permuted for llama.cpp's interleaved RoPE; the GGUF
//! loader undoes that permutation, so the whole decoder (and every adapter trained against
//! Hugging Face weights) sees one layout. The cos/sin tables are computed once per model and
//! gathered per token, so rows of one batch can sit at different positions.

use candle_core::{DType, Device, Tensor};

use crate::config::{Llama3RopeScaling, ModelConfig, RopeScaling};
use crate::error::Result;

/// Precomputed cos/sin tables, each `(max_positions, head_dim / 2)`.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    max_positions: usize,
}

/// Inverse frequencies `theta^(-2i/d)`, adjusted by the model's scaling rule.
pub fn inverse_frequencies(cfg: &ModelConfig) -> Vec<f32> {
    let d = cfg.head_dim;
    let base: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f32 / d as f32))
        .collect();
    match &cfg.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Factors(f) => base.iter().zip(f).map(|(b, f)| b / f).collect(),
        RopeScaling::Llama3(s) => base.iter().map(|&f| llama3_scale(f, s)).collect(),
    }
}

/// Llama 3.1's rule: keep high frequencies, divide low ones by `factor`, blend in between
/// (transformers `_compute_llama3_parameters`).
fn llama3_scale(freq: f32, s: &Llama3RopeScaling) -> f32 {
    let old = s.original_max_position_embeddings as f32;
    let low_wavelen = old / s.low_freq_factor;
    let high_wavelen = old / s.high_freq_factor;
    let wavelen = 2.0 * std::f32::consts::PI / freq;
    if wavelen < high_wavelen {
        freq
    } else if wavelen > low_wavelen {
        freq / s.factor
    } else {
        let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * freq / s.factor + smooth * freq
    }
}

impl Rope {
    pub fn new(cfg: &ModelConfig, max_positions: usize, device: &Device) -> Result<Self> {
        let inv = inverse_frequencies(cfg);
        let half = inv.len();
        let mut angles = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            // f64 keeps large positions accurate before the cast, as transformers does in f32
            // only after the outer product; the difference matters past ~10k positions.
            angles.extend(inv.iter().map(|&f| (p as f64 * f as f64) as f32));
        }
        let angles = Tensor::from_vec(angles, (max_positions, half), &Device::Cpu)?;
        Ok(Self {
            cos: angles.cos()?.to_device(device)?,
            sin: angles.sin()?.to_device(device)?,
            max_positions,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// cos/sin rows for the given positions: two `(n_tokens, head_dim / 2)` tensors.
    pub fn tables(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.cos.index_select(positions, 0)?,
            self.sin.index_select(positions, 0)?,
        ))
    }

    /// Rotates `x` of shape `(n_tokens, n_heads, head_dim)` with per-token tables from
    /// [`Rope::tables`].
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (n, h, d) = x.dims3()?;
        let x = x.reshape((1, n, h, d))?.contiguous()?;
        let dtype = x.dtype();
        let (cos, sin) = if dtype == DType::F32 {
            (cos.clone(), sin.clone())
        } else {
            (cos.to_dtype(dtype)?, sin.to_dtype(dtype)?)
        };
        Ok(candle_nn::rotary_emb::rope_thd(&x, &cos, &sin)?.reshape((n, h, d))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Architecture;

    fn cfg(scaling: RopeScaling) -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Llama,
            hidden_size: 16,
            intermediate_size: 32,
            num_layers: 1,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 8,
            vocab_size: 10,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: scaling,
            max_position_embeddings: 64,
            tie_word_embeddings: true,
            attention_bias: false,
        }
    }

    #[test]
    fn rotation_matches_rotate_half_formula() -> Result<()> {
        let c = cfg(RopeScaling::None);
        let rope = Rope::new(&c, 16, &Device::Cpu)?;
        let x: Vec<f32> = (0..8).map(|i| i as f32 + 1.0).collect();
        let xt = Tensor::from_vec(x.clone(), (1, 1, 8), &Device::Cpu)?;
        let pos = Tensor::new(&[5u32], &Device::Cpu)?;
        let (cos, sin) = rope.tables(&pos)?;
        let y = Rope::apply(&xt, &cos, &sin)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let inv = inverse_frequencies(&c);
        for i in 0..4 {
            let (s, co) = (5.0 * inv[i]).sin_cos();
            assert!((y[i] - (x[i] * co - x[i + 4] * s)).abs() < 1e-5);
            assert!((y[i + 4] - (x[i + 4] * co + x[i] * s)).abs() < 1e-5);
        }
        Ok(())
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let s = Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        };
        let base = inverse_frequencies(&cfg(RopeScaling::None));
        let scaled = inverse_frequencies(&cfg(RopeScaling::Llama3(s)));
        // Highest frequency: wavelength 2*pi < 16, kept.
        assert_eq!(base[0], scaled[0]);
        // Lowest frequency: wavelength ~ 2*pi*10^(3*0.75) > 64, divided by the factor.
        assert!((scaled[3] - base[3] / 8.0).abs() < 1e-9);
    }
}
