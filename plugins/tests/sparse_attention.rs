//! Learned sparse attention on a tiny seeded model: a budget or threshold that reads every
//! block gives the dense output bit for bit; the compressed keys after a prefill equal those
//! built token by token; rows with and without the plug-in share a step and each gets what it
//! gets alone; a rollback recomputes what it reopens; the trainer's gates fit the model's own
//! attention better than untrained ones; files round-trip and bad ones are refused naming the
//! fault.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use models::tiny::TinyModel;
use models::{BatchRow, HookCall, KvCache, Llama, LogitsWanted, ModelConfig};
use plugins::files::PluginFiles;
use plugins::sparse_attention::gate::LayerGate;
use plugins::sparse_attention::train::{config_of, train, windows, Target, TrainOptions};
use plugins::sparse_attention::{SparseAttention, SparseState, WEIGHTS_FILE};
use plugins::train::Quiet;
use plugins::{BaseModel, Plugin, PluginError};
use rand::{Rng, SeedableRng};
use serde_json::json;

const MAX_POS: usize = 256;
const BLOCK: usize = 16;

fn config() -> ModelConfig {
    common::tiny_layers(4)
}

fn base(c: &ModelConfig) -> BaseModel {
    common::tiny_base(c)
}

fn model(c: &ModelConfig) -> Llama {
    TinyModel::random(c.clone(), 5)
        .unwrap()
        .build(MAX_POS)
        .unwrap()
}

fn options() -> TrainOptions {
    TrainOptions {
        length: 128,
        sequences: 12,
        queries: 24,
        block_size: BLOCK,
        gate_dim: 8,
        dense_layers: 1,
        sink_block: true,
        budget: 32,
        steps: 0,
        batch: 4,
        lr: 1e-2,
        target: Default::default(),
        seed: 3,
    }
}

/// Gates with seeded random weights for every layer from `dense_layers` on.
fn random_plugin(c: &ModelConfig, opts: &TrainOptions) -> SparseAttention {
    let b = base(c);
    let config = config_of(&b, opts);
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let (h, dg, g, d) = (
        c.num_kv_heads,
        opts.gate_dim,
        c.num_heads / c.num_kv_heads,
        c.head_dim,
    );
    let mut draw = |n: usize| {
        (0..n)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect::<Vec<f32>>()
    };
    let gates: HashMap<usize, LayerGate> = (opts.dense_layers..c.num_layers)
        .map(|l| {
            (
                l,
                LayerGate {
                    q_proj: draw(h * dg * g * d),
                    k_proj: draw(h * dg * 3 * d),
                    q_norm: vec![1.0; dg],
                    k_norm: vec![1.0; dg],
                },
            )
        })
        .collect();
    SparseAttention::new("gates", config, gates, &b).unwrap()
}

fn call(p: &Arc<SparseAttention>, params: serde_json::Value) -> HookCall {
    let params = p.request_params(params.as_object().unwrap()).unwrap();
    HookCall::new(p.clone(), params)
}

fn prompt(n: usize, seed: u64) -> Vec<u32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(0..96)).collect()
}

/// One step of several rows; returns each row's last-position logits as bits.
fn step(m: &Llama, rows: &mut [(&mut KvCache, Vec<u32>, Vec<HookCall>)]) -> Vec<Vec<u32>> {
    let mut batch: Vec<BatchRow<'_>> = rows
        .iter_mut()
        .enumerate()
        .map(|(i, (cache, tokens, hooks))| BatchRow {
            seq_id: i as u64,
            tokens,
            cache,
            hooks,
            logits: LogitsWanted::Last,
        })
        .collect();
    m.forward(&mut batch)
        .unwrap()
        .into_iter()
        .map(|t| {
            let v = t.unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        })
        .collect()
}

/// Greedy decode of `n` tokens after `prompt` with `hooks`: every step's logits as bits.
fn decode(m: &Llama, prompt: &[u32], n: usize, hooks: &[HookCall]) -> Vec<Vec<u32>> {
    let mut cache = m.new_cache();
    let mut next = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..n {
        let bits = step(m, &mut [(&mut cache, next.clone(), hooks.to_vec())]).remove(0);
        let logits: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        let id = (0..logits.len())
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .unwrap();
        next = vec![id as u32];
        out.push(bits);
    }
    out
}

#[test]
fn reading_every_block_gives_the_dense_output_bit_for_bit() {
    let c = config();
    let m = model(&c);
    let p = Arc::new(random_plugin(&c, &options()));
    let text = prompt(150, 1);
    let dense = decode(&m, &text, 30, &[]);
    // A budget covering the context reads densely; a threshold no block misses selects
    // every block, so the kernel runs with a selection of all of them.
    for params in [json!({"budget": 256}), json!({"threshold": 1e-30})] {
        let sparse = decode(&m, &text, 30, &[call(&p, params.clone())]);
        assert_eq!(sparse, dense, "{params}");
    }
    let (tokens, context, read) = p.reads();
    // 30 steps: the prompt's prefill (dense) and 29 decode tokens.
    assert_eq!(
        tokens, 29,
        "the threshold run selected on every decode step"
    );
    assert_eq!(read, context);
}

#[test]
fn a_small_budget_reads_fewer_keys_and_counts_them() {
    let c = config();
    let m = model(&c);
    let p = Arc::new(random_plugin(&c, &options()));
    let text = prompt(150, 2);
    decode(&m, &text, 20, &[call(&p, json!({"budget": 48}))]);
    let (tokens, context, read) = p.reads();
    assert_eq!(tokens, 19, "the prompt's prefill, then 19 decode tokens");
    // 3 gated layers x 2 kv heads x 19 tokens, each reading at most 3 blocks of 16 of 151+.
    assert!(read <= 3 * 2 * 19 * 48, "{read}");
    let first: u64 = (151..170).sum::<u64>() * 3 * 2;
    assert_eq!(context, first);
}

/// The state's compressed keys, per layer.
fn compressed(cache: &KvCache) -> Vec<Vec<f32>> {
    cache
        .plugins()
        .with(|s: &mut SparseState| s.layers.iter().map(|l| l.compressed.clone()).collect())
        .unwrap()
}

#[test]
fn the_compressed_keys_after_a_prefill_equal_those_built_step_by_step() {
    let c = config();
    let m = model(&c);
    let p = Arc::new(random_plugin(&c, &options()));
    // A budget covering the context: the decode steps read densely, so every layer's keys
    // are the prefill's (a sparse layer would change the next layers' keys).
    let hooks = vec![call(&p, json!({"budget": 256}))];
    let text = prompt(100, 3);
    let mut whole = m.new_cache();
    step(&m, &mut [(&mut whole, text.clone(), hooks.clone())]);
    let mut stepped = m.new_cache();
    step(&m, &mut [(&mut stepped, text[..7].to_vec(), hooks.clone())]);
    for &t in &text[7..] {
        step(&m, &mut [(&mut stepped, vec![t], hooks.clone())]);
    }
    let (a, b) = (compressed(&whole), compressed(&stepped));
    for (l, (x, y)) in a.iter().zip(&b).enumerate().skip(1) {
        assert_eq!(
            x.len(),
            6 * 2 * 8,
            "layer {l}: 6 closed blocks x 2 heads x gate_dim 8"
        );
        let worst = x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "layer {l}: {worst}");
    }
    assert!(a[0].is_empty(), "the dense layer keeps nothing");
}

#[test]
fn a_rollback_into_a_closed_block_recomputes_it() {
    let c = config();
    let m = model(&c);
    let p = Arc::new(random_plugin(&c, &options()));
    let hooks = vec![call(&p, json!({"budget": 32}))];
    let text = prompt(90, 4);
    let mut ahead = m.new_cache();
    step(&m, &mut [(&mut ahead, text[..70].to_vec(), hooks.clone())]);
    // Cut back into block 3 (48..64), which the prefill closed, then feed the true tokens.
    ahead.truncate(60).unwrap();
    step(
        &m,
        &mut [(&mut ahead, text[60..90].to_vec(), hooks.clone())],
    );
    let mut straight = m.new_cache();
    step(&m, &mut [(&mut straight, text.clone(), hooks.clone())]);
    assert_eq!(compressed(&ahead).len(), compressed(&straight).len());
    for (x, y) in compressed(&ahead).iter().zip(&compressed(&straight)) {
        assert_eq!(x.len(), y.len());
        assert!(x.iter().zip(y).all(|(p, q)| (p - q).abs() < 1e-4));
    }
}

#[test]
fn rows_with_and_without_the_plugin_share_a_step_as_they_run_alone() {
    let c = config();
    let m = model(&c);
    let p = Arc::new(random_plugin(&c, &options()));
    let sparse = vec![call(&p, json!({"budget": 32}))];
    let (a, b) = (prompt(120, 5), prompt(90, 6));
    let alone_a = decode(&m, &a, 12, &sparse);
    let alone_b = decode(&m, &b, 12, &[]);
    let (mut ca, mut cb) = (m.new_cache(), m.new_cache());
    let (mut na, mut nb) = (a.clone(), b.clone());
    let argmax = |bits: &[u32]| {
        let v: Vec<f32> = bits.iter().map(|&x| f32::from_bits(x)).collect();
        (0..v.len()).max_by(|&i, &j| v[i].total_cmp(&v[j])).unwrap() as u32
    };
    for i in 0..12 {
        let out = step(
            &m,
            &mut [
                (&mut ca, na.clone(), sparse.clone()),
                (&mut cb, nb.clone(), vec![]),
            ],
        );
        assert_eq!(out[0], alone_a[i], "sparse row, step {i}");
        assert_eq!(out[1], alone_b[i], "dense row, step {i}");
        na = vec![argmax(&out[0])];
        nb = vec![argmax(&out[1])];
    }
}

fn write(p: &SparseAttention) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    p.save(dir.path()).unwrap();
    dir
}

fn load(dir: &std::path::Path, c: &ModelConfig) -> Result<SparseAttention, PluginError> {
    SparseAttention::load("gates", dir, &base(c), &mut PluginFiles::unconfined())
}

#[test]
fn files_round_trip_and_bad_ones_are_refused_naming_the_fault() {
    let c = config();
    let p = random_plugin(&c, &options());
    let dir = write(&p);
    let back = load(dir.path(), &c).unwrap();
    assert_eq!(back.config(), p.config());
    for l in 1..4 {
        assert_eq!(back.gate(l), p.gate(l));
    }
    // A model with more layers: the file has no gate for them.
    let deeper = ModelConfig {
        num_layers: 5,
        ..config()
    };
    let err = load(dir.path(), &deeper).unwrap_err().to_string();
    assert!(err.contains("made for"), "{err}");
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let d = write(&p);
        let path = d.path().join("config.json");
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
        load(d.path(), &c).unwrap_err().to_string()
    };
    let err = edit(&|v| v["num_kv_heads"] = json!(4));
    assert!(err.contains("key/value heads"), "{err}");
    let err = edit(&|v| v["block_size"] = json!(48));
    assert!(err.contains("block_size 48"), "{err}");
    let err = edit(&|v| v["dense_layers"] = json!(0));
    assert!(
        err.contains("layer 0 has no gate") || err.contains("missing"),
        "{err}"
    );
    let err = edit(&|v| v["gate_dim"] = json!(16));
    assert!(err.contains("shape"), "{err}");
    // A tensor file missing a layer's gate.
    let d = write(&p);
    let path = d.path().join(WEIGHTS_FILE);
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    tensors.remove("layers.2.k_proj.weight");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = load(d.path(), &c).unwrap_err().to_string();
    assert!(
        err.contains("layers.2.k_proj.weight") && err.contains("missing"),
        "{err}"
    );
    // NaN weights.
    tensors.insert(
        "layers.2.k_proj.weight".into(),
        Tensor::full(f32::NAN, (2, 8, 24), &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = load(d.path(), &c).unwrap_err().to_string();
    assert!(err.contains("NaN"), "{err}");
}

#[test]
fn request_parameters_are_checked_and_named() {
    let c = config();
    let p = random_plugin(&c, &options());
    let bad = |v: serde_json::Value| {
        p.request_params(v.as_object().unwrap())
            .unwrap_err()
            .to_string()
    };
    assert!(bad(json!({"budget": 8})).contains("budget"));
    assert!(bad(json!({"threshold": 1.5})).contains("threshold"));
    assert!(bad(json!({"threshold": 0})).contains("threshold"));
    assert!(bad(json!({"budget": 64, "threshold": 0.01})).contains("not both"));
    assert!(bad(json!({"top_k": 3})).contains("top_k"));
    assert!(p.request_params(json!({}).as_object().unwrap()).is_ok());
}

#[test]
fn trained_gates_fit_the_models_attention_better_than_untrained_ones() {
    let c = config();
    let m = model(&c);
    let b = base(&c);
    let docs: Vec<Vec<u32>> = (0..8).map(|i| prompt(200, 100 + i)).collect();
    let wins = windows(&docs, &[1], 128);
    assert_eq!(wins.len(), (8 * 200 + 7) / 128);
    let mut plugin = None;
    for target in [Target::Peak, Target::Mass] {
        let untrained = TrainOptions {
            target,
            ..options()
        };
        let untrained = train(&m, &b, "gates", &wins, &untrained, &mut Quiet)
            .unwrap()
            .1;
        let opts = TrainOptions {
            steps: 120,
            target,
            ..options()
        };
        let (made, trained) = train(&m, &b, "gates", &wins, &opts, &mut Quiet).unwrap();
        assert_eq!(trained.layers.len(), 3);
        for (u, t) in untrained.layers.iter().zip(&trained.layers) {
            assert!(
                t.heldout_kl < u.heldout_kl,
                "{target:?} layer {}: {} vs {}",
                t.layer,
                t.heldout_kl,
                u.heldout_kl
            );
        }
        plugin = Some(made);
    }
    let plugin = plugin.unwrap();
    // What the trainer made loads back as it was.
    let dir = write(&plugin);
    let back = load(dir.path(), &c).unwrap();
    assert_eq!(back.gate(2), plugin.gate(2));
}

#[test]
fn a_prefix_cut_through_an_older_block_keeps_the_others_and_forces_that_one() {
    let c = config();
    let m = model(&c);
    let p = Arc::new(random_plugin(&c, &options()));
    let hooks = vec![call(&p, json!({"budget": 32}))];
    let text = prompt(100, 7);
    let mut whole = m.new_cache();
    step(&m, &mut [(&mut whole, text.clone(), hooks.clone())]);
    // What automatic prefix caching does: the first 70 positions for a later request.
    let mut reused = whole.fork_prefix(70).unwrap();
    step(&m, &mut [(&mut reused, text[70..].to_vec(), hooks.clone())]);
    let width = 2 * 8;
    for (l, (x, y)) in compressed(&whole)
        .iter()
        .zip(&compressed(&reused))
        .enumerate()
        .skip(1)
    {
        assert_eq!(x.len(), y.len(), "layer {l}");
        for block in [0, 1, 2, 3, 5] {
            let (a, b) = (&x[block * width..][..width], &y[block * width..][..width]);
            assert!(
                a.iter().zip(b).all(|(p, q)| (p - q).abs() < 1e-4),
                "layer {l} block {block}"
            );
        }
    }
    let forced = reused
        .plugins()
        .with(|s: &mut SparseState| {
            s.layers
                .iter()
                .map(|l| l.forced.clone())
                .collect::<Vec<_>>()
        })
        .unwrap();
    assert_eq!(
        forced[1..],
        [vec![4], vec![4], vec![4]],
        "block 4 (64..80) lost 64..70"
    );
    // Every head of every gated layer reads it on the next decode step, beside the budget.
    let before = p.reads();
    step(&m, &mut [(&mut reused, vec![5], hooks.clone())]);
    let after = p.reads();
    // Per head: the current block (96..101, 5 keys), one best block (16) and block 4 (16),
    // or block 4 as the best one; 3 layers x 2 heads.
    let read = after.2 - before.2;
    assert!(
        (3 * 2 * (5 + 16)..=3 * 2 * (5 + 32)).contains(&read),
        "{read}"
    );
}
