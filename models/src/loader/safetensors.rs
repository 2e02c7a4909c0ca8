//! Hugging Face checkpoints: a folder with `config.json` and `model.safetensors` (or shards
//! listed in `model.safetensors.index.json`), in f32, f16 or bf16.
//!
//! A vision-language checkpoint of the Idefics3 family (SmolVLM) holds its language model
//! under `model.text_model.` with its config in `text_config`: this source then serves that
//! language model (the vision tower loads from the same folder, see [`crate::vision`]).
//!
//! Weights are converted to f32 on load: activations are f32 and candle's CPU matmul wants
//! both operands in one dtype. Shards are read whole into memory (no mmap: the crate
//! forbids `unsafe`), one at a time as the decoder asks for their tensors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::BufferedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::{check_shape, WeightName, WeightSource};
use crate::config::{HfConfig, ModelConfig};
use crate::error::{ModelError, Result};
use crate::linear::Linear;

pub struct SafetensorsSource {
    config: ModelConfig,
    device: Device,
    /// What the checkpoint puts before the language model's `layers.`, `embed_tokens`, `norm`:
    /// `model.`, or `model.text_model.` in an Idefics3 checkpoint.
    prefix: &'static str,
    /// Tensor name -> shard file.
    index: HashMap<String, PathBuf>,
    /// The shard currently in memory.
    loaded: Option<(PathBuf, BufferedSafetensors)>,
}

impl SafetensorsSource {
    pub fn open(dir: &Path, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text =
            std::fs::read_to_string(&config_path).map_err(|e| ModelError::io(&config_path, e))?;
        let parse = |e: serde_json::Error| ModelError::Parse {
            path: config_path.clone(),
            message: e.to_string(),
        };
        let mut json: serde_json::Value = serde_json::from_str(&text).map_err(parse)?;
        let idefics3 = json_str(&json, "model_type") == Some("idefics3");
        let (json, prefix) = match json.get_mut("text_config") {
            Some(text) if idefics3 => (text.take(), "model.text_model."),
            _ => (json, "model."),
        };
        let hf: HfConfig = serde_json::from_value(json).map_err(parse)?;
        Ok(Self {
            config: hf.into_config()?,
            device: device.clone(),
            prefix,
            index: shard_index(dir)?,
            loaded: None,
        })
    }

    /// A single-file checkpoint already read into memory (a plug-in's weights, read through
    /// its own confinement and size checks), with its parsed config; `path` names it in errors.
    pub fn from_bytes(
        config: ModelConfig,
        bytes: Vec<u8>,
        path: &Path,
        device: &Device,
    ) -> Result<Self> {
        let st = BufferedSafetensors::new(bytes).map_err(|e| parse_error(path, e))?;
        let index = st
            .tensors()
            .into_iter()
            .map(|(name, _)| (name, path.to_path_buf()))
            .collect();
        Ok(Self {
            config,
            device: device.clone(),
            prefix: "model.",
            index,
            loaded: Some((path.to_path_buf(), st)),
        })
    }

    /// The checkpoint's name of a language-model weight.
    fn name(&self, name: WeightName) -> String {
        let hf = name.hf();
        match hf.strip_prefix("model.") {
            Some(rest) => format!("{}{rest}", self.prefix),
            None => hf,
        }
    }

    /// Loads `name` as f32 on the device and checks its shape.
    pub(crate) fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let shard = self
            .index
            .get(name)
            .cloned()
            .ok_or_else(|| ModelError::MissingTensor { name: name.into() })?;
        if self.loaded.as_ref().map(|(p, _)| p) != Some(&shard) {
            let bytes = std::fs::read(&shard).map_err(|e| ModelError::io(&shard, e))?;
            let st = BufferedSafetensors::new(bytes).map_err(|e| parse_error(&shard, e))?;
            self.loaded = Some((shard.clone(), st));
        }
        let st = &self
            .loaded
            .as_ref()
            .ok_or_else(|| ModelError::MissingTensor { name: name.into() })?
            .1;
        let t = st
            .load(name, &Device::Cpu)
            .map_err(|e| parse_error(&shard, e))?;
        check_shape(name, t.dims(), shape)?;
        if !matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16) {
            return Err(ModelError::TensorDtype {
                name: name.into(),
                dtype: format!("{:?}", t.dtype()),
            });
        }
        Ok(t.to_dtype(DType::F32)?.to_device(&self.device)?)
    }
}

fn json_str<'a>(json: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    json.get(key).and_then(|v| v.as_str())
}

fn parse_error(path: &Path, e: candle_core::Error) -> ModelError {
    ModelError::Parse {
        path: path.to_path_buf(),
        message: crate::error::candle_message(e),
    }
}

/// Maps every tensor name to its file: from the shard index when there is one, else from
/// the single `model.safetensors`.
fn shard_index(dir: &Path) -> Result<HashMap<String, PathBuf>> {
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.exists() {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: HashMap<String, String>,
        }
        let text =
            std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
        let index: Index = serde_json::from_str(&text).map_err(|e| ModelError::Parse {
            path: index_path.clone(),
            message: e.to_string(),
        })?;
        return Ok(index
            .weight_map
            .into_iter()
            .map(|(k, v)| (k, dir.join(v)))
            .collect());
    }
    let single = dir.join("model.safetensors");
    let bytes = std::fs::read(&single).map_err(|e| ModelError::io(&single, e))?;
    let st = BufferedSafetensors::new(bytes).map_err(|e| parse_error(&single, e))?;
    Ok(st
        .tensors()
        .into_iter()
        .map(|(name, _)| (name, single.clone()))
        .collect())
}

impl WeightSource for SafetensorsSource {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn linear(&mut self, name: WeightName, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let base = self.name(name);
        let weight = self.tensor(&format!("{base}.weight"), &[out, inp])?;
        let bias = match bias {
            true => Some(self.tensor(&format!("{base}.bias"), &[out])?),
            false => None,
        };
        Linear::from_dense(weight, bias)
    }

    fn vector(&mut self, name: WeightName, len: usize) -> Result<Tensor> {
        let name = self.name(name);
        self.tensor(&format!("{name}.weight"), &[len])
    }

    fn embedding(&mut self, vocab: usize, hidden: usize) -> Result<Linear> {
        let name = self.name(WeightName::Embed);
        let w = self.tensor(&format!("{name}.weight"), &[vocab, hidden])?;
        Linear::from_dense(w, None)
    }
}
