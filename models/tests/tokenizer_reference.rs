//! Reference test of the tokenizer against llama.cpp on the real default model: the
//! SmolLM2-135M-Instruct GGUF's own vocabulary, and a fixture of ids produced by llama.cpp's
//! tokenizer (`tests/fixtures/smollm2_tokenizer.json`). Every prompt graft serves goes through
//! this tokenizer, so any id difference here is a different prompt from llama.cpp's.
//!
//! The model comes from `models::testing::default_model_for_tests()` (`GRAFT_DEFAULT_MODEL_GGUF`,
//! else the library's cached default model, fetched on first use); only an explicit
//! `GRAFT_SKIP_REAL_MODEL=1` skips these tests.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use candle_core::quantized::gguf_file::{self, Value};
use models::tokenizer::{IncrementalDecoder, TokenKind, Tokenizer};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Fixture {
    #[serde(default)]
    source: serde_json::Value,
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
struct Case {
    text: String,
    parse_special: bool,
    ids: Vec<u32>,
}

fn model_path() -> Option<PathBuf> {
    models::testing::default_model_for_tests()
}

fn tokenizer() -> Option<Tokenizer> {
    let path = model_path()?;
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    Some(Tokenizer::from_gguf(&content).unwrap())
}

fn fixture() -> Option<Fixture> {
    fixture_named("smollm2_tokenizer.json")
}

fn fixture_named(name: &str) -> Option<Fixture> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    // The fixtures are committed: a missing one is a broken checkout, not a reason to skip.
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Some(serde_json::from_str(&text).unwrap())
}

#[test]
fn smollm2_ids_match_llama_cpp_fixture() {
    let (Some(tk), Some(fx)) = (tokenizer(), fixture()) else {
        return;
    };
    assert!(
        !fx.cases.is_empty(),
        "fixture from {} has no cases",
        fx.source
    );
    let mut failures = Vec::new();
    for case in &fx.cases {
        let got = tk.encode(&case.text, case.parse_special).unwrap();
        if got != case.ids {
            failures.push(format!(
                "{:?} (parse_special={}):\n  llama.cpp {:?}\n  graft     {:?}",
                case.text, case.parse_special, case.ids, got
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        fx.cases.len(),
        failures.join("\n")
    );
}

#[test]
fn smollm2_streaming_decode_round_trips_fixture_texts() {
    let (Some(tk), Some(fx)) = (tokenizer(), fixture()) else {
        return;
    };
    for case in &fx.cases {
        let ids = tk.encode(&case.text, case.parse_special).unwrap();
        let mut dec = IncrementalDecoder::new(false);
        let mut streamed = String::new();
        for &id in &ids {
            if let Some(delta) = dec.push(&tk, id).unwrap() {
                assert!(
                    !delta.contains('\u{FFFD}'),
                    "{:?}: delta {delta:?}",
                    case.text
                );
                streamed.push_str(&delta);
            }
        }
        streamed.extend(dec.finish());
        assert_eq!(streamed, case.text);
        assert_eq!(tk.decode(&ids, false).unwrap(), case.text);
    }
}

/// The model-reference fixture (transformers' tokenizer over the same GGUF vocabulary and the
/// HF SmolLM2 pre-tokenizer) carries rendered prompts and their ids: a second, independent check.
#[test]
fn smollm2_ids_match_transformers_reference_prompts() {
    let Some(tk) = tokenizer() else {
        return;
    };
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let prompts = reference["prompts"].as_array().unwrap();
    assert!(!prompts.is_empty());
    for p in prompts {
        let text = p["prompt_text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(p["prompt_ids"].clone()).unwrap();
        assert_eq!(tk.encode(text, true).unwrap(), want, "{}", p["name"]);
    }
}

/// Cases checked by hand against the SmolLM2 vocabulary and llama.cpp's `smollm` rules, so the
/// essentials are pinned even before (or without) the fixture.
#[test]
fn smollm2_hand_checked_cases() {
    let Some(tk) = tokenizer() else {
        return;
    };
    assert_eq!(tk.vocab_size(), 49152);
    assert_eq!(tk.bos_id(), Some(1));
    assert_eq!(tk.bos_token(), Some("<|im_start|>"));
    assert_eq!(tk.eos_token(), Some("<|im_end|>"));
    assert_eq!(tk.eos_ids(), [2, 0]);
    assert!(!tk.add_bos());
    let id = |piece: &str| tk.token_id(piece).unwrap();
    // " 2024": every digit on its own, the space alone (`\s+(?!\S)` on the piece " ").
    let digits = tk.encode(" 2024", false).unwrap();
    assert_eq!(digits, [id("Ġ"), id("2"), id("0"), id("2"), id("4")]);
    assert_eq!(
        tk.encode("<|im_start|>user\n", true).unwrap(),
        [1, id("user"), id("Ċ")]
    );
    let plain = tk.encode("<|im_start|>", false).unwrap();
    assert!(plain.len() > 1 && !plain.contains(&1));
    let chat =
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi 😀<|im_end|>\n";
    let ids = tk.encode(chat, true).unwrap();
    assert_eq!(tk.decode(&ids, false).unwrap(), chat);
    assert_eq!(ids.iter().filter(|&&i| i == 1).count(), 2);
}

/// The SentencePiece vocabulary described in `tests/fixtures/spm_synth_llamacpp.json`, built
/// from the SmolLM2 vocabulary: a realistic 49k-piece SPM model without shipping a Llama 2 GGUF.
fn synthesized_spm(smollm: &Tokenizer) -> Tokenizer {
    let mut pieces: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
    pieces.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    let mut types = vec![2, 3, 3];
    types.resize(pieces.len(), 6);
    let mut scores = vec![0.0f32; pieces.len()];
    let mut seen: std::collections::HashSet<String> = pieces.iter().cloned().collect();
    for (i, id) in (17..smollm.vocab_size() as u32).enumerate() {
        let Ok(text) = String::from_utf8(smollm.token_bytes(id).unwrap().to_vec()) else {
            continue;
        };
        let piece = text.replace(' ', "\u{2581}");
        if !piece.is_empty() && seen.insert(piece.clone()) {
            pieces.push(piece);
            types.push(1);
            scores.push(-(i as f32));
        }
    }
    pieces.push("<tool>".into());
    types.push(4);
    scores.push(0.0);
    let metadata = [
        ("tokenizer.ggml.model", Value::String("llama".into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(pieces.into_iter().map(Value::String).collect()),
        ),
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
        ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
    ];
    let refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let mut buf = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut buf, &refs, &[]).unwrap();
    buf.set_position(0);
    Tokenizer::from_gguf(&gguf_file::Content::read(&mut buf).unwrap()).unwrap()
}

/// graft's port of llama.cpp's SPM merger against llama.cpp itself (`llama-tokenize`), on a
/// realistic vocabulary: score-ordered merges, byte fallback (emoji, rare CJK), the prefix
/// space after special and user-defined tokens.
#[test]
fn spm_ids_match_llama_cpp_on_a_synthesized_vocabulary() {
    let (Some(smollm), Some(fx)) = (tokenizer(), fixture_named("spm_synth_llamacpp.json")) else {
        return;
    };
    let tk = synthesized_spm(&smollm);
    assert_eq!(tk.vocab_size(), 49082);
    assert_eq!(tk.token_kind(49081), Some(TokenKind::UserDefined));
    let mut failures = Vec::new();
    for case in &fx.cases {
        let got = tk.encode(&case.text, case.parse_special).unwrap();
        if got != case.ids {
            failures.push(format!(
                "{:?} ({}): {:?} vs {got:?}",
                case.text, case.parse_special, case.ids
            ));
        }
        let mut dec = IncrementalDecoder::new(false);
        let mut streamed = String::new();
        for &id in &got {
            if let Some(delta) = dec.push(&tk, id).unwrap() {
                assert!(
                    !delta.contains('\u{FFFD}'),
                    "{:?}: delta {delta:?}",
                    case.text
                );
                streamed.push_str(&delta);
            }
        }
        streamed.extend(dec.finish());
        assert_eq!(streamed, tk.decode(&got, false).unwrap());
    }
    assert!(
        failures.is_empty(),
        "{} of {} differ:\n{}",
        failures.len(),
        fx.cases.len(),
        failures.join("\n")
    );
}
