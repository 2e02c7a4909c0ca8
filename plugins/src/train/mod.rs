//! Offline training of plug-ins on the frozen base model; nothing here is on the request path.
//!
//! The serving decoder (`models::Llama`) runs quantized weights through custom kernels and
//! writes an in-place KV cache, none of which has gradients. Training therefore runs its own
//! forward pass, [`DenseLlama`]: the same model with every weight dequantized to a plain f32
//! tensor and only candle operations that have a backward, pinned to the serving forward by
//! tests (same logits within 1e-4, with and without an adapter). [`data`] turns a JSONL file
//! of chat or prompt/completion examples into token sequences with their loss masks, and
//! [`prompts`] reads prompt lists and renders them with the chat template.
//!
//! These are the utilities every kind's trainer shares; each trainer lives in its kind's
//! folder (`crate::lora::train`, `crate::steer::train`, `crate::controller::train`), and
//! `server train <kind>` drives it.

pub mod adamw;
pub mod data;
pub mod dense;
pub mod progress;
pub mod prompts;

use std::path::PathBuf;

pub use data::{Batch, Dataset, Encoder, Example};
pub use dense::{DenseLlama, LoraFactors, LoraPair};
pub use progress::{Progress, Quiet};

/// Why training could not start or go on. Messages name the file, line or option at fault.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("`{path}`: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{path}` line {line}: {message}")]
    BadLine {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{}: {message}", path.display())]
    BadPrompts { path: PathBuf, message: String },
    #[error("cannot encode a prompt: {0}")]
    Prompt(String),
    #[error(
        "unknown target module `{0}` (LoRA can target {known})",
        known = crate::lora::SUPPORTED_MODULES.join(", ")
    )]
    UnknownTarget(String),
    #[error("invalid training option: {0}")]
    BadOption(String),
    #[error(transparent)]
    Plugin(#[from] crate::error::PluginError),
    #[error("the model cannot be used for training: {0}")]
    Model(#[from] models::ModelError),
    /// Built through `From`, which drops candle's backtrace.
    #[error("tensor operation failed: {0}")]
    Tensor(candle_core::Error),
}

impl From<candle_core::Error> for TrainError {
    fn from(e: candle_core::Error) -> Self {
        Self::Tensor(models::error::without_backtrace(e))
    }
}

impl TrainError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;

/// Runs `model` over `prompts`, each a whole prefill row from position 0 on a fresh cache,
/// with the chain `hooks`, computing no logits: for hooks that capture what they see.
pub fn prefill(
    model: &models::Llama,
    prompts: &[&[u32]],
    hooks: &[models::HookCall],
) -> models::Result<()> {
    let mut caches: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
    let mut rows: Vec<models::BatchRow<'_>> = prompts
        .iter()
        .zip(caches.iter_mut())
        .enumerate()
        .map(|(i, (tokens, cache))| models::BatchRow {
            seq_id: i as u64,
            tokens,
            cache,
            hooks,
            logits: models::LogitsWanted::None,
        })
        .collect();
    model.forward(&mut rows).map(|_| ())
}
