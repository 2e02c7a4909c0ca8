//! Training the predictors (what `server train early-exit` runs), following SpecEE's recipe
//! on this project's draft sources:
//!
//! 1. the model's own greedy outputs for the training prompts ([`generate::greedy`]);
//! 2. a successor table learned from the outputs of the first half of the prompts; the
//!    second half supplies features with that table, so the predictors see candidates as
//!    good as they will be on text the table never saw (the shipped table then learns from
//!    every output);
//! 3. per token and layer, from one teacher-forced pass over prompt + output: the features
//!    `[z, p, Δp]` of the candidates and the label "this layer's top token (final norm and LM
//!    head) is the token the full model chose" ([`collect`]);
//! 4. one MLP per layer by Adam on binary cross-entropy, features standardised during
//!    training and the standardisation folded into `fc1` ([`fit`]);
//! 5. on held-out sequences (the last fifth): per-layer precision and recall, the exit-layer
//!    histogram with every layer scheduled, the offline schedule (the fewest layers holding
//!    80% of those exits), and the exits the shipped schedule would make ([`report`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use models::{Hook, HookCall, HookGroup, HookPoints, Llama};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::config::{EarlyExitConfig, TYPE};
use super::drafts::{self, DraftTable};
use super::generate;
use super::predictor::{self, Predictor};
use super::report::{self, Report};
use super::EarlyExit;
use crate::base::{BaseIdentity, BaseModel};
use crate::train::{Progress, Result, TrainError};

/// `server train early-exit`'s settings.
#[derive(Debug, Clone, Serialize)]
pub struct TrainOptions {
    /// Greedy tokens generated per prompt.
    pub max_new_tokens: usize,
    /// Prompts decoded together.
    pub batch: usize,
    /// Candidates per token (SpecEE's k).
    pub draft_tokens: usize,
    pub lookup_max: usize,
    pub hidden_units: usize,
    /// The first layer with a predictor; every layer from it to `num_layers - 3` gets one.
    pub first_layer: usize,
    pub epochs: usize,
    pub lr: f64,
    /// The default threshold written to the file and used for the report.
    pub threshold: f32,
    /// Written to the file: the most rows a step may run for tokens to leave it.
    pub max_batch_rows: usize,
    pub seed: u64,
}

/// What one decode token of a held-out or training sequence offers the predictors.
#[derive(Debug, Clone)]
pub struct TokenExamples {
    /// Per predictor layer (in `layers` order): `[z, p, Δp]`.
    pub features: Vec<Vec<f32>>,
    /// Per predictor layer: the layer's top token is the final one.
    pub label: Vec<bool>,
    /// Per predictor layer: the layer's top token is a candidate (an exit check would pass).
    pub top_in: Vec<bool>,
    /// The final token is a candidate.
    pub hit: bool,
}

/// Trains a plug-in named `name` on `prompts` (token ids, chat-rendered). `stop`: the
/// model's end-of-turn tokens. Returns it and the report (`report.json` of the command).
pub fn train(
    model: &Llama,
    base: &BaseModel,
    name: &str,
    prompts: &[Vec<u32>],
    stop: &[u32],
    opts: &TrainOptions,
    progress: &mut dyn Progress,
) -> Result<(EarlyExit, Report)> {
    let num_layers = base.config.num_layers;
    let layers: Vec<usize> = (opts.first_layer..=num_layers.saturating_sub(3)).collect();
    if prompts.len() < 4 || layers.is_empty() || opts.first_layer == 0 {
        return Err(TrainError::BadOption(format!(
            "need at least 4 prompts and a first layer within [1, {}]",
            num_layers.saturating_sub(3)
        )));
    }
    progress.phase("generate", prompts.len());
    let outputs = generate::greedy(
        model,
        prompts,
        &[],
        opts.max_new_tokens,
        stop,
        opts.batch,
        progress,
    )?
    .outputs;
    let vocab = base.config.vocab_size;
    let half = prompts.len() / 2;
    let table = DraftTable::learn(
        outputs[..half].iter().map(Vec::as_slice),
        vocab,
        opts.draft_tokens,
    );
    progress.phase("features", prompts.len() - half);
    let mut sequences = Vec::new();
    for (prompt, output) in prompts[half..].iter().zip(&outputs[half..]) {
        let seq: Vec<u32> = prompt.iter().chain(output).copied().collect();
        sequences.push(collect(
            model,
            &seq,
            prompt.len(),
            &table,
            opts.lookup_max,
            &layers,
        )?);
        progress.advance(1);
    }
    let held_out = (sequences.len() / 5).max(1);
    let (fit_on, check_on) = sequences.split_at(sequences.len() - held_out);
    progress.phase("predictors", layers.len());
    let mut predictors = HashMap::new();
    for (i, &l) in layers.iter().enumerate() {
        let (x, y): (Vec<&[f32]>, Vec<bool>) = fit_on
            .iter()
            .flatten()
            .map(|t| (t.features[i].as_slice(), t.label[i]))
            .unzip();
        predictors.insert(l, fit(&x, &y, opts, opts.seed + l as u64)?);
        progress.advance(1);
    }
    let ordered: Vec<&Predictor> = layers.iter().filter_map(|l| predictors.get(l)).collect();
    let report = report::report(check_on, &layers, &ordered, opts.threshold, num_layers);
    let config = EarlyExitConfig {
        kind: TYPE.to_string(),
        base_model: BaseIdentity::of(base),
        layers,
        offline_layers: report.offline_layers.clone(),
        draft_tokens: opts.draft_tokens,
        lookup_max: opts.lookup_max,
        hidden_units: opts.hidden_units,
        threshold: opts.threshold,
        max_batch_rows: opts.max_batch_rows,
    };
    let shipped = DraftTable::learn(outputs.iter().map(Vec::as_slice), vocab, opts.draft_tokens);
    let plugin = EarlyExit::new(name, config, predictors, shipped, base)?;
    Ok((plugin, report))
}

/// The examples of one sequence's decode tokens: one teacher-forced pass over `seq` (prompt
/// then the model's greedy output), every decode position (the prompt's last token is
/// prefill, so the first decode step feeds the first output token).
pub fn collect(
    model: &Llama,
    seq: &[u32],
    prompt_len: usize,
    table: &DraftTable,
    lookup_max: usize,
    layers: &[usize],
) -> Result<Vec<TokenExamples>> {
    let first = layers[0] - 1;
    let last = layers[layers.len() - 1];
    let capture = Arc::new(Capture::new(first, last));
    crate::train::prefill(model, &[seq], &[HookCall::bare(capture.clone())])?;
    let positions = prompt_len..seq.len().saturating_sub(1);
    if positions.is_empty() {
        return Ok(Vec::new());
    }
    let n = positions.len();
    let head = model.output_head();
    let (norm, eps) = head.norm_weight()?;
    let captured = capture.take()?;
    let (mut hidden, mut tops) = (Vec::new(), Vec::new());
    for h in &captured {
        let h = h.narrow(0, prompt_len, n)?;
        let x = candle_nn::ops::rms_norm(&h, &model.norm, eps as f32)?;
        tops.push(model.lm_head.forward(&x)?.argmax(1)?.to_vec1::<u32>()?);
        hidden.push(h.to_vec2::<f32>()?);
    }
    let mut out = Vec::with_capacity(n);
    for (j, p) in positions.enumerate() {
        let cands = drafts::candidates(&seq[..=p], table, lookup_max);
        if cands.len() < table.k() {
            continue;
        }
        let rows = head.token_rows(&cands)?;
        let target = seq[p + 1];
        let mut t = TokenExamples {
            features: Vec::new(),
            label: Vec::new(),
            top_in: Vec::new(),
            hit: cands.contains(&target),
        };
        let mut p_prev: Option<Vec<f32>> = None;
        for (i, l) in (first..=last).enumerate() {
            let x = predictor::rms_norm(&hidden[i][j], &norm, eps);
            let z = predictor::candidate_logits(&rows, &x);
            let (f, probs) = predictor::features(&z, p_prev.as_deref());
            p_prev = Some(probs);
            if layers.contains(&l) {
                t.features.push(f);
                t.label.push(tops[i][j] == target);
                t.top_in.push(cands.contains(&tops[i][j]));
            }
        }
        out.push(t);
    }
    Ok(out)
}

/// Records the residual stream after layers `first..=last` of a one-row prefill.
struct Capture {
    first: usize,
    last: usize,
    seen: Mutex<Vec<Tensor>>,
}

impl Capture {
    fn new(first: usize, last: usize) -> Self {
        Self {
            first,
            last,
            seen: Mutex::new(Vec::new()),
        }
    }

    /// The captured states, `(tokens, hidden)` per layer from `first`.
    fn take(&self) -> Result<Vec<Tensor>> {
        let seen = std::mem::take(&mut *self.seen.lock().unwrap_or_else(|p| p.into_inner()));
        match seen.len() == self.last + 1 - self.first {
            true => Ok(seen),
            false => Err(TrainError::BadOption(format!(
                "captured {} layers",
                seen.len()
            ))),
        }
    }
}

impl Hook for Capture {
    fn name(&self) -> &str {
        "early-exit-capture"
    }

    fn points(&self) -> HookPoints {
        HookPoints {
            residual: true,
            ..HookPoints::default()
        }
    }

    fn residual(
        &self,
        layer: usize,
        _g: &HookGroup<'_>,
        h: &Tensor,
    ) -> models::Result<Option<Tensor>> {
        if (self.first..=self.last).contains(&layer) {
            self.seen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(h.clone());
        }
        Ok(None)
    }
}

/// One layer's predictor by Adam on binary cross-entropy over `x` (features) and `y`.
pub fn fit(x: &[&[f32]], y: &[bool], opts: &TrainOptions, seed: u64) -> Result<Predictor> {
    let f = 3 * opts.draft_tokens;
    let h = opts.hidden_units;
    let n = x.len();
    if n == 0 || x.iter().any(|r| r.len() != f) {
        return Err(TrainError::BadOption(format!(
            "no examples of {f} features to fit"
        )));
    }
    let (mean, std) = standardisation(x, f);
    let dev = Device::Cpu;
    let flat: Vec<f32> = x
        .iter()
        .flat_map(|r| r.iter().zip(&mean).zip(&std).map(|((v, m), s)| (v - m) / s))
        .collect();
    let xs = Tensor::from_vec(flat, (n, f), &dev)?;
    let ys = Tensor::from_vec(
        y.iter().map(|&b| b as u8 as f32).collect::<Vec<_>>(),
        (n, 1),
        &dev,
    )?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut uniform = |rows: usize, cols: usize| -> Result<Var> {
        let bound = 1.0 / (cols as f32).sqrt();
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        Ok(Var::from_tensor(&Tensor::from_vec(v, (rows, cols), &dev)?)?)
    };
    let (w1, w2) = (uniform(h, f)?, uniform(1, h)?);
    let b1 = Var::from_tensor(&Tensor::zeros(h, DType::F32, &dev)?)?;
    let b2 = Var::from_tensor(&Tensor::zeros(1, DType::F32, &dev)?)?;
    let params = ParamsAdamW {
        lr: opts.lr,
        weight_decay: 0.0,
        ..ParamsAdamW::default()
    };
    let mut adam = AdamW::new(vec![w1.clone(), b1.clone(), w2.clone(), b2.clone()], params)?;
    let mut order: Vec<u32> = (0..n as u32).collect();
    for _ in 0..opts.epochs {
        order.shuffle(&mut rng);
        for batch in order.chunks(1024) {
            let idx = Tensor::new(batch, &dev)?;
            let (xb, yb) = (xs.index_select(&idx, 0)?, ys.index_select(&idx, 0)?);
            let a = xb.matmul(&w1.t()?)?.broadcast_add(&b1)?.relu()?;
            let logit = a.matmul(&w2.t()?)?.broadcast_add(&b2)?;
            // BCE with logits, stable: max(z, 0) - z y + log(1 + exp(-|z|)).
            let loss = ((logit.relu()? - (&logit * &yb)?)?
                + (logit.abs()?.neg()?.exp()? + 1.0)?.log()?)?
            .mean_all()?;
            adam.backward_step(&loss)?;
        }
    }
    // Fold the standardisation into fc1: W (x - m)/s + b = (W/s) x + (b - W (m/s)).
    let (w1, b1) = (
        w1.as_tensor().to_vec2::<f32>()?,
        b1.as_tensor().to_vec1::<f32>()?,
    );
    let mut fc1_weight = Vec::with_capacity(h * f);
    let mut fc1_bias = Vec::with_capacity(h);
    for (row, b) in w1.iter().zip(&b1) {
        fc1_weight.extend(row.iter().zip(&std).map(|(w, s)| w / s));
        fc1_bias.push(
            b - row
                .iter()
                .zip(&mean)
                .zip(&std)
                .map(|((w, m), s)| w * m / s)
                .sum::<f32>(),
        );
    }
    Ok(Predictor {
        inputs: f,
        fc1_weight,
        fc1_bias,
        fc2_weight: w2.as_tensor().flatten_all()?.to_vec1::<f32>()?,
        fc2_bias: b2.as_tensor().to_vec1::<f32>()?[0],
    })
}

/// Per-feature mean and standard deviation (1 where a feature is constant).
fn standardisation(x: &[&[f32]], f: usize) -> (Vec<f32>, Vec<f32>) {
    let n = x.len().max(1) as f64;
    let mut mean = vec![0f64; f];
    let mut sq = vec![0f64; f];
    for r in x {
        for (i, &v) in r.iter().enumerate() {
            mean[i] += v as f64 / n;
            sq[i] += (v as f64) * (v as f64) / n;
        }
    }
    let std = mean.iter().zip(&sq).map(|(m, s)| {
        let var = (s - m * m).max(0.0);
        if var > 1e-12 {
            var.sqrt() as f32
        } else {
            1.0
        }
    });
    let std = std.collect();
    (mean.into_iter().map(|m| m as f32).collect(), std)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_learns_a_separable_rule_on_raw_unscaled_features() {
        let opts = TrainOptions {
            max_new_tokens: 0,
            batch: 1,
            draft_tokens: 1,
            lookup_max: 1,
            hidden_units: 8,
            first_layer: 1,
            epochs: 60,
            lr: 1e-2,
            threshold: 0.5,
            max_batch_rows: 1,
            seed: 1,
        };
        // Label: the second feature (offset 100, scale 50) above 100; the others are noise.
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let x: Vec<Vec<f32>> = (0..2000)
            .map(|_| {
                vec![
                    rng.random_range(-1.0..1.0),
                    100.0 + 50.0 * rng.random_range(-1.0f32..1.0),
                    0.5,
                ]
            })
            .collect();
        let y: Vec<bool> = x.iter().map(|r| r[1] > 100.0).collect();
        let rows: Vec<&[f32]> = x.iter().map(Vec::as_slice).collect();
        let p = fit(&rows, &y, &opts, 9).unwrap();
        let right = rows
            .iter()
            .zip(&y)
            .filter(|(r, &l)| (p.probability(r) > 0.5) == l)
            .count();
        assert!(right as f64 / 2000.0 > 0.97, "{right} of 2000");
    }
}
