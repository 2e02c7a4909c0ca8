//! LoRA on the real default model against an independent implementation: Python `peft` +
//! `transformers` running the same GGUF dequantized to float32 with the same adapter (made
//! with PEFT, non-zero A and B from a fixed seed, stored float16; fixture and adapter by
//! scripts/reference/lora_reference.py).
//!
//! The limits sit just above what the base model alone shows against the same reference
//! (~0.002 nats; models/tests/reference.rs), far below what the adapter moves (~0.4-0.8
//! nats) and what a classic mistake moves: the last test applies the adapter with its q/k
//! `lora_B` rows in llama.cpp's permuted order and checks that it fails these limits.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use models::testing::{self, top_k};
use models::{Hook, HookCall, Llama};
use plugins::files::PluginFiles;
use plugins::lora::{LoraAdapter, LoraParams, WEIGHTS_FILE};
use plugins::BaseModel;
use serde_json::Value;

const FIXTURE: &str = include_str!("fixtures/lora_smollm2_reference.json");
const ADAPTER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/lora_smollm2");

/// Log-prob limit for the reference's top-10 at the last prompt position.
const TOP10_NATS: f32 = 0.02;
/// Mean absolute difference of teacher-forced prompt log-probs.
const PROMPT_MAD_NATS: f32 = 0.01;
/// Greedy steps whose reference margin is below this are near-ties either side may break.
const NEAR_TIE_NATS: f64 = 0.05;

fn model() -> Option<Llama> {
    let path = models::testing::default_model_for_tests()?;
    Some(models::loader::load_model(&path, &Device::Cpu, 2048).unwrap())
}

fn adapter(m: &Llama, dir: &Path) -> Arc<LoraAdapter> {
    let base = BaseModel {
        id: "smollm2".into(),
        config: m.config.clone(),
        device: Device::Cpu,
        tokenizer_hash: None,
        kv_dtype: models::KvDtype::F32,
    };
    Arc::new(LoraAdapter::load("reference", dir, &base, &mut PluginFiles::unconfined()).unwrap())
}

fn chain(a: &Arc<LoraAdapter>, scale: f32) -> Vec<HookCall> {
    let hook: Arc<dyn Hook> = a.clone();
    vec![HookCall::new(hook, Arc::new(LoraParams { scale }))]
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn pairs(v: &Value) -> Vec<(u32, f32)> {
    let row = |e: &Value| (e[0].as_u64().unwrap() as u32, e[1].as_f64().unwrap() as f32);
    v.as_array().unwrap().iter().map(row).collect()
}

fn fixture() -> Value {
    serde_json::from_str(FIXTURE).unwrap()
}

/// The largest top-10 log-prob difference over all prompts at `scale` with `hooks`.
fn worst_top10(m: &Llama, hooks: &[HookCall], scale: &str) -> f32 {
    let f = fixture();
    let mut worst = 0f32;
    for p in f["scales"][scale]["prompts"].as_array().unwrap() {
        let lp = testing::log_probs(m, &ids(&p["prompt_ids"]), hooks).unwrap();
        let last = lp.last().unwrap();
        for (id, want) in pairs(&p["top10"]) {
            worst = worst.max((last[id as usize] - want).abs());
        }
    }
    worst
}

#[test]
fn adapted_next_token_distributions_match_peft_at_both_scales() {
    let Some(m) = model() else { return };
    let a = adapter(&m, Path::new(ADAPTER));
    let f = fixture();
    for scale in ["1.0", "0.5"] {
        let hooks = chain(&a, scale.parse().unwrap());
        for p in f["scales"][scale]["prompts"].as_array().unwrap() {
            let name = p["name"].as_str().unwrap();
            let prompt = ids(&p["prompt_ids"]);
            let lp = testing::log_probs(&m, &prompt, &hooks).unwrap();
            let last = lp.last().unwrap();
            for (id, want) in pairs(&p["top10"]) {
                let d = (last[id as usize] - want).abs();
                assert!(
                    d <= TOP10_NATS,
                    "{name} @ {scale}: token {id} off by {d} nats"
                );
            }
            let forced: Vec<f32> = p["prompt_logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            let ours: Vec<f32> = (1..prompt.len())
                .map(|i| lp[i - 1][prompt[i] as usize])
                .collect();
            let mad = ours
                .iter()
                .zip(&forced)
                .map(|(a, b)| (a - b).abs())
                .sum::<f32>()
                / forced.len() as f32;
            assert!(
                mad <= PROMPT_MAD_NATS,
                "{name} @ {scale}: prompt log-prob MAD {mad}"
            );
        }
    }
}

#[test]
fn adapted_greedy_continuations_match_peft_up_to_near_ties() {
    let Some(m) = model() else { return };
    let a = adapter(&m, Path::new(ADAPTER));
    let f = fixture();
    for scale in ["1.0", "0.5"] {
        let hooks = chain(&a, scale.parse().unwrap());
        for p in f["scales"][scale]["prompts"].as_array().unwrap() {
            let name = p["name"].as_str().unwrap();
            let want = ids(&p["greedy_ids"]);
            let margins: Vec<f64> = p["greedy_margins"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            let sure = margins
                .iter()
                .position(|&x| x < NEAR_TIE_NATS)
                .unwrap_or(want.len());
            let got = testing::greedy(&m, &ids(&p["prompt_ids"]), sure, &hooks).unwrap();
            assert_eq!(
                got,
                want[..sure],
                "{name} @ {scale}: greedy tokens differ before any near-tie"
            );
        }
    }
}

#[test]
fn the_adapter_moves_the_model_far_beyond_the_tolerance() {
    let Some(m) = model() else { return };
    let f = fixture();
    let mut moved = 0f32;
    for p in f["scales"]["1.0"]["prompts"].as_array().unwrap() {
        let lp = testing::log_probs(&m, &ids(&p["prompt_ids"]), &[]).unwrap();
        let base_top10 = pairs(&f["base_top10"][p["name"].as_str().unwrap()]);
        let ours = top_k(lp.last().unwrap(), 10);
        assert_eq!(
            ours[0].0, base_top10[0].0,
            "without the adapter the base model's top-1 comes back"
        );
        for (id, want) in pairs(&p["top10"]) {
            moved = moved.max((lp.last().unwrap()[id as usize] - want).abs());
        }
    }
    assert!(
        moved > 20.0 * TOP10_NATS,
        "the base model is only {moved} nats from the adapted reference"
    );
}

/// llama.cpp's `permute` for q/k rows (interleaved RoPE order), applied to `lora_B`.
fn permute_rows(b: &Tensor, heads: usize) -> Tensor {
    let (out, r) = b.dims2().unwrap();
    b.reshape((heads, 2, out / heads / 2, r))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((out, r))
        .unwrap()
}

#[test]
fn applying_qk_lora_b_in_the_gguf_row_order_would_fail_this_reference() {
    let Some(m) = model() else { return };
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        Path::new(ADAPTER).join("adapter_config.json"),
        dir.path().join("adapter_config.json"),
    )
    .unwrap();
    let tensors =
        candle_core::safetensors::load(Path::new(ADAPTER).join(WEIGHTS_FILE), &Device::Cpu)
            .unwrap();
    let permuted: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(name, t)| {
            let heads = match () {
                _ if name.ends_with("q_proj.lora_B.weight") => m.config.num_heads,
                _ if name.ends_with("k_proj.lora_B.weight") => m.config.num_kv_heads,
                _ => return (name, t),
            };
            let p = permute_rows(&t, heads);
            (name, p)
        })
        .collect();
    candle_core::safetensors::save(&permuted, dir.path().join(WEIGHTS_FILE)).unwrap();
    let wrong = adapter(&m, dir.path());
    let right = adapter(&m, Path::new(ADAPTER));
    let wrong_err = worst_top10(&m, &chain(&wrong, 1.0), "1.0");
    let right_err = worst_top10(&m, &chain(&right, 1.0), "1.0");
    eprintln!("worst top-10 difference: {right_err} nats as served, {wrong_err} with permuted q/k lora_B rows");
    assert!(right_err <= TOP10_NATS);
    assert!(
        wrong_err > 5.0 * TOP10_NATS,
        "a permuted q/k delta stays within {wrong_err} nats"
    );
}

/// Reference for the adapter `server train lora` made from data/ahoy (f32 factors), computed by
/// Python `peft` after loading those very files (scripts/reference/trained_lora_reference.py).
const TRAINED_FIXTURE: &str = include_str!("fixtures/ahoy_reference.json");
const TRAINED_ADAPTER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../data/ahoy/adapter");

/// Our trainer's output is a PEFT adapter that peft itself loads, and graft serves what peft
/// computes from it; the base model alone is far off those numbers, so the check has teeth.
#[test]
fn a_trained_adapter_loads_in_peft_and_serves_what_peft_computes() {
    let Some(m) = model() else { return };
    let a = adapter(&m, Path::new(TRAINED_ADAPTER));
    let f: Value = serde_json::from_str(TRAINED_FIXTURE).unwrap();
    let worst = |hooks: &[HookCall]| {
        let mut worst = 0f32;
        for p in f["prompts"].as_array().unwrap() {
            let lp = testing::log_probs(&m, &ids(&p["prompt_ids"]), hooks).unwrap();
            let last = lp.last().unwrap();
            for (id, want) in pairs(&p["top10"]) {
                worst = worst.max((last[id as usize] - want).abs());
            }
        }
        worst
    };
    let served = worst(&chain(&a, 1.0));
    assert!(served <= TOP10_NATS, "served vs peft: {served} nats");
    let base = worst(&[]);
    eprintln!(
        "trained adapter, worst top-10 difference: {served} nats as served, {base} without it"
    );
    assert!(base > 10.0 * TOP10_NATS, "base vs peft: only {base} nats");
}
