//! Plug-in chains through the real engine and the HTTP routes, on the tiny seeded model:
//! requests with different LoRA adapters (or none) share batches and each gets what it gets
//! alone, an adapter selected per request gives the merged model's greedy output, and the
//! registry routes load, list, refuse and unload adapters with OpenAI-shaped errors.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use candle_core::Device;
use common::{chat, get, post, send, tokens_and_cached};
use models::sampling::SamplingParams;
use models::tiny::{tiny_config, TinyModel};
use models::{Architecture, HookCall};
use plugins::lora::tiny::{TinyAdapter, ALL_PROJECTIONS};
use plugins::{BaseModel, PluginKind, PluginSpec, Registry, RegistryConfig, Source};
use serde_json::{json, Value};
use server::engine::testing::{tiny_char_id, tiny_loaded_model};
use server::engine::{Engine, EngineConfig, Event, GenerateRequest, OutputRules, RealEngine};
use server::http::{app, AppState, EngineSlot, HttpConfig};

const SEED: u64 = 5;
const BASE_ID: &str = "tiny";

/// The tiny model (as the engine loads it), two adapters on disk and a registry holding them.
struct Setup {
    dir: tempfile::TempDir,
    tiny: TinyModel,
    adapters: Vec<TinyAdapter>,
    registry: Arc<Registry>,
}

impl Setup {
    fn new() -> Self {
        Self::with_budget(1 << 20)
    }

    /// With a plug-in memory budget of `budget_bytes`; the adapters are loaded in order.
    fn with_budget(budget_bytes: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let tiny = TinyModel::random(tiny_config(Architecture::Llama), SEED).unwrap();
        let plugins = dir.path().join("plugins");
        let adapters: Vec<TinyAdapter> = [(3, 31), (2, 32)]
            .into_iter()
            .map(|(r, seed)| {
                TinyAdapter::random(&tiny.config, r, 8.0, &ALL_PROJECTIONS, seed).unwrap()
            })
            .collect();
        for (i, a) in adapters.iter().enumerate() {
            a.write(&plugins.join(format!("a{i}"))).unwrap();
        }
        let base = BaseModel {
            id: BASE_ID.into(),
            config: tiny.config.clone(),
            device: Device::Cpu,
            tokenizer_hash: None,
            kv_dtype: models::KvDtype::F32,
        };
        let config = RegistryConfig {
            dir: Some(plugins),
            budget_bytes,
        };
        let registry = Arc::new(Registry::new(base, config).unwrap());
        for name in ["a0", "a1"] {
            registry
                .load(PluginKind::Lora, name, name.as_ref(), Source::Config, false)
                .unwrap();
        }
        Self {
            dir,
            tiny,
            adapters,
            registry,
        }
    }

    fn engine(&self, dir: &Path) -> RealEngine {
        let config = EngineConfig {
            model_id: BASE_ID.into(),
            max_running: 16,
            max_batch_tokens: 24,
            prefill_chunk: 4,
            ..EngineConfig::default()
        };
        RealEngine::new(tiny_loaded_model(dir, SEED).unwrap(), config).unwrap()
    }

    fn chain(&self, specs: &[(&str, f64)]) -> Vec<HookCall> {
        let specs: Vec<PluginSpec> = specs
            .iter()
            .map(|(name, scale)| {
                serde_json::from_value(json!({"type": "lora", "name": name, "scale": scale}))
                    .unwrap()
            })
            .collect();
        self.registry.resolve(&specs).unwrap().calls
    }
}

fn ids(text: &str) -> Vec<u32> {
    text.chars().map(|c| tiny_char_id(c).unwrap()).collect()
}

fn request(prompt: &str, temperature: f32, seed: u64, hooks: Vec<HookCall>) -> GenerateRequest {
    GenerateRequest {
        id: format!("r{seed}"),
        prompt: ids(prompt),
        sampling: SamplingParams {
            temperature,
            ..SamplingParams::default()
        },
        seed,
        max_tokens: 24,
        stop: Vec::new(),
        stop_token_ids: Vec::new(),
        prompt_logprobs: None,
        hooks,
        output: OutputRules::default(),
        cache_prompt: true,
        constraint: None,
        embed: false,
    }
}

fn tokens(rx: server::engine::EventReceiver) -> Vec<u32> {
    let mut rx = rx;
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
fn requests_with_different_adapters_share_batches_and_each_equals_itself_alone() {
    let s = Setup::new();
    let engine = s.engine(s.dir.path());
    let chains: [&[(&str, f64)]; 5] = [
        &[("a0", 1.0)],
        &[],
        &[("a1", 1.0)],
        &[("a0", 0.5)],
        &[("a1", 1.0), ("a0", -1.0)],
    ];
    let requests: Vec<GenerateRequest> = (0..15u64)
        .map(|i| {
            let prompt = &"the quick brown fox jumps over"[..4 + i as usize];
            request(
                prompt,
                1.0,
                100 + i,
                s.chain(chains[i as usize % chains.len()]),
            )
        })
        .collect();
    let alone: Vec<Vec<u32>> = requests
        .iter()
        .map(|r| tokens(engine.submit(r.clone()).unwrap()))
        .collect();
    let receivers: Vec<_> = requests
        .into_iter()
        .map(|r| engine.submit(r).unwrap())
        .collect();
    let together: Vec<Vec<u32>> = receivers.into_iter().map(tokens).collect();
    assert_eq!(together, alone);
}

#[test]
fn greedy_output_with_an_adapter_equals_the_merged_model_and_differs_from_the_base() {
    let s = Setup::new();
    let engine = s.engine(s.dir.path());
    let merged_dir = tempfile::tempdir().unwrap();
    let merged = s.adapters[0].merge_into(&s.tiny, 1.0).unwrap();
    // The merged weights written as the engine's tiny GGUF, so both runs share every loader
    // and kernel: only where the adapter is applied differs.
    let merged_engine = {
        let path = merged_dir.path().join("merged.gguf");
        merged
            .write_gguf(&path, candle_core::quantized::GgmlDType::F32)
            .unwrap();
        let mut loaded = tiny_loaded_model(merged_dir.path(), SEED).unwrap();
        loaded.model = models::loader::load_model(&path, &Device::Cpu, usize::MAX).unwrap();
        RealEngine::new(loaded, EngineConfig::default()).unwrap()
    };
    let prompt = "pack my box with five dozen";
    let with_adapter = tokens(
        engine
            .submit(request(prompt, 0.0, 1, s.chain(&[("a0", 1.0)])))
            .unwrap(),
    );
    let reference = tokens(
        merged_engine
            .submit(request(prompt, 0.0, 1, Vec::new()))
            .unwrap(),
    );
    let base = tokens(engine.submit(request(prompt, 0.0, 1, Vec::new())).unwrap());
    assert_eq!(with_adapter, reference);
    assert_ne!(
        with_adapter, base,
        "the adapter must change the greedy output"
    );
}

// ------------------------------------------------------------------------------ HTTP

fn http_app(s: &Setup, engine_dir: &Path) -> Router {
    let engine: Arc<dyn Engine> = Arc::new(s.engine(engine_dir));
    let slot = EngineSlot::ready(engine);
    slot.fill_plugins(s.registry.clone());
    app(AppState::new(slot, HttpConfig::default()).unwrap())
}

fn delete(uri: &str) -> Request<Body> {
    Request::delete(uri).body(Body::empty()).unwrap()
}

fn greedy(model: &str, plugins: Value) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12,
           "temperature": 0, "ignore_eos": true, "plugins": plugins})
}

#[tokio::test]
async fn adapters_are_selected_by_model_name_or_plugins_list_and_echoed() {
    let s = Setup::new();
    let engine_dir = tempfile::tempdir().unwrap();
    let app = http_app(&s, engine_dir.path());
    let hash = s.registry.list()[0].hash.clone();

    let base = chat(&app, greedy(BASE_ID, json!([]))).await.json();
    assert!(base.get("plugins").is_none(), "no chain, no echo: {base}");
    let text = |v: &Value| {
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let mut outputs = Vec::new();
    for (model, plugins) in [
        ("tiny::a0", json!([])),
        ("a0", json!([])),
        (BASE_ID, json!([{"type": "lora", "name": "a0"}])),
        (
            BASE_ID,
            json!([{"type": "lora", "name": "a0", "scale": 1.0}]),
        ),
    ] {
        let body = chat(&app, greedy(model, plugins)).await.ok();
        assert_eq!(body["model"], model);
        assert_eq!(
            body["plugins"],
            json!([{"type": "lora", "name": "a0", "hash": hash}])
        );
        outputs.push(text(&body));
    }
    assert!(outputs.iter().all(|o| *o == outputs[0]), "{outputs:?}");
    assert_ne!(outputs[0], text(&base));

    let mut streamed = greedy("a0", json!([]));
    streamed["stream"] = json!(true);
    let r = chat(&app, streamed).await;
    let frames = r.sse_data();
    let first: Value = serde_json::from_str(&frames[0]).unwrap();
    assert_eq!(first["plugins"][0]["name"], "a0", "{first}");
    let second: Value = serde_json::from_str(&frames[1]).unwrap();
    assert!(
        second.get("plugins").is_none(),
        "only the first chunk echoes: {second}"
    );
}

#[tokio::test]
async fn an_evicted_adapter_is_read_back_for_the_request_that_names_it() {
    let roomy = Setup::new();
    let largest = roomy.registry.list().iter().map(|p| p.bytes).max().unwrap();
    // Room for one adapter: loading a1 evicted a0.
    let tight = Setup::with_budget(largest);
    let resident = |s: &Setup| -> Vec<String> {
        let list = s.registry.list();
        list.into_iter()
            .filter(|p| p.resident)
            .map(|p| p.name)
            .collect()
    };
    assert_eq!(resident(&tight), ["a1"]);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (roomy_app, tight_app) = (
        http_app(&roomy, dir_a.path()),
        http_app(&tight, dir_b.path()),
    );
    for name in ["a0", "a1", "a0"] {
        let want = chat(&roomy_app, greedy(name, json!([]))).await.ok();
        let got = chat(&tight_app, greedy(name, json!([]))).await.ok();
        assert_eq!(got["choices"], want["choices"], "{name}");
        assert_eq!(
            got["plugins"], want["plugins"],
            "same file, same hash: {name}"
        );
        assert_eq!(resident(&tight), [name], "the other adapter made room");
    }
}

#[tokio::test]
async fn bad_plugin_selections_get_openai_shaped_errors_naming_them() {
    let s = Setup::new();
    let engine_dir = tempfile::tempdir().unwrap();
    let app = http_app(&s, engine_dir.path());
    let cases = [
        (
            greedy("nope", json!([])),
            StatusCode::NOT_FOUND,
            "model_not_found",
            "model",
        ),
        (
            greedy(BASE_ID, json!([{"type": "lora", "name": "nope"}])),
            StatusCode::NOT_FOUND,
            "plugin_not_found",
            "plugins[0]",
        ),
        (
            greedy(
                BASE_ID,
                json!([{"type": "lora", "name": "a0", "scale": 50}]),
            ),
            StatusCode::BAD_REQUEST,
            "invalid_value",
            "plugins[0].scale",
        ),
        (
            greedy(BASE_ID, json!([{"type": "lora", "name": "a0", "rank": 2}])),
            StatusCode::BAD_REQUEST,
            "invalid_value",
            "plugins[0].rank",
        ),
        (
            greedy(BASE_ID, json!([{"type": "steer", "name": "a0"}])),
            StatusCode::BAD_REQUEST,
            "invalid_value",
            "plugins[0]",
        ),
        (
            greedy(BASE_ID, json!([{"name": "a0"}])),
            StatusCode::BAD_REQUEST,
            "invalid_value",
            "plugins[0]",
        ),
        (
            greedy(BASE_ID, json!("a0")),
            StatusCode::BAD_REQUEST,
            "invalid_value",
            "plugins",
        ),
    ];
    for (body, status, code, param) in cases {
        let r = chat(&app, body.clone()).await;
        let error = r.error(status, code);
        let got = error["param"].as_str().unwrap_or_default();
        assert!(
            got.starts_with(param),
            "{body}: param {got:?}, wanted {param:?}: {error}"
        );
    }
    // An unknown type fails at the wire edge, naming the field and the known types.
    let r = chat(
        &app,
        greedy(BASE_ID, json!([{"type": "lorra", "name": "a0"}])),
    )
    .await;
    let error = r.error(StatusCode::BAD_REQUEST, "invalid_value");
    assert_eq!(error["param"], "plugins[0].type", "{error}");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains(
            "unknown plug-in type `lorra` (known: lora, steer, controller, memory, speculative, early_exit, sparse_attention, vision_prune)"
        ),
        "{message}"
    );
    // The server still serves.
    assert_eq!(
        chat(&app, greedy(BASE_ID, json!([]))).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn speculative_decoding_is_built_in_named_by_type_and_changes_no_output() {
    let s = Setup::new();
    let engine_dir = tempfile::tempdir().unwrap();
    let app = http_app(&s, engine_dir.path());
    let ngram = json!({"type": "speculative", "method": "ngram", "num_speculative_tokens": 4,
                       "prompt_lookup_min": 1, "prompt_lookup_max": 3});
    let echo = json!({"type": "speculative", "name": "speculative", "hash": "built-in"});
    let lora = json!({"type": "lora", "name": "a0"});
    for (plain, drafted) in [
        (json!([]), json!([ngram])),
        (json!([lora]), json!([lora, ngram])),
        (
            json!([]),
            json!([{"type": "speculative", "name": "speculative"}]),
        ),
    ] {
        let mut want = greedy(BASE_ID, plain.clone());
        let mut got = greedy(BASE_ID, drafted.clone());
        for body in [&mut want, &mut got] {
            body["max_tokens"] = json!(48);
        }
        let want = chat(&app, want).await.ok();
        let got = chat(&app, got).await.ok();
        assert_eq!(got["choices"], want["choices"], "{drafted}");
        let chain = got["plugins"].as_array().unwrap();
        assert_eq!(chain.last().unwrap(), &echo, "{got}");
    }
    let metrics = String::from_utf8(send(&app, get("/metrics")).await.body.to_vec()).unwrap();
    let drafts = metrics
        .lines()
        .find_map(|l| l.strip_prefix("vllm:spec_decode_num_draft_tokens_total "))
        .unwrap();
    assert!(drafts.parse::<u64>().unwrap() > 0, "{metrics}");

    let cases = [
        (
            json!([{"type": "speculative", "num_speculative_tokens": 0}]),
            "plugins[0].num_speculative_tokens",
        ),
        (
            json!([{"type": "speculative", "method": "eagle"}]),
            "plugins[0].method",
        ),
        (
            json!([{"type": "speculative", "name": "mine"}]),
            "plugins[0]",
        ),
        (json!([{"type": "lora"}]), "plugins[0]"),
    ];
    for (plugins, param) in cases {
        let r = chat(&app, greedy(BASE_ID, plugins.clone())).await;
        let error = r.error(StatusCode::BAD_REQUEST, "invalid_value");
        assert_eq!(error["param"], param, "{plugins}: {error}");
    }
    let load = json!({"type": "speculative", "name": "spec", "path": "a0"});
    let r = send(&app, post("/v1/plugins", load.to_string())).await;
    let error = r.error(StatusCode::BAD_REQUEST, "invalid_value");
    assert!(
        error["message"].as_str().unwrap().contains("built in"),
        "{error}"
    );
}

#[tokio::test]
async fn the_registry_routes_load_list_refuse_and_unload() {
    let s = Setup::new();
    let engine_dir = tempfile::tempdir().unwrap();
    let app = http_app(&s, engine_dir.path());
    let load = |body: Value| post("/v1/plugins", body.to_string());

    let r = send(
        &app,
        load(json!({"type": "lora", "name": "fresh", "path": "a1"})),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.json()["name"], "fresh");
    let listed = send(&app, get("/v1/plugins")).await.json();
    let names: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a0", "a1", "fresh"]);
    let models = send(&app, get("/v1/models")).await.json();
    let fresh = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "fresh")
        .unwrap()
        .clone();
    assert_eq!(fresh["parent"], BASE_ID);
    assert_eq!(
        chat(&app, greedy("fresh", json!([]))).await.status,
        StatusCode::OK
    );

    // A file made for another model shape is refused whole, naming the mismatch.
    let other = TinyModel::random(
        models::ModelConfig {
            hidden_size: 48,
            ..tiny_config(Architecture::Llama)
        },
        1,
    )
    .unwrap();
    TinyAdapter::random(&other.config, 2, 2.0, &ALL_PROJECTIONS, 3)
        .unwrap()
        .write(&s.dir.path().join("plugins/wrong"))
        .unwrap();
    let refusals = [
        (
            json!({"type": "lora", "name": "fresh", "path": "a1"}),
            StatusCode::CONFLICT,
            "plugin_exists",
        ),
        (
            json!({"type": "lora", "name": "w", "path": "wrong"}),
            StatusCode::BAD_REQUEST,
            "invalid_value",
        ),
        (
            json!({"type": "lora", "name": "x", "path": "../../etc"}),
            StatusCode::BAD_REQUEST,
            "invalid_value",
        ),
        (
            json!({"type": "lora", "name": "x", "path": "missing"}),
            StatusCode::BAD_REQUEST,
            "invalid_value",
        ),
        (
            json!({"type": "dora", "name": "x", "path": "a1"}),
            StatusCode::BAD_REQUEST,
            "invalid_value",
        ),
        (
            json!({"type": "lora", "name": "tiny", "path": "a1"}),
            StatusCode::BAD_REQUEST,
            "invalid_value",
        ),
        (
            json!({"type": "lora", "name": "x", "path": "a1", "rank": 3}),
            StatusCode::BAD_REQUEST,
            "unsupported_parameter",
        ),
    ];
    for (body, status, code) in refusals {
        let r = send(&app, load(body.clone())).await;
        let e = r.error(status, code);
        assert!(!e["message"].as_str().unwrap().is_empty(), "{body}");
    }
    // Each refusal names the field at fault.
    for (body, param) in [
        (json!({"type": "lora", "name": "..", "path": "a1"}), "name"),
        (
            json!({"type": "lora", "name": "fresh", "path": "a1"}),
            "name",
        ),
        (json!({"type": "lorra", "name": "x", "path": "a1"}), "type"),
        (
            json!({"type": "lora", "name": "x", "path": "../../etc"}),
            "path",
        ),
    ] {
        let e = send(&app, load(body.clone())).await.json();
        assert_eq!(e["error"]["param"], param, "{body}: {e}");
    }
    let e = send(
        &app,
        load(json!({"type": "lora", "name": "w", "path": "wrong"})),
    )
    .await
    .json();
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("has shape"),
        "{e}"
    );

    let r = send(&app, delete("/v1/plugins/fresh")).await;
    assert_eq!(r.json()["deleted"], true);
    send(&app, delete("/v1/plugins/fresh"))
        .await
        .error(StatusCode::NOT_FOUND, "plugin_not_found");
    chat(&app, greedy("fresh", json!([])))
        .await
        .error(StatusCode::NOT_FOUND, "model_not_found");

    let metrics = String::from_utf8(send(&app, get("/metrics")).await.body.to_vec()).unwrap();
    assert!(
        metrics.contains("graft_plugin_requests_total{type=\"lora\",name=\"fresh\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("vllm:lora_requests_info{"), "{metrics}");
}

/// vLLM's error body for `status`, checked: `type` and the status as a numeric `code`.
fn vllm_error(r: &common::Answer, status: StatusCode, kind: &str) -> String {
    assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
    let e = r.json();
    assert_eq!(e["error"]["type"], kind, "{e}");
    assert_eq!(e["error"]["code"], status.as_u16(), "{e}");
    e["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn vllm_lora_endpoints_load_and_unload_as_vllm_answers() {
    let s = Setup::new();
    let engine_dir = tempfile::tempdir().unwrap();
    let app = http_app(&s, engine_dir.path());
    let load = |body: Value| post("/v1/load_lora_adapter", body.to_string());
    let unload = |body: Value| post("/v1/unload_lora_adapter", body.to_string());

    let r = send(&app, load(json!({"lora_name": "sql", "lora_path": "a1"}))).await;
    assert_eq!(r.status, StatusCode::OK);
    let text = String::from_utf8_lossy(&r.body).to_string();
    assert_eq!(text, "Success: LoRA adapter 'sql' added successfully.");
    assert_eq!(
        chat(&app, greedy("sql", json!([]))).await.status,
        StatusCode::OK
    );
    let metrics = String::from_utf8(send(&app, get("/metrics")).await.body.to_vec()).unwrap();
    let info = metrics
        .lines()
        .find(|l| l.starts_with("vllm:lora_requests_info{"))
        .unwrap_or_default();
    assert!(
        info.contains("running_lora_adapters=\"a0,a1,sql\""),
        "{metrics}"
    );
    assert!(info.contains("waiting_lora_adapters=\"\""), "{metrics}");

    let again = send(&app, load(json!({"lora_name": "sql", "lora_path": "a0"}))).await;
    let message = vllm_error(&again, StatusCode::BAD_REQUEST, "InvalidUserInput");
    assert!(message.contains("has already been loaded"), "{message}");
    let inplace = json!({"lora_name": "sql", "lora_path": "a0", "load_inplace": true});
    assert_eq!(send(&app, load(inplace)).await.status, StatusCode::OK);
    let missing = send(&app, load(json!({"lora_name": "x", "lora_path": "nope"}))).await;
    let message = vllm_error(&missing, StatusCode::NOT_FOUND, "NotFoundError");
    assert_eq!(message, "Loading lora x failed: No adapter found for nope");
    for body in [
        json!({"lora_name": "", "lora_path": "a1"}),
        json!({"lora_name": BASE_ID, "lora_path": "a1"}),
        json!({"lora_name": "x", "lora_path": "/etc"}),
        json!({"lora_name": "x", "lora_path": "a1", "is_3d_lora_weight": true}),
        json!({"lora_name": "x"}),
    ] {
        let r = send(&app, load(body.clone())).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(r.json()["error"]["code"], 400, "{body}");
    }

    let r = send(&app, unload(json!({"lora_name": "sql"}))).await;
    assert_eq!(
        String::from_utf8_lossy(&r.body),
        "Success: LoRA adapter 'sql' removed successfully."
    );
    let gone = send(&app, unload(json!({"lora_name": "sql"}))).await;
    let message = vllm_error(&gone, StatusCode::NOT_FOUND, "NotFoundError");
    assert_eq!(message, "The lora adapter 'sql' cannot be found.");
    chat(&app, greedy("sql", json!([])))
        .await
        .error(StatusCode::NOT_FOUND, "model_not_found");
}

/// Control-vector GGUFs that made candle panic (a 500 "task panicked"): each is a 400 naming
/// the file and the field.
#[tokio::test]
async fn malformed_control_vectors_are_400s_naming_the_file_and_the_field() {
    use candle_core::quantized::gguf_file::{self, Value as GgufValue};
    use candle_core::quantized::{GgmlDType, QTensor};
    let s = Setup::new();
    let engine_dir = tempfile::tempdir().unwrap();
    let app = http_app(&s, engine_dir.path());
    let plugins = s.dir.path().join("plugins");
    let hidden = s.tiny.config.hidden_size;
    let direction = candle_core::Tensor::new(vec![0.5f32; hidden], &Device::Cpu).unwrap();
    let direction = QTensor::quantize(&direction, GgmlDType::F32).unwrap();
    let write = |file: &str, alignment: u32| {
        let arch = GgufValue::String("controlvector".into());
        let alignment = GgufValue::U32(alignment);
        let md = [
            ("general.architecture", &arch),
            ("general.alignment", &alignment),
        ];
        let mut f = std::fs::File::create(plugins.join(file)).unwrap();
        gguf_file::write(&mut f, &md, &[("direction.1", &direction)]).unwrap();
    };
    write("good.gguf", 32);
    write("zero.gguf", 0);
    // The one dimension of `direction.1` (after its name and n_dims) set to 2^62.
    let mut huge = std::fs::read(plugins.join("good.gguf")).unwrap();
    let at = huge.windows(11).position(|w| w == b"direction.1").unwrap() + 11 + 4;
    huge[at..at + 8].copy_from_slice(&(1u64 << 62).to_le_bytes());
    std::fs::write(plugins.join("huge.gguf"), huge).unwrap();

    let load = |path: &str| {
        post(
            "/v1/plugins",
            json!({"type": "steer", "name": path, "path": path}).to_string(),
        )
    };
    let r = send(&app, load("good.gguf")).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    for (file, field) in [
        ("zero.gguf", "general.alignment"),
        ("huge.gguf", "`direction.1`: dims"),
    ] {
        let e = send(&app, load(file))
            .await
            .error(StatusCode::BAD_REQUEST, "invalid_value");
        let message = e["message"].as_str().unwrap();
        assert!(
            message.contains(file) && message.contains(field),
            "{message}"
        );
        assert_eq!(e["param"], "path");
    }
}

#[test]
fn a_prefix_is_reused_only_under_the_same_adapters_with_the_same_scales() {
    let s = Setup::new();
    let engine = s.engine(s.dir.path());
    let plain_dir = tempfile::tempdir().unwrap();
    let plain = RealEngine::new(
        tiny_loaded_model(plain_dir.path(), SEED).unwrap(),
        EngineConfig {
            prefix_caching: false,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    let shared = "the quick brown fox jumps over the lazy dog";
    let chains: [(&[(&str, f64)], usize); 8] = [
        (&[], 0),
        (&[("a0", 1.0)], 0), // the base model's prefix holds other keys and values
        (&[("a0", 1.0)], shared.len()),
        (&[("a0", 0.5)], 0),
        (&[("a1", 1.0)], 0),
        (&[], shared.len()),
        (&[("a0", 1.0), ("a1", 1.0)], 0),
        (&[("a1", 1.0), ("a0", 1.0)], 0), // another order is another model
    ];
    for (i, (chain, expected)) in chains.into_iter().enumerate() {
        let prompt = format!("{shared}{i}");
        let submit = |e: &RealEngine| {
            tokens_and_cached(e.submit(request(&prompt, 1.0, 7, s.chain(chain))).unwrap())
        };
        let (got, cached) = submit(&engine);
        assert_eq!(cached, expected, "request {i} {chain:?}");
        assert_eq!(got, submit(&plain).0, "request {i} {chain:?}");
    }
}

#[test]
fn a_response_format_constrains_a_row_whose_chain_changes_its_logits() {
    let s = Setup::new();
    let engine = s.engine(s.dir.path());
    let format: server::structured::ResponseFormat = serde_json::from_value(json!({
        "type": "json_schema",
        "json_schema": {"name": "pick", "schema": {"enum": ["north", "south", "east", "west"]}}
    }))
    .unwrap();
    let constraint = engine.grammars().unwrap().compile(&format).unwrap();
    let mut answers = Vec::new();
    for (seed, chain) in [
        (1, s.chain(&[("a0", 1.0)])),
        (2, s.chain(&[("a1", 2.0)])),
        (3, vec![]),
    ] {
        let req = GenerateRequest {
            constraint: constraint.clone(),
            stop_token_ids: vec![server::engine::testing::TINY_EOS],
            ..request("which way?", 1.0, seed, chain)
        };
        let (ids, _) = tokens_and_cached(engine.submit(req).unwrap());
        let text: String = ids
            .iter()
            .filter(|&&id| id != server::engine::testing::TINY_EOS)
            .map(|&id| {
                server::engine::testing::tiny_tokenizer()
                    .unwrap()
                    .decode(&[id], false)
                    .unwrap()
            })
            .collect();
        let value: String = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        answers.push(value);
    }
    assert!(
        answers
            .iter()
            .all(|a| ["north", "south", "east", "west"].contains(&a.as_str())),
        "{answers:?}"
    );
}
