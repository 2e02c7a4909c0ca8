//! The GGUF-metadata tokenizers (`models::tokenizer`): the tiny byte-level BPE vocabulary of
//! `models::tiny` and a small SentencePiece one built here. The first byte picks the
//! tokenizer (bit 0) and the operation (bits 1-2): encode the rest as UTF-8 (lossy) with or
//! without special tokens, or decode the rest as little-endian u32 ids (any value, so
//! out-of-range ids too) in one go and through the incremental decoder. A typed error or
//! text, never a panic.
#![no_main]

use std::io::Cursor;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::{self, Content, Value};
use libfuzzer_sys::fuzz_target;
use models::tiny::tiny_tokenizer_metadata;
use models::{IncrementalDecoder, Tokenizer};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Some(tk) = tokenizers()[usize::from(mode & 1)].as_ref() else {
        return;
    };
    match (mode >> 1) & 3 {
        0 | 1 => {
            let _ = tk.encode(&String::from_utf8_lossy(rest), mode & 2 != 0);
        }
        2 => {
            let ids = ids(rest);
            let _ = tk.decode(&ids, true);
            let _ = tk.decode(&ids, false);
        }
        _ => {
            let mut decoder = IncrementalDecoder::new(mode & 8 != 0);
            for id in ids(rest) {
                let _ = decoder.push(tk, id);
            }
            let _ = decoder.finish();
        }
    }
});

fn ids(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks(4)
        .map(|c| {
            let mut b = [0u8; 4];
            b[..c.len()].copy_from_slice(c);
            // Small ids are the interesting ones; keep most in range, some far out of it.
            let id = u32::from_le_bytes(b);
            if id & 0x8000_0000 != 0 {
                id
            } else {
                id % 300
            }
        })
        .collect()
}

fn tokenizers() -> &'static [Option<Tokenizer>; 2] {
    static TK: OnceLock<[Option<Tokenizer>; 2]> = OnceLock::new();
    TK.get_or_init(|| {
        [
            from_metadata(tiny_tokenizer_metadata()),
            from_metadata(spm_metadata()),
        ]
    })
}

fn from_metadata(entries: Vec<(String, Value)>) -> Option<Tokenizer> {
    let refs: Vec<(&str, &Value)> = entries.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut buf = Cursor::new(Vec::new());
    gguf_file::write(&mut buf, &refs, &[]).ok()?;
    buf.set_position(0);
    Tokenizer::from_gguf(&Content::read(&mut buf).ok()?).ok()
}

/// A SentencePiece (`llama`) vocabulary: `<unk>`, `<s>`, `</s>`, the 256 byte tokens, then a
/// few scored pieces so that merges happen.
fn spm_metadata() -> Vec<(String, Value)> {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    let pieces = [
        "▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "hell", "hello", "▁hello", "▁w", "or",
        "▁wor", "ld", "▁world",
    ];
    tokens.extend(pieces.iter().map(|p| p.to_string()));
    let n = tokens.len();
    let scores: Vec<Value> = (0..n).map(|i| Value::F32(-(i as f32))).collect();
    let types: Vec<Value> = (0..n)
        .map(|i| match i {
            0 => Value::I32(2),
            1 | 2 => Value::I32(3),
            3..=258 => Value::I32(6),
            _ => Value::I32(1),
        })
        .collect();
    vec![
        ("tokenizer.ggml.model".into(), Value::String("llama".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.scores".into(), Value::Array(scores)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
    ]
}
