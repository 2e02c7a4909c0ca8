//! What a speculative verification row costs: the default model's forward time for one row of
//! `n` tokens with logits at every position (the last sampled token plus `n - 1` drafts), after
//! a prompt (256 tokens by default), the cache cut back after each timing so every row runs at the same depth.
//! The ratio to `n = 1` is the price of verifying `n - 1` drafts; speculation breaks even when
//! a step emits that many tokens on average (accepted drafts + 1).
//!
//! Run: `cargo bench -p models --bench verify`. Env: GRAFT_BENCH_RUNS (timings per size,
//! median; default 30), GRAFT_BENCH_DEPTH (prompt tokens before the row; default 256, at most
//! 1,000), GRAFT_DEFAULT_MODEL_GGUF (model path). Prints one JSON object.

use std::time::Instant;

use candle_core::Device;
use models::{BatchRow, LogitsWanted};

const SIZES: [usize; 9] = [1, 2, 3, 4, 5, 6, 7, 8, 9];

fn main() -> anyhow::Result<()> {
    models::threads::pin_cpu_threads(None);
    let runs: usize = std::env::var("GRAFT_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let depth: usize = std::env::var("GRAFT_BENCH_DEPTH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let path = models::testing::default_model_for_tests().ok_or_else(|| {
        anyhow::anyhow!("the default model is not fetched (scripts/fetch-model.sh)")
    })?;
    let m = models::loader::load_model(&path, &Device::Cpu, 4096)?;
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("../tests/fixtures/smollm2_perplexity.json"))?;
    let ids: Vec<u32> = fixture["token_ids"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("fixture without token_ids"))?
        .iter()
        .filter_map(|v| v.as_u64().map(|id| id as u32))
        .collect();
    anyhow::ensure!(
        ids.len() >= depth + 9,
        "the fixture has {} tokens",
        ids.len()
    );
    let (prompt, next) = ids.split_at(depth);
    let mut cache = m.new_cache();
    let mut row = [BatchRow {
        seq_id: 0,
        tokens: prompt,
        cache: &mut cache,
        hooks: &[],
        logits: LogitsWanted::Last,
    }];
    m.forward(&mut row)?;
    let mut ms = Vec::new();
    let mut last_ms = Vec::new();
    for (logits, out) in [
        (LogitsWanted::All, &mut ms),
        (LogitsWanted::Last, &mut last_ms),
    ] {
        for n in SIZES {
            let mut times = Vec::with_capacity(runs);
            for _ in 0..runs + 3 {
                let t = Instant::now();
                let mut row = [BatchRow {
                    seq_id: 0,
                    tokens: &next[..n],
                    cache: &mut cache,
                    hooks: &[],
                    logits,
                }];
                m.forward(&mut row)?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
                cache.truncate(depth)?;
            }
            times.drain(..3); // warm-up
            times.sort_by(f64::total_cmp);
            out.push(times[times.len() / 2]);
        }
    }
    let json = serde_json::json!({
        "threads": candle_core::utils::get_num_threads(),
        "depth": depth,
        "runs": runs,
        "row_tokens": SIZES,
        "ms": ms,
        "cost_vs_one_token": ms.iter().map(|t| t / ms[0]).collect::<Vec<_>>(),
        "ms_last_logits_only": last_ms,
    });
    println!("{json}");
    Ok(())
}
