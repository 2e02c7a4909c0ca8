//! Single-stream speed of the default model: prefill tokens/s on a 512-token prompt, greedy
//! decode tokens/s over 128 tokens from an empty context and after the 512-token prompt,
//! medians of several runs, plus peak RSS.
//! Also decode with a chain of no-op hooks that declare every hook point, to show what the
//! hook machinery costs when plug-ins are present but idle; with no plug-ins the forward pass
//! builds no hook groups at all.
//!
//! Run: `cargo bench -p models --bench model` (scripts/bench/model_vs_llamacpp.sh runs it
//! beside llama.cpp and writes the comparison). Env: GRAFT_BENCH_RUNS (default 5),
//! GRAFT_DEFAULT_MODEL_GGUF (model path).

use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use models::hooks::NoOpHook;
use models::{BatchRow, HookCall, Llama, LogitsWanted};

const PROMPT_TOKENS: usize = 512;
const DECODE_TOKENS: usize = 128;

fn prompt() -> Vec<u32> {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("../tests/fixtures/smollm2_perplexity.json"))
            .expect("fixture");
    let ids = fixture["token_ids"].as_array().expect("ids");
    ids.iter()
        .take(PROMPT_TOKENS)
        .map(|v| v.as_u64().expect("id") as u32)
        .collect()
}

fn argmax(m: &Llama, out: Vec<Option<candle_core::Tensor>>) -> u32 {
    let logits = out.into_iter().next().flatten().expect("logits");
    let v: Vec<f32> = logits.flatten_all().expect("flat").to_vec1().expect("vec");
    let _ = m;
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .expect("argmax")
}

/// Prefill of `prompt` into a fresh cache, then `DECODE_TOKENS` greedy steps:
/// (prefill seconds, decode seconds). With a one-token prompt this is decode at depth 0, as
/// llama-bench's `tg` test; with the full prompt, decode at depth 512.
fn run(m: &Llama, prompt: &[u32], hooks: &[HookCall]) -> (f64, f64) {
    let mut cache = m.new_cache();
    let t = Instant::now();
    let mut b = [BatchRow {
        seq_id: 0,
        tokens: prompt,
        cache: &mut cache,
        hooks,
        logits: LogitsWanted::Last,
    }];
    let mut next = argmax(m, m.forward(&mut b).expect("prefill"));
    let prefill = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..DECODE_TOKENS {
        let tok = [next];
        let mut b = [BatchRow {
            seq_id: 0,
            tokens: &tok,
            cache: &mut cache,
            hooks,
            logits: LogitsWanted::Last,
        }];
        next = argmax(m, m.forward(&mut b).expect("decode"));
    }
    (prefill, t.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

fn main() {
    models::threads::pin_cpu_threads(None);
    let runs: usize = std::env::var("GRAFT_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let path = models::testing::default_model_for_tests().expect("model path");
    let m = models::loader::load_model(&path, &Device::Cpu, 4096).expect("load");
    let prompt = prompt();
    run(&m, &prompt[..32], &[]); // warm-up: page in weights, size thread pools
    let noop = Arc::new(NoOpHook);
    let chain = [HookCall::bare(noop)];
    let (mut pf, mut dc, mut dc_deep, mut dc_hooks) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let (p, d) = run(&m, &prompt, &[]);
        pf.push(PROMPT_TOKENS as f64 / p);
        dc_deep.push(DECODE_TOKENS as f64 / d);
        dc.push(DECODE_TOKENS as f64 / run(&m, &prompt[..1], &[]).1);
        dc_hooks.push(DECODE_TOKENS as f64 / run(&m, &prompt[..1], &chain).1);
    }
    let json = serde_json::json!({
        "engine": "graft",
        "threads": candle_core::utils::get_num_threads(),
        "runs": runs,
        "prefill_tokens": PROMPT_TOKENS,
        "decode_tokens": DECODE_TOKENS,
        "prefill_tok_s": median(pf.clone()),
        "decode_tok_s": median(dc.clone()),
        "decode_depth512_tok_s": median(dc_deep.clone()),
        "decode_noop_hooks_tok_s": median(dc_hooks.clone()),
        "prefill_runs": pf,
        "decode_runs": dc,
        "decode_depth512_runs": dc_deep,
        "decode_noop_hooks_runs": dc_hooks,
        "peak_rss_mib": peak_rss_mib(),
    });
    println!("{json}");
}
