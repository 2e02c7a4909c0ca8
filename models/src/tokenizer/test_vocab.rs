//! Tiny hand-made GGUF vocabularies for the tokenizer's unit tests. Each is written to an
//! in-memory GGUF with candle's `gguf_file::write` and read back with `Content::read`, so the
//! real loader path runs; the ids below are small enough to check by hand.
//!
//! Byte-level (`gpt2`) vocabulary: 0 `<|endoftext|>`, 1 `<|im_start|>`, 2 `<|im_end|>` (control),
//! 3 `<tool>` (user-defined), 4 + b for every byte b, then the merges `he` 260, `ll` 261,
//! `Ġt` 262, `Ġthe` 263, `hell` 264, `hello` 265, `ĠĠ` 266, `12` 267.
//!
//! SentencePiece (`llama`) vocabulary: 0 `<unk>`, 1 `<s>`, 2 `</s>`, 3 + b the byte token
//! `<0xXX>`, then `▁ h e l o w r d` 259..=266 and scored pieces `he` 267, `ll` 268, `hell` 269,
//! `hello` 270, `▁hello` 271, `▁w` 272, `or` 273, `▁wor` 274, `ld` 275, `▁world` 276.

#![allow(clippy::unwrap_used)]

use std::io::Cursor;

use candle_core::quantized::gguf_file::{self, Content, Value};

use super::bytelevel::byte_to_char;
use super::Tokenizer;

/// Id of an ASCII character in the byte-level vocabulary.
pub(crate) fn gpt2_char(c: char) -> u32 {
    4 + c as u32
}

/// Id of a byte token in the SentencePiece vocabulary.
pub(crate) fn spm_byte(b: u8) -> u32 {
    3 + u32::from(b)
}

/// Writes `entries` as a GGUF (no tensors) and parses it back.
pub(crate) fn gguf_content(entries: &[(&str, Value)]) -> Content {
    let refs: Vec<(&str, &Value)> = entries.iter().map(|(k, v)| (*k, v)).collect();
    let mut buf = Cursor::new(Vec::new());
    gguf_file::write(&mut buf, &refs, &[]).unwrap();
    buf.set_position(0);
    Content::read(&mut buf).unwrap()
}

fn strings(items: &[String]) -> Value {
    Value::Array(items.iter().cloned().map(Value::String).collect())
}

/// The byte-level vocabulary's entries (index = id) and merges.
pub(crate) fn gpt2_tokens_and_merges() -> (Vec<String>, [&'static str; 8]) {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool>"]
        .map(String::from)
        .to_vec();
    tokens.extend((0..=255u8).map(|b| byte_to_char(b).to_string()));
    let merges = [
        "h e", "l l", "Ġ t", "Ġt he", "he ll", "hell o", "Ġ Ġ", "1 2",
    ];
    tokens.extend(merges.iter().map(|m| m.replace(' ', "")));
    (tokens, merges)
}

/// Metadata of the byte-level vocabulary with the given `tokenizer.ggml.pre`.
pub(crate) fn gpt2_metadata(pre: &str) -> Vec<(&'static str, Value)> {
    let (tokens, merges) = gpt2_tokens_and_merges();
    let mut types = vec![3, 3, 3, 4];
    types.resize(tokens.len(), 1);
    vec![
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String(pre.into())),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges", strings(&merges.map(String::from))),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
    ]
}

/// Metadata of the SentencePiece vocabulary.
pub(crate) fn spm_metadata() -> Vec<(&'static str, Value)> {
    let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
    let mut types = vec![2, 3, 3];
    let mut scores = vec![0.0f32; 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    let scored: [(&str, f32); 18] = [
        ("▁", -10.0),
        ("h", -10.0),
        ("e", -10.0),
        ("l", -10.0),
        ("o", -10.0),
        ("w", -10.0),
        ("r", -10.0),
        ("d", -10.0),
        ("he", -5.0),
        ("ll", -4.0),
        ("hell", -3.0),
        ("hello", -2.0),
        ("▁hello", -1.0),
        ("▁w", -6.0),
        ("or", -7.0),
        ("▁wor", -8.0),
        ("ld", -6.5),
        ("▁world", -0.5),
    ];
    for (piece, score) in scored {
        tokens.push(piece.into());
        types.push(1);
        scores.push(score);
    }
    vec![
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        (
            "tokenizer.ggml.scores",
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
    ]
}

pub(crate) fn gpt2_tokenizer(pre: &str) -> Tokenizer {
    Tokenizer::from_gguf(&gguf_content(&gpt2_metadata(pre))).unwrap()
}

pub(crate) fn spm_tokenizer() -> Tokenizer {
    Tokenizer::from_gguf(&gguf_content(&spm_metadata())).unwrap()
}
