//! LoRA on tiny seeded models: the adapter as a hook equals the same adapter merged into the
//! weights (on float and on GGUF bases, whose q/k rows the loader un-permutes), rows with
//! different adapters or none share one step and each gets what it gets alone, and files that
//! cannot be applied are refused with errors naming the problem.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use models::tiny::{tiny_config, TinyModel};
use models::{Architecture, BatchRow, Hook, HookCall, Llama, LogitsWanted, Projection};
use plugins::files::PluginFiles;
use plugins::lora::tiny::{TinyAdapter, ALL_PROJECTIONS};
use plugins::lora::{LoraAdapter, LoraParams};
use plugins::{BaseModel, PluginError};
use serde_json::json;

const MAX_POS: usize = 64;

fn base_of(model: &TinyModel) -> BaseModel {
    BaseModel {
        id: "tiny".into(),
        config: model.config.clone(),
        device: Device::Cpu,
        tokenizer_hash: None,
        kv_dtype: models::KvDtype::F32,
    }
}

fn load(dir: &Path, model: &TinyModel) -> Result<LoraAdapter, PluginError> {
    LoraAdapter::load("a", dir, &base_of(model), &mut PluginFiles::unconfined())
}

fn call(adapter: &Arc<LoraAdapter>, scale: f32) -> HookCall {
    let hook: Arc<dyn Hook> = adapter.clone();
    HookCall::new(hook, Arc::new(LoraParams { scale }))
}

/// Logits at every position of `tokens` fed as one prefill row with `hooks`.
fn logits(model: &Llama, tokens: &[u32], hooks: &[HookCall]) -> Tensor {
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
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

const PROMPT: [u32; 9] = [5, 17, 3, 88, 42, 42, 7, 60, 1];

#[test]
fn an_adapter_equals_its_merged_weights_on_every_projection() {
    let tiny = TinyModel::random(tiny_config(Architecture::Llama), 7).unwrap();
    let adapter = TinyAdapter::random(&tiny.config, 3, 6.0, &ALL_PROJECTIONS, 11).unwrap();
    let dir = tempfile::tempdir().unwrap();
    adapter.write(dir.path()).unwrap();
    let lora = Arc::new(load(dir.path(), &tiny).unwrap());
    assert_eq!(lora.adapted_modules(), 7 * tiny.config.num_layers);

    let base = tiny.build(MAX_POS).unwrap();
    for scale in [1.0, 0.5, -1.0] {
        let merged = adapter
            .merge_into(&tiny, scale as f64)
            .unwrap()
            .build(MAX_POS)
            .unwrap();
        let want = logits(&merged, &PROMPT, &[]);
        let got = logits(&base, &PROMPT, &[call(&lora, scale)]);
        let moved = max_diff(&want, &logits(&base, &PROMPT, &[]));
        assert!(
            moved > 0.1,
            "the adapter must change the output (moved {moved})"
        );
        let err = max_diff(&got, &want);
        assert!(err < 1e-4, "scale {scale}: hook vs merged differ by {err}");
    }
}

#[test]
fn rslora_and_a_qwen2_base_with_biases_match_their_merged_weights() {
    let tiny = TinyModel::random(tiny_config(Architecture::Qwen2), 8).unwrap();
    let mut adapter = TinyAdapter::random(
        &tiny.config,
        4,
        2.0,
        &[Projection::Q, Projection::V, Projection::Down],
        12,
    )
    .unwrap();
    adapter.config["use_rslora"] = json!(true);
    let dir = tempfile::tempdir().unwrap();
    adapter.write(dir.path()).unwrap();
    let lora = Arc::new(load(dir.path(), &tiny).unwrap());
    let merged = adapter
        .merge_into(&tiny, 1.0)
        .unwrap()
        .build(MAX_POS)
        .unwrap();
    let got = logits(&tiny.build(MAX_POS).unwrap(), &PROMPT, &[call(&lora, 1.0)]);
    let err = max_diff(&got, &logits(&merged, &PROMPT, &[]));
    assert!(err < 1e-4, "rsLoRA hook vs merged differ by {err}");
}

/// The GGUF file stores q/k rows permuted for interleaved RoPE; the loader un-permutes them,
/// so PEFT's lora_B rows (HF order) apply as they are. Adding them in the permuted order
/// would move the logits by far more than the tolerance.
#[test]
fn on_a_gguf_base_the_q_and_k_deltas_land_on_the_right_rows() {
    let tiny = TinyModel::random(tiny_config(Architecture::Llama), 9).unwrap();
    let adapter =
        TinyAdapter::random(&tiny.config, 2, 4.0, &[Projection::Q, Projection::K], 13).unwrap();
    let dir = tempfile::tempdir().unwrap();
    adapter.write(&dir.path().join("lora")).unwrap();
    let gguf = dir.path().join("tiny.gguf");
    tiny.write_gguf(&gguf, GgmlDType::F32).unwrap();
    let from_gguf = models::loader::load_model(&gguf, &Device::Cpu, MAX_POS).unwrap();
    let lora = Arc::new(load(&dir.path().join("lora"), &tiny).unwrap());

    let merged = adapter
        .merge_into(&tiny, 1.0)
        .unwrap()
        .build(MAX_POS)
        .unwrap();
    let got = logits(&from_gguf, &PROMPT, &[call(&lora, 1.0)]);
    let err = max_diff(&got, &logits(&merged, &PROMPT, &[]));
    assert!(err < 1e-4, "GGUF base + adapter vs merged differ by {err}");
}

#[test]
fn rows_with_different_adapters_or_none_share_a_step_and_each_gets_what_it_gets_alone() {
    let tiny = TinyModel::random(tiny_config(Architecture::Llama), 10).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut adapters = Vec::new();
    for (i, seed) in [21, 22].into_iter().enumerate() {
        let a = TinyAdapter::random(&tiny.config, 2 + i, 4.0, &ALL_PROJECTIONS, seed).unwrap();
        let d = dir.path().join(format!("a{i}"));
        a.write(&d).unwrap();
        adapters.push(Arc::new(load(&d, &tiny).unwrap()));
    }
    let model = tiny.build(MAX_POS).unwrap();
    let chains: Vec<Vec<HookCall>> = vec![
        vec![call(&adapters[0], 1.0)],
        vec![],
        vec![call(&adapters[1], 1.0)],
        vec![call(&adapters[0], 0.5)],
        vec![call(&adapters[1], 1.0), call(&adapters[0], 2.0)],
    ];
    let prompts: Vec<Vec<u32>> = (0..chains.len() as u32)
        .map(|i| vec![i + 3, 40 - i, 7, i * 5 % 90])
        .collect();
    let alone: Vec<Tensor> = prompts
        .iter()
        .zip(&chains)
        .map(|(p, c)| logits(&model, p, c))
        .collect();

    let mut caches: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
    let mut rows: Vec<BatchRow> = prompts
        .iter()
        .zip(&chains)
        .zip(caches.iter_mut())
        .enumerate()
        .map(|(i, ((p, c), cache))| BatchRow {
            seq_id: i as u64,
            tokens: p,
            cache,
            hooks: c,
            logits: LogitsWanted::All,
        })
        .collect();
    let together = model.forward(&mut rows).unwrap();
    for (i, (t, a)) in together.iter().zip(&alone).enumerate() {
        let err = max_diff(t.as_ref().unwrap(), a);
        assert!(err < 1e-5, "row {i}: batched vs alone differ by {err}");
    }
    assert!(max_diff(&alone[0], &alone[1]) > 0.1 && max_diff(&alone[0], &alone[3]) > 0.01);
}

#[test]
fn scale_zero_is_exactly_the_base_model() {
    let tiny = TinyModel::random(tiny_config(Architecture::Llama), 14).unwrap();
    let dir = tempfile::tempdir().unwrap();
    TinyAdapter::random(&tiny.config, 2, 4.0, &ALL_PROJECTIONS, 15)
        .unwrap()
        .write(dir.path())
        .unwrap();
    let lora = Arc::new(load(dir.path(), &tiny).unwrap());
    let model = tiny.build(MAX_POS).unwrap();
    assert_eq!(
        max_diff(
            &logits(&model, &PROMPT, &[call(&lora, 0.0)]),
            &logits(&model, &PROMPT, &[])
        ),
        0.0
    );
}

/// Writes an adapter changed by `edit` and returns the loader's error message.
fn refusal(edit: impl FnOnce(&mut TinyAdapter)) -> String {
    let tiny = TinyModel::random(tiny_config(Architecture::Llama), 16).unwrap();
    let mut adapter =
        TinyAdapter::random(&tiny.config, 2, 4.0, &[Projection::Q, Projection::Up], 17).unwrap();
    edit(&mut adapter);
    let dir = tempfile::tempdir().unwrap();
    adapter.write(dir.path()).unwrap();
    load(dir.path(), &tiny).unwrap_err().to_string()
}

#[test]
fn files_that_cannot_be_applied_whole_are_refused_naming_the_problem() {
    fn t(n: &str) -> String {
        format!("base_model.model.model.layers.{n}")
    }
    fn zeros(r: usize, c: usize) -> Tensor {
        Tensor::zeros((r, c), candle_core::DType::F32, &Device::Cpu).unwrap()
    }
    type Edit = Box<dyn FnOnce(&mut TinyAdapter)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "layer 5, the base model has 2",
            Box::new(move |a| {
                a.tensors
                    .insert(t("5.self_attn.q_proj.lora_A.weight"), zeros(2, 32));
                a.tensors
                    .insert(t("5.self_attn.q_proj.lora_B.weight"), zeros(32, 2));
            }),
        ),
        (
            "has shape [2, 31]",
            Box::new(move |a| {
                a.tensors
                    .insert(t("0.self_attn.q_proj.lora_A.weight"), zeros(2, 31));
            }),
        ),
        (
            "only one of lora_A and lora_B",
            Box::new(move |a| {
                a.tensors.remove(&t("1.mlp.up_proj.lora_B.weight"));
            }),
        ),
        (
            "which target_modules does not list",
            Box::new(move |a| {
                a.tensors
                    .insert(t("0.self_attn.v_proj.lora_A.weight"), zeros(2, 32));
                a.tensors
                    .insert(t("0.self_attn.v_proj.lora_B.weight"), zeros(16, 2));
            }),
        ),
        (
            "`base_model.model.lm_head.lora_A.weight` is not a LoRA factor",
            Box::new(|a| {
                a.tensors.insert(
                    "base_model.model.lm_head.lora_A.weight".into(),
                    zeros(2, 32),
                );
            }),
        ),
        ("need [4, 32]", Box::new(|a| a.config["r"] = json!(4))),
        ("DoRA", Box::new(|a| a.config["use_dora"] = json!(true))),
        (
            "modules_to_save",
            Box::new(|a| a.config["modules_to_save"] = json!(["lm_head"])),
        ),
        (
            "`embed_tokens` is not supported",
            Box::new(|a| a.config["target_modules"] = json!(["q_proj", "up_proj", "embed_tokens"])),
        ),
    ];
    for (needle, edit) in cases {
        let msg = refusal(edit);
        assert!(msg.contains(needle), "expected {needle:?} in: {msg}");
    }
}

#[test]
fn regression_non_finite_or_absurd_factors_and_alpha_are_refused_at_load() {
    let name = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight";
    for bad in [f32::NAN, f32::INFINITY, -1e30] {
        let msg = refusal(move |a| {
            let t = &a.tensors[name];
            let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v[0] = bad;
            let t = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
            a.tensors.insert(name.into(), t);
        });
        assert!(
            msg.contains("unusable weights") && msg.contains(name),
            "{bad}: {msg}"
        );
    }
    let msg = refusal(|a| a.config["lora_alpha"] = json!(1e308));
    assert!(msg.contains("`lora_alpha`"), "{msg}");
    let msg = refusal(|a| a.config["rank_pattern"] = json!({"q_proj": 0}));
    assert!(msg.contains("rank_pattern"), "{msg}");
}
