//! Everything one served model needs, loaded together from one path: the decoder, its
//! tokenizer and its chat template.
//!
//! A `.gguf` file carries all three (tokenizer and template in its metadata); a Hugging Face
//! folder carries `tokenizer.json` and `tokenizer_config.json` beside the weights. A
//! `tokenizer.json` next to a GGUF file takes precedence over the GGUF's own vocabulary.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use candle_core::Device;

use crate::chat_template::{find_template, ChatTemplate, TemplateError};
use crate::error::ModelError;
use crate::llama::Llama;
use crate::loader::{GgufSource, SafetensorsSource};
use crate::tokenizer::{Tokenizer, TokenizerError};
use crate::vision::VisionModel;

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
    #[error("chat template: {0}")]
    Template(#[from] TemplateError),
}

/// A model ready to serve.
pub struct LoadedModel {
    pub path: PathBuf,
    pub model: Llama,
    pub tokenizer: Tokenizer,
    /// `None` when neither the checkpoint nor the configuration provides one; chat requests
    /// then fail with [`TemplateError::Missing`] while raw completions still work.
    pub chat_template: Option<ChatTemplate>,
    /// The vision tower of a vision-language checkpoint (SmolVLM); `None` for a text model.
    pub vision: Option<std::sync::Arc<VisionModel>>,
}

/// Options that change how a model is loaded.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Longest sequence served; defaults to the model's trained context.
    pub max_positions: Option<usize>,
    /// A Jinja chat template that overrides the checkpoint's.
    pub chat_template: Option<String>,
    /// The folder of a vision tower trained for this (text-only) model to attach.
    pub vision: Option<PathBuf>,
}

/// Loads the model at `path` (a `.gguf` file or a Hugging Face folder) onto `device`.
pub fn load(path: &Path, device: &Device, options: &LoadOptions) -> Result<LoadedModel, LoadError> {
    let max = options.max_positions.unwrap_or(usize::MAX);
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else {
        path.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    let tokenizer_json = dir.join("tokenizer.json");
    let tokenizer_config = dir.join("tokenizer_config.json");
    let mut vision = None;
    let (model, tokenizer, gguf_template) = if path.is_dir() {
        let mut source = SafetensorsSource::open(path, device)?;
        let model = Llama::load(&mut source, max)?;
        let hidden = model.config.hidden_size;
        vision = VisionModel::load(path, &mut source, hidden)?.map(std::sync::Arc::new);
        (model, Tokenizer::from_file(&tokenizer_json)?, None)
    } else {
        let mut source = GgufSource::open(path, device)?;
        let tokenizer = match tokenizer_json.exists() {
            true => Tokenizer::from_file(&tokenizer_json)?,
            false => Tokenizer::from_gguf(source.content())?,
        };
        let template = match source.content().metadata.get("tokenizer.chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        (Llama::load(&mut source, max)?, tokenizer, template)
    };
    if let Some(tower) = &options.vision {
        if vision.is_some() {
            return Err(ModelError::Config(format!(
                "{} has a vision tower of its own; --vision attaches one to a text-only model",
                path.display()
            ))
            .into());
        }
        let hidden = model.config.hidden_size;
        let attached = VisionModel::attach(tower, device, hidden, &tokenizer)
            .map_err(|e| ModelError::Config(format!("vision tower {}: {e}", tower.display())))?;
        vision = Some(std::sync::Arc::new(attached));
    }
    let chat_template = match find_template(
        gguf_template,
        Some(&tokenizer_config),
        options.chat_template.clone(),
    ) {
        Ok(source) => Some(ChatTemplate::new(
            &source,
            tokenizer.bos_token().map(str::to_string),
            tokenizer.eos_token().map(str::to_string),
        )?),
        Err(TemplateError::Missing) => None,
        Err(e) => return Err(e.into()),
    };
    Ok(LoadedModel {
        path: path.to_path_buf(),
        model,
        tokenizer,
        chat_template,
        vision,
    })
}
