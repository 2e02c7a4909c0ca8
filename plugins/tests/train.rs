//! Training on tiny seeded models: the differentiable training forward equals the serving
//! forward (padded rows, Llama and Qwen2, with and without LoRA), training lowers the loss,
//! the saved files load through `LoraAdapter::load` and serve exactly what was trained, one
//! seed gives identical files, and the JSONL data format encodes as documented.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use models::bundle::{LoadOptions, LoadedModel};
use models::tiny::{tiny_config, TinyModel};
use models::{Architecture, Hook, HookCall, Llama, LogitsWanted, Projection};
use plugins::files::PluginFiles;
use plugins::lora::tiny::{TinyAdapter, ALL_PROJECTIONS};
use plugins::lora::train::{mean_completion_ce, parse_targets, LoraTrainConfig, LoraTrainer};
use plugins::lora::{LoraAdapter, LoraParams, TensorName, CONFIG_FILE, WEIGHTS_FILE};
use plugins::train::{DenseLlama, Encoder, Example, LoraFactors, LoraPair, TrainError};
use plugins::BaseModel;
use serde_json::json;

const MAX_POS: usize = 64;

/// Logits at every position of `tokens` fed to the serving decoder as one prefill row.
fn serving_logits(model: &Llama, tokens: &[u32], hooks: &[HookCall]) -> Tensor {
    models::testing::step(
        model,
        &mut model.new_cache(),
        tokens,
        hooks,
        LogitsWanted::All,
    )
    .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
    d.max(0).unwrap().to_scalar().unwrap()
}

const LONG: [u32; 9] = [5, 17, 3, 88, 42, 42, 7, 60, 1];
const SHORT: [u32; 5] = [9, 4, 71, 30, 2];

/// The dense forward over `[LONG, SHORT]` right-padded into one batch, checked row by row
/// against the serving decoder run on each row alone.
fn check_padded_rows(
    serving: &Llama,
    dense: &DenseLlama,
    lora: Option<&LoraFactors>,
    hooks: &[HookCall],
    tolerance: f32,
) {
    let mut padded = [0u32; LONG.len()];
    padded[..SHORT.len()].copy_from_slice(&SHORT);
    let ids = Tensor::new(&[LONG, padded], &Device::Cpu).unwrap();
    let logits = dense.forward(&ids, lora).unwrap(); // (2, 9, vocab)
    for (r, row) in [&LONG[..], &SHORT[..]].into_iter().enumerate() {
        let want = serving_logits(serving, row, hooks);
        let got = logits.get(r).unwrap().narrow(0, 0, row.len()).unwrap();
        let err = max_diff(&got, &want);
        assert!(err < tolerance, "row {r}: dense vs serving differ by {err}");
    }
}

#[test]
fn the_dense_forward_equals_the_serving_forward_on_padded_rows() {
    let dir = tempfile::tempdir().unwrap();
    // A GGUF Llama (q/k rows un-permuted by the loader, tied head) and an in-memory Qwen2
    // (q/k/v biases, untied head).
    let llama = TinyModel::random(tiny_config(Architecture::Llama), 21).unwrap();
    let gguf = dir.path().join("tiny.gguf");
    llama.write_gguf(&gguf, GgmlDType::F32).unwrap();
    let from_gguf = models::loader::load_model(&gguf, &Device::Cpu, MAX_POS).unwrap();
    let qwen = TinyModel::random(tiny_config(Architecture::Qwen2), 22)
        .unwrap()
        .build(MAX_POS)
        .unwrap();
    for serving in [from_gguf, qwen] {
        let dense = DenseLlama::from_llama(&serving, MAX_POS, &Device::Cpu).unwrap();
        check_padded_rows(&serving, &dense, None, &[], 1e-4);
    }
}

/// The adapter's PEFT tensors as factors for the dense forward.
fn factors_of(adapter: &TinyAdapter, layers: usize, scaling: f64) -> LoraFactors {
    let mut factors = LoraFactors::new(layers, scaling);
    for (name, a) in &adapter.tensors {
        let Some(path) = name.strip_suffix(".lora_A.weight") else {
            continue;
        };
        let b = adapter.tensors[&format!("{path}.lora_B.weight")].clone();
        let parsed = TensorName::parse(name).unwrap();
        let pair = LoraPair { a: a.clone(), b };
        factors
            .insert(parsed.layer, parsed.projection, pair)
            .unwrap();
    }
    factors
}

fn load_adapter(dir: &Path, config: &models::ModelConfig) -> Arc<LoraAdapter> {
    let base = BaseModel {
        id: "tiny".into(),
        config: config.clone(),
        device: Device::Cpu,
        tokenizer_hash: None,
        kv_dtype: models::KvDtype::F32,
    };
    Arc::new(LoraAdapter::load("a", dir, &base, &mut PluginFiles::unconfined()).unwrap())
}

fn hook(adapter: &Arc<LoraAdapter>) -> Vec<HookCall> {
    let hook: Arc<dyn Hook> = adapter.clone();
    vec![HookCall::new(hook, Arc::new(LoraParams { scale: 1.0 }))]
}

#[test]
fn the_dense_forward_with_lora_factors_equals_the_serving_lora_hook() {
    let cases = [
        (Architecture::Llama, ALL_PROJECTIONS.to_vec(), false),
        (
            Architecture::Qwen2,
            vec![Projection::Q, Projection::V, Projection::Down],
            true,
        ),
    ];
    for (arch, projections, rslora) in cases {
        let tiny = TinyModel::random(tiny_config(arch), 23).unwrap();
        let mut adapter = TinyAdapter::random(&tiny.config, 3, 6.0, &projections, 24).unwrap();
        adapter.config["use_rslora"] = json!(rslora);
        let dir = tempfile::tempdir().unwrap();
        adapter.write(dir.path()).unwrap();
        let lora = load_adapter(dir.path(), &tiny.config);
        let scaling = if rslora { 6.0 / 3f64.sqrt() } else { 2.0 };
        let factors = factors_of(&adapter, tiny.config.num_layers, scaling);

        let serving = tiny.build(MAX_POS).unwrap();
        let dense = DenseLlama::from_llama(&serving, MAX_POS, &Device::Cpu).unwrap();
        let moved = max_diff(
            &serving_logits(&serving, &LONG, &hook(&lora)),
            &serving_logits(&serving, &LONG, &[]),
        );
        assert!(moved > 0.1, "the adapter must change the output ({moved})");
        check_padded_rows(&serving, &dense, Some(&factors), &hook(&lora), 1e-4);
    }
}

/// Eight examples whose targets are one fixed phrase after varied prompts: learnable in a
/// few dozen steps by a rank-4 adapter on a random model.
fn phrase_examples() -> Vec<Example> {
    (0..8u32)
        .map(|i| {
            let prompt: Vec<u32> = (0..6).map(|j| 2 + (i * 11 + j * 7) % 90).collect();
            let mut tokens = prompt.clone();
            tokens.extend([40, 41, 42, 43, 44, 0]);
            Example {
                tokens,
                prompt_len: prompt.len(),
                line: i as usize + 1,
            }
        })
        .collect()
}

fn train_config(steps: usize, seed: u64) -> LoraTrainConfig {
    LoraTrainConfig {
        rank: 4,
        alpha: 8.0,
        steps,
        batch_size: 4,
        lr: 1e-2,
        seed,
        ..LoraTrainConfig::default()
    }
}

fn tiny_dense(seed: u64) -> (Llama, DenseLlama) {
    let serving = TinyModel::random(tiny_config(Architecture::Llama), seed)
        .unwrap()
        .build(MAX_POS)
        .unwrap();
    let dense = DenseLlama::from_llama(&serving, MAX_POS, &Device::Cpu).unwrap();
    (serving, dense)
}

#[test]
fn a_few_dozen_steps_lower_the_training_loss_clearly() {
    let (_, dense) = tiny_dense(25);
    let data = phrase_examples();
    let mut trainer = LoraTrainer::new(&dense, train_config(40, 0)).unwrap();
    let before = mean_completion_ce(&dense, &data, None, 4).unwrap();
    let losses: Vec<f32> = (0..40).map(|_| trainer.step(&data).unwrap().loss).collect();
    let first = losses[..5].iter().sum::<f32>() / 5.0;
    let last = losses[35..].iter().sum::<f32>() / 5.0;
    assert!(
        last < 0.5 * first,
        "loss went from {first} to {last} over 40 steps: {losses:?}"
    );
    // The first batches see the untrained adapter, which is the base model (B = 0).
    assert!(
        (losses[0] as f64 - before.ce).abs() < 0.5,
        "{losses:?} vs {before:?}"
    );
    let after = mean_completion_ce(&dense, &data, Some(trainer.factors()), 4).unwrap();
    assert!(after.ce < 0.5 * before.ce, "{before:?} -> {after:?}");
}

#[test]
fn a_saved_adapter_loads_and_serves_the_logits_it_was_trained_to() {
    let (serving, dense) = tiny_dense(26);
    let data = phrase_examples();
    let mut config = train_config(10, 1);
    config.targets = parse_targets("q_proj,v_proj,down_proj").unwrap();
    let mut trainer = LoraTrainer::new(&dense, config).unwrap();
    for _ in 0..10 {
        trainer.step(&data).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    trainer.save(dir.path(), "tiny.gguf").unwrap();
    let lora = load_adapter(dir.path(), &dense.config);
    assert_eq!(lora.adapted_modules(), 3 * dense.config.num_layers);
    let moved = max_diff(
        &serving_logits(&serving, &LONG, &hook(&lora)),
        &serving_logits(&serving, &LONG, &[]),
    );
    assert!(moved > 1e-2, "training must move the output ({moved})");
    // Trained factors are f32; the CPU serving path stores them in bf16 (8 significant bits),
    // which moves these logits by ~1e-3. A misplaced factor moves them by far more.
    let tolerance = 5e-3;
    check_padded_rows(
        &serving,
        &dense,
        Some(trainer.factors()),
        &hook(&lora),
        tolerance,
    );

    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join(CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(
        config["target_modules"],
        json!(["q_proj", "v_proj", "down_proj"])
    );
    assert_eq!(config["base_model_name_or_path"], json!("tiny.gguf"));
    assert_eq!(
        (config["r"].clone(), config["lora_alpha"].clone()),
        (json!(4), json!(8.0))
    );
}

fn train_and_save(dense: &DenseLlama, seed: u64, dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let mut trainer = LoraTrainer::new(dense, train_config(6, seed)).unwrap();
    for _ in 0..6 {
        trainer.step(&phrase_examples()).unwrap();
    }
    trainer.save(dir, "tiny.gguf").unwrap();
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    (read(CONFIG_FILE), read(WEIGHTS_FILE))
}

#[test]
fn one_seed_gives_identical_files_and_another_seed_does_not() {
    let (_, dense) = tiny_dense(27);
    let dir = tempfile::tempdir().unwrap();
    let first = train_and_save(&dense, 5, &dir.path().join("a"));
    let again = train_and_save(&dense, 5, &dir.path().join("b"));
    let other = train_and_save(&dense, 6, &dir.path().join("c"));
    assert!(first == again, "the same seed must give the same bytes");
    assert_eq!(first.0, other.0, "the config does not depend on the seed");
    assert_ne!(first.1, other.1, "another seed must give other weights");
}

#[test]
fn bad_options_are_refused_by_name() {
    let (_, dense) = tiny_dense(28);
    let err = parse_targets("q_proj,qkv_proj").unwrap_err();
    assert!(
        matches!(&err, TrainError::UnknownTarget(t) if t == "qkv_proj"),
        "{err}"
    );
    assert!(
        err.to_string().contains("gate_proj"),
        "lists what is known: {err}"
    );
    let mut config = train_config(1, 0);
    config.rank = 0;
    let err = LoraTrainer::new(&dense, config).err().unwrap();
    assert!(err.to_string().contains("rank"), "{err}");
}

/// The tiny model with its byte-level vocabulary and plain chat template, through the loader.
fn tiny_bundle(dir: &Path) -> LoadedModel {
    let path = dir.join("tiny.gguf");
    TinyModel::random(tiny_config(Architecture::Llama), 29)
        .unwrap()
        .write_gguf_with_tokenizer(&path, GgmlDType::F32)
        .unwrap();
    models::bundle::load(&path, &Device::Cpu, &LoadOptions::default()).unwrap()
}

#[test]
fn chat_lines_render_the_template_and_targets_end_with_the_end_of_turn_token() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_bundle(dir.path());
    let enc = Encoder::new(&m.tokenizer, m.chat_template.as_ref(), 256).unwrap();
    let tk = |s: &str| m.tokenizer.encode(s, false).unwrap();
    let line = json!({"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo!"}]});
    let (prompt, target) = enc.encode(&line.to_string()).unwrap();
    assert_eq!(prompt, tk("system: be brief\nuser: hi\nassistant:"));
    assert_eq!(target, [tk("yo!"), vec![0]].concat());

    let line = json!({"prompt": "2+2=", "completion": "4", "id": 7});
    let (prompt, target) = enc.encode(&line.to_string()).unwrap();
    assert_eq!((prompt, target), (tk("2+2="), [tk("4"), vec![0]].concat()));

    // Text: every token after the first is a target, nothing appended, long texts keep their start.
    let words = tk("one two three four");
    let (prompt, target) = enc
        .encode(&json!({"text": "one two three four"}).to_string())
        .unwrap();
    assert_eq!((prompt, target), (words[..1].to_vec(), words[1..].to_vec()));
    let short = Encoder::new(&m.tokenizer, None, 3).unwrap();
    let (prompt, target) = short
        .encode(&json!({"text": "one two three four"}).to_string())
        .unwrap();
    assert_eq!([prompt, target].concat(), words[..3]);
}

#[test]
fn bad_lines_are_errors_naming_their_line_number() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_bundle(dir.path());
    let enc = Encoder::new(&m.tokenizer, m.chat_template.as_ref(), 256).unwrap();
    let good = json!({"prompt": "a", "completion": "b"}).to_string();
    for (bad, needle) in [
        ("{not json".to_string(), "not JSON"),
        (json!({"txt": "x y"}).to_string(), "expected"),
        (
            json!({"text": "x y", "prompt": "x"}).to_string(),
            "one form",
        ),
        (
            json!({"prompt": "x"}).to_string(),
            "`completion` is missing",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}]}).to_string(),
            "assistant",
        ),
        (json!({"messages": []}).to_string(), "empty"),
    ] {
        let path = dir.path().join("data.jsonl");
        std::fs::write(&path, format!("{good}\n\n{bad}\n{good}\n")).unwrap();
        let err = enc.load(&path).unwrap_err();
        assert!(matches!(err, TrainError::BadLine { line: 3, .. }), "{err}");
        assert!(
            err.to_string().contains("line 3") && err.to_string().contains(needle),
            "{err}"
        );
    }
    let err = enc.load(&dir.path().join("missing.jsonl")).unwrap_err();
    assert!(err.to_string().contains("missing.jsonl"), "{err}");
}

#[test]
fn long_prompts_lose_their_left_end_and_targets_that_cannot_fit_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_bundle(dir.path());
    let enc = Encoder::new(&m.tokenizer, m.chat_template.as_ref(), 8).unwrap();
    let tk = |s: &str| m.tokenizer.encode(s, false).unwrap();
    let lines = [
        json!({"prompt": "abc", "completion": "de"}), // 6 tokens: kept whole
        json!({"prompt": "0123456789", "completion": "xyz"}), // 14: the prompt keeps "6789"
        json!({"prompt": "p", "completion": "seven!!"}), // target 8 tokens: skipped
    ];
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    let path = dir.path().join("data.jsonl");
    std::fs::write(&path, text.join("\n")).unwrap();
    let data = enc.load(&path).unwrap();
    assert_eq!((data.skipped.clone(), data.truncated), (vec![3], 1));
    assert_eq!(data.examples.len(), 2);
    let long = &data.examples[1];
    assert_eq!(long.tokens, [tk("6789xyz"), vec![0]].concat());
    assert_eq!((long.prompt_len, long.target_len(), long.line), (4, 4, 2));
}
