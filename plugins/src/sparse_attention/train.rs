//! Training the gates (what `server train sparse-attention` runs): SeerAttention-R's
//! self-distillation at this project's scale.
//!
//! 1. The text is tokenised, joined and cut into windows of `length` tokens; a seeded
//!    shuffle picks `sequences` of them, the last tenth held out.
//! 2. Each window runs once densely through the frozen model ([`capture`]): per layer, the
//!    pre-RoPE keys of every position and the pre-RoPE queries of `queries` positions drawn
//!    from the window's second half (the paper's `loss_slice_ratio` of 0.5). Caching every
//!    position's queries for every layer would not fit in memory at 8k tokens (30 layers x
//!    576 floats per token); a sample of positions does, so the trainer subsamples
//!    positions and keeps every key.
//! 3. From them, per layer, the ground truth ([`capture::block_truth`]) and the gate's inputs
//!    (the sampled queries grouped per key/value head; every block's pooled keys).
//! 4. Each layer's gate is fitted on its own (the forward stays dense, so layers are
//!    independent) by AdamW on `KL(truth || softmax(gate scores))`, learning rate with 20
//!    warm-up steps and a cosine decay to 1% (the paper's recipe), weight decay 0.
//! 5. On the held-out windows: per layer the KL and the truth's mass the default budget's
//!    selection keeps ([`Report`]).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use models::rope::Rope;
use models::Llama;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::capture;
use super::config::{SparseAttentionConfig, TYPE};
use super::gate::{GateShape, LayerGate};
use super::SparseAttention;
use crate::base::{BaseIdentity, BaseModel};
use crate::train::prompts::tokens;
use crate::train::{Progress, Result, TrainError};

/// `server train sparse-attention`'s settings.
#[derive(Debug, Clone, Serialize)]
pub struct TrainOptions {
    /// Tokens per training window (a multiple of `block_size`).
    pub length: usize,
    /// Windows used (the last tenth, at least one, held out).
    pub sequences: usize,
    /// Query positions sampled per window, from its second half.
    pub queries: usize,
    pub block_size: usize,
    pub gate_dim: usize,
    pub dense_layers: usize,
    pub sink_block: bool,
    /// The default budget written to the file and used for the report.
    pub budget: usize,
    /// AdamW steps per layer, each over `batch` windows.
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    /// What the gate learns to predict over the earlier blocks.
    pub target: Target,
    pub seed: u64,
}

/// The distribution over earlier blocks each gate is fitted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// SeerAttention-R's: each block's largest attention probability (over its keys and the
    /// group's heads), renormalised.
    #[default]
    Peak,
    /// Each block's attention mass (summed over its keys, averaged over the group's heads),
    /// renormalised: what a selection's recall counts.
    Mass,
}

/// One layer's training material: per window, the gate's inputs and the ground truth.
struct LayerExamples {
    /// `(S, N, h, g·d)`: sampled queries grouped per key/value head.
    queries: Tensor,
    /// `(S, B, h, 3d)`: pooled keys.
    blocks: Tensor,
    /// `(S, h, N, B)`.
    target: Tensor,
    /// `(S, N)` positions of the sampled queries.
    positions: Vec<Vec<usize>>,
}

/// What `report.json` holds: per gated layer, on the held-out windows.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub options: TrainOptions,
    pub train_windows: usize,
    pub heldout_windows: usize,
    pub layers: Vec<LayerReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    pub layer: usize,
    pub final_train_kl: f32,
    pub heldout_kl: f32,
    /// Attention mass of the blocks before the query's own that the default budget's
    /// selection reads (the current block aside), as a share of those blocks' mass.
    pub heldout_recall: f32,
}

/// Cuts the documents, each as token ids, joined with `separator` between them, into windows
/// of `length` tokens (the rest is dropped).
pub fn windows(documents: &[Vec<u32>], separator: &[u32], length: usize) -> Vec<Vec<u32>> {
    let mut all = Vec::new();
    for doc in documents {
        if !all.is_empty() {
            all.extend_from_slice(separator);
        }
        all.extend_from_slice(doc);
    }
    all.chunks_exact(length.max(1))
        .map(<[u32]>::to_vec)
        .collect()
}

/// Plain-text files as token ids (no special tokens parsed), joined with a blank line
/// between them when cut into windows: what training and evaluation read.
pub struct Text {
    documents: Vec<Vec<u32>>,
    separator: Vec<u32>,
}

impl Text {
    pub fn read(
        loaded: &models::bundle::LoadedModel,
        paths: &[std::path::PathBuf],
    ) -> Result<Self> {
        let mut documents = Vec::with_capacity(paths.len());
        for path in paths {
            let text = std::fs::read_to_string(path).map_err(|source| TrainError::Unreadable {
                path: path.clone(),
                source,
            })?;
            documents.push(tokens(loaded, &text, false)?);
        }
        let separator = tokens(loaded, "\n\n", false)?;
        Ok(Self {
            documents,
            separator,
        })
    }

    /// The text cut into windows of `length` tokens ([`windows`]).
    pub fn windows(&self, length: usize) -> Vec<Vec<u32>> {
        windows(&self.documents, &self.separator, length)
    }
}

/// Trains a plug-in named `name` on `windows` (token ids, `opts.length` each).
pub fn train(
    model: &Llama,
    base: &BaseModel,
    name: &str,
    windows: &[Vec<u32>],
    opts: &TrainOptions,
    progress: &mut dyn Progress,
) -> Result<(SparseAttention, Report)> {
    let config = config_of(base, opts);
    let layers = base.config.num_layers;
    let b = opts.block_size;
    if !opts.length.is_multiple_of(b) || opts.length < 4 * b || opts.queries == 0 {
        return Err(TrainError::BadOption(format!(
            "--length must be a multiple of the block size {b}, at least 4 blocks, with queries"
        )));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let mut picked: Vec<&Vec<u32>> = windows.iter().filter(|w| w.len() == opts.length).collect();
    picked.shuffle(&mut rng);
    picked.truncate(opts.sequences);
    if picked.len() < 2 || opts.dense_layers >= layers {
        return Err(TrainError::BadOption(format!(
            "need at least 2 windows of {} tokens (got {}) and a gated layer",
            opts.length,
            picked.len()
        )));
    }
    let heldout = (picked.len() / 10).max(1);
    let per_layer = capture_all(model, base, &picked, opts, &mut rng, progress)?;
    let shape = super::shape_of(&config);
    let split = picked.len() - heldout;
    progress.phase("gates", layers - opts.dense_layers);
    let mut gates = HashMap::new();
    let mut reports = Vec::new();
    for (l, examples) in per_layer.into_iter().enumerate().skip(opts.dense_layers) {
        let (train_part, test_part) = examples.split_at(split);
        let train_ex = stack(&shape, train_part)?;
        let test_ex = stack(&shape, test_part)?;
        let (gate, final_kl) = fit(&shape, &train_ex, opts, opts.seed + l as u64, l, progress)?;
        let vars = GateVars::of(&shape, &gate)?;
        let (heldout_kl, recall) = heldout_scores(&shape, &vars, &test_ex, opts)?;
        reports.push(LayerReport {
            layer: l,
            final_train_kl: final_kl,
            heldout_kl,
            heldout_recall: recall,
        });
        gates.insert(l, gate);
        progress.advance(1);
    }
    let plugin = SparseAttention::new(name, config, gates, base)?;
    let report = Report {
        options: opts.clone(),
        train_windows: split,
        heldout_windows: heldout,
        layers: reports,
    };
    Ok((plugin, report))
}

/// One window's material for one layer: its sampled queries `(N, n_heads, d)`, pooled key
/// blocks `(B, h, 3d)`, the target `(h, N, B)` and the sampled positions.
struct WindowLayer {
    queries: Tensor,
    blocks: Tensor,
    target: Tensor,
    positions: Vec<usize>,
}

/// Runs every window through the model once; returns, per layer (empty below
/// `dense_layers`), each window's [`WindowLayer`].
fn capture_all(
    model: &Llama,
    base: &BaseModel,
    picked: &[&Vec<u32>],
    opts: &TrainOptions,
    rng: &mut impl Rng,
    progress: &mut dyn Progress,
) -> Result<Vec<Vec<WindowLayer>>> {
    let rope = Rope::new(&base.config, opts.length, &Device::Cpu)?;
    progress.phase("capture", picked.len());
    let mut per_layer: Vec<Vec<WindowLayer>> =
        (0..base.config.num_layers).map(|_| Vec::new()).collect();
    for window in picked {
        let positions = sample_positions(rng, opts.length, opts.queries);
        let captured = capture::capture(model, window, &positions)?;
        for (l, c) in captured.into_iter().enumerate().skip(opts.dense_layers) {
            let truth = capture::block_truth(&rope, &c, &positions, opts.block_size)?;
            per_layer[l].push(WindowLayer {
                target: match opts.target {
                    Target::Peak => truth.target,
                    Target::Mass => truth.mass_target,
                },
                blocks: capture::pooled_blocks(&c.keys, opts.block_size)?,
                queries: c.queries,
                positions: positions.clone(),
            });
        }
        progress.advance(1);
    }
    Ok(per_layer)
}

/// The file's config for a gate trained with `opts` on `base`.
pub fn config_of(base: &BaseModel, opts: &TrainOptions) -> SparseAttentionConfig {
    let c = &base.config;
    SparseAttentionConfig {
        kind: TYPE.to_string(),
        base_model: BaseIdentity::of(base),
        num_heads: c.num_heads,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
        block_size: opts.block_size,
        gate_dim: opts.gate_dim,
        rope_theta: c.rope_theta,
        norm_eps: 1e-6,
        dense_layers: opts.dense_layers,
        sink_block: opts.sink_block,
        budget: opts.budget,
    }
}

/// `n` distinct positions of the window's second half, ascending.
fn sample_positions(rng: &mut impl Rng, length: usize, n: usize) -> Vec<usize> {
    let mut all: Vec<usize> = (length / 2..length).collect();
    all.shuffle(rng);
    all.truncate(n);
    all.sort_unstable();
    all
}

/// Stacks windows' captures into one layer's [`LayerExamples`].
fn stack(shape: &GateShape, part: &[WindowLayer]) -> Result<LayerExamples> {
    let (h, gd) = (shape.kv_heads, shape.query_inputs());
    let queries: Vec<Tensor> = part
        .iter()
        .map(|w| {
            let n = w.queries.dim(0)?;
            w.queries.reshape((n, h, gd))
        })
        .collect::<candle_core::Result<_>>()?;
    let blocks: Vec<Tensor> = part.iter().map(|w| w.blocks.clone()).collect();
    let target: Vec<Tensor> = part.iter().map(|w| w.target.clone()).collect();
    Ok(LayerExamples {
        queries: Tensor::stack(&queries, 0)?,
        blocks: Tensor::stack(&blocks, 0)?,
        target: Tensor::stack(&target, 0)?,
        positions: part.iter().map(|w| w.positions.clone()).collect(),
    })
}

/// The trainable form of one [`LayerGate`].
pub struct GateVars {
    q_proj: Var,
    k_proj: Var,
    q_norm: Var,
    k_norm: Var,
}

impl GateVars {
    pub fn of(shape: &GateShape, g: &LayerGate) -> Result<Self> {
        let (h, dg) = (shape.kv_heads, shape.gate_dim);
        let dev = Device::Cpu;
        let var = |v: &[f32], s: &[usize]| Var::from_tensor(&Tensor::from_slice(v, s, &dev)?);
        Ok(Self {
            q_proj: var(&g.q_proj, &[h, dg, shape.query_inputs()])?,
            k_proj: var(&g.k_proj, &[h, dg, shape.key_inputs()])?,
            q_norm: var(&g.q_norm, &[dg])?,
            k_norm: var(&g.k_norm, &[dg])?,
        })
    }

    /// A fresh gate: projections uniform in `±1/sqrt(inputs)` (PyTorch's `nn.Linear`), norms 1.
    fn init(shape: &GateShape, rng: &mut impl Rng) -> LayerGate {
        let mut uniform = |n: usize, inputs: usize| -> Vec<f32> {
            let bound = 1.0 / (inputs as f32).sqrt();
            (0..n).map(|_| rng.random_range(-bound..bound)).collect()
        };
        let (h, dg) = (shape.kv_heads, shape.gate_dim);
        LayerGate {
            q_proj: uniform(h * dg * shape.query_inputs(), shape.query_inputs()),
            k_proj: uniform(h * dg * shape.key_inputs(), shape.key_inputs()),
            q_norm: vec![1.0; dg],
            k_norm: vec![1.0; dg],
        }
    }

    fn vars(&self) -> Vec<Var> {
        vec![
            self.q_proj.clone(),
            self.k_proj.clone(),
            self.q_norm.clone(),
            self.k_norm.clone(),
        ]
    }

    pub fn gate(&self) -> Result<LayerGate> {
        let flat = |v: &Var| v.as_tensor().flatten_all()?.to_vec1::<f32>();
        Ok(LayerGate {
            q_proj: flat(&self.q_proj)?,
            k_proj: flat(&self.k_proj)?,
            q_norm: flat(&self.q_norm)?,
            k_norm: flat(&self.k_norm)?,
        })
    }

    /// Log-probabilities over blocks, `(S, h, N, B)`, for `queries` `(S, N, h, g·d)` at
    /// `positions` and pooled `blocks` `(S, B, h, 3d)`; blocks at or after a query's own get
    /// (almost) none. The tensor form of [`LayerGate::query`], [`LayerGate::key`] and
    /// [`super::gate::scores`].
    pub fn log_probs(
        &self,
        shape: &GateShape,
        queries: &Tensor,
        blocks: &Tensor,
        positions: &[Vec<usize>],
        block: usize,
    ) -> Result<Tensor> {
        let (s, n, h, _) = queries.dims4()?;
        let nb = blocks.dim(1)?;
        let q_pos: Vec<usize> = positions.iter().flatten().copied().collect();
        let k_pos: Vec<usize> = (0..s).flat_map(|_| (0..nb).map(|j| j * block)).collect();
        let q = branch(shape, queries, &self.q_proj, &self.q_norm, &q_pos)?; // (h, S*N, dg)
        let k = branch(shape, blocks, &self.k_proj, &self.k_norm, &k_pos)?; // (h, S*B, dg)
        let dg = shape.gate_dim;
        let q = q.reshape((h * s, n, dg))?;
        let k = k.reshape((h * s, nb, dg))?;
        let logits = (q.matmul(&k.t()?)? / (dg as f64).sqrt())?.reshape((h, s, n, nb))?;
        let mut mask = vec![0f32; s * n * nb];
        for (i, &p) in q_pos.iter().enumerate() {
            mask[i * nb + p / block..(i + 1) * nb].fill(-1e9);
        }
        let mask = Tensor::from_vec(mask, (1, s, n, nb), queries.device())?;
        let logits = logits.broadcast_add(&mask)?;
        let max = logits.max_keepdim(D::Minus1)?;
        let shifted = logits.broadcast_sub(&max)?;
        let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        Ok(shifted.broadcast_sub(&lse)?.transpose(0, 1)?)
    }
}

/// One branch of the gate for `x` `(S, M, h, inputs)` at `positions` (`S·M` of them):
/// projection per key/value head, RMSNorm, RoPE. Returns `(h, S·M, d_g)`.
fn branch(
    shape: &GateShape,
    x: &Tensor,
    proj: &Var,
    norm: &Var,
    positions: &[usize],
) -> Result<Tensor> {
    let (s, m, h, inputs) = x.dims4()?;
    let x = x
        .reshape((s * m, h, inputs))?
        .transpose(0, 1)?
        .contiguous()?;
    let y = x.matmul(&proj.as_tensor().transpose(1, 2)?)?; // (h, S*M, dg)
    let rms = (y.sqr()?.mean_keepdim(D::Minus1)? + shape.eps)?.sqrt()?;
    let y = y.broadcast_div(&rms)?.broadcast_mul(norm.as_tensor())?;
    let half = shape.gate_dim / 2;
    let mut cos = Vec::with_capacity(positions.len() * shape.gate_dim);
    let mut sin = Vec::with_capacity(positions.len() * shape.gate_dim);
    for &p in positions {
        let angles: Vec<f32> = shape
            .inv_freq
            .iter()
            .map(|&f| (p as f64 * f as f64) as f32)
            .collect();
        for _ in 0..2 {
            cos.extend(angles.iter().map(|a| a.cos()));
            sin.extend(angles.iter().map(|a| a.sin()));
        }
    }
    let rows = positions.len();
    let cos = Tensor::from_vec(cos, (1, rows, shape.gate_dim), x.device())?;
    let sin = Tensor::from_vec(sin, (1, rows, shape.gate_dim), x.device())?;
    let rotated = Tensor::cat(&[y.narrow(2, half, half)?.neg()?, y.narrow(2, 0, half)?], 2)?;
    Ok((y.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
}

/// `KL(target || exp(log_probs))` averaged over rows; `target` `(S, h, N, B)`.
fn kl(log_probs: &Tensor, target: &Tensor) -> Result<Tensor> {
    let rows = (target.elem_count() / target.dim(D::Minus1)?) as f64;
    let t = target.to_vec1_flat()?;
    let entropy: f64 = t
        .iter()
        .filter(|&&p| p > 0.0)
        .map(|&p| (p * p.ln()) as f64)
        .sum();
    let cross = (target * log_probs)?.sum_all()?;
    Ok(((cross.neg()? + entropy)? / rows)?)
}

trait Flat {
    fn to_vec1_flat(&self) -> candle_core::Result<Vec<f32>>;
}

impl Flat for Tensor {
    fn to_vec1_flat(&self) -> candle_core::Result<Vec<f32>> {
        self.flatten_all()?.to_vec1::<f32>()
    }
}

/// Fits layer `layer`'s gate on `ex`. Returns it and the KL of its last step.
fn fit(
    shape: &GateShape,
    ex: &LayerExamples,
    opts: &TrainOptions,
    seed: u64,
    layer: usize,
    progress: &mut dyn Progress,
) -> Result<(LayerGate, f32)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let vars = GateVars::of(shape, &GateVars::init(shape, &mut rng))?;
    let params = ParamsAdamW {
        lr: opts.lr,
        weight_decay: 0.0,
        ..ParamsAdamW::default()
    };
    let mut adam = AdamW::new(vars.vars(), params)?;
    let windows = ex.queries.dim(0)?;
    let mut order: Vec<u32> = (0..windows as u32).collect();
    let mut last = f32::NAN;
    let batch = opts.batch.clamp(1, windows);
    for step in 0..opts.steps {
        if step % windows.div_ceil(batch) == 0 {
            order.shuffle(&mut rng);
        }
        let at = (step * batch) % windows;
        let pick: Vec<u32> = (0..batch).map(|i| order[(at + i) % windows]).collect();
        let idx = Tensor::new(pick.as_slice(), &Device::Cpu)?;
        let positions: Vec<Vec<usize>> = pick
            .iter()
            .map(|&i| ex.positions[i as usize].clone())
            .collect();
        let log_probs = vars.log_probs(
            shape,
            &ex.queries.index_select(&idx, 0)?,
            &ex.blocks.index_select(&idx, 0)?,
            &positions,
            opts.block_size,
        )?;
        let loss = kl(&log_probs, &ex.target.index_select(&idx, 0)?)?;
        adam.set_learning_rate(learning_rate(opts, step));
        adam.backward_step(&loss)?;
        last = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        if step % 10 == 0 || step + 1 == opts.steps {
            progress.losses(layer * opts.steps + step, &[("kl", last)]);
        }
    }
    Ok((vars.gate()?, last))
}

/// 20 warm-up steps, then a cosine from `lr` to `lr / 100`.
fn learning_rate(opts: &TrainOptions, step: usize) -> f64 {
    let warmup = 20.min(opts.steps / 4).max(1);
    if step < warmup {
        return opts.lr * (step + 1) as f64 / warmup as f64;
    }
    let t = (step - warmup) as f64 / (opts.steps - warmup).max(1) as f64;
    let floor = opts.lr / 100.0;
    floor + 0.5 * (opts.lr - floor) * (1.0 + (std::f64::consts::PI * t).cos())
}

/// The held-out KL, and the share of the target's mass (blocks before the query's own) that
/// the top `budget / block - 1` blocks by gate score hold.
fn heldout_scores(
    shape: &GateShape,
    vars: &GateVars,
    ex: &LayerExamples,
    opts: &TrainOptions,
) -> Result<(f32, f32)> {
    let log_probs = vars.log_probs(
        shape,
        &ex.queries,
        &ex.blocks,
        &ex.positions,
        opts.block_size,
    )?;
    let loss = kl(&log_probs, &ex.target)?.to_scalar::<f32>()?;
    let nb = ex.blocks.dim(1)?;
    let lp = log_probs.to_vec1_flat()?;
    let target = ex.target.to_vec1_flat()?;
    let room = (opts.budget / opts.block_size).saturating_sub(1);
    let (mut kept, mut rows) = (0f64, 0usize);
    for (scores, truth) in lp.chunks_exact(nb).zip(target.chunks_exact(nb)) {
        let mut order: Vec<usize> = (0..nb).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        kept += order
            .iter()
            .take(room)
            .map(|&j| truth[j] as f64)
            .sum::<f64>();
        rows += 1;
    }
    Ok((loss, (kept / rows.max(1) as f64) as f32))
}

#[cfg(test)]
mod tests {
    use super::super::gate;
    use super::*;

    /// The trainer's tensor gate scores blocks exactly as the decode path does.
    #[test]
    fn the_tensor_gate_is_the_decode_gate() {
        let shape = GateShape::with_theta(2, 3, 4, 6, 100.0, 1e-6);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut draw =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
        let g = LayerGate {
            q_proj: draw(2 * 6 * 12),
            k_proj: draw(2 * 6 * 12),
            q_norm: draw(6),
            k_norm: draw(6),
        };
        let (n, nb, block) = (3, 4, 16);
        let positions = vec![vec![20, 50, 63]];
        let q = draw(n * 2 * 12);
        let k = draw(nb * 2 * 12);
        let dev = Device::Cpu;
        let vars = GateVars::of(&shape, &g).unwrap();
        let lp = vars
            .log_probs(
                &shape,
                &Tensor::from_slice(&q, (1, n, 2, 12), &dev).unwrap(),
                &Tensor::from_slice(&k, (1, nb, 2, 12), &dev).unwrap(),
                &positions,
                block,
            )
            .unwrap()
            .to_vec1_flat()
            .unwrap(); // (1, h, N, B)
        let keys: Vec<f32> = k
            .chunks_exact(24)
            .enumerate()
            .flat_map(|(j, pooled)| g.key(&shape, pooled, j * block))
            .collect();
        for (i, &p) in positions[0].iter().enumerate() {
            let q_gate = g.query(&shape, &q[i * 24..(i + 1) * 24], p);
            for h in 0..2 {
                let earlier = p / block;
                let s = gate::scores(&shape, &q_gate, &keys[..earlier * 12], h);
                let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let lse = max + s.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
                for (j, x) in s.iter().enumerate() {
                    let got = lp[(h * n + i) * nb + j];
                    assert!(
                        (got - (x - lse)).abs() < 1e-4,
                        "q{i} h{h} b{j}: {got} vs {}",
                        x - lse
                    );
                }
                assert!(
                    lp[(h * n + i) * nb + earlier] < -1e6,
                    "the own block is masked"
                );
            }
        }
    }
}
