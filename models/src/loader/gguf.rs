//! GGUF checkpoints (llama.cpp's format): hyper-parameters from the metadata, weights kept in
//! their quantized form.
//!
//! llama.cpp's converter permutes the rows of `attn_q` and `attn_k` of Llama-architecture
//! models so its interleaved RoPE kernel applies (`LlamaModel.permute` in
//! convert_hf_to_gguf.py). Rows of a quantized matrix are independent blocks, so this loader
//! undoes the permutation exactly, by moving rows, and the decoder sees the Hugging Face
//! layout whatever the source. Qwen2 GGUFs are stored unpermuted (NEOX RoPE) and are left
//! alone.

use std::borrow::Cow;
use std::fs::File;
use std::io::{BufReader, Cursor, Read, Seek};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{QStorage, QTensor};
use candle_core::{Device, Tensor};

use super::gguf_check::check_gguf_reader;
use super::{check_shape, WeightName, WeightSource};
use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::error::{candle_message, ModelError, Result};
use crate::linear::Linear;
use crate::loader::LayerWeight;

/// What a GGUF source reads from: a file or bytes in memory.
trait ReadSeek: Read + Seek {}
impl<T: Read + Seek> ReadSeek for T {}

pub struct GgufSource {
    path: PathBuf,
    reader: Box<dyn ReadSeek>,
    content: Content,
    config: ModelConfig,
    device: Device,
    /// Undo llama.cpp's q/k row permutation (Llama-architecture files).
    unpermute_qk: bool,
}

impl GgufSource {
    pub fn open(path: &Path, device: &Device) -> Result<Self> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_reader(Box::new(BufReader::new(file)), path, device)
    }

    /// A GGUF file already read into memory (a plug-in's file, read through its own
    /// confinement and size checks); `path` names it in errors.
    pub fn from_bytes(bytes: Vec<u8>, path: &Path, device: &Device) -> Result<Self> {
        Self::from_reader(Box::new(Cursor::new(bytes)), path, device)
    }

    fn from_reader(mut reader: Box<dyn ReadSeek>, path: &Path, device: &Device) -> Result<Self> {
        // candle panics on some malformed headers; it only sees files that pass this walk.
        check_gguf_reader(&mut reader).map_err(|error| ModelError::Gguf {
            path: path.to_path_buf(),
            error,
        })?;
        let content = Content::read(&mut reader).map_err(|e| ModelError::Parse {
            path: path.to_path_buf(),
            message: candle_message(e),
        })?;
        let config = read_config(&content, &mut reader, path)?;
        Ok(Self {
            path: path.to_path_buf(),
            reader,
            unpermute_qk: metadata_str(&content, "general.architecture")? == "llama",
            content,
            config,
            device: device.clone(),
        })
    }

    /// The parsed header: metadata (tokenizer, chat template) and tensor directory.
    pub fn content(&self) -> &Content {
        &self.content
    }

    fn read(&mut self, name: &str) -> Result<QTensor> {
        if !self.content.tensor_infos.contains_key(name) {
            return Err(ModelError::MissingTensor { name: name.into() });
        }
        self.content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| ModelError::Parse {
                path: self.path.clone(),
                message: format!("tensor `{name}`: {}", candle_message(e)),
            })
    }

    /// Reads `name`, checks its shape, undoes the q/k permutation for `heads` heads when
    /// asked, and moves it to the device.
    fn read_checked(
        &mut self,
        name: &str,
        shape: &[usize],
        heads: Option<usize>,
    ) -> Result<QTensor> {
        let t = self.read(name)?;
        check_shape(name, t.shape().dims(), shape)?;
        let bytes = t.data()?;
        let bytes = match heads {
            Some(h) if self.unpermute_qk => Cow::Owned(unpermute_rows(&bytes, shape[0], h)),
            _ => bytes,
        };
        let storage = QStorage::from_data(bytes, &self.device, t.dtype())?;
        Ok(QTensor::new(storage, t.shape().clone())?)
    }

    fn rope_heads(&self, name: WeightName) -> Option<usize> {
        match name {
            WeightName::Layer(_, LayerWeight::Q) => Some(self.config.num_heads),
            WeightName::Layer(_, LayerWeight::K) => Some(self.config.num_kv_heads),
            _ => None,
        }
    }

    /// A projection's weight `(out, inp)` and, when `bias`, its bias `(out,)` as f32.
    fn read_linear(
        &mut self,
        name: WeightName,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<(QTensor, Option<Tensor>)> {
        let base = name.gguf();
        let heads = self.rope_heads(name);
        let weight = self.read_checked(&format!("{base}.weight"), &[out, inp], heads)?;
        let bias = match bias {
            true => Some(
                self.read_checked(&format!("{base}.bias"), &[out], heads)?
                    .dequantize(&self.device)?,
            ),
            false => None,
        };
        Ok((weight, bias))
    }
}

/// Inverse of llama.cpp's `permute(w, n_head)`: GGUF row `h*d + 2i + s` holds Hugging Face
/// row `h*d + s*(d/2) + i`. Works on raw rows, so any quantization type (and biases) moves
/// unchanged.
pub fn unpermute_rows(bytes: &[u8], rows: usize, heads: usize) -> Vec<u8> {
    let row_bytes = bytes.len() / rows;
    let d = rows / heads;
    let mut out = Vec::with_capacity(bytes.len());
    for h in 0..heads {
        for s in 0..2 {
            for i in 0..d / 2 {
                let src = h * d + 2 * i + s;
                out.extend_from_slice(&bytes[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    out
}

impl WeightSource for GgufSource {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn linear(&mut self, name: WeightName, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let (weight, bias) = self.read_linear(name, out, inp, bias)?;
        Linear::from_qtensor(weight, bias)
    }

    fn linears(&mut self, parts: &[(WeightName, usize, usize, bool)]) -> Result<Vec<Linear>> {
        let weights = parts
            .iter()
            .map(|&(name, out, inp, bias)| self.read_linear(name, out, inp, bias))
            .collect::<Result<Vec<_>>>()?;
        Linear::from_qtensors_stacked(weights)
    }

    fn vector(&mut self, name: WeightName, len: usize) -> Result<Tensor> {
        let t = self.read_checked(&format!("{}.weight", name.gguf()), &[len], None)?;
        Ok(t.dequantize(&self.device)?)
    }

    fn embedding(&mut self, vocab: usize, hidden: usize) -> Result<Linear> {
        let t = self.read_checked(
            &format!("{}.weight", WeightName::Embed.gguf()),
            &[vocab, hidden],
            None,
        )?;
        Linear::from_qtensor(t, None)
    }
}

fn metadata<'a>(c: &'a Content, key: &str) -> Result<&'a Value> {
    c.metadata
        .get(key)
        .ok_or_else(|| ModelError::MissingMetadata { key: key.into() })
}

fn metadata_str<'a>(c: &'a Content, key: &str) -> Result<&'a str> {
    metadata(c, key)?
        .to_string()
        .map(|s| s.as_str())
        .map_err(|e| ModelError::BadMetadata {
            key: key.into(),
            message: candle_message(e),
        })
}

/// Any integer metadata value as usize (writers differ between u32, i32 and u64).
fn as_usize(v: &Value, key: &str) -> Result<usize> {
    let n: Option<i128> = match v {
        Value::U8(x) => Some(*x as i128),
        Value::I8(x) => Some(*x as i128),
        Value::U16(x) => Some(*x as i128),
        Value::I16(x) => Some(*x as i128),
        Value::U32(x) => Some(*x as i128),
        Value::I32(x) => Some(*x as i128),
        Value::U64(x) => Some(*x as i128),
        Value::I64(x) => Some(*x as i128),
        _ => None,
    };
    n.and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| ModelError::BadMetadata {
            key: key.into(),
            message: format!("expected a non-negative integer, found {v:?}"),
        })
}

fn as_f32(v: &Value, key: &str) -> Result<f32> {
    match v {
        Value::F32(x) => Ok(*x),
        Value::F64(x) => Ok(*x as f32),
        other => as_usize(other, key).map(|n| n as f32),
    }
}

fn read_config(c: &Content, reader: &mut Box<dyn ReadSeek>, path: &Path) -> Result<ModelConfig> {
    let arch_name = metadata_str(c, "general.architecture")?.to_string();
    let architecture = Architecture::parse(&arch_name)?;
    let key = |k: &str| format!("{arch_name}.{k}");
    let int = |k: &str| metadata(c, &key(k)).and_then(|v| as_usize(v, &key(k)));
    let opt_int = |k: &str| {
        c.metadata
            .get(&key(k))
            .map(|v| as_usize(v, &key(k)))
            .transpose()
    };
    let opt_f32 = |k: &str| {
        c.metadata
            .get(&key(k))
            .map(|v| as_f32(v, &key(k)))
            .transpose()
    };
    if let Some(kind) = c.metadata.get(&key("rope.scaling.type")) {
        let kind = kind.to_string().map(|s| s.as_str()).unwrap_or("?");
        if kind != "none" {
            return Err(ModelError::Config(format!(
                "RoPE scaling type `{kind}` is not supported"
            )));
        }
    }
    let hidden_size = int("embedding_length")?;
    let num_heads = int("attention.head_count")?;
    let embed =
        c.tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| ModelError::MissingTensor {
                name: "token_embd.weight".into(),
            })?;
    let vocab_size = match opt_int("vocab_size")? {
        Some(v) => v,
        None => embed.shape.dims().first().copied().unwrap_or(0),
    };
    let head_dim = match opt_int("attention.key_length")? {
        Some(d) => d,
        None => hidden_size / num_heads.max(1),
    };
    let rope_scaling = match c.tensor_infos.contains_key("rope_freqs.weight") {
        true => RopeScaling::Factors(read_rope_factors(c, reader, path)?),
        false => RopeScaling::None,
    };
    let config = ModelConfig {
        architecture,
        hidden_size,
        intermediate_size: int("feed_forward_length")?,
        num_layers: int("block_count")?,
        num_heads,
        num_kv_heads: opt_int("attention.head_count_kv")?.unwrap_or(num_heads),
        head_dim,
        vocab_size,
        rms_norm_eps: opt_f32("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
        rope_theta: opt_f32("rope.freq_base")?.unwrap_or(10_000.0),
        rope_scaling,
        max_position_embeddings: opt_int("context_length")?.unwrap_or(4096),
        tie_word_embeddings: !c.tensor_infos.contains_key("output.weight"),
        attention_bias: c.tensor_infos.contains_key("blk.0.attn_q.bias"),
    };
    config.validate()?;
    Ok(config)
}

fn read_rope_factors(c: &Content, reader: &mut Box<dyn ReadSeek>, path: &Path) -> Result<Vec<f32>> {
    let t = c
        .tensor(reader, "rope_freqs.weight", &Device::Cpu)
        .map_err(|e| ModelError::Parse {
            path: path.into(),
            message: format!("rope_freqs.weight: {}", candle_message(e)),
        })?;
    Ok(t.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's `permute` written out, to check that ours inverts it.
    fn permute(rows: &[u8], n: usize, heads: usize) -> Vec<u8> {
        let d = n / heads;
        let mut out = vec![0u8; n];
        for h in 0..heads {
            for s in 0..2 {
                for i in 0..d / 2 {
                    out[h * d + 2 * i + s] = rows[h * d + s * (d / 2) + i];
                }
            }
        }
        out
    }

    #[test]
    fn a_zero_alignment_fails_the_model_load_by_name_instead_of_panicking() {
        use crate::tiny::{tiny_config, TinyModel};
        use candle_core::quantized::GgmlDType;
        let dir = tempfile::tempdir().unwrap();
        let tiny = TinyModel::random(tiny_config(Architecture::Llama), 1).unwrap();
        let good = dir.path().join("good.gguf");
        tiny.write_gguf(&good, GgmlDType::Q8_0).unwrap();
        let source = GgufSource::open(&good, &Device::Cpu).unwrap();
        let mut reader = BufReader::new(File::open(&good).unwrap());
        let summary = check_gguf_reader(&mut reader).unwrap();
        assert_eq!(summary.data_offset, source.content().tensor_data_offset);

        let bad = dir.path().join("bad.gguf");
        let zero = [("general.alignment".to_string(), Value::U32(0))];
        tiny.write_gguf_with_metadata(&bad, GgmlDType::Q8_0, &zero)
            .unwrap();
        let err = GgufSource::open(&bad, &Device::Cpu).err().unwrap();
        let ModelError::Gguf { path, error } = &err else {
            panic!("expected a GGUF fault, got {err}");
        };
        assert_eq!((path, error.field.as_str()), (&bad, "general.alignment"));
        assert!(err.to_string().contains("bad.gguf"), "{err}");
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let hf: Vec<u8> = (0..24).collect();
        let gguf = permute(&hf, 24, 3);
        assert_ne!(gguf, hf);
        assert_eq!(unpermute_rows(&gguf, 24, 3), hf);
    }
}
