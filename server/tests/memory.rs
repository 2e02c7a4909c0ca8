//! Memory decoders through the real engine and the HTTP routes, on the tiny seeded Q8_0 model:
//! the memory's cache is freed when a request ends or is cancelled, `n > 1` choices fork it and
//! each equals its own request, a memory is selected per request with its log-probs reported,
//! and bad memory files are 400s naming what is wrong.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use candle_core::quantized::GgmlDType;
use candle_core::Device;
use common::{chat, post, send, tokens_and_cached};
use models::sampling::SamplingParams;
use models::tiny::{tiny_config, TinyModel};
use models::{Architecture, HookCall, ModelConfig};
use plugins::memory::tiny::{edit_config, write_memory, Weights};
use plugins::{BaseModel, PluginKind, PluginSpec, Registry, RegistryConfig, Source};
use serde_json::{json, Value};
use server::engine::testing::{tiny_char_id, tiny_loaded_model_as};
use server::engine::{Engine, EngineConfig, Event, GenerateRequest, OutputRules, RealEngine};
use server::http::{app, AppState, EngineSlot, HttpConfig};

const SEED: u64 = 5;
const Q8: Weights = Weights::Gguf(GgmlDType::Q8_0);

struct Setup {
    dir: tempfile::TempDir,
    registry: Arc<Registry>,
    engine: Arc<RealEngine>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    let config = tiny_config(Architecture::Llama);
    let memory = TinyModel::random(config.clone(), 77).unwrap();
    write_memory(&memory, &plugins.join("mem"), Q8, 0.5).unwrap();
    let base = BaseModel {
        id: "tiny".into(),
        config,
        device: Device::Cpu,
        tokenizer_hash: None,
        kv_dtype: models::KvDtype::F32,
    };
    let registry = RegistryConfig {
        dir: Some(plugins),
        budget_bytes: 1 << 24,
    };
    let registry = Arc::new(Registry::new(base, registry).unwrap());
    registry
        .load(
            PluginKind::Memory,
            "mem",
            "mem".as_ref(),
            Source::Config,
            false,
        )
        .unwrap();
    let loaded = tiny_loaded_model_as(dir.path(), SEED, GgmlDType::Q8_0).unwrap();
    let engine_config = EngineConfig {
        model_id: "tiny".into(),
        prefill_chunk: 4,
        ..EngineConfig::default()
    };
    let engine = Arc::new(RealEngine::new(loaded, engine_config).unwrap());
    Setup {
        dir,
        registry,
        engine,
    }
}

impl Setup {
    fn chain(&self, lambda: f64) -> Vec<HookCall> {
        let spec: PluginSpec =
            serde_json::from_value(json!({"type": "memory", "name": "mem", "lambda": lambda}))
                .unwrap();
        self.registry.resolve(&[spec]).unwrap().calls
    }

    fn request(&self, seed: u64, max_tokens: usize) -> GenerateRequest {
        GenerateRequest {
            id: format!("r{seed}"),
            prompt: "the memory"
                .chars()
                .map(|c| tiny_char_id(c).unwrap())
                .collect(),
            sampling: SamplingParams {
                temperature: 1.0,
                ..SamplingParams::default()
            },
            seed,
            max_tokens,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            prompt_logprobs: None,
            hooks: self.chain(0.5),
            output: OutputRules::default(),
            cache_prompt: true,
            constraint: None,
            embed: false,
        }
    }

    fn wait_for_empty_cache(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.engine.stats().kv_used_bytes != 0 {
            assert!(Instant::now() < deadline, "{:?}", self.engine.stats());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn tokens(mut rx: server::engine::EventReceiver) -> Vec<u32> {
    let mut out = Vec::new();
    while let Some(event) = rx.blocking_recv() {
        match event {
            Event::Token { id, .. } => out.push(id),
            Event::Failed(e) => panic!("request failed: {e}"),
            _ => {}
        }
    }
    out
}

#[test]
fn the_memory_cache_is_freed_when_a_request_ends_or_is_cancelled() {
    let s = setup();
    assert_eq!(tokens(s.engine.submit(s.request(1, 8)).unwrap()).len(), 8);
    s.wait_for_empty_cache();
    let mut rx = s.engine.submit(s.request(2, 200)).unwrap();
    // Cancelled after its first token: the client goes away.
    while !matches!(rx.blocking_recv(), Some(Event::Token { .. })) {}
    drop(rx);
    s.wait_for_empty_cache();
}

#[test]
fn choices_fork_the_memory_cache_and_each_equals_its_own_request() {
    let s = setup();
    let choices: Vec<_> = (0..3).map(|i| s.request(10 + i, 6)).collect();
    let forked: Vec<Vec<u32>> = s
        .engine
        .submit_choices(choices)
        .unwrap()
        .into_iter()
        .map(tokens)
        .collect();
    for (i, want) in forked.iter().enumerate() {
        let alone = tokens(s.engine.submit(s.request(10 + i as u64, 6)).unwrap());
        assert_eq!(&alone, want, "choice {i}");
    }
    s.wait_for_empty_cache();
}

fn http(s: &Setup) -> axum::Router {
    let engine: Arc<dyn Engine> = s.engine.clone();
    let slot = EngineSlot::ready(engine);
    slot.fill_plugins(s.registry.clone());
    app(AppState::new(slot, HttpConfig::default()).unwrap())
}

fn greedy(plugins: Value) -> Value {
    json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
           "temperature": 0, "ignore_eos": true, "logprobs": true, "plugins": plugins})
}

fn logprobs(v: &Value) -> Vec<f64> {
    v["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["logprob"].as_f64().unwrap())
        .collect()
}

#[tokio::test]
async fn a_memory_selected_per_request_changes_the_reported_log_probs() {
    let s = setup();
    let app = http(&s);
    let base = chat(&app, greedy(json!([]))).await.ok();
    let none = chat(
        &app,
        greedy(json!([{"type": "memory", "name": "mem", "lambda": 0}])),
    )
    .await
    .ok();
    let mixed = chat(
        &app,
        greedy(json!([{"type": "memory", "name": "mem", "lambda": 0.6}])),
    )
    .await
    .ok();
    assert_eq!(mixed["plugins"][0]["type"], "memory", "{mixed}");
    // λ = 0 is the base distribution; λ = 0.6 is another one.
    let (b, n, m) = (logprobs(&base), logprobs(&none), logprobs(&mixed));
    assert_eq!(b.len(), 6);
    for (x, y) in b.iter().zip(&n) {
        assert!((x - y).abs() < 1e-5, "{b:?} vs {n:?}");
    }
    assert_ne!(b, m);
    let e = chat(
        &app,
        greedy(json!([{"type": "memory", "name": "mem", "lambda": 2}])),
    )
    .await
    .error(StatusCode::BAD_REQUEST, "invalid_value");
    assert!(e["message"].as_str().unwrap().contains("`lambda`"), "{e}");
}

#[tokio::test]
async fn bad_memory_files_are_400s_naming_what_is_wrong() {
    let s = setup();
    let app = http(&s);
    let plugins = s.dir.path().join("plugins");
    let config = tiny_config(Architecture::Llama);
    let small = TinyModel::random(
        ModelConfig {
            vocab_size: 64,
            ..config.clone()
        },
        1,
    )
    .unwrap();
    write_memory(&small, &plugins.join("vocab"), Q8, 0.5).unwrap();
    let mut missing = TinyModel::random(config.clone(), 1).unwrap();
    missing.tensors.remove("model.norm.weight");
    write_memory(
        &missing,
        &plugins.join("missing"),
        Weights::Safetensors,
        0.5,
    )
    .unwrap();
    let other = TinyModel::random(config, 1).unwrap();
    write_memory(&other, &plugins.join("typed"), Q8, 0.5).unwrap();
    edit_config(&plugins.join("typed"), |c| {
        c["graft"]["type"] = json!("memory")
    })
    .unwrap();
    for (path, said) in [
        ("vocab", &["64 tokens", "96"][..]),
        ("missing", &["model.norm.weight", "model.safetensors"]),
        ("typed", &["graft.type is `memory`, not `memory_decoder`"]),
    ] {
        let body = json!({"type": "memory", "name": path, "path": path});
        let e = send(&app, post("/v1/plugins", body.to_string()))
            .await
            .error(StatusCode::BAD_REQUEST, "invalid_value");
        let message = e["message"].as_str().unwrap();
        assert!(
            said.iter().all(|w| message.contains(w)),
            "{path}: {message}"
        );
    }
}

#[test]
fn a_cached_prefix_restores_the_memory_cache_and_changes_nothing() {
    let s = setup();
    let plain_dir = tempfile::tempdir().unwrap();
    let plain = RealEngine::new(
        tiny_loaded_model_as(plain_dir.path(), SEED, GgmlDType::Q8_0).unwrap(),
        EngineConfig {
            prefill_chunk: 4,
            prefix_caching: false,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    let shared = "the memory decoder mixes its own distribution";
    // (λ, with the memory, prompt tokens expected from the cache): λ only mixes logits, so
    // memories at any λ share prefixes, which hold the memory's own cache; the base does not.
    let cases = [
        (0.5, true, 0),
        (0.3, true, shared.len() + 1),
        (0.0, false, 0),
    ];
    for (i, (lambda, with_memory, expected)) in cases.into_iter().enumerate() {
        let request = GenerateRequest {
            prompt: format!("{shared} {i}")
                .chars()
                .map(|c| tiny_char_id(c).unwrap())
                .collect(),
            hooks: match with_memory {
                true => s.chain(lambda),
                false => Vec::new(),
            },
            ..s.request(40 + i as u64, 10)
        };
        let (got, cached) = tokens_and_cached(s.engine.submit(request.clone()).unwrap());
        assert_eq!(cached, expected, "case {i}");
        assert_eq!(got, tokens(plain.submit(request).unwrap()), "case {i}");
    }
}
