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
    #[error("{path} is not a valid GGUF file: {error}")]
    Gguf {
        path: PathBuf,
        error: crate::loader::gguf_check::GgufError,
    },
    /// Built through `From`, which drops candle's backtrace (see [`without_backtrace`]).
    #[error(transparent)]
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for ModelError {
    fn from(e: candle_core::Error) -> Self {
        Self::Candle(without_backtrace(e))
    }
}

/// `e` without the backtraces candle attaches to its errors when `RUST_BACKTRACE` or
/// `RUST_LIB_BACKTRACE` is set (`Error::bt`, used by `bail!`): its `Display` would print the
/// whole stack into a message meant for a client or an operator. Context and path layers stay.
pub fn without_backtrace(e: candle_core::Error) -> candle_core::Error {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } => without_backtrace(*inner),
        E::Context { inner, context } => E::Context {
            inner: Box::new(without_backtrace(*inner)),
            context,
        },
        E::WithPath { inner, path } => E::WithPath {
            inner: Box::new(without_backtrace(*inner)),
            path,
        },
        other => other,
    }
}

/// The message of a candle error, without its backtrace.
pub fn candle_message(e: candle_core::Error) -> String {
    without_backtrace(e).to_string()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// What `bail!` builds when `RUST_BACKTRACE` is set, captured whatever the environment.
    fn with_backtrace(message: &str) -> candle_core::Error {
        candle_core::Error::WithBacktrace {
            inner: Box::new(candle_core::Error::Msg(message.into())),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        }
    }

    #[test]
    fn candle_backtraces_never_reach_model_error_messages() {
        assert_ne!(
            with_backtrace("boom").to_string(),
            "boom",
            "no backtrace captured"
        );
        assert_eq!(ModelError::from(with_backtrace("boom")).to_string(), "boom");
        let layered = with_backtrace("boom")
            .context("reading x")
            .with_path("/m.gguf");
        assert_eq!(
            ModelError::from(layered).to_string(),
            "path: \"/m.gguf\" reading x\nboom"
        );
        assert_eq!(candle_message(with_backtrace("boom")), "boom");
    }
}
