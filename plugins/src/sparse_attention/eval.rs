//! Evaluating a sparse-attention plug-in on long held-out text (what `server eval
//! long-context` runs), at each context length:
//!
//! - **Recall**: for query positions sampled from each window's last `tail` tokens, per gated
//!   layer, the share of the true attention mass (summed over a block's keys, averaged over
//!   the group's query heads, the query's own block included) that the blocks read hold, at
//!   each token budget, for four selections: the gate's (exactly the decode path's
//!   arithmetic and [`select`]); the oracle (the true heaviest blocks); Quest's (Tang et al.
//!   2024: per block and channel the min and max of the post-RoPE keys bound `q · k`, the
//!   group's heads take the largest bound); recency (the latest blocks). Every selection reads
//!   the current block; gate, Quest and recency also the sink block when the file forces it.
//! - **Decode**: the last `tail` tokens of each window fed as single-token decode steps after
//!   a dense prefill of the rest, teacher-forced, densely and with the plug-in at each budget:
//!   perplexity of those tokens, agreement of the top token with the dense run's, the share
//!   of keys read, and decode tokens per second of the same loop (`repetitions` timed runs,
//!   configurations alternating, medians).

use std::time::Instant;

use candle_core::{Device, Tensor, D};
use models::hooks::HookParams;
use models::rope::Rope;
use models::{BatchRow, HookCall, Llama, LogitsWanted};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use super::capture::{self, LayerCapture};
use super::gate::{self, pool};
use super::oracle::Oracle;
use super::select::{select, Budget};
use super::SparseAttention;
use crate::train::{Progress, Result};

/// `server eval long-context`'s settings.
#[derive(Debug, Clone, Serialize)]
pub struct EvalOptions {
    /// Context lengths (multiples of the block size).
    pub contexts: Vec<usize>,
    /// Token budgets for recall and decoding.
    pub budgets: Vec<usize>,
    /// Windows per context length.
    pub windows: usize,
    /// Scored tokens at the end of each window (decode steps, and where recall's queries lie).
    pub tail: usize,
    /// Query positions per window for recall.
    pub queries: usize,
    /// Timed decode runs of every configuration (medians reported).
    pub repetitions: usize,
    /// Also decode with the oracle's selection at every budget (slow; not timed).
    pub oracle: bool,
    pub seed: u64,
}

/// Recall of one selection method at one context and budget.
#[derive(Debug, Clone, Serialize)]
pub struct RecallRow {
    pub context: usize,
    pub budget: usize,
    pub method: &'static str,
    /// Per gated layer (from `dense_layers` on).
    pub per_layer: Vec<f64>,
    pub mean: f64,
}

/// One decode configuration at one context length, over every window.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeRow {
    pub context: usize,
    /// `dense`, `gate` (the plug-in) or `oracle` (the true heaviest blocks; not timed).
    pub selection: &'static str,
    /// `None`: dense.
    pub budget: Option<usize>,
    pub tokens: usize,
    pub perplexity: f64,
    /// Share of steps whose top token is the dense run's.
    pub agreement: f64,
    /// Keys read over keys in context, gated layers (1 for dense).
    pub read_fraction: f64,
    /// Median over repetitions of decode tokens/s over every window.
    pub tokens_per_s: f64,
    /// Median over repetitions of the dense run's time over this one's.
    pub speedup: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub options: EvalOptions,
    pub recall: Vec<RecallRow>,
    pub decode: Vec<DecodeRow>,
}

pub const METHODS: [&str; 4] = ["gate", "oracle", "quest", "recency"];

/// Runs the evaluation on `windows_by_context[i]` (token windows of `contexts[i]` tokens).
pub fn evaluate(
    model: &Llama,
    plugin: &std::sync::Arc<SparseAttention>,
    windows_by_context: &[Vec<Vec<u32>>],
    opts: &EvalOptions,
    progress: &mut dyn Progress,
) -> Result<EvalReport> {
    let mut recall = Vec::new();
    let mut decode = Vec::new();
    let oracle = std::sync::Arc::new(Oracle::new(&model.config, plugin.config.block_size));
    for (&context, windows) in opts.contexts.iter().zip(windows_by_context) {
        progress.phase(&format!("{context} tokens"), windows.len());
        let mut sums = RecallSums::new(plugin, opts);
        let mut runs: Vec<DecodeSums> = Vec::new();
        for (w, window) in windows.iter().enumerate() {
            let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed + w as u64);
            let mut positions: Vec<usize> = (context - opts.tail..context).collect();
            positions.shuffle(&mut rng);
            positions.truncate(opts.queries);
            positions.sort_unstable();
            let layers = capture::capture(model, window, &positions)?;
            sums.add(model, &layers, &positions)?;
            let budgets = std::iter::once(None).chain(opts.budgets.iter().map(|&b| Some(b)));
            let mut configs: Vec<Selection> = budgets
                .map(|b| b.map_or(Selection::Dense, Selection::Gate))
                .collect();
            if opts.oracle {
                configs.extend(opts.budgets.iter().map(|&b| Selection::Oracle(b)));
            }
            let prefilled = prefill(model, plugin, &oracle, window, opts.tail)?;
            let mut dense_top = Vec::new();
            // Configurations alternate within each repetition, so drifts in the machine's
            // speed fall on all of them alike; the oracle (never timed) runs once.
            for rep in 0..opts.repetitions.max(1) {
                for (i, &config) in configs.iter().enumerate() {
                    if rep > 0 && matches!(config, Selection::Oracle(_)) {
                        continue;
                    }
                    let cache = prefilled.fork()?;
                    let hooks = config.hooks(plugin, &oracle);
                    let run =
                        decode_tail(model, plugin, cache, window, opts.tail, &hooks, &dense_top)?;
                    let run = DecodeSums {
                        selection: config,
                        ..run
                    };
                    if i == 0 && rep == 0 {
                        dense_top = run.top.clone();
                    }
                    match runs.get_mut(i) {
                        Some(r) => r.add(&run, rep),
                        None => runs.push(run),
                    }
                }
            }
            progress.advance(1);
        }
        recall.extend(sums.rows(context));
        let dense_seconds = runs.first().map(|r| r.seconds.clone()).unwrap_or_default();
        for run in runs {
            decode.push(run.row(context, &dense_seconds));
        }
    }
    Ok(EvalReport {
        options: opts.clone(),
        recall,
        decode,
    })
}

/// Running sums of recall per budget, method and layer for one context length.
struct RecallSums<'a> {
    plugin: &'a SparseAttention,
    budgets: Vec<usize>,
    /// `[budget][method][gated layer]`.
    sums: Vec<Vec<Vec<f64>>>,
    count: usize,
    rope: Option<Rope>,
}

impl<'a> RecallSums<'a> {
    fn new(plugin: &'a SparseAttention, opts: &EvalOptions) -> Self {
        let gated = plugin.gates.len() - plugin.config.dense_layers;
        Self {
            plugin,
            budgets: opts.budgets.clone(),
            sums: vec![vec![vec![0.0; gated]; METHODS.len()]; opts.budgets.len()],
            count: 0,
            rope: None,
        }
    }

    fn add(&mut self, model: &Llama, layers: &[LayerCapture], positions: &[usize]) -> Result<()> {
        let t = layers[0].keys.dim(0)?;
        if self.rope.as_ref().is_none_or(|r| r.max_positions() < t) {
            self.rope = Some(Rope::new(&model.config, t, &Device::Cpu)?);
        }
        let Some(rope) = self.rope.as_ref() else {
            return Ok(());
        };
        let p = self.plugin;
        let b = p.config.block_size;
        for (slot, l) in (p.config.dense_layers..layers.len()).enumerate() {
            let Some(gate) = p.gate(l) else { continue };
            let truth = capture::block_truth(rope, &layers[l], positions, b)?;
            let mass = truth.mass.flatten_all()?.to_vec1::<f32>()?; // (h, N, B)
            let scorer = Scorer::new(p, gate, rope, &layers[l], positions)?;
            let nb = t / b;
            for (i, &pos) in positions.iter().enumerate() {
                for h in 0..p.shape.kv_heads {
                    let m = &mass[(h * positions.len() + i) * nb..][..nb];
                    let current = pos / b;
                    let mut scores = scorer.scores(i, h, current);
                    scores[1] = m[..current].to_vec();
                    for (bi, &budget) in self.budgets.iter().enumerate() {
                        for (mi, s) in scores.iter().enumerate() {
                            let sink = p.config.sink_block && METHODS[mi] != "oracle";
                            let chosen = select(s, current, Budget::Tokens(budget), b, sink);
                            let kept: f64 = chosen.iter().map(|&j| m[j as usize] as f64).sum();
                            self.sums[bi][mi][slot] += kept;
                        }
                    }
                }
            }
        }
        self.count += positions.len() * p.shape.kv_heads;
        Ok(())
    }

    fn rows(&self, context: usize) -> Vec<RecallRow> {
        let n = self.count.max(1) as f64;
        let mut rows = Vec::new();
        for (bi, &budget) in self.budgets.iter().enumerate() {
            for (mi, method) in METHODS.iter().enumerate() {
                let per_layer: Vec<f64> = self.sums[bi][mi].iter().map(|s| s / n).collect();
                let mean = per_layer.iter().sum::<f64>() / per_layer.len().max(1) as f64;
                rows.push(RecallRow {
                    context,
                    budget,
                    method,
                    per_layer,
                    mean,
                });
            }
        }
        rows
    }
}

/// Block scores of one captured layer for every method of [`METHODS`].
struct Scorer {
    /// Gate queries per sampled position, `(h, d_g)` each.
    gate_queries: Vec<Vec<f32>>,
    /// `(B, h, d_g)`.
    gate_keys: Vec<f32>,
    /// Post-RoPE queries per sampled position, `(n_heads, d)`.
    queries: Vec<Vec<f32>>,
    /// Per block and kv head: channel-wise max and min of the post-RoPE keys, `(B, h, 2, d)`.
    bounds: Vec<f32>,
    shape: gate::GateShape,
    group: usize,
    head_dim: usize,
}

impl Scorer {
    fn new(
        p: &SparseAttention,
        gate: &gate::LayerGate,
        rope: &Rope,
        c: &LayerCapture,
        positions: &[usize],
    ) -> Result<Self> {
        let (t, h, d) = c.keys.dims3()?;
        let b = p.config.block_size;
        let raw = c.keys.flatten_all()?.to_vec1::<f32>()?;
        let width = h * d;
        let gate_keys: Vec<f32> = raw
            .chunks_exact(b * width)
            .enumerate()
            .flat_map(|(j, block)| gate.key(&p.shape, &pool(block, h, d), j * b))
            .collect();
        let q_raw = c.queries.flatten_all()?.to_vec1::<f32>()?;
        let heads = c.queries.dim(1)?;
        let gate_queries = positions
            .iter()
            .enumerate()
            .map(|(i, &pos)| gate.query(&p.shape, &q_raw[i * heads * d..(i + 1) * heads * d], pos))
            .collect();
        let all = Tensor::arange(0u32, t as u32, &Device::Cpu)?;
        let (cos, sin) = rope.tables(&all)?;
        let keys = Rope::apply(&c.keys, &cos, &sin)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut bounds = Vec::with_capacity(t / b * h * 2 * d);
        for block in keys.chunks_exact(b * width) {
            let pooled = pool(block, h, d); // (h, 3d): max, min, mean
            for head in pooled.chunks_exact(3 * d) {
                bounds.extend_from_slice(&head[..2 * d]);
            }
        }
        let q_pos: Vec<u32> = positions.iter().map(|&x| x as u32).collect();
        let (cos, sin) = rope.tables(&Tensor::new(q_pos.as_slice(), &Device::Cpu)?)?;
        let q = Rope::apply(&c.queries, &cos, &sin)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let queries = q.chunks_exact(heads * d).map(<[f32]>::to_vec).collect();
        Ok(Self {
            gate_queries,
            gate_keys,
            queries,
            bounds,
            shape: p.shape.clone(),
            group: heads / h,
            head_dim: d,
        })
    }

    /// Scores of blocks `0..current` for query `i` and kv head `h`, in [`METHODS`] order,
    /// the oracle's left empty: they are the true masses, which the caller holds.
    fn scores(&self, i: usize, h: usize, current: usize) -> [Vec<f32>; 4] {
        let dg = self.shape.gate_dim;
        let closed = &self.gate_keys[..current * self.shape.kv_heads * dg];
        let gate = gate::scores(&self.shape, &self.gate_queries[i], closed, h);
        let d = self.head_dim;
        let quest = (0..current)
            .map(|j| {
                let bound = &self.bounds[(j * self.shape.kv_heads + h) * 2 * d..][..2 * d];
                let (max, min) = bound.split_at(d);
                (0..self.group)
                    .map(|g| {
                        let q = &self.queries[i][(h * self.group + g) * d..][..d];
                        (0..d)
                            .map(|c| (q[c] * max[c]).max(q[c] * min[c]))
                            .sum::<f32>()
                    })
                    .fold(f32::NEG_INFINITY, f32::max)
            })
            .collect();
        let recency = (0..current).map(|j| j as f32).collect();
        [gate, Vec::new(), quest, recency]
    }
}

/// Which blocks a decode run reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Selection {
    Dense,
    Gate(usize),
    Oracle(usize),
}

impl Selection {
    fn hooks(
        self,
        plugin: &std::sync::Arc<SparseAttention>,
        oracle: &std::sync::Arc<Oracle>,
    ) -> Vec<HookCall> {
        match self {
            Selection::Dense => Vec::new(),
            Selection::Gate(b) => vec![call(plugin.clone(), b)],
            Selection::Oracle(b) => vec![call(oracle.clone(), b)],
        }
    }
}

/// One decode configuration's runs over windows' tails.
struct DecodeSums {
    selection: Selection,
    nll: f64,
    tokens: usize,
    agree: usize,
    /// Per repetition: seconds over every window.
    seconds: Vec<f64>,
    context_keys: u64,
    read_keys: u64,
    /// The first run's top tokens (the dense run's are what later runs agree with).
    top: Vec<u32>,
}

impl DecodeSums {
    /// Adds a run of repetition `rep`: its time, and on the first repetition what it computed
    /// (the same in every repetition).
    fn add(&mut self, other: &DecodeSums, rep: usize) {
        if self.seconds.len() <= rep {
            self.seconds.resize(rep + 1, 0.0);
        }
        self.seconds[rep] += other.seconds[0];
        if rep > 0 {
            return;
        }
        self.nll += other.nll;
        self.tokens += other.tokens;
        self.agree += other.agree;
        self.context_keys += other.context_keys;
        self.read_keys += other.read_keys;
    }

    /// The row, timed against the dense configuration's seconds per repetition.
    fn row(&self, context: usize, dense_seconds: &[f64]) -> DecodeRow {
        let n = self.tokens.max(1) as f64;
        let rates: Vec<f64> = self.seconds.iter().map(|s| n / s.max(1e-9)).collect();
        let ratios: Vec<f64> = dense_seconds
            .iter()
            .zip(&self.seconds)
            .map(|(d, s)| d / s.max(1e-9))
            .collect();
        let (selection, budget) = match self.selection {
            Selection::Dense => ("dense", None),
            Selection::Gate(b) => ("gate", Some(b)),
            Selection::Oracle(b) => ("oracle", Some(b)),
        };
        let timed = selection != "oracle";
        DecodeRow {
            context,
            selection,
            budget,
            tokens: self.tokens,
            perplexity: (self.nll / n).exp(),
            agreement: self.agree as f64 / n,
            read_fraction: match self.context_keys {
                0 => 1.0,
                c => self.read_keys as f64 / c as f64,
            },
            tokens_per_s: if timed { median(rates) } else { 0.0 },
            speedup: if timed { median(ratios) } else { 0.0 },
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A cache holding `window[..len - tail - 1]`, prefilled densely with the plug-in and the
/// oracle in the chain (so their states hold what they need; the dense runs ignore them).
fn prefill(
    model: &Llama,
    plugin: &std::sync::Arc<SparseAttention>,
    oracle: &std::sync::Arc<Oracle>,
    window: &[u32],
    tail: usize,
) -> Result<models::KvCache> {
    let hooks = [
        call(plugin.clone(), plugin.config.budget),
        call(oracle.clone(), plugin.config.budget),
    ];
    let mut cache = model.new_cache();
    for chunk in window[..window.len() - tail - 1].chunks(1024) {
        let mut rows = [BatchRow {
            seq_id: 0,
            tokens: chunk,
            cache: &mut cache,
            hooks: &hooks,
            logits: LogitsWanted::None,
        }];
        model.forward(&mut rows)?;
    }
    Ok(cache)
}

fn call(hook: std::sync::Arc<dyn models::Hook>, budget: usize) -> HookCall {
    HookCall::new(
        hook,
        std::sync::Arc::new(Budget::Tokens(budget)) as HookParams,
    )
}

/// Feeds the rest of `window` after the prefilled `cache` one token per decode step with
/// `hooks`, scoring `window[len - tail..]`.
fn decode_tail(
    model: &Llama,
    plugin: &std::sync::Arc<SparseAttention>,
    mut cache: models::KvCache,
    window: &[u32],
    tail: usize,
    hooks: &[HookCall],
    dense_top: &[u32],
) -> Result<DecodeSums> {
    let split = window.len() - tail - 1;
    let before = plugin.reads();
    let mut sums = DecodeSums {
        selection: Selection::Dense,
        nll: 0.0,
        tokens: 0,
        agree: 0,
        seconds: Vec::new(),
        context_keys: 0,
        read_keys: 0,
        top: Vec::with_capacity(tail),
    };
    let started = Instant::now();
    for t in split..window.len() - 1 {
        let token = &window[t..t + 1];
        let logits = models::testing::step(model, &mut cache, token, hooks, LogitsWanted::Last)?;
        let lp =
            candle_nn::ops::log_softmax(&logits.flatten_all()?, D::Minus1)?.to_vec1::<f32>()?;
        sums.nll -= lp[window[t + 1] as usize] as f64;
        let top = (0..lp.len())
            .max_by(|&a, &b| lp[a].total_cmp(&lp[b]))
            .unwrap_or(0) as u32;
        sums.agree += usize::from(dense_top.get(sums.tokens).is_none_or(|&d| d == top));
        sums.top.push(top);
        sums.tokens += 1;
    }
    sums.seconds = vec![started.elapsed().as_secs_f64()];
    let after = plugin.reads();
    if hooks.iter().any(|h| {
        std::ptr::addr_eq(
            std::sync::Arc::as_ptr(&h.hook),
            std::sync::Arc::as_ptr(plugin),
        )
    }) {
        sums.context_keys = after.1 - before.1;
        sums.read_keys = after.2 - before.2;
    }
    Ok(sums)
}
