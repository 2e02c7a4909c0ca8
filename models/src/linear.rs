//! A projection `y = x W^T (+ b)` over quantized (GGUF) or dense (safetensors) weights.
//!
//! Quantized weights stay quantized. On the CPU, Q4_1 and Q8_0 run through our own SIMD
//! kernels (`kernels`), which hold the only copy of the weights in a repacked layout; every
//! other case runs through candle's `QMatMul` (its quantized matmul quantizes activations on
//! the fly, as llama.cpp does; dense weights use an ordinary matmul). Either way the caller
//! sees one type, so the decoder does not care where the weights came from.
//!
//! Projections of the same input (q/k/v, gate/up) can share one stacked weight
//! ([`Linear::from_qtensors_stacked`]): each stays a `Linear` of its own (its rows of the
//! stack), and [`Linear::forward_stacked`] computes them together, quantizing the input once
//! and making one pass (one thread-pool round trip) instead of one per projection.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::error::Result;
use crate::kernels::q4_1::Q4_1Matmul;
use crate::kernels::residual;
pub use crate::kernels::residual::ActivationQuantization;
use crate::kernels::Q8_0Matmul;
use crate::kernels::TILE_ROWS;

/// The matmul a projection runs.
#[derive(Debug, Clone)]
enum Weight {
    /// candle's quantized or dense matmul.
    Candle(QMatMul),
    /// Our Q4_1 kernel (candle's Q4_1 dot product is scalar).
    Q4_1(Arc<Q4_1Matmul>),
    /// Our Q8_0 kernel (candle skips its fast path unless `in % 256 == 0`).
    Q8_0(Arc<Q8_0Matmul>),
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    /// The rows of `weight` this projection is: all of them, or its part of a stack.
    weight_rows: Range<usize>,
    activations: ActivationQuantization,
    bias: Option<Tensor>,
    in_features: usize,
    out_features: usize,
}

impl Linear {
    /// From a quantized tensor of shape `(out, in)`; F32/F16 "quantized" tensors are
    /// dequantized by candle into a dense matmul.
    pub fn from_qtensor(weight: QTensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.shape().dims2()?;
        let weight = if let Some(k) = Q4_1Matmul::try_new(&weight)? {
            Weight::Q4_1(Arc::new(k))
        } else if let Some(k) = Q8_0Matmul::try_new(&weight)? {
            Weight::Q8_0(Arc::new(k))
        } else {
            Weight::Candle(QMatMul::from_arc(Arc::new(weight))?)
        };
        Ok(Self {
            weight,
            weight_rows: 0..out_features,
            activations: ActivationQuantization::default(),
            bias,
            in_features,
            out_features,
        })
    }

    /// From a dense tensor of shape `(out, in)`.
    pub fn from_dense(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        Ok(Self {
            weight: Weight::Candle(QMatMul::Tensor(weight)),
            weight_rows: 0..out_features,
            activations: ActivationQuantization::default(),
            bias,
            in_features,
            out_features,
        })
    }

    /// Chooses how activations are quantized for the 8-bit kernels (other weights ignore it).
    pub fn set_activation_quantization(&mut self, mode: ActivationQuantization) {
        self.activations = mode;
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The weight as a dense f32 tensor `(out, in)`; used by trainers and tests, never on
    /// the serving path.
    pub fn dense_weight(&self) -> Result<Tensor> {
        let all: Vec<u32> = (0..self.out_features as u32).collect();
        match &self.weight {
            Weight::Candle(QMatMul::QTensor(q)) => Ok(q.dequantize(&q.device())?),
            Weight::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                Ok(t.to_dtype(DType::F32)?)
            }
            Weight::Q4_1(_) | Weight::Q8_0(_) => self.rows(&all),
        }
    }

    /// `x`: `(n_tokens, in)` -> `(n_tokens, out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        let (rows, mode) = (self.weight_rows.clone(), self.activations);
        let y = match &self.weight {
            Weight::Candle(w) => w.forward(&x)?,
            Weight::Q4_1(k) => residual::forward(k.as_ref(), &x, rows, mode)?,
            Weight::Q8_0(k) => residual::forward(k.as_ref(), &x, rows, mode)?,
        };
        self.add_bias(y)
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// Projections of the same input (q/k/v, gate/up) from their quantized `(out, in)`
    /// weights, sharing one stacked weight where our CPU kernels run them: each part is a
    /// view of its own rows, and [`Self::forward_stacked`] computes all of them as one matmul
    /// (same results bit for bit, same memory). The weights stack when they are all Q4_1 or
    /// all Q8_0 on the CPU with one input size, and every part but the last fills whole
    /// 16-row tiles (else a tile would hold two parts' rows); otherwise each part is built
    /// as [`Self::from_qtensor`] builds it.
    pub fn from_qtensors_stacked(parts: Vec<(QTensor, Option<Tensor>)>) -> Result<Vec<Self>> {
        if !stackable(&parts)? {
            return parts
                .into_iter()
                .map(|(w, b)| Self::from_qtensor(w, b))
                .collect();
        }
        let mut rows = Vec::with_capacity(parts.len());
        let bytes = parts.iter().map(|(w, _)| w.storage_size_in_bytes()).sum();
        let (mut raw, mut biases) = (Vec::with_capacity(bytes), Vec::new());
        let (dtype, k) = (parts[0].0.dtype(), parts[0].0.shape().dims2()?.1);
        for (w, bias) in parts {
            rows.push(w.shape().dims2()?.0);
            raw.extend_from_slice(&w.data()?);
            biases.push(bias);
        }
        let n = rows.iter().sum::<usize>();
        let storage = QStorage::from_data(Cow::Owned(raw), &Device::Cpu, dtype)?;
        let stacked = Self::from_qtensor(QTensor::new(storage, (n, k))?, None)?;
        let mut start = 0;
        Ok(rows
            .into_iter()
            .zip(biases)
            .map(|(n, bias)| {
                let rows = start..start + n;
                start += n;
                Self {
                    weight_rows: rows,
                    bias,
                    out_features: n,
                    ..stacked.clone()
                }
            })
            .collect())
    }

    /// Every part's output for the same input `x` `(n_tokens, in)`: one matmul when the
    /// parts are consecutive views of one stack ([`Self::from_qtensors_stacked`]) with one
    /// activation mode, otherwise one per part. Results equal each part's [`Self::forward`]
    /// bit for bit.
    pub fn forward_stacked(parts: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        let widths: Vec<usize> = parts.iter().map(|p| p.out_features).collect();
        let mode = parts.first().map(|p| p.activations).unwrap_or_default();
        let ys = match (stacked_columns(parts), parts.first().map(|p| &p.weight)) {
            (Some(cols), Some(Weight::Q4_1(k))) => {
                residual::forward_parts(k.as_ref(), x, cols, &widths, mode)?
            }
            (Some(cols), Some(Weight::Q8_0(k))) => {
                residual::forward_parts(k.as_ref(), x, cols, &widths, mode)?
            }
            _ => return parts.iter().map(|p| p.forward(x)).collect(),
        };
        parts.iter().zip(ys).map(|(p, y)| p.add_bias(y)).collect()
    }

    /// Rows of the weight as embeddings: `ids` `(n,)` -> `(n, in)`. Used for the token
    /// embedding, which GGUF files store as a quantized `(vocab, hidden)` matrix (tied to the
    /// LM head in the default model).
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        match &self.weight {
            Weight::Candle(w) => Ok(w.embedding(ids)?),
            Weight::Q4_1(_) | Weight::Q8_0(_) => self.rows(&ids.to_vec1::<u32>()?),
        }
    }

    /// Dequantized weight rows, `(rows.len(), in)`.
    fn rows(&self, rows: &[u32]) -> Result<Tensor> {
        let cpu = candle_core::Device::Cpu;
        let offset = self.weight_rows.start as u32;
        let own: Vec<u32> = rows.iter().map(|&r| r + offset).collect();
        let values = match &self.weight {
            Weight::Q4_1(k) => k.dequantize_rows(&own)?,
            Weight::Q8_0(k) => k.dequantize_rows(&own)?,
            Weight::Candle(w) => return Ok(w.embedding(&Tensor::new(rows, &cpu)?)?),
        };
        Ok(Tensor::from_vec(
            values,
            (rows.len(), self.in_features),
            &cpu,
        )?)
    }
}

/// Whether [`Linear::from_qtensors_stacked`] can stack these weights.
fn stackable(parts: &[(QTensor, Option<Tensor>)]) -> Result<bool> {
    let Some((first, _)) = parts.first().filter(|_| parts.len() > 1) else {
        return Ok(false);
    };
    let k = first.shape().dims2()?.1;
    for (i, (w, _)) in parts.iter().enumerate() {
        let (n, wk) = w.shape().dims2()?;
        let last = i + 1 == parts.len();
        if w.dtype() != first.dtype()
            || !w.device().is_cpu()
            || wk != k
            || !(last || n.is_multiple_of(TILE_ROWS))
        {
            return Ok(false);
        }
    }
    Ok(matches!(first.dtype(), GgmlDType::Q4_1 | GgmlDType::Q8_0))
}

/// The stack columns `parts` cover, when they are consecutive views of one stacked kernel
/// weight with one activation mode.
fn stacked_columns(parts: &[&Linear]) -> Option<Range<usize>> {
    let (first, last) = (parts.first()?, parts.last()?);
    let same = |p: &&Linear| {
        p.activations == first.activations
            && match (&p.weight, &first.weight) {
                (Weight::Q4_1(a), Weight::Q4_1(b)) => Arc::ptr_eq(a, b),
                (Weight::Q8_0(a), Weight::Q8_0(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    };
    let consecutive = parts
        .windows(2)
        .all(|w| w[0].weight_rows.end == w[1].weight_rows.start);
    (parts.len() > 1 && parts.iter().all(same) && consecutive)
        .then_some(first.weight_rows.start..last.weight_rows.end)
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: usize = 128;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    fn weight(dtype: GgmlDType, n: usize, k: usize, seed: u32) -> QTensor {
        let w = Tensor::from_vec(values(n * k, seed), (n, k), &Device::Cpu).expect("weight");
        QTensor::quantize(&w, dtype).expect("quantize")
    }

    /// The parts built separately and built stacked, each with its own bias (as Qwen2's
    /// q/k/v have), so a bias applied to the wrong part shows.
    fn both(shapes: &[(GgmlDType, usize, usize)]) -> Result<(Vec<Linear>, Vec<Linear>)> {
        let parts = || {
            shapes.iter().zip(1..).map(|(&(t, n, k), s)| {
                let bias = Tensor::from_vec(values(n, 100 + s), n, &Device::Cpu);
                (weight(t, n, k, s), bias.expect("bias"))
            })
        };
        let separate = parts()
            .map(|(w, b)| Linear::from_qtensor(w, Some(b)))
            .collect::<Result<_>>()?;
        let stacked = Linear::from_qtensors_stacked(parts().map(|(w, b)| (w, Some(b))).collect())?;
        Ok((separate, stacked))
    }

    fn flat(ys: &[Tensor]) -> Vec<Vec<f32>> {
        ys.iter()
            .map(|y| y.flatten_all().and_then(|y| y.to_vec1()).expect("values"))
            .collect()
    }

    #[test]
    fn stacked_projections_equal_separate_ones_bit_for_bit() -> Result<()> {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            for mode in [
                ActivationQuantization::TwoPass,
                ActivationQuantization::Single,
            ] {
                // q/k/v-like parts; the last may end inside a tile.
                let (mut separate, mut stacked) =
                    both(&[(dtype, 48, K), (dtype, 16, K), (dtype, 40, K)])?;
                for l in separate.iter_mut().chain(&mut stacked) {
                    l.set_activation_quantization(mode);
                }
                let parts: Vec<&Linear> = stacked.iter().collect();
                assert_eq!(stacked_columns(&parts), Some(0..104));
                // 37 rows go through the thread pool, 1 and 5 stay on this thread.
                for m in [1, 5, 37] {
                    let x = Tensor::from_vec(values(m * K, 9), (m, K), &Device::Cpu)?;
                    let want: Vec<Tensor> = separate
                        .iter()
                        .map(|l| l.forward(&x))
                        .collect::<Result<_>>()?;
                    let together = Linear::forward_stacked(&parts, &x)?;
                    let alone: Vec<Tensor> = stacked
                        .iter()
                        .map(|l| l.forward(&x))
                        .collect::<Result<_>>()?;
                    assert_eq!(flat(&together), flat(&want), "{dtype:?} {mode:?} m = {m}");
                    assert_eq!(flat(&alone), flat(&want), "{dtype:?} {mode:?} m = {m}");
                }
                for (s, w) in stacked.iter().zip(&separate) {
                    assert_eq!(flat(&[s.dense_weight()?]), flat(&[w.dense_weight()?]));
                }
            }
        }
        Ok(())
    }

    #[test]
    fn weights_that_cannot_share_a_stack_are_built_on_their_own() -> Result<()> {
        use GgmlDType::{Q4_1, Q5_0, Q8_0};
        for shapes in [
            vec![(Q4_1, 40, K), (Q4_1, 16, K)], // the first part ends inside a tile
            vec![(Q4_1, 16, K), (Q8_0, 16, K)], // two formats
            vec![(Q4_1, 16, K), (Q4_1, 16, 2 * K)], // two input sizes
            vec![(Q5_0, 16, K), (Q5_0, 16, K)], // not one of our kernels' formats
            vec![(Q4_1, 16, K)],                // nothing to stack with
        ] {
            let (separate, stacked) = both(&shapes)?;
            assert_eq!(stacked_columns(&stacked.iter().collect::<Vec<_>>()), None);
            if shapes.iter().all(|s| s.2 == K) {
                let x = Tensor::from_vec(values(3 * K, 9), (3, K), &Device::Cpu)?;
                let want: Vec<Tensor> = separate
                    .iter()
                    .map(|l| l.forward(&x))
                    .collect::<Result<_>>()?;
                let parts: Vec<&Linear> = stacked.iter().collect();
                assert_eq!(flat(&Linear::forward_stacked(&parts, &x)?), flat(&want));
            }
        }
        Ok(())
    }
}
