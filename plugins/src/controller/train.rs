//! Training a steering controller (what `server train controller` runs), in three stages that
//! each use the serving forward pass except the last, which trains only the small MLP:
//!
//! 1. features: the input layers' residual stream at each prompt's last token
//!    ([`crate::steer::train::last_token_activations`]), labelled harmful or harmless;
//! 2. per-layer weight targets: for harmful prompts, how much adding `α · d_l` at layer `l`
//!    (last prompt token only) raises the refusal score `log p(R) − log(1 − p(R))` at the next
//!    token, `R` the refusal-opening tokens; normalised to 0..1 per prompt. This is the task
//!    signal the paper's released code never gives `w_l` (research notes, section 1.2);
//! 3. the MLP, by AdamW on `BCE(s_logit, harmful) + λ · BCE(w_logits, targets)` (the weight term
//!    on harmful prompts only: on harmless ones `s ≈ 0` makes `w` irrelevant). Features are
//!    standardised for training and the standardisation is folded into `fc1` when saving, so
//!    the plug-in reads raw activations.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use models::{BatchRow, Hook, HookCall, HookGroup, HookPoints, Llama, LogitsWanted};
use rand::{Rng, SeedableRng};

use super::ControllerTensors;
use crate::error::{PluginError, Result};
use crate::steer::add_along;
use crate::train::Progress;

/// `log p(R) − log(1 − p(R))` of next-token `logits`, `p(R)` the probability of any of `ids`.
pub fn refusal_score(logits: &[f32], ids: &[u32]) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let all: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let r: f64 = ids
        .iter()
        .filter_map(|&i| logits.get(i as usize))
        .map(|&l| (l as f64 - max).exp())
        .sum();
    let p = (r / all).clamp(1e-12, 1.0 - 1e-12);
    p.ln() - (1.0 - p).ln()
}

/// Adds `coef · d_layer` to each row's last entry, the layer and coefficient per row.
struct LayerPatch {
    /// `(layers, hidden)`.
    directions: Tensor,
}

#[derive(Debug, Clone, Copy)]
struct PatchAt {
    layer: usize,
    coef: f32,
}

impl Hook for LayerPatch {
    fn name(&self) -> &str {
        "layer-patch"
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
        group: &HookGroup<'_>,
        h: &Tensor,
    ) -> models::Result<Option<Tensor>> {
        let mut column = vec![0f32; h.dim(0)?];
        let mut end = 0;
        for (row, &n) in group.rows.iter().zip(&group.lengths) {
            end += n;
            if let Some(p) = row
                .params
                .downcast_ref::<PatchAt>()
                .filter(|p| p.layer == layer)
            {
                column[end - 1] = p.coef;
            }
        }
        add_along(h, column, &self.directions.get(layer)?)
    }
}

/// Probe runs per forward step in [`sensitivities`].
const PROBE_BATCH: usize = 32;

/// `[prompt][layer - first]`: the refusal-score gain of `α · d_l` at layer `l` of
/// `first..=last`, added at the prompt's last token, over the unsteered score.
pub fn sensitivities(
    model: &Llama,
    prompts: &[Vec<u32>],
    directions: &Tensor,
    (first, last): (usize, usize),
    alpha: f32,
    refusal_ids: &[u32],
    progress: &mut dyn Progress,
) -> Result<Vec<Vec<f32>>> {
    let patch: Arc<dyn Hook> = Arc::new(LayerPatch {
        directions: directions.clone(),
    });
    // Job 0 of each prompt is the unsteered run.
    let jobs: Vec<(usize, Option<usize>)> = (0..prompts.len())
        .flat_map(|p| std::iter::once((p, None)).chain((first..=last).map(move |l| (p, Some(l)))))
        .collect();
    let mut scores = vec![vec![0f64; last - first + 2]; prompts.len()];
    for chunk in jobs.chunks(PROBE_BATCH) {
        let chains: Vec<Vec<HookCall>> = chunk
            .iter()
            .map(|&(_, l)| match l {
                None => Vec::new(),
                Some(layer) => vec![HookCall::new(
                    patch.clone(),
                    Arc::new(PatchAt { layer, coef: alpha }),
                )],
            })
            .collect();
        let logits = last_logits(model, chunk.iter().map(|&(p, _)| &prompts[p]), &chains)?;
        for (&(p, l), row) in chunk.iter().zip(logits) {
            let slot = l.map_or(0, |l| l - first + 1);
            scores[p][slot] = refusal_score(&row, refusal_ids);
        }
        progress.advance(chunk.len());
    }
    Ok(scores
        .into_iter()
        .map(|s| s[1..].iter().map(|x| (x - s[0]) as f32).collect())
        .collect())
}

/// Next-token logits after each prompt, each row with its own chain.
pub fn last_logits<'p>(
    model: &Llama,
    prompts: impl Iterator<Item = &'p Vec<u32>>,
    chains: &[Vec<HookCall>],
) -> Result<Vec<Vec<f32>>> {
    let prompts: Vec<&Vec<u32>> = prompts.collect();
    let mut caches: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
    let mut rows: Vec<BatchRow> = prompts
        .iter()
        .zip(caches.iter_mut())
        .zip(chains)
        .enumerate()
        .map(|(i, ((tokens, cache), hooks))| BatchRow {
            seq_id: i as u64,
            tokens,
            cache,
            hooks,
            logits: LogitsWanted::Last,
        })
        .collect();
    let out = model
        .forward(&mut rows)
        .map_err(|e| PluginError::incompatible("controller training", e))?;
    out.into_iter()
        .map(|l| {
            let l =
                l.ok_or_else(|| PluginError::incompatible("controller training", "no logits"))?;
            Ok(l.flatten_all()?.to_vec1::<f32>()?)
        })
        .collect()
}

/// Per-prompt weight targets from sensitivities: gains scaled to 0..1 by the prompt's largest
/// gain (all 0 when no layer raises the score).
pub fn weight_targets(gains: &[f32]) -> Vec<f32> {
    let best = gains.iter().copied().fold(0f32, f32::max);
    gains
        .iter()
        .map(|&g| {
            if best > 0.0 {
                (g / best).clamp(0.0, 1.0)
            } else {
                0.0
            }
        })
        .collect()
}

/// One training example of the MLP.
#[derive(Debug, Clone)]
pub struct Example {
    /// Concatenated input-layer activations.
    pub features: Vec<f32>,
    pub harmful: bool,
    /// Targets for every layer's weight (harmful prompts only).
    pub weights: Option<Vec<f32>>,
}

#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub units: usize,
    pub steps: usize,
    pub lr: f64,
    /// λ: weight of the per-layer term.
    pub weight_loss: f64,
    pub batch: usize,
    pub seed: u64,
}

/// The trained MLP (directions still to be added) and the loss per step.
pub struct Trained {
    pub fc1_weight: Tensor,
    pub fc1_bias: Tensor,
    pub fc2_weight: Tensor,
    pub fc2_bias: Tensor,
    pub losses: Vec<f32>,
}

impl Trained {
    pub fn with_directions(self, directions: Tensor) -> ControllerTensors {
        ControllerTensors {
            fc1_weight: self.fc1_weight,
            fc1_bias: self.fc1_bias,
            fc2_weight: self.fc2_weight,
            fc2_bias: self.fc2_bias,
            directions,
        }
    }
}

/// `mean(max(x,0) − x·y + log(1 + e^{−|x|}))` over the entries where `mask` is 1.
fn bce_with_logits(x: &Tensor, y: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let loss = ((x.relu()? - (x * y)?)? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    let total = mask.sum_all()?.to_scalar::<f32>()?.max(1.0);
    (loss * mask)?.sum_all()? / total as f64
}

/// Trains the controller MLP on `examples` for a model with `layers` layers, steering
/// `steered` (inclusive) only.
pub fn train(
    examples: &[Example],
    layers: usize,
    steered: (usize, usize),
    options: &TrainOptions,
    progress: &mut dyn Progress,
) -> Result<Trained> {
    let dev = Device::Cpu;
    let n = examples.len();
    let dim = examples.first().map_or(0, |e| e.features.len());
    if n == 0 || dim == 0 {
        return Err(PluginError::incompatible(
            "controller training",
            "no training examples",
        ));
    }
    let x = Tensor::from_vec(
        examples.iter().flat_map(|e| e.features.clone()).collect(),
        (n, dim),
        &dev,
    )?;
    let mean = x.mean_keepdim(0)?;
    let std = (x.broadcast_sub(&mean)?.sqr()?.mean_keepdim(0)? + 1e-6)?.sqrt()?;
    let xs = x.broadcast_sub(&mean)?.broadcast_div(&std)?;
    let (targets, mask) = target_tensors(examples, layers, steered, &dev)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(options.seed);
    let mut init = |rows: usize, cols: usize| -> Result<Var> {
        let bound = 1.0 / (cols as f32).sqrt();
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| bound * (rng.random::<f32>() * 2.0 - 1.0))
            .collect();
        Ok(Var::from_tensor(&Tensor::from_vec(v, (rows, cols), &dev)?)?)
    };
    let (w1, w2) = (init(options.units, dim)?, init(1 + layers, options.units)?);
    let b1 = Var::zeros(options.units, DType::F32, &dev)?;
    let b2 = Var::zeros(1 + layers, DType::F32, &dev)?;
    let params = ParamsAdamW {
        lr: options.lr,
        weight_decay: 1e-4,
        ..ParamsAdamW::default()
    };
    let mut opt = AdamW::new(vec![w1.clone(), b1.clone(), w2.clone(), b2.clone()], params)?;
    let mut losses = Vec::with_capacity(options.steps);
    let mut order: Vec<u32> = (0..n as u32).collect();
    for step in 0..options.steps {
        if step % n.div_ceil(options.batch.max(1)) == 0 {
            shuffle(&mut order, &mut rng);
        }
        let start = (step * options.batch) % n;
        let idx: Vec<u32> = order
            .iter()
            .cycle()
            .skip(start)
            .take(options.batch.min(n))
            .copied()
            .collect();
        let idx = Tensor::new(idx.as_slice(), &dev)?;
        let (xb, tb, mb) = (
            xs.index_select(&idx, 0)?,
            targets.index_select(&idx, 0)?,
            mask.index_select(&idx, 0)?,
        );
        let hidden = xb.matmul(&w1.t()?)?.broadcast_add(&b1)?.relu()?;
        let logits = hidden.matmul(&w2.t()?)?.broadcast_add(&b2)?;
        let s_loss = bce_with_logits(
            &logits.narrow(1, 0, 1)?,
            &tb.narrow(1, 0, 1)?,
            &mb.narrow(1, 0, 1)?,
        )?;
        let w_loss = bce_with_logits(
            &logits.narrow(1, 1, layers)?,
            &tb.narrow(1, 1, layers)?,
            &mb.narrow(1, 1, layers)?,
        )?;
        let (s, w) = (s_loss.to_scalar::<f32>()?, w_loss.to_scalar::<f32>()?);
        let loss = (s_loss + (w_loss * options.weight_loss)?)?;
        opt.backward_step(&loss)?;
        let total = loss.to_scalar::<f32>()?;
        losses.push(total);
        progress.losses(
            step,
            &[("loss", total), ("strength_loss", s), ("weight_loss", w)],
        );
        progress.advance(1);
    }
    // Fold the standardisation into fc1: W (x − m)/s + b = (W/s) x + (b − (W/s) m).
    let w1s = w1.as_tensor().broadcast_div(&std)?;
    let b1s = (b1.as_tensor() - w1s.matmul(&mean.t()?)?.squeeze(D::Minus1)?)?;
    Ok(Trained {
        fc1_weight: w1s,
        fc1_bias: b1s,
        fc2_weight: w2.as_tensor().clone(),
        fc2_bias: b2.as_tensor().clone(),
        losses,
    })
}

/// `(targets, mask)`, both `(n, 1 + layers)`: column 0 is harmful/harmless for every example;
/// the weight columns count only for harmful examples and steered layers.
fn target_tensors(
    examples: &[Example],
    layers: usize,
    (first, last): (usize, usize),
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    let mut t = Vec::with_capacity(examples.len() * (1 + layers));
    let mut m: Vec<f32> = Vec::with_capacity(t.capacity());
    for e in examples {
        t.push(if e.harmful { 1.0 } else { 0.0 });
        m.push(1.0);
        for l in 0..layers {
            let target = e.weights.as_ref().and_then(|w| w.get(l).copied());
            let counts = target.is_some() && (first..=last).contains(&l);
            t.push(target.unwrap_or(0.0));
            m.push(if counts { 1.0 } else { 0.0 });
        }
    }
    let shape = (examples.len(), 1 + layers);
    Ok((
        Tensor::from_vec(t, shape, dev)?,
        Tensor::from_vec(m, shape, dev)?,
    ))
}

fn shuffle(v: &mut [u32], rng: &mut rand::rngs::StdRng) {
    for i in (1..v.len()).rev() {
        let j = rng.random_range(0..=i);
        v.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_score_is_the_log_odds_of_the_refusal_tokens() {
        let logits = [0.0f32, 0.0, 0.0, 0.0];
        assert!((refusal_score(&logits, &[1]) - (0.25f64 / 0.75).ln()).abs() < 1e-9);
        assert!(refusal_score(&[5.0, 0.0], &[0]) > 4.9);
    }

    #[test]
    fn weight_targets_scale_gains_to_the_best_layer() {
        assert_eq!(weight_targets(&[1.0, 2.0, -1.0]), vec![0.5, 1.0, 0.0]);
        assert_eq!(weight_targets(&[-1.0, -2.0]), vec![0.0, 0.0]);
    }

    #[test]
    fn the_mlp_learns_a_separable_labelling_and_the_folded_weights_read_raw_features() {
        // Harmful when feature 0 is large; raw features far from unit scale.
        let examples: Vec<Example> = (0..64)
            .map(|i| {
                let harmful = i % 2 == 0;
                let f0 = if harmful { 40.0 } else { 10.0 } + (i % 7) as f32;
                Example {
                    features: vec![f0, 100.0 + (i % 5) as f32, -30.0],
                    harmful,
                    weights: harmful.then(|| vec![0.0, 1.0, 0.2]),
                }
            })
            .collect();
        let options = TrainOptions {
            units: 8,
            steps: 300,
            lr: 1e-2,
            weight_loss: 1.0,
            batch: 16,
            seed: 1,
        };
        let t = train(&examples, 3, (1, 2), &options, &mut crate::train::Quiet).unwrap();
        assert!(
            t.losses.last().unwrap() < &(t.losses[0] * 0.2),
            "{:?}",
            &t.losses[..3]
        );
        let net = t.with_directions(Tensor::zeros((3, 1), DType::F32, &Device::Cpu).unwrap());
        let logits = |f: &[f32]| {
            let x = Tensor::new(f, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            let h = x
                .matmul(&net.fc1_weight.t().unwrap())
                .unwrap()
                .broadcast_add(&net.fc1_bias)
                .unwrap()
                .relu()
                .unwrap();
            h.matmul(&net.fc2_weight.t().unwrap())
                .unwrap()
                .broadcast_add(&net.fc2_bias)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (harm, benign) = (logits(&[42.0, 101.0, -30.0]), logits(&[12.0, 101.0, -30.0]));
        assert!(harm[0] > 2.0 && benign[0] < -2.0, "{harm:?} {benign:?}");
        assert!(
            harm[2] > 1.0 && harm[3] < harm[2],
            "layer weights follow the targets: {harm:?}"
        );
    }
}
