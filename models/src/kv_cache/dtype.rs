//! How a KV cache stores keys and values (`serve --kv-cache-dtype`), and the q8_0 block codec.
//!
//! Keys and values are computed in f32 and rounded once, when written ([`KvDtype::store`]);
//! attention reads them back widened to f32, so the arithmetic after the rounding is the f32
//! kernel's whatever the storage. What each costs in accuracy and speed on the default model
//! is measured in docs/BENCHMARKS.md ("Long context").
//!
//! q8_0 is llama.cpp's format (`block_q8_0` in ggml-common.h): per 32 consecutive values of a
//! head's row, one f16 scale `s = max|x| / 127` and 32 signed bytes `round(x / s)`, 34 bytes in
//! all; a value reads back as `q * s`. A cache holds such a row as 34 bytes per 32 values in a
//! `u8` tensor of shape `(n_kv, capacity, d / 32 * 34)`; only the CPU attention kernel reads it.

use candle_core::{DType, Device, Tensor};
use half::f16;

use crate::error::{ModelError, Result};

/// Values per q8_0 block.
pub(crate) const Q8_BLOCK: usize = 32;
/// Bytes per q8_0 block: the f16 scale, then the 32 signed values.
pub(crate) const Q8_BLOCK_BYTES: usize = 2 + Q8_BLOCK;

/// The storage of a KV cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum KvDtype {
    /// Keys and values as computed.
    #[default]
    F32,
    /// IEEE half precision: 10 mantissa bits, range to 65504.
    F16,
    /// bfloat16: f32's range, 7 mantissa bits.
    Bf16,
    /// llama.cpp's q8_0 blocks (see the module doc): 8.5 bits per value, CPU only.
    Q8_0,
}

impl KvDtype {
    pub const ALL: [Self; 4] = [Self::F32, Self::F16, Self::Bf16, Self::Q8_0];

    /// The name `--kv-cache-dtype` and llama.cpp's `--cache-type-k` use.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Q8_0 => "q8_0",
        }
    }

    /// The dtype of the cache's tensors.
    pub(crate) fn storage(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
            Self::Q8_0 => DType::U8,
        }
    }

    /// Stored elements for one head's row of `head_dim` values.
    pub(crate) fn row_len(self, head_dim: usize) -> usize {
        match self {
            Self::Q8_0 => head_dim / Q8_BLOCK * Q8_BLOCK_BYTES,
            _ => head_dim,
        }
    }

    /// Bytes one head's row of `head_dim` values occupies.
    pub fn row_bytes(self, head_dim: usize) -> usize {
        self.row_len(head_dim) * self.storage().size_in_bytes()
    }

    /// Whether a model with heads of `head_dim` values on `device` can keep its cache in this
    /// dtype: q8_0 needs whole blocks and the CPU kernel.
    pub fn check(self, head_dim: usize, device: &Device) -> Result<()> {
        if self != Self::Q8_0 {
            return Ok(());
        }
        if !head_dim.is_multiple_of(Q8_BLOCK) {
            return Err(ModelError::Config(format!(
                "a q8_0 KV cache needs heads of a multiple of {Q8_BLOCK} values, not {head_dim}"
            )));
        }
        if !device.is_cpu() {
            return Err(ModelError::Config(
                "a q8_0 KV cache is read by the CPU attention kernel only; use f16 or bf16 on a GPU"
                    .into(),
            ));
        }
        Ok(())
    }

    /// `x` (`(n_kv, n, d)`, f32) in this storage.
    pub(crate) fn store(self, x: &Tensor) -> Result<Tensor> {
        if self != Self::Q8_0 {
            return Ok(x.to_dtype(self.storage())?);
        }
        let (n_kv, n, d) = x.dims3()?;
        let values = x
            .to_dtype(DType::F32)?
            .contiguous()?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut bytes = vec![0u8; values.len() / Q8_BLOCK * Q8_BLOCK_BYTES];
        for (block, out) in values
            .chunks_exact(Q8_BLOCK)
            .zip(bytes.chunks_exact_mut(Q8_BLOCK_BYTES))
        {
            quantize_q8_block(block, out);
        }
        Ok(Tensor::from_vec(
            bytes,
            (n_kv, n, self.row_len(d)),
            x.device(),
        )?)
    }

    /// Stored `x` back as f32 `(n_kv, n, head_dim)`.
    pub(crate) fn load(self, x: &Tensor, head_dim: usize) -> Result<Tensor> {
        if self != Self::Q8_0 {
            return Ok(x.to_dtype(DType::F32)?);
        }
        let (n_kv, n, _) = x.dims3()?;
        let bytes = x.contiguous()?.flatten_all()?.to_vec1::<u8>()?;
        let mut values = vec![0f32; n_kv * n * head_dim];
        dequantize_q8(&bytes, &mut values);
        Ok(Tensor::from_vec(values, (n_kv, n, head_dim), x.device())?)
    }
}

/// 32 values as one q8_0 block of 34 bytes, as llama.cpp's `quantize_row_q8_0_ref`.
pub(crate) fn quantize_q8_block(x: &[f32], out: &mut [u8]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = amax / 127.0;
    let inverse = if scale == 0.0 { 0.0 } else { 1.0 / scale };
    out[..2].copy_from_slice(&f16::from_f32(scale).to_le_bytes());
    for (q, &v) in out[2..].iter_mut().zip(x) {
        *q = ((v * inverse).round() as i8) as u8;
    }
}

/// The f32 scale of a q8_0 block.
#[inline(always)]
fn q8_scale(block: &[u8]) -> f32 {
    f16::from_le_bytes([block[0], block[1]]).to_f32()
}

/// Whole q8_0 blocks as their values (`out`: 32 per 34 bytes), as [`dequantize_q8_block`].
#[inline(always)]
pub(crate) fn dequantize_q8(bytes: &[u8], out: &mut [f32]) {
    for (block, out) in bytes
        .chunks_exact(Q8_BLOCK_BYTES)
        .zip(out.chunks_exact_mut(Q8_BLOCK))
    {
        dequantize_q8_block(block, out);
    }
}

/// One q8_0 block (34 bytes) as its 32 values: `q * scale`, one rounding each.
#[inline(always)]
fn dequantize_q8_block(block: &[u8], out: &mut [f32]) {
    let scale = q8_scale(block);
    for (o, &q) in out.iter_mut().zip(&block[2..Q8_BLOCK_BYTES]) {
        *o = f32::from(q as i8) * scale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect()
    }

    #[test]
    fn q8_0_rounds_each_value_to_within_half_a_step() -> Result<()> {
        // Half a step from rounding to an integer, plus up to 127 times the f16 scale's own
        // rounding (a relative 2^-11).
        let bound = 0.5 + 127.0 / 2048.0;
        let x = values(3 * 5 * 64);
        let t = Tensor::from_vec(x.clone(), (3, 5, 64), &Device::Cpu)?;
        let stored = KvDtype::Q8_0.store(&t)?;
        assert_eq!(stored.dims(), &[3, 5, 2 * Q8_BLOCK_BYTES]);
        assert_eq!(KvDtype::Q8_0.row_bytes(64), 68);
        let back = KvDtype::Q8_0
            .load(&stored, 64)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (block, got) in x.chunks(Q8_BLOCK).zip(back.chunks(Q8_BLOCK)) {
            let step = block.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (a, b) in block.iter().zip(got) {
                assert!((a - b).abs() <= bound * step, "{a} -> {b}, step {step}");
            }
        }
        Ok(())
    }

    #[test]
    fn q8_0_keeps_zero_blocks_and_matches_llama_cpp_layout() {
        let mut out = [0xffu8; Q8_BLOCK_BYTES];
        quantize_q8_block(&[0.0; Q8_BLOCK], &mut out);
        assert_eq!(out, [0u8; Q8_BLOCK_BYTES]);
        // The largest magnitude maps to ±127 and the scale is little-endian f16 in front.
        let mut x = [0f32; Q8_BLOCK];
        (x[0], x[1], x[31]) = (-2.54, 1.26, 0.02);
        quantize_q8_block(&x, &mut out);
        assert_eq!(q8_scale(&out), f16::from_f32(0.02).to_f32());
        assert_eq!((out[2] as i8, out[3] as i8, out[33] as i8), (-127, 63, 1));
    }

    #[test]
    fn other_dtypes_round_trip_through_their_candle_dtype() -> Result<()> {
        let t = Tensor::from_vec(values(2 * 3 * 8), (2, 3, 8), &Device::Cpu)?;
        for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Bf16] {
            let stored = dtype.store(&t)?;
            assert_eq!(stored.dtype(), dtype.storage());
            let want = stored
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let got = dtype.load(&stored, 8)?.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(got, want);
        }
        Ok(())
    }

    #[test]
    fn q8_0_is_refused_where_it_cannot_be_read() {
        assert!(KvDtype::Q8_0.check(48, &Device::Cpu).is_err());
        assert!(KvDtype::Q8_0.check(64, &Device::Cpu).is_ok());
        assert!(KvDtype::Bf16.check(48, &Device::Cpu).is_ok());
    }
}
