//! The one error type of model loading and the forward pass.
//!
//! Loading errors name the file, tensor or metadata key at fault so that a user who points the
//! server at a wrong or damaged checkpoint learns what is wrong without reading a backtrace.

use std::path::PathBuf;

/// Everything that can go wrong while loading weights or running the decoder.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("metadata key `{key}` is missing")]
    MissingMetadata { key: String },
    #[error("metadata key `{key}` has the wrong type: {message}")]
    BadMetadata { key: String, message: String },
    #[error("unsupported architecture `{0}` (supported: llama, mistral, qwen2)")]
    UnsupportedArchitecture(String),
    #[error("tensor `{name}` is missing from the checkpoint")]
    MissingTensor { name: String },
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("tensor `{name}` has unsupported dtype {dtype}")]
    TensorDtype { name: String, dtype: String },
    #[error("invalid model configuration: {0}")]
    Config(String),
    #[error("token id {id} is outside the vocabulary of {vocab_size}")]
    TokenOutOfRange { id: u32, vocab_size: usize },
    #[error("sequence would reach position {position}, beyond the context length {context}")]
    ContextOverflow { position: usize, context: usize },
    #[error("invalid batch: {0}")]
    Batch(String),
    #[error("plug-in hook `{hook}` failed: {message}")]
    Hook { hook: String, message: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
