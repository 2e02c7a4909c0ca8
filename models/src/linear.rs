//! A projection `y = x W^T (+ b)` over quantized (GGUF) or dense (safetensors) weights.
//!
//! Quantized weights stay quantized and run through candle's quantized matmul (which
//! quantizes activations on the fly, as llama.cpp does); dense weights use an ordinary matmul.
//! Either way the caller sees the same type, so the decoder does not care where it came from.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Module, Tensor};

use crate::error::Result;
use crate::kernels::q4_1::Q4_1Matmul;

/// The matmul a projection runs.
#[derive(Debug, Clone)]
enum Weight {
    /// candle's quantized or dense matmul.
    Candle(QMatMul),
    /// Our SIMD kernel for Q4_1 on the CPU (candle's Q4_1 dot product is scalar); the
    /// original tensor is kept only as candle's matmul for embedding lookups and dequantizing.
    Q4_1(Arc<Q4_1Matmul>, QMatMul),
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    in_features: usize,
    out_features: usize,
}

impl Linear {
    /// From a quantized tensor of shape `(out, in)`; F32/F16 "quantized" tensors are
    /// dequantized by candle into a dense matmul.
    pub fn from_qtensor(weight: QTensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.shape().dims2()?;
        let kernel = Q4_1Matmul::try_new(&weight)?;
        let candle = QMatMul::from_arc(Arc::new(weight))?;
        Ok(Self {
            weight: match kernel {
                Some(k) => Weight::Q4_1(Arc::new(k), candle),
                None => Weight::Candle(candle),
            },
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
            bias,
            in_features,
            out_features,
        })
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// The weight as a dense f32 tensor `(out, in)`; used by trainers and tests, never on
    /// the serving path.
    pub fn dense_weight(&self) -> Result<Tensor> {
        Ok(match self.candle() {
            QMatMul::QTensor(q) => q.dequantize(&q.device())?,
            QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.to_dtype(candle_core::DType::F32)?,
        })
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `x`: `(n_tokens, in)` -> `(n_tokens, out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        let y = match &self.weight {
            Weight::Candle(w) => w.forward(&x)?,
            Weight::Q4_1(k, _) => k.forward(&x)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// Rows of the weight as embeddings: `ids` `(n,)` -> `(n, in)`. Used for the token
    /// embedding, which GGUF files store as a quantized `(vocab, hidden)` matrix.
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.candle().embedding(ids)?)
    }

    fn candle(&self) -> &QMatMul {
        match &self.weight {
            Weight::Candle(w) | Weight::Q4_1(_, w) => w,
        }
    }
}
