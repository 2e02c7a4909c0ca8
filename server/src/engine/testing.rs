//! Test fixtures for the engine: a tiny seeded model written to disk and loaded back through
//! the real loader, with a byte-level vocabulary of exactly its 96 tokens.
//!
//! Not on the request path; public so that the engine's integration tests (and the HTTP
//! layer's, should they want a real engine on a model that runs in microseconds) share it.
//! The vocabulary (`models::tiny::tiny_tokenizer_metadata`) is one token per printable ASCII
//! character: id 0 `<|endoftext|>` (the end of sequence), id 1 the space (`Ġ`), ids 2..=95
//! the characters `!`..=`~` in order. No merges, so every string of those characters encodes
//! to one id per character. `TinyModel::write_gguf_with_tokenizer` writes a model file that
//! carries this vocabulary and the chat template, for tests that run the binary.

use std::io::Cursor;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::Device;
use models::bundle::{LoadError, LoadedModel};
use models::chat_template::ChatTemplate;
use models::tiny::{tiny_config, tiny_tokenizer_metadata, TinyModel, TINY_CHAT_TEMPLATE};
use models::tokenizer::TokenizerError;
use models::{Architecture, Tokenizer};

/// Vocabulary size of `models::tiny::tiny_config`, which the tokenizer matches.
pub const TINY_VOCAB: usize = 96;

/// The end-of-sequence id of [`tiny_tokenizer`].
pub const TINY_EOS: u32 = 0;

/// The id of a printable ASCII character or the space in [`tiny_tokenizer`].
pub fn tiny_char_id(c: char) -> Option<u32> {
    match c {
        ' ' => Some(1),
        '!'..='~' => Some(c as u32 - '!' as u32 + 2),
        _ => None,
    }
}

/// The 96-token byte-level tokenizer described in the module docs.
pub fn tiny_tokenizer() -> Result<Tokenizer, TokenizerError> {
    Tokenizer::from_gguf(&metadata_only_gguf(&tiny_tokenizer_metadata())?)
}

/// The [`tiny_tokenizer`] with `Ċ` (a new line, in GPT-2's byte alphabet) as one more token,
/// id [`TINY_VOCAB`]: for grammars that need new lines (tool calls).
pub fn tiny_tokenizer_with_newline() -> Result<Tokenizer, TokenizerError> {
    let mut entries = tiny_tokenizer_metadata();
    for (key, value) in &mut entries {
        match (key.as_str(), value) {
            ("tokenizer.ggml.tokens", Value::Array(tokens)) => {
                tokens.push(Value::String("Ċ".into()))
            }
            ("tokenizer.ggml.token_type", Value::Array(types)) => types.push(Value::I32(1)),
            _ => {}
        }
    }
    Tokenizer::from_gguf(&metadata_only_gguf(&entries)?)
}

/// Writes a seeded tiny Llama as an f32 GGUF into `dir` and loads it back with the
/// [`tiny_tokenizer`] and a plain chat template. Its context is 256 positions.
pub fn tiny_loaded_model(dir: &Path, seed: u64) -> Result<LoadedModel, LoadError> {
    tiny_loaded_model_as(dir, seed, GgmlDType::F32)
}

/// [`tiny_loaded_model`] with its matrices in `dtype`: Q8_0 runs the served kernels, whose
/// results depend neither on the batch nor on chunking, for tests that compare bits.
pub fn tiny_loaded_model_as(
    dir: &Path,
    seed: u64,
    dtype: GgmlDType,
) -> Result<LoadedModel, LoadError> {
    let path = dir.join(format!("tiny-{seed}-{dtype:?}.gguf"));
    TinyModel::random(tiny_config(Architecture::Llama), seed)?.write_gguf(&path, dtype)?;
    let model = models::loader::load_model(&path, &Device::Cpu, usize::MAX)?;
    let tokenizer = tiny_tokenizer()?;
    let chat_template = ChatTemplate::new(TINY_CHAT_TEMPLATE, None, Some("<|endoftext|>".into()))?;
    Ok(LoadedModel {
        path,
        model,
        tokenizer,
        chat_template: Some(chat_template),
        vision: None,
    })
}

/// A greedy request for `prompt` with nothing else asked for: no stops, no plug-ins, no
/// log-probs, prefix caching allowed. Tests set what they vary with struct-update syntax.
pub fn plain_request(id: &str, prompt: Vec<u32>, max_tokens: usize) -> super::GenerateRequest {
    super::GenerateRequest {
        id: id.to_string(),
        prompt,
        sampling: models::sampling::SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        seed: 0,
        max_tokens,
        stop: Vec::new(),
        stop_token_ids: Vec::new(),
        prompt_logprobs: None,
        hooks: Vec::new(),
        output: super::OutputRules::default(),
        cache_prompt: true,
        constraint: None,
        embed: false,
    }
}

/// Every event of a request until its channel closes (blocking).
pub fn collect_events(mut rx: super::EventReceiver) -> Vec<super::Event> {
    std::iter::from_fn(|| rx.blocking_recv()).collect()
}

/// Polls `cond` every 2 ms until it holds; panics naming `what` after 20 s.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "timed out: {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Round-trips tokenizer metadata through an in-memory GGUF, as the loader reads it.
fn metadata_only_gguf(entries: &[(String, Value)]) -> Result<Content, TokenizerError> {
    let refs: Vec<(&str, &Value)> = entries.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut buf = Cursor::new(Vec::new());
    let fixture = |e: candle_core::Error| TokenizerError::Parse {
        path: "<in-memory tiny vocabulary>".into(),
        message: e.to_string(),
    };
    gguf_file::write(&mut buf, &refs, &[]).map_err(fixture)?;
    buf.set_position(0);
    Content::read(&mut buf).map_err(fixture)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_tiny_vocabulary_has_one_id_per_character() {
        let tk = tiny_tokenizer().unwrap();
        assert_eq!(tk.vocab_size(), TINY_VOCAB);
        let ids = tk.encode("hi there!", false).unwrap();
        let expect: Vec<u32> = "hi there!".chars().filter_map(tiny_char_id).collect();
        assert_eq!(ids, expect);
        assert_eq!(tk.decode(&ids, false).unwrap(), "hi there!");
        assert_eq!(tk.eos_ids(), &[TINY_EOS]);
    }
}
