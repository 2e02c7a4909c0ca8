//! A projection `y = x W^T (+ b)` over quantized (GGUF) or dense (safetensors) weights.
//!
//! Quantized weights stay quantized. On the CPU, Q4_1 and Q8_0 run through our own SIMD
//! kernels (`kernels`), which hold the only copy of the weights in a repacked layout; every
//! other case runs through candle's `QMatMul` (its quantized matmul quantizes activations on
//! the fly, as llama.cpp does; dense weights use an ordinary matmul). Either way the caller
//! sees one type, so the decoder does not care where the weights came from.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Module, Tensor};

use crate::error::Result;
use crate::kernels::q4_1::Q4_1Matmul;
pub use crate::kernels::residual::ActivationQuantization;
use crate::kernels::Q8_0Matmul;

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
        let y = match &self.weight {
            Weight::Candle(w) => w.forward(&x)?,
            Weight::Q4_1(k) => k.forward_with(&x, self.activations)?,
            Weight::Q8_0(k) => k.forward_with(&x, self.activations)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
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
        let values = match &self.weight {
            Weight::Q4_1(k) => k.dequantize_rows(rows)?,
            Weight::Q8_0(k) => k.dequantize_rows(rows)?,
            Weight::Candle(w) => return Ok(w.embedding(&Tensor::new(rows, &cpu)?)?),
        };
        Ok(Tensor::from_vec(
            values,
            (rows.len(), self.in_features),
            &cpu,
        )?)
    }
}
