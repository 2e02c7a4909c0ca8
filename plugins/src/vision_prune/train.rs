//! `server train vision-prune`: LVPruning's training at this project's scale. The language
//! model and the vision tower stay frozen; one decision module after `layer` learns which
//! image tokens the question needs.
//!
//! Each step asks one question about each of `batch` synthetic images (a stream of samples
//! the tower never trained on). The prompt runs through layers `0..=layer` once; the module
//! scores its image tokens against the instruction and samples keep decisions with the
//! Gumbel trick (hard 0/1 forward, the relaxed sigmoid's gradient backward). The later layers
//! then run twice: in full (the reference) and with the decisions as key masks
//! ([`DenseLlama::run_layers`]), which is what removing the dropped tokens does at serving
//! time for every token that stays. The loss is the KL divergence from the full model's
//! answer distribution to the pruned one's, plus `ratio_weight` times the squared gap
//! between the kept fraction and `keep` (DynamicViT's ratio loss, which LVPruning follows).
//! The paper trains on the MLLM's own next-token loss; distilling from the unpruned model
//! asks for the same thing here (the model is frozen, so its answers are the reference to
//! preserve) and does not depend on how good the tower's answers are.

use candle_core::{DType, Device, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::choose::{image_offsets, instruction_offsets, keep_random, keep_top};
use super::module::{DecisionModule, ModuleShape};
use crate::train::adamw::AdamW;
use crate::train::{Progress, Result, TrainError};
use crate::vision::data::{self, Sample, Split};
use crate::vision::prompt::Conversation;
use crate::vision::tower::TrainableTower;
use crate::vision::train::{schedule, Trainer};

/// Where this trainer's samples start in the training split: past both of the tower's phases.
const PRUNE_SAMPLES: u64 = 1 << 33;

/// How a decision module is trained.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PruneTrainOptions {
    /// Image tokens are pruned after this layer.
    pub layer: usize,
    /// The fraction of image tokens the decisions should keep.
    pub keep: f32,
    pub module: ModuleShape,
    pub steps: usize,
    /// Questions (each about its own image) per step.
    pub batch: usize,
    /// Peak learning rate (warm-up, then cosine decay to a tenth).
    pub lr: f64,
    /// Temperature of the relaxed decisions.
    pub temperature: f64,
    /// Weight of the kept-fraction penalty.
    pub ratio_weight: f64,
    pub seed: u64,
}

impl Default for PruneTrainOptions {
    fn default() -> Self {
        Self {
            layer: 14,
            keep: 0.25,
            module: ModuleShape::default(),
            steps: 200,
            batch: 4,
            lr: 1e-3,
            temperature: 1.0,
            ratio_weight: 10.0,
            seed: 0,
        }
    }
}

impl PruneTrainOptions {
    /// Settings a run cannot start with, named, for a model of `layers` layers.
    pub fn validate(&self, layers: usize) -> Result<()> {
        let bad = |m: String| Err(TrainError::BadOption(m));
        if self.layer + 1 >= layers {
            return bad(format!(
                "layer {} leaves no layer after it (the model has {layers})",
                self.layer
            ));
        }
        if !(self.keep > 0.0 && self.keep < 1.0) {
            return bad(format!("keep must lie within (0, 1), got {}", self.keep));
        }
        if let Some(problem) = self.module.problem() {
            return bad(problem);
        }
        if self.batch == 0 || self.temperature <= 0.0 {
            return bad("batch and temperature must be positive".into());
        }
        Ok(())
    }
}

/// One step's losses, for the log.
#[derive(Debug, Clone, Copy)]
pub struct StepLosses {
    pub kl: f32,
    pub kept: f32,
}

/// Trains a decision module for `tower` (frozen, as is `trainer.dense`).
pub fn train(
    trainer: &Trainer<'_>,
    tower: &TrainableTower,
    opts: &PruneTrainOptions,
    progress: &mut dyn Progress,
) -> Result<DecisionModule> {
    let layers = trainer.dense.config.num_layers;
    opts.validate(layers)?;
    let hidden = trainer.dense.config.hidden_size;
    let vars = opts
        .module
        .initial(hidden, opts.keep, opts.seed)?
        .into_iter()
        .map(|(n, t)| Ok((n, Var::from_tensor(&t)?)))
        .collect::<Result<Vec<_>>>()?;
    let module = || {
        let weights = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone()));
        DecisionModule::new(opts.module, weights.collect())
    };
    let mut optimizer = AdamW::new(vars.clone(), 0.0)?;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed ^ 0x5eed);
    progress.phase("decision-module steps", opts.steps);
    for step in 0..opts.steps {
        let (samples, conversations) = step_questions(trainer, opts, step)?;
        let features = tower.forward(&trainer.pixels(&samples)?)?.detach();
        let (loss, losses) = step_loss(
            trainer,
            &module(),
            opts,
            &conversations,
            &features,
            &mut rng,
        )?;
        optimizer.step(&loss.backward()?, schedule(opts.lr, step, opts.steps))?;
        progress.losses(step, &[("kl", losses.kl), ("kept", losses.kept)]);
        progress.advance(1);
    }
    Ok(module())
}

/// Step `step`'s images and one question about each (the questions of a scene are shuffled;
/// successive steps ask different kinds).
pub fn step_questions(
    trainer: &Trainer<'_>,
    opts: &PruneTrainOptions,
    step: usize,
) -> Result<(Vec<Sample>, Vec<Conversation>)> {
    let first = PRUNE_SAMPLES + (step * opts.batch) as u64;
    let samples: Vec<Sample> = (first..first + opts.batch as u64)
        .map(|i| data::sample(opts.seed, Split::Train, i))
        .collect();
    let conversations = samples
        .iter()
        .enumerate()
        .map(|(j, s)| {
            let q = &s.questions[(step + j) % s.questions.len()];
            trainer
                .renderer
                .conversation(&[(q.text.as_str(), q.answer)])
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((samples, conversations))
}

/// A batch run through the layers up to the pruning layer, ready to finish with and without
/// pruning.
struct Halfway<'t> {
    trainer: &'t Trainer<'t>,
    /// `(n, t, hidden)`, the residual stream after the pruning layer (no gradient).
    h: Tensor,
    /// Flat indices of the answers' positions.
    wanted: Tensor,
    later: std::ops::Range<usize>,
}

impl<'t> Halfway<'t> {
    fn new(
        trainer: &'t Trainer<'t>,
        layer: usize,
        conversations: &[Conversation],
        features: &Tensor,
    ) -> Result<Self> {
        let dense = trainer.dense;
        let (x, wanted) = trainer.spliced(conversations, features)?;
        let h = dense.run_layers(&x, 0..layer + 1, None, None)?.detach();
        Ok(Self {
            trainer,
            h,
            wanted,
            later: layer + 1..dense.config.num_layers,
        })
    }

    /// Log-probabilities at the answers' positions with `keep` `(n, t)` as key masks after the
    /// pruning layer (`None`: the full model): `(answers, vocab)`.
    fn answers(&self, keep: Option<&Tensor>) -> Result<Tensor> {
        let dense = self.trainer.dense;
        let out = dense.run_layers(&self.h, self.later.clone(), keep, None)?;
        let out = dense
            .final_norm(&out)?
            .flatten_to(1)?
            .index_select(&self.wanted, 0)?;
        Ok(candle_nn::ops::log_softmax(&dense.head(&out)?, D::Minus1)?)
    }

    /// Mean KL divergence from the full model's answers `reference` ([`Self::answers`] with
    /// no mask) to those under `keep`.
    fn divergence(&self, reference: &Tensor, keep: &Tensor) -> Result<Tensor> {
        let reference = reference.detach();
        let pruned = self.answers(Some(keep))?;
        Ok((reference.exp()? * (&reference - &pruned)?)?
            .sum(D::Minus1)?
            .mean_all()?)
    }
}

/// The loss of one step (see the module doc) and its parts.
pub fn step_loss(
    trainer: &Trainer<'_>,
    module: &DecisionModule,
    opts: &PruneTrainOptions,
    conversations: &[Conversation],
    features: &Tensor,
    rng: &mut ChaCha8Rng,
) -> Result<(Tensor, StepLosses)> {
    let halfway = Halfway::new(trainer, opts.layer, conversations, features)?;
    let mut rows = Vec::with_capacity(conversations.len());
    let mut kept = Vec::with_capacity(conversations.len());
    for (r, c) in conversations.iter().enumerate() {
        let (keep, fraction) = decisions(trainer, module, opts, c, &halfway.h.get(r)?, rng)?;
        rows.push(keep);
        kept.push(fraction);
    }
    let reference = halfway.answers(None)?;
    let kl = halfway.divergence(&reference, &Tensor::stack(&rows, 0)?)?;
    let kept = Tensor::stack(&kept, 0)?;
    let gap = (kept.affine(1.0, -(opts.keep as f64))?.sqr()?.mean_all()? * opts.ratio_weight)?;
    let losses = StepLosses {
        kl: kl.to_scalar::<f32>()?,
        kept: kept.mean_all()?.to_scalar::<f32>()?,
    };
    Ok(((kl + gap)?, losses))
}

/// Held-out divergence of pruned answers from the full model's (mean KL, nats).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct HeldOut {
    /// A seeded random draw of the image tokens that stay.
    pub random: f32,
    /// The module's highest logits stay, as served.
    pub learned: f32,
}

/// How far pruning to `keep` of the image tokens moves the answers of held-out `steps`, with
/// random choices and with `module`'s.
pub fn held_out_divergence(
    trainer: &Trainer<'_>,
    tower: &TrainableTower,
    module: &DecisionModule,
    opts: &PruneTrainOptions,
    steps: std::ops::Range<usize>,
    progress: &mut dyn Progress,
) -> Result<HeldOut> {
    let count = steps.len().max(1) as f32;
    let mut total = HeldOut {
        random: 0.0,
        learned: 0.0,
    };
    progress.phase("held-out steps", steps.len());
    for step in steps {
        let (samples, conversations) = step_questions(trainer, opts, step)?;
        let features = tower.forward(&trainer.pixels(&samples)?)?.detach();
        let halfway = Halfway::new(trainer, opts.layer, &conversations, &features)?;
        let reference = halfway.answers(None)?;
        let t = halfway.h.dim(1)?;
        let (mut random, mut learned) = (Vec::new(), Vec::new());
        for (r, c) in conversations.iter().enumerate() {
            let images = image_offsets(&c.tokens, trainer.image_id);
            let drawn = keep_random(t, &images, opts.keep, (step * opts.batch + r) as u64);
            random.push(mask(t, &images, &drawn)?);
            let instruction = instruction_offsets(prompt_len(c), &images);
            let scores = module.scores(&halfway.h.get(r)?, t, &images, &instruction)?;
            learned.push(mask(t, &images, &keep_top(t, &images, opts.keep, &scores))?);
        }
        let kl = |rows: &[Tensor]| -> Result<f32> {
            let keep = Tensor::stack(rows, 0)?;
            Ok(halfway.divergence(&reference, &keep)?.to_scalar::<f32>()?)
        };
        total.random += kl(&random)? / count;
        total.learned += kl(&learned)? / count;
        progress.advance(1);
    }
    Ok(total)
}

/// The key mask `(t,)` that keeps the offsets `kept` and every offset not in `images`.
fn mask(t: usize, images: &[usize], kept: &[usize]) -> Result<Tensor> {
    let mut keep = vec![1f32; t];
    for &i in images {
        keep[i] = 0.0;
    }
    for &i in kept {
        keep[i] = 1.0;
    }
    Ok(Tensor::new(keep, &Device::Cpu)?)
}

/// One conversation's sampled decisions as a key mask over its padded row of `h` `(t,
/// hidden)`: `(t,)`, 1 at text and padding, the straight-through decision at each image
/// token; and the kept fraction of its image tokens (a scalar with the relaxed gradient).
fn decisions(
    trainer: &Trainer<'_>,
    module: &DecisionModule,
    opts: &PruneTrainOptions,
    c: &Conversation,
    h: &Tensor,
    rng: &mut ChaCha8Rng,
) -> Result<(Tensor, Tensor)> {
    let t = h.dim(0)?;
    let images = image_offsets(&c.tokens, trainer.image_id);
    let instruction = instruction_offsets(prompt_len(c), &images);
    let logits = module.row_logits(h, &images, &instruction)?;
    let decision = relaxed_decision(&logits, opts.temperature, rng)?; // (v,)
    let fraction = decision.mean_all()?;
    // Position p reads slot 0 (a constant 1) or slot 1 + k (the k-th image token's decision).
    let mut slot = vec![0u32; t];
    for (k, &p) in images.iter().enumerate() {
        slot[p] = 1 + k as u32;
    }
    let ones = Tensor::ones(1, DType::F32, &Device::Cpu)?;
    let table = Tensor::cat(&[&ones, &decision], 0)?;
    let keep = table.index_select(&Tensor::new(slot, &Device::Cpu)?, 0)?;
    Ok((keep, fraction))
}

/// Hard keep decisions (1 where the logit plus logistic noise is positive) that pass the
/// gradient of their relaxation `sigmoid((logit + noise) / temperature)`.
fn relaxed_decision(logits: &Tensor, temperature: f64, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    let n = logits.dim(0)?;
    let noise: Vec<f32> = (0..n)
        .map(|_| {
            let u: f32 = rng.random_range(1e-6..1.0 - 1e-6);
            u.ln() - (1.0 - u).ln()
        })
        .collect();
    let noisy = (logits + Tensor::from_vec(noise, n, logits.device())?)?;
    let soft = ((noisy / temperature)?.neg()?.exp()? + 1.0)?.recip()?;
    let hard = soft.ge(0.5)?.to_dtype(DType::F32)?;
    Ok(((hard - soft.detach())? + soft)?)
}

/// The tokens of `c`'s prompt, the instruction as serving sees it: not the answer after it.
fn prompt_len(c: &Conversation) -> usize {
    c.targets.first().map_or(c.tokens.len(), |&(p, _)| p + 1)
}
