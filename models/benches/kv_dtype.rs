//! The KV cache's dtype at depth: for each depth, a prompt of that many tokens is prefilled
//! into a cache of each dtype (f32, f16, bf16, q8_0), the dtypes alternating, once per run (timed; the
//! last run's caches are kept), then greedy decode steps run from each in turn (the cache cut
//! back to the prompt before every run, which is exact), so the dtypes alternate on the
//! same machine state. Prints one JSON line per depth with
//! medians and every run, and the bytes per token of each cache.
//!
//! Run: `cargo bench -p models --bench kv_dtype` (scripts/bench/kv_dtype.sh). Env:
//! GRAFT_BENCH_DEPTHS (default "2048,8000": the default model's context is 8,192), GRAFT_BENCH_RUNS (5), GRAFT_BENCH_DECODE (32
//! tokens per run), GRAFT_DEFAULT_MODEL_GGUF (model path).

use std::time::Instant;

use candle_core::{Device, Tensor};
use models::kv_cache::KvCache;
use models::{BatchRow, KvDtype, Llama, LogitsWanted};

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// `n` tokens of English text: the perplexity fixture's tokens, repeated as needed.
fn prompt(n: usize) -> Vec<u32> {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("../tests/fixtures/smollm2_perplexity.json"))
            .expect("fixture");
    let ids: Vec<u32> = fixture["token_ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect();
    ids.iter().copied().cycle().take(n).collect()
}

fn argmax(out: Vec<Option<Tensor>>) -> u32 {
    let logits = out.into_iter().next().flatten().expect("logits");
    let v: Vec<f32> = logits.flatten_all().expect("flat").to_vec1().expect("vec");
    (0..v.len())
        .max_by(|&a, &b| v[a].total_cmp(&v[b]))
        .expect("argmax") as u32
}

fn step(m: &Llama, cache: &mut KvCache, tokens: &[u32]) -> u32 {
    let mut b = [BatchRow {
        seq_id: 0,
        tokens,
        cache,
        hooks: &[],
        logits: LogitsWanted::Last,
    }];
    argmax(m.forward(&mut b).expect("forward"))
}

/// Prefills `prompt` in chunks of 512 (as the server does): (cache, first token, seconds).
fn prefill(m: &Llama, prompt: &[u32]) -> (KvCache, u32, f64) {
    let mut cache = m.new_cache();
    let t = Instant::now();
    let mut next = 0;
    for chunk in prompt.chunks(512) {
        next = step(m, &mut cache, chunk);
    }
    (cache, next, t.elapsed().as_secs_f64())
}

/// Decode tokens/s of `n` greedy steps from the prompt in `cache`, which is cut back after.
fn decode(m: &Llama, cache: &mut KvCache, first: u32, n: usize) -> f64 {
    let depth = cache.len();
    let t = Instant::now();
    let mut next = first;
    for _ in 0..n {
        next = step(m, cache, &[next]);
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    cache.truncate(depth).expect("truncate");
    rate
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    models::threads::pin_cpu_threads(None);
    let depths: Vec<usize> = env("GRAFT_BENCH_DEPTHS", "2048,8000".to_string())
        .split(',')
        .filter_map(|d| d.trim().parse().ok())
        .collect();
    let runs: usize = env("GRAFT_BENCH_RUNS", 5);
    let n: usize = env("GRAFT_BENCH_DECODE", 32);
    let path = models::testing::default_model_for_tests().expect("model path");
    let most = depths.iter().max().copied().unwrap_or(0) + n + 1;
    let mut m = models::loader::load_model(&path, &Device::Cpu, most).expect("load");
    step(&m, &mut m.new_cache(), &prompt(32)); // warm-up: page in weights, size pools
    let dtypes = KvDtype::ALL;
    for depth in depths {
        let tokens = prompt(depth);
        let mut caches = Vec::new();
        let mut prefills = vec![Vec::new(); dtypes.len()];
        for _ in 0..runs {
            caches.clear();
            for (dtype, rates) in dtypes.iter().zip(&mut prefills) {
                m.set_kv_dtype(*dtype).expect("dtype");
                let (cache, first, seconds) = prefill(&m, &tokens);
                rates.push(depth as f64 / seconds);
                caches.push((cache, first));
            }
        }
        let bytes: Vec<usize> = dtypes
            .iter()
            .map(|&dtype| {
                m.set_kv_dtype(dtype).expect("dtype");
                m.kv_bytes_per_token()
            })
            .collect();
        let mut rates = vec![Vec::new(); dtypes.len()];
        for _ in 0..runs {
            for ((cache, first), rates) in caches.iter_mut().zip(&mut rates) {
                rates.push(decode(&m, cache, *first, n));
            }
        }
        let mut json = serde_json::json!({
            "depth": depth,
            "decode_tokens": n,
            "runs": runs,
            "threads": candle_core::utils::get_num_threads(),
            "first_tokens": caches.iter().map(|c| c.1).collect::<Vec<_>>(),
        });
        for (i, dtype) in dtypes.iter().enumerate() {
            json[dtype.name()] = serde_json::json!({
                "kv_bytes_per_token": bytes[i],
                "prefill_tok_s": median(prefills[i].clone()),
                "prefill_runs": prefills[i],
                "decode_tok_s": median(rates[i].clone()),
                "decode_runs": rates[i],
            });
        }
        println!("{json}");
    }
}
