//! Tiny seeded Llama models written to disk, so tests run the real loaders.
//!
//! A [`TinyModel`] is a config plus Hugging Face-named f32 tensors drawn from a seeded
//! generator. It writes itself as a Hugging Face folder (config.json + model.safetensors) and
//! as a GGUF file laid out the way llama.cpp's converter writes one (q/k rows permuted for
//! interleaved RoPE, optionally quantized), and it also builds a [`Llama`] directly from
//! memory: the invariant tests check that all three give the same logits.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::error::{ModelError, Result};
use crate::linear::Linear;
use crate::llama::Llama;
use crate::loader::{check_shape, LayerWeight, WeightName, WeightSource};

/// A small random model: config and HF-named tensors.
#[derive(Debug, Clone)]
pub struct TinyModel {
    pub config: ModelConfig,
    pub tensors: HashMap<String, Tensor>,
}

/// The default tiny shape: 2 layers, GQA with 4 query and 2 KV heads, head_dim 8.
pub fn tiny_config(architecture: Architecture) -> ModelConfig {
    ModelConfig {
        architecture,
        hidden_size: 32,
        intermediate_size: 64,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
        vocab_size: 96,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: RopeScaling::None,
        max_position_embeddings: 256,
        tie_word_embeddings: architecture != Architecture::Qwen2,
        attention_bias: architecture == Architecture::Qwen2,
    }
}

impl TinyModel {
    /// Draws every weight from a generator seeded with `seed`. Norm weights sit around 1 and
    /// projections have a spread large enough that logits differ visibly between tokens.
    pub fn random(config: ModelConfig, seed: u64) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut tensors = HashMap::new();
        let mut put = |name: String, shape: Vec<usize>, center: f32, spread: f32| -> Result<()> {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|_| center + spread * (rng.random::<f32>() * 2.0 - 1.0))
                .collect();
            tensors.insert(name, Tensor::from_vec(v, shape, &Device::Cpu)?);
            Ok(())
        };
        for (name, shape, bias) in weight_shapes(&config) {
            let is_norm = shape.len() == 1;
            let base = name.hf();
            // Projections get a fan-in-scaled spread so activations keep unit scale through
            // the layers, as in a trained model; norms sit around 1.
            let spread = if is_norm {
                0.1
            } else {
                1.5 / (shape[1] as f32).sqrt()
            };
            put(
                format!("{base}.weight"),
                shape.clone(),
                if is_norm { 1.0 } else { 0.0 },
                spread,
            )?;
            if bias {
                put(format!("{base}.bias"), vec![shape[0]], 0.0, 0.3)?;
            }
        }
        Ok(Self { config, tensors })
    }

    /// The decoder built straight from the tensors in memory.
    pub fn build(&self, max_positions: usize) -> Result<Llama> {
        Llama::load(
            &mut MemorySource {
                model: self,
                device: Device::Cpu,
            },
            max_positions,
        )
    }

    /// Writes `config.json` and `model.safetensors` into `dir`.
    pub fn write_safetensors(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let config = self.config.hf_json();
        let path = dir.join("config.json");
        std::fs::write(&path, config.to_string()).map_err(|e| ModelError::io(&path, e))?;
        let path = dir.join("model.safetensors");
        candle_core::safetensors::save(&self.tensors, &path)?;
        Ok(())
    }

    /// Writes a GGUF file as llama.cpp's converter would: GGUF tensor names, q/k rows
    /// permuted for Llama architectures, matrices quantized to `dtype` (vectors stay f32).
    pub fn write_gguf(&self, path: &Path, dtype: GgmlDType) -> Result<()> {
        self.write_gguf_with_metadata(path, dtype, &[])
    }

    /// [`Self::write_gguf`] with the [`tiny_tokenizer_metadata`] vocabulary and the
    /// [`TINY_CHAT_TEMPLATE`] in the metadata: a complete model `bundle::load` can serve.
    pub fn write_gguf_with_tokenizer(&self, path: &Path, dtype: GgmlDType) -> Result<()> {
        let mut extra = tiny_tokenizer_metadata();
        extra.push((
            "tokenizer.chat_template".into(),
            Value::String(TINY_CHAT_TEMPLATE.into()),
        ));
        self.write_gguf_with_metadata(path, dtype, &extra)
    }

    /// [`Self::write_gguf`] with `extra` metadata entries after the model's own.
    pub fn write_gguf_with_metadata(
        &self,
        path: &Path,
        dtype: GgmlDType,
        extra: &[(String, Value)],
    ) -> Result<()> {
        let c = &self.config;
        let mut qtensors: Vec<(String, QTensor)> = Vec::new();
        for (name, shape, bias) in weight_shapes(c) {
            let heads = match name {
                WeightName::Layer(_, LayerWeight::Q) => Some(c.num_heads),
                WeightName::Layer(_, LayerWeight::K) => Some(c.num_kv_heads),
                _ => None,
            };
            let permute = heads.filter(|_| c.architecture != Architecture::Qwen2);
            let ty = if shape.len() == 1 {
                GgmlDType::F32
            } else {
                dtype
            };
            let w = self.hf_tensor(&format!("{}.weight", name.hf()))?;
            qtensors.push((
                format!("{}.weight", name.gguf()),
                QTensor::quantize(&permute_rows(w, permute)?, ty)?,
            ));
            if bias {
                let b = self.hf_tensor(&format!("{}.bias", name.hf()))?;
                qtensors.push((
                    format!("{}.bias", name.gguf()),
                    QTensor::quantize(&permute_rows(b, permute)?, GgmlDType::F32)?,
                ));
            }
        }
        let arch = match c.architecture {
            Architecture::Qwen2 => "qwen2",
            _ => "llama",
        };
        let u = |v: usize| Value::U32(v as u32);
        let md: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String(arch.into())),
            (
                format!("{arch}.context_length"),
                u(c.max_position_embeddings),
            ),
            (format!("{arch}.embedding_length"), u(c.hidden_size)),
            (format!("{arch}.block_count"), u(c.num_layers)),
            (
                format!("{arch}.feed_forward_length"),
                u(c.intermediate_size),
            ),
            (format!("{arch}.attention.head_count"), u(c.num_heads)),
            (format!("{arch}.attention.head_count_kv"), u(c.num_kv_heads)),
            (
                format!("{arch}.attention.layer_norm_rms_epsilon"),
                Value::F32(c.rms_norm_eps),
            ),
            (format!("{arch}.rope.freq_base"), Value::F32(c.rope_theta)),
        ];
        let md_refs: Vec<(&str, &Value)> = md
            .iter()
            .chain(extra)
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        let t_refs: Vec<(&str, &QTensor)> = qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut file = std::fs::File::create(path).map_err(|e| ModelError::io(path, e))?;
        gguf_file::write(&mut file, &md_refs, &t_refs)?;
        Ok(())
    }

    fn hf_tensor(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor { name: name.into() })
    }
}

/// A plain-text chat template for the tiny vocabulary, which has no role markers.
pub const TINY_CHAT_TEMPLATE: &str =
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}\
{% if add_generation_prompt %}assistant:{% endif %}";

/// GGUF tokenizer metadata of a byte-level vocabulary of exactly `tiny_config`'s 96 tokens:
/// id 0 `<|endoftext|>` (the end of sequence, a control token), id 1 the space (`Ġ`), ids
/// 2..=95 the characters `!`..=`~` in order. No merges, so every string of those characters
/// encodes to one id per character; no BOS.
pub fn tiny_tokenizer_metadata() -> Vec<(String, Value)> {
    let mut tokens = vec!["<|endoftext|>".to_string(), "Ġ".to_string()];
    tokens.extend(('!'..='~').map(String::from));
    let mut types = vec![Value::I32(3)];
    types.resize(tokens.len(), Value::I32(1));
    let s = |v: &str| Value::String(v.into());
    vec![
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s("gpt2")),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(Vec::new())),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
    ]
}

/// Every weight the config implies: role, shape, and whether it has a bias.
fn weight_shapes(c: &ModelConfig) -> Vec<(WeightName, Vec<usize>, bool)> {
    let (h, d, f) = (c.hidden_size, c.head_dim, c.intermediate_size);
    let mut out = vec![
        (WeightName::Embed, vec![c.vocab_size, h], false),
        (WeightName::Norm, vec![h], false),
    ];
    if !c.tie_word_embeddings {
        out.push((WeightName::LmHead, vec![c.vocab_size, h], false));
    }
    for i in 0..c.num_layers {
        let l = |w| WeightName::Layer(i, w);
        let b = c.attention_bias;
        out.extend([
            (l(LayerWeight::InputNorm), vec![h], false),
            (l(LayerWeight::Q), vec![c.num_heads * d, h], b),
            (l(LayerWeight::K), vec![c.num_kv_heads * d, h], b),
            (l(LayerWeight::V), vec![c.num_kv_heads * d, h], b),
            (l(LayerWeight::O), vec![h, c.num_heads * d], false),
            (l(LayerWeight::PostAttentionNorm), vec![h], false),
            (l(LayerWeight::Gate), vec![f, h], false),
            (l(LayerWeight::Up), vec![f, h], false),
            (l(LayerWeight::Down), vec![h, f], false),
        ]);
    }
    out
}

/// llama.cpp's `permute(w, heads)`: HF row `h*d + s*(d/2) + i` goes to row `h*d + 2i + s`.
fn permute_rows(w: &Tensor, heads: Option<usize>) -> Result<Tensor> {
    let Some(heads) = heads else {
        return Ok(w.clone());
    };
    let rows = w.dim(0)?;
    let d = rows / heads;
    let mut src = vec![0u32; rows];
    for h in 0..heads {
        for s in 0..2 {
            for i in 0..d / 2 {
                src[h * d + 2 * i + s] = (h * d + s * (d / 2) + i) as u32;
            }
        }
    }
    Ok(w.index_select(&Tensor::new(src.as_slice(), w.device())?, 0)?)
}

/// Serves a [`TinyModel`]'s tensors to [`Llama::load`] without touching the disk.
struct MemorySource<'a> {
    model: &'a TinyModel,
    device: Device,
}

impl MemorySource<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.model.hf_tensor(name)?;
        check_shape(name, t.dims(), shape)?;
        Ok(t.clone())
    }
}

impl WeightSource for MemorySource<'_> {
    fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn linear(&mut self, name: WeightName, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let w = self.get(&format!("{}.weight", name.hf()), &[out, inp])?;
        let b = match bias {
            true => Some(self.get(&format!("{}.bias", name.hf()), &[out])?),
            false => None,
        };
        Linear::from_dense(w, b)
    }

    fn vector(&mut self, name: WeightName, len: usize) -> Result<Tensor> {
        self.get(&format!("{}.weight", name.hf()), &[len])
    }

    fn embedding(&mut self, vocab: usize, hidden: usize) -> Result<Linear> {
        Linear::from_dense(
            self.get(
                &format!("{}.weight", WeightName::Embed.hf()),
                &[vocab, hidden],
            )?,
            None,
        )
    }
}
