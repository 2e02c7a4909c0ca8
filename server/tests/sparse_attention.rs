//! A sparse-attention plug-in through the real engine on the tiny model: its compressed keys
//! are the sequence's plug-in state, counted as KV memory and freed when the client goes
//! away; and a request whose budget covers its context gets the plug-in-free output while
//! sharing steps with others.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;

use models::HookCall;
use plugins::sparse_attention::gate::LayerGate;
use plugins::sparse_attention::train::{config_of, TrainOptions};
use plugins::sparse_attention::SparseAttention;
use plugins::{BaseModel, Plugin};
use server::engine::testing::{collect_events, plain_request, tiny_loaded_model, wait_until};
use server::engine::{Engine, EngineConfig, Event, RealEngine};

fn plugin(base: &BaseModel) -> Arc<SparseAttention> {
    let opts = TrainOptions {
        length: 64,
        sequences: 2,
        queries: 1,
        block_size: 16,
        gate_dim: 4,
        dense_layers: 0,
        sink_block: true,
        budget: 32,
        steps: 0,
        batch: 1,
        lr: 0.0,
        target: Default::default(),
        seed: 0,
    };
    let c = &base.config;
    let group = c.num_heads / c.num_kv_heads;
    let gates: HashMap<usize, LayerGate> = (0..c.num_layers)
        .map(|l| {
            let n = |inputs: usize| c.num_kv_heads * 4 * inputs;
            let wave = |len: usize| {
                (0..len)
                    .map(|i| ((i * 7 + l) % 13) as f32 / 13.0 - 0.5)
                    .collect()
            };
            let gate = LayerGate {
                q_proj: wave(n(group * c.head_dim)),
                k_proj: wave(n(3 * c.head_dim)),
                q_norm: vec![1.0; 4],
                k_norm: vec![1.0; 4],
            };
            (l, gate)
        })
        .collect();
    Arc::new(SparseAttention::new("sa", config_of(base, &opts), gates, base).unwrap())
}

fn chain(p: &Arc<SparseAttention>, params: serde_json::Value) -> Vec<HookCall> {
    let params = p.request_params(params.as_object().unwrap()).unwrap();
    vec![HookCall::new(p.clone(), params)]
}

fn tokens(events: &[Event]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Token { id, .. } => Some(*id),
            _ => None,
        })
        .collect()
}

fn setup() -> (tempfile::TempDir, RealEngine, Arc<SparseAttention>) {
    let dir = tempfile::tempdir().unwrap();
    let loaded = tiny_loaded_model(dir.path(), 11).unwrap();
    let base = BaseModel {
        id: "tiny".into(),
        config: loaded.model.config.clone(),
        device: candle_core::Device::Cpu,
        tokenizer_hash: None,
        kv_dtype: models::KvDtype::F32,
    };
    let p = plugin(&base);
    (
        dir,
        RealEngine::new(loaded, EngineConfig::default()).unwrap(),
        p,
    )
}

#[test]
fn a_cancelled_request_frees_the_gates_compressed_keys_with_its_cache() {
    let (_dir, engine, p) = setup();
    let mut request = plain_request("long", (0..40).map(|i| 3 + i % 50).collect(), 200);
    request.hooks = chain(&p, serde_json::json!({"budget": 32}));
    let mut rx = engine.submit(request).unwrap();
    for _ in 0..30 {
        assert!(matches!(rx.blocking_recv(), Some(Event::Token { .. })));
    }
    assert!(p.reads().0 > 0, "decode steps read sparsely");
    wait_until("cache claimed", || engine.stats().kv_used_bytes > 0);
    drop(rx);
    wait_until("cache and state freed", || {
        let s = engine.stats();
        s.kv_used_bytes == 0 && s.running == 0
    });
}

#[test]
fn a_covering_budget_beside_other_requests_gives_the_plugin_free_output() {
    let (_dir, engine, p) = setup();
    let prompt: Vec<u32> = (0..50).map(|i| 3 + (i * 5) % 60).collect();
    let alone = tokens(&collect_events(
        engine
            .submit(plain_request("a", prompt.clone(), 60))
            .unwrap(),
    ));
    let mut covered = plain_request("b", prompt.clone(), 60);
    covered.hooks = chain(&p, serde_json::json!({"budget": 4096}));
    let mut sparse = plain_request("c", prompt.clone(), 60);
    sparse.hooks = chain(&p, serde_json::json!({"budget": 32}));
    let receivers = [
        engine.submit(covered).unwrap(),
        engine.submit(sparse).unwrap(),
        engine.submit(plain_request("d", prompt, 60)).unwrap(),
    ];
    let outs: Vec<Vec<u32>> = receivers
        .into_iter()
        .map(|rx| tokens(&collect_events(rx)))
        .collect();
    assert_eq!(outs[0], alone);
    assert_eq!(outs[2], alone);
    assert_eq!(outs[1].len(), 60);
}
