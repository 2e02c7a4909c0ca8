//! What early exit buys and costs on held-out prompts (what `server eval early-exit` runs),
//! greedy, against the full model in the same run:
//!
//! - speed: decode tokens/s (prefill steps excluded, every answer run to `max_new_tokens` so
//!   each configuration does the same work but for its exits) with the plug-in at each
//!   threshold over the base's, `batch` prompts at a time, configurations interleaved per
//!   repetition;
//! - agreement, teacher-forced: along the base's own greedy answer, at every decode position,
//!   whether the early-exit step picks the base's next token; with where tokens left;
//! - drift, free-running: the share of answers identical to the base's and the full model's
//!   perplexity of the early-exit answers against that of its own.

use std::sync::Arc;

use models::{BatchRow, HookCall, Llama, LogitsWanted};
use serde::Serialize;
use serde_json::{json, Map};

use super::generate::greedy;
use super::{EarlyExit, ExitCounts};
use crate::plugin::Plugin;
use crate::train::{Progress, Quiet, Result};

#[derive(Debug, Clone, Serialize)]
pub struct EvalOptions {
    pub max_new_tokens: usize,
    pub thresholds: Vec<f32>,
    /// Prompts decoded together in the timed runs (1: one request at a time).
    pub batches: Vec<usize>,
    /// Timed repetitions of every configuration; medians are reported.
    pub repetitions: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub prompts: usize,
    /// Base decode tokens/s per batch size (median).
    pub base_tokens_per_s: Vec<(usize, f64)>,
    pub thresholds: Vec<ThresholdResult>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ThresholdResult {
    pub threshold: f32,
    /// Teacher-forced along the base's answers.
    pub agreement: f64,
    pub exit_fraction: f64,
    pub mean_exit_layer: f64,
    /// LM-head checks per decode token (each costs about as much as a few layers).
    pub checks_per_token: f64,
    /// Per batch size: tokens/s and its ratio to the base's.
    pub tokens_per_s: Vec<(usize, f64, f64)>,
    /// Free-running answers identical to the base's.
    pub identical_answers: f64,
    /// The full model's perplexity of the early-exit answers over that of its own answers.
    pub perplexity_ratio: f64,
}

/// Evaluates `plugin` on `prompts` (token ids); `stop`: end-of-turn tokens. `before`: plug-ins
/// that run before it in every chain, the base's included (a LoRA adapter, to measure whether
/// predictors trained on the base model stay valid on the adapted one).
pub fn evaluate(
    model: &Llama,
    plugin: &Arc<EarlyExit>,
    before: &[HookCall],
    prompts: &[Vec<u32>],
    stop: &[u32],
    opts: &EvalOptions,
    progress: &mut dyn Progress,
) -> Result<EvalReport> {
    let mut chains: Vec<Vec<HookCall>> = vec![before.to_vec()];
    for &t in &opts.thresholds {
        chains.push(before.iter().cloned().chain(chain(plugin, t)?).collect());
    }
    let configs = opts.thresholds.len() + 1;
    progress.phase(
        "timed runs",
        opts.repetitions * opts.batches.len() * configs,
    );
    // times[config][batch] over repetitions; config 0 is the base. The last base run's and
    // each threshold's batch-1 answers are kept.
    let mut times = vec![vec![Vec::new(); opts.batches.len()]; configs];
    let mut answers: Vec<Vec<Vec<u32>>> = vec![Vec::new(); configs];
    for _ in 0..opts.repetitions {
        for (b, &batch) in opts.batches.iter().enumerate() {
            for c in 0..configs {
                let hooks: &[HookCall] = &chains[c];
                // Every answer runs to max_new_tokens, so each configuration does the same
                // work but for its exits; answers are cut at a stop token below.
                let g = greedy(
                    model,
                    prompts,
                    hooks,
                    opts.max_new_tokens,
                    &[],
                    batch,
                    &mut Quiet,
                )?;
                times[c][b].push(g.decode_tokens() as f64 / g.decode_seconds.max(1e-9));
                if b == 0 {
                    answers[c] = g
                        .outputs
                        .into_iter()
                        .map(|o| cut_at_stop(o, stop))
                        .collect();
                }
                progress.advance(1);
            }
        }
    }
    let speed: Vec<Vec<f64>> = times
        .iter()
        .map(|per| per.iter().map(|v| median(v)).collect())
        .collect();
    let base_ppl = perplexity(model, prompts, &answers[0], before)?;
    progress.phase("teacher-forced", opts.thresholds.len());
    let mut results = Vec::new();
    for (i, &threshold) in opts.thresholds.iter().enumerate() {
        let counted = plugin.counts();
        let agreement = teacher_forced(model, prompts, &answers[0], &chains[i + 1])?;
        let counts = plugin.counts().since(&counted);
        let c = i + 1;
        let same = answers[c]
            .iter()
            .zip(&answers[0])
            .filter(|(a, b)| a == b)
            .count();
        results.push(ThresholdResult {
            threshold,
            agreement,
            exit_fraction: exit_fraction(&counts),
            mean_exit_layer: mean_exit_layer(&counts, model.config.num_layers),
            checks_per_token: counts.checks.iter().sum::<u64>() as f64
                / counts.decode_tokens.max(1) as f64,
            tokens_per_s: opts
                .batches
                .iter()
                .enumerate()
                .map(|(b, &n)| (n, speed[c][b], speed[c][b] / speed[0][b]))
                .collect(),
            identical_answers: same as f64 / prompts.len().max(1) as f64,
            perplexity_ratio: perplexity(model, prompts, &answers[c], before)? / base_ppl,
        });
        progress.advance(1);
    }
    Ok(EvalReport {
        prompts: prompts.len(),
        base_tokens_per_s: opts
            .batches
            .iter()
            .enumerate()
            .map(|(b, &n)| (n, speed[0][b]))
            .collect(),
        thresholds: results,
    })
}

/// A one-entry chain of `plugin` at `threshold`.
fn chain(plugin: &Arc<EarlyExit>, threshold: f32) -> Result<Vec<HookCall>> {
    let mut params = Map::new();
    params.insert("threshold".into(), json!(threshold));
    let hook: Arc<dyn Plugin> = plugin.clone();
    let p = hook.request_params(&params)?;
    Ok(vec![HookCall::new(hook, p)])
}

/// `output` up to and including its first stop token.
fn cut_at_stop(mut output: Vec<u32>, stop: &[u32]) -> Vec<u32> {
    if let Some(i) = output.iter().position(|t| stop.contains(t)) {
        output.truncate(i + 1);
    }
    output
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub fn exit_fraction(c: &ExitCounts) -> f64 {
    c.exits.iter().sum::<u64>() as f64 / c.decode_tokens.max(1) as f64
}

/// Mean layer tokens left after, the last layer for those that did not leave early.
pub fn mean_exit_layer(c: &ExitCounts, num_layers: usize) -> f64 {
    let exits: u64 = c.exits.iter().sum();
    let early: u64 = c.exits.iter().enumerate().map(|(l, &n)| l as u64 * n).sum();
    let stayed = c.decode_tokens.saturating_sub(exits);
    (early + stayed * (num_layers as u64 - 1)) as f64 / c.decode_tokens.max(1) as f64
}

/// Share of decode positions of `answers` where the chain's greedy token is the answer's
/// next one, each answer fed token by token after its prompt.
pub fn teacher_forced(
    model: &Llama,
    prompts: &[Vec<u32>],
    answers: &[Vec<u32>],
    hooks: &[HookCall],
) -> Result<f64> {
    let (mut agree, mut total) = (0usize, 0usize);
    for (prompt, answer) in prompts.iter().zip(answers) {
        let mut cache = model.new_cache();
        let mut feed: &[u32] = prompt;
        // Position t feeds answer[t - 1] and must predict answer[t]; t = 0 is the prompt's.
        for t in 0..answer.len() {
            let mut rows = [BatchRow {
                seq_id: 0,
                tokens: feed,
                cache: &mut cache,
                hooks,
                logits: LogitsWanted::Last,
            }];
            let logits = model.forward(&mut rows)?.remove(0);
            let logits = logits.ok_or_else(|| models::ModelError::Batch("no logits".into()))?;
            if t > 0 {
                let top = logits.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
                agree += (top == answer[t]) as usize;
                total += 1;
            }
            feed = &answer[t..=t];
        }
    }
    Ok(agree as f64 / total.max(1) as f64)
}

/// The full model's perplexity (with the chain `hooks`) of `answers` after their prompts
/// (every answer token, the first included).
pub fn perplexity(
    model: &Llama,
    prompts: &[Vec<u32>],
    answers: &[Vec<u32>],
    hooks: &[HookCall],
) -> Result<f64> {
    let (mut nll, mut count) = (0f64, 0usize);
    for (prompt, answer) in prompts.iter().zip(answers) {
        if answer.is_empty() {
            continue;
        }
        let seq: Vec<u32> = prompt.iter().chain(answer).copied().collect();
        let mut cache = model.new_cache();
        let mut rows = [BatchRow {
            seq_id: 0,
            tokens: &seq,
            cache: &mut cache,
            hooks,
            logits: LogitsWanted::All,
        }];
        let logits = model.forward(&mut rows)?.remove(0);
        let logits = logits.ok_or_else(|| models::ModelError::Batch("no logits".into()))?;
        let logp = candle_nn::ops::log_softmax(&logits, 1)?.to_vec2::<f32>()?;
        for (i, &t) in answer.iter().enumerate() {
            nll -= logp[prompt.len() - 1 + i][t as usize] as f64;
            count += 1;
        }
    }
    Ok((nll / count.max(1) as f64).exp())
}
