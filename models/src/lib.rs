//! `models`: the Llama-family decoder graft serves, on candle.
//!
//! Everything the server needs to turn token ids into next-token distributions lives here:
//! weights loading (GGUF and Hugging Face safetensors), the decoder with its plug-in hook
//! points, per-sequence KV caches, the tokenizer and chat template, sampling, and the
//! default-model fetch. The crate knows nothing about HTTP or scheduling.

mod attention;
pub mod attention_probe;
pub mod batch;
pub mod bundle;
pub mod chat_template;
pub mod config;
pub mod default_model;
pub mod error;
mod hook_plan;
pub mod hook_state;
pub mod hooks;
pub mod kernels;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod loader;
pub mod output_head;
pub mod rope;
pub mod sampling;
pub mod testing;
pub mod threads;
pub mod tiny;
pub mod tokenizer;
pub mod vision;

pub use attention::HeadKeys;
pub use attention_probe::AttentionProbe;
pub use batch::{BatchRow, LogitsWanted};
pub use config::{Architecture, ModelConfig};
pub use error::{ModelError, Result};
pub use hook_state::{ChainState, HookState};
pub use hooks::{
    Exit, Hook, HookCall, HookGroup, HookPoints, HookRow, KeyBlocks, PrefixReuse, Projection,
};
pub use kv_cache::{KvCache, KvDtype};
pub use llama::Llama;
pub use output_head::OutputHead;
pub use tokenizer::{IncrementalDecoder, Tokenizer};
