//! Weights loading: one [`WeightSource`] per checkpoint format, one decoder type for all.
//!
//! The decoder asks for weights by their role ([`WeightName`]); each format maps the role to
//! its own tensor name (Hugging Face `model.layers.3.self_attn.q_proj.weight`, GGUF
//! `blk.3.attn_q.weight`), checks the shape, and hands back a [`Linear`] or a vector. Any
//! missing or misshapen tensor is a [`ModelError`] naming it.

pub mod gguf;
pub mod gguf_check;
pub mod safetensors;

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::linear::Linear;
use crate::llama::Llama;

pub use gguf::GgufSource;
pub use safetensors::SafetensorsSource;

/// The weights of one decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerWeight {
    InputNorm,
    Q,
    K,
    V,
    O,
    PostAttentionNorm,
    Gate,
    Up,
    Down,
}

/// A weight by its role in the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightName {
    Embed,
    Norm,
    LmHead,
    Layer(usize, LayerWeight),
}

impl WeightName {
    /// The Hugging Face `transformers` name, without the `.weight`/`.bias` suffix.
    pub fn hf(self) -> String {
        use LayerWeight as W;
        match self {
            Self::Embed => "model.embed_tokens".into(),
            Self::Norm => "model.norm".into(),
            Self::LmHead => "lm_head".into(),
            Self::Layer(i, w) => {
                let leaf = match w {
                    W::InputNorm => "input_layernorm",
                    W::Q => "self_attn.q_proj",
                    W::K => "self_attn.k_proj",
                    W::V => "self_attn.v_proj",
                    W::O => "self_attn.o_proj",
                    W::PostAttentionNorm => "post_attention_layernorm",
                    W::Gate => "mlp.gate_proj",
                    W::Up => "mlp.up_proj",
                    W::Down => "mlp.down_proj",
                };
                format!("model.layers.{i}.{leaf}")
            }
        }
    }

    /// The GGUF (llama.cpp) name, without the `.weight`/`.bias` suffix.
    pub fn gguf(self) -> String {
        use LayerWeight as W;
        match self {
            Self::Embed => "token_embd".into(),
            Self::Norm => "output_norm".into(),
            Self::LmHead => "output".into(),
            Self::Layer(i, w) => {
                let leaf = match w {
                    W::InputNorm => "attn_norm",
                    W::Q => "attn_q",
                    W::K => "attn_k",
                    W::V => "attn_v",
                    W::O => "attn_output",
                    W::PostAttentionNorm => "ffn_norm",
                    W::Gate => "ffn_gate",
                    W::Up => "ffn_up",
                    W::Down => "ffn_down",
                };
                format!("blk.{i}.{leaf}")
            }
        }
    }
}

/// Where the decoder's weights come from.
pub trait WeightSource {
    fn config(&self) -> &ModelConfig;
    fn device(&self) -> &Device;
    /// A projection `(out, inp)`, with a bias of `(out,)` when `bias`.
    fn linear(&mut self, name: WeightName, out: usize, inp: usize, bias: bool) -> Result<Linear>;
    /// Projections of the same input, each `(name, out, inp, bias)` as [`Self::linear`]
    /// takes it; a source may stack their weights so that they run as one matmul (see
    /// [`Linear::from_qtensors_stacked`]). By default each is loaded on its own.
    fn linears(&mut self, parts: &[(WeightName, usize, usize, bool)]) -> Result<Vec<Linear>> {
        parts
            .iter()
            .map(|&(name, out, inp, bias)| self.linear(name, out, inp, bias))
            .collect()
    }
    /// A norm weight of `(len,)`, as f32.
    fn vector(&mut self, name: WeightName, len: usize) -> Result<Tensor>;
    /// The token embedding `(vocab, hidden)`, as a [`Linear`] so a tied LM head can reuse it.
    fn embedding(&mut self, vocab: usize, hidden: usize) -> Result<Linear>;
}

/// Checks a tensor's shape against what the config implies.
pub(crate) fn check_shape(name: &str, actual: &[usize], expected: &[usize]) -> Result<()> {
    if actual != expected {
        return Err(ModelError::TensorShape {
            name: name.to_string(),
            expected: expected.to_vec(),
            actual: actual.to_vec(),
        });
    }
    Ok(())
}

/// Loads a model from a `.gguf` file or a Hugging Face folder (`config.json` plus
/// safetensors), onto `device`; `max_positions` caps the context this instance serves.
pub fn load_model(path: &Path, device: &Device, max_positions: usize) -> Result<Llama> {
    if path.is_dir() {
        Llama::load(&mut SafetensorsSource::open(path, device)?, max_positions)
    } else {
        Llama::load(&mut GgufSource::open(path, device)?, max_positions)
    }
}
