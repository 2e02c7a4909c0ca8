//! Helpers shared by tests that need the real default model, and by the reference tests
//! (here and in `plugins`) that compare the decoder's distributions with fixtures.

use std::path::PathBuf;

use candle_core::{Tensor, D};

use crate::error::Result;
use crate::{BatchRow, HookCall, KvCache, Llama, LogitsWanted};

/// The default model's GGUF for tests: `GRAFT_DEFAULT_MODEL_GGUF` when set, else the
/// library's own cached copy, fetched on first use ([`crate::default_model::path`]).
/// Returns `None` (the test prints why and passes vacuously) only when the developer sets
/// `GRAFT_SKIP_REAL_MODEL=1`; a failing fetch otherwise fails the test.
pub fn default_model_for_tests() -> Option<PathBuf> {
    if std::env::var("GRAFT_SKIP_REAL_MODEL").as_deref() == Ok("1") {
        eprintln!("GRAFT_SKIP_REAL_MODEL=1: skipping a real-model test");
        return None;
    }
    if let Ok(p) = std::env::var("GRAFT_DEFAULT_MODEL_GGUF") {
        return Some(PathBuf::from(p));
    }
    match crate::default_model::path() {
        Ok(p) => Some(p),
        Err(e) => panic!("the default model is needed for this test: {e}"),
    }
}

/// One forward step of a single row: `tokens` extend `cache`, with `hooks`. Returns the
/// logits `wanted`: `(tokens, vocab)` for every position, `(1, vocab)` for the last.
pub fn step(
    m: &Llama,
    cache: &mut KvCache,
    tokens: &[u32],
    hooks: &[HookCall],
    wanted: LogitsWanted,
) -> Result<Tensor> {
    let mut rows = [BatchRow {
        seq_id: 0,
        tokens,
        cache,
        hooks,
        logits: wanted,
    }];
    m.forward(&mut rows)?
        .remove(0)
        .ok_or_else(|| crate::ModelError::Batch("no logits returned".into()))
}

/// Log-softmax of every position's logits, `tokens` fed as one prefill row with `hooks`:
/// one `vocab`-long vector per token.
pub fn log_probs(m: &Llama, tokens: &[u32], hooks: &[HookCall]) -> Result<Vec<Vec<f32>>> {
    let logits = step(m, &mut m.new_cache(), tokens, hooks, LogitsWanted::All)?;
    Ok(candle_nn::ops::log_softmax(&logits, D::Minus1)?.to_vec2()?)
}

/// The `k` most likely ids and their log-probs, most likely first.
pub fn top_k(lp: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<(u32, f32)> = lp.iter().enumerate().map(|(i, &v)| (i as u32, v)).collect();
    idx.sort_by(|a, b| b.1.total_cmp(&a.1));
    idx.truncate(k);
    idx
}

/// `n` greedy tokens after `prompt`, one decode step each through the KV cache, with `hooks`.
pub fn greedy(m: &Llama, prompt: &[u32], n: usize, hooks: &[HookCall]) -> Result<Vec<u32>> {
    let mut cache = m.new_cache();
    let mut out = Vec::with_capacity(n);
    let mut next: Vec<u32> = prompt.to_vec();
    for _ in 0..n {
        let logits = step(m, &mut cache, &next, hooks, LogitsWanted::Last)?;
        let id = logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?;
        out.push(id);
        next = vec![id];
    }
    Ok(out)
}
