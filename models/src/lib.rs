//! `models`: the Llama-family decoder graft serves, on candle.
//!
//! Everything the server needs to turn token ids into next-token distributions lives here:
//! weights loading (GGUF and Hugging Face safetensors), the decoder with its plug-in hook
//! points, per-sequence KV caches, the tokenizer and chat template, sampling, and the
//! default-model fetch. The crate knows nothing about HTTP or scheduling.

pub mod kernels;
