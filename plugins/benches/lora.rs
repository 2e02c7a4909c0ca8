//! What a LoRA adapter costs per decode step on the default model, against the base model in
//! the same run: batches of 1 and 8 decoding rows (each after a 64-token prompt), with no
//! adapter, every row on one adapter, and rows split between two adapters and none (the
//! mixed batches the server builds). Medians of several runs, scenarios interleaved within each
//! run so machine noise hits them alike.
//!
//! Run: `cargo bench -p plugins --bench lora` (GRAFT_BENCH_RUNS, default 5;
//! GRAFT_DEFAULT_MODEL_GGUF for the model path). Prints one JSON object; docs/BENCHMARKS.md
//! has the table.

use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use models::{BatchRow, Hook, HookCall, KvCache, Llama, LogitsWanted, Projection};
use plugins::lora::tiny::{TinyAdapter, ALL_PROJECTIONS};
use plugins::lora::{LoraAdapter, LoraParams};
use plugins::plugin::ContentHash;
use plugins::BaseModel;

const PROMPT: usize = 64;
const STEPS: usize = 64;

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
    };
    Arc::new(LoraAdapter::load("bench", dir, &base, &mut ContentHash::default()).expect("load"))
}

fn call(a: &Arc<LoraAdapter>) -> HookCall {
    let hook: Arc<dyn Hook> = a.clone();
    HookCall::new(hook, Arc::new(LoraParams { scale: 1.0 }))
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
    let qv = adapter(
        &m,
        &dir.path().join("qv"),
        8,
        &[Projection::Q, Projection::V],
        2,
    );
    let rows =
        |n: usize, pick: &dyn Fn(usize) -> Vec<HookCall>| (0..n).map(pick).collect::<Vec<_>>();
    let scenarios: Vec<(String, Vec<Vec<HookCall>>)> = [1usize, 8]
        .into_iter()
        .flat_map(|n| {
            vec![
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
            ]
        })
        .collect();
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
