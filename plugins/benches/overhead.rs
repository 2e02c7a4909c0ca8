//! What plug-ins cost per decode step on the default model, against the base model in the same
//! run: batches of 1 and 8 decoding rows (each after a 64-token prompt) with no plug-in, a LoRA
//! adapter (r16 on all projections; r8 on q/v), rows split between two adapters and none (the
//! mixed batches the server builds), a steering vector on layers 1-29, and a steering
//! controller (reading 4 layers, steering 20; weights set so it always steers, its worst
//! case); and, at 8 rows, one adapter for all rows against eight distinct adapters, one per row
//! (r8 and r64 on q/v, r8 on all projections). Medians of several runs, scenarios interleaved within each run so machine noise hits
//! them alike.
//!
//! Run: `cargo bench -p plugins --bench overhead` (GRAFT_BENCH_RUNS, default 5;
//! GRAFT_DEFAULT_MODEL_GGUF for the model path). Prints one JSON object; docs/BENCHMARKS.md
//! has the table.

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use models::{BatchRow, Hook, HookCall, KvCache, Llama, LogitsWanted, Projection};
use plugins::controller::{
    BaseIdentity, ControllerConfig, ControllerTensors, SteeringController, TYPE,
};
use plugins::files::PluginFiles;
use plugins::lora::tiny::{TinyAdapter, ALL_PROJECTIONS};
use plugins::lora::{LoraAdapter, LoraParams};
use plugins::steer::{ControlVector, SteeringVector};
use plugins::{BaseModel, Plugin};

const PROMPT: usize = 64;
const STEPS: usize = 64;
const QV: [Projection; 2] = [Projection::Q, Projection::V];

/// Decode tokens/s of `chains.len()` rows stepping together for `STEPS` steps.
fn decode(m: &Llama, chains: &[Vec<HookCall>]) -> f64 {
    let prompt: Vec<u32> = (0..PROMPT as u32).map(|i| 100 + i * 7).collect();
    let mut caches: Vec<KvCache> = chains.iter().map(|_| m.new_cache()).collect();
    let feed = |caches: &mut [KvCache], tokens: &[Vec<u32>]| {
        let mut rows: Vec<BatchRow> = caches
            .iter_mut()
            .zip(chains)
            .zip(tokens)
            .enumerate()
            .map(|(i, ((cache, hooks), t))| BatchRow {
                seq_id: i as u64,
                tokens: t,
                cache,
                hooks,
                logits: LogitsWanted::Last,
            })
            .collect();
        m.forward(&mut rows).expect("forward");
    };
    feed(&mut caches, &vec![prompt; chains.len()]);
    let next: Vec<Vec<u32>> = (0..chains.len() as u32).map(|i| vec![200 + i]).collect();
    let t = Instant::now();
    for _ in 0..STEPS {
        feed(&mut caches, &next);
    }
    (STEPS * chains.len()) as f64 / t.elapsed().as_secs_f64()
}

fn adapter(
    m: &Llama,
    dir: &std::path::Path,
    r: usize,
    targets: &[Projection],
    seed: u64,
) -> Arc<LoraAdapter> {
    TinyAdapter::random(&m.config, r, 2.0 * r as f64, targets, seed)
        .expect("adapter")
        .write(dir)
        .expect("write");
    let base = BaseModel {
        id: "bench".into(),
        config: m.config.clone(),
        device: Device::Cpu,
        tokenizer_hash: None,
        kv_dtype: models::KvDtype::F32,
    };
    Arc::new(LoraAdapter::load("bench", dir, &base, &mut PluginFiles::unconfined()).expect("load"))
}

fn call(a: &Arc<LoraAdapter>) -> HookCall {
    let hook: Arc<dyn Hook> = a.clone();
    HookCall::new(hook, Arc::new(LoraParams { scale: 1.0 }))
}

/// A fresh call of `p` with default parameters (a controller keeps per-request state).
fn fresh(p: &Arc<dyn Plugin>) -> HookCall {
    let hook: Arc<dyn Hook> = p.clone();
    HookCall::new(
        hook,
        p.request_params(&serde_json::Map::new()).expect("params"),
    )
}

fn base(m: &Llama) -> BaseModel {
    BaseModel {
        id: "bench".into(),
        config: m.config.clone(),
        device: Device::Cpu,
        tokenizer_hash: None,
        kv_dtype: models::KvDtype::F32,
    }
}

fn unit_rows(rows: usize, cols: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut x = seed;
    (0..rows)
        .map(|_| {
            let v: Vec<f32> = (0..cols)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
                .collect();
            plugins::steer::unit(v)
        })
        .collect()
}

fn steering_vector(m: &Llama) -> Arc<dyn Plugin> {
    let (layers, hidden) = (m.config.num_layers, m.config.hidden_size);
    let rows = unit_rows(layers, hidden, 7);
    let cv = ControlVector {
        model_hint: None,
        directions: (1..layers).map(|l| (l, rows[l].clone())).collect(),
    };
    Arc::new(SteeringVector::from_control_vector("steer", &cv, &base(m)).expect("vector"))
}

fn controller(m: &Llama, dir: &std::path::Path) -> Arc<dyn Plugin> {
    let (layers, hidden, units) = (m.config.num_layers, m.config.hidden_size, 128);
    let t = |rows: usize, cols: usize, seed| {
        let v: Vec<f32> = unit_rows(rows, cols, seed).into_iter().flatten().collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).expect("tensor")
    };
    let config = ControllerConfig {
        kind: TYPE.into(),
        base_model: BaseIdentity::of(&base(m)),
        input_layers: vec![6, 8, 10, 12],
        steered_layers: (1, 20),
        hidden_units: units,
        alpha: 4.0,
        decay: None,
    };
    let tensors = ControllerTensors {
        fc1_weight: t(units, 4 * hidden, 1),
        fc1_bias: Tensor::zeros(units, DType::F32, &Device::Cpu).expect("zeros"),
        fc2_weight: t(1 + layers, units, 2),
        // Strength and weights near 1: the controller always steers.
        fc2_bias: (Tensor::ones(1 + layers, DType::F32, &Device::Cpu).expect("ones") * 10.0)
            .expect("bias"),
        directions: t(layers, hidden, 3),
    };
    tensors.save(dir, &config).expect("save");
    Arc::new(
        SteeringController::load("controller", dir, &base(m), &mut PluginFiles::unconfined())
            .expect("controller"),
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    models::threads::pin_cpu_threads(None);
    let runs: usize = std::env::var("GRAFT_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let path = models::testing::default_model_for_tests().expect("model path");
    let m = models::loader::load_model(&path, &Device::Cpu, 4096).expect("load");
    let dir = tempfile::tempdir().expect("tempdir");
    // r = 16 on all seven projections (4.9 M parameters) and r = 8 on q/v: the two common shapes.
    let all = adapter(&m, &dir.path().join("all"), 16, &ALL_PROJECTIONS, 1);
    let qv = adapter(&m, &dir.path().join("qv"), 8, &QV, 2);
    // Eight distinct adapters per shape: one per row of a batch of 8 (the multi-tenant case).
    let distinct = |r: usize, targets: &[Projection], tag: &str| -> Vec<Arc<LoraAdapter>> {
        (0..8)
            .map(|i| {
                adapter(
                    &m,
                    &dir.path().join(format!("{tag}-{i}")),
                    r,
                    targets,
                    10 + i,
                )
            })
            .collect()
    };
    let (qv8, qv64, all8) = (
        distinct(8, &QV, "qv8"),
        distinct(64, &QV, "qv64"),
        distinct(8, &ALL_PROJECTIONS, "all8"),
    );
    let steer = steering_vector(&m);
    let ctl = controller(&m, &dir.path().join("controller"));
    let rows =
        |n: usize, pick: &dyn Fn(usize) -> Vec<HookCall>| (0..n).map(pick).collect::<Vec<_>>();
    let mut scenarios: Vec<(String, Vec<Vec<HookCall>>)> = Vec::new();
    for n in [1usize, 8] {
        scenarios.extend([
            (format!("c{n} base"), rows(n, &|_| vec![])),
            (format!("c{n} lora r16 all"), rows(n, &|_| vec![call(&all)])),
            (format!("c{n} lora r8 qv"), rows(n, &|_| vec![call(&qv)])),
            (
                format!("c{n} mixed (r16 all / r8 qv / none)"),
                rows(n, &|i| match i % 3 {
                    0 => vec![call(&all)],
                    1 => vec![call(&qv)],
                    _ => vec![],
                }),
            ),
            (
                format!("c{n} steer (layers 1-29)"),
                rows(n, &|_| vec![fresh(&steer)]),
            ),
            (format!("c{n} controller"), rows(n, &|_| vec![fresh(&ctl)])),
        ]);
    }
    for (label, set) in [("r8 qv", &qv8), ("r64 qv", &qv64), ("r8 all", &all8)] {
        scenarios.extend([
            (format!("c8 one {label}"), rows(8, &|_| vec![call(&set[0])])),
            (
                format!("c8 8 distinct {label}"),
                rows(8, &|i| vec![call(&set[i])]),
            ),
        ]);
    }
    decode(&m, &scenarios[0].1); // warm-up
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); scenarios.len()];
    for _ in 0..runs {
        for (i, (_, chains)) in scenarios.iter().enumerate() {
            results[i].push(decode(&m, chains));
        }
    }
    let out: Vec<serde_json::Value> = scenarios
        .iter()
        .zip(&results)
        .map(|((name, _), r)| serde_json::json!({"scenario": name, "decode_tok_s": median(r.clone()), "runs": r}))
        .collect();
    println!(
        "{}",
        serde_json::json!({"threads": candle_core::utils::get_num_threads(), "runs": runs, "steps": STEPS, "prompt": PROMPT, "results": out})
    );
}
