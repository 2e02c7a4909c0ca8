//! Training a LoRA adapter on the frozen base model, and writing it in the PEFT format the
//! server loads ([`crate::lora::LoraAdapter::load`]).
//!
//! Follows PEFT (`tuners/lora/layer.py`, `reset_lora_parameters`) and the Hugging Face
//! Trainer's defaults: `A` Kaiming-uniform (`kaiming_uniform_(a=sqrt(5))`, i.e. uniform in
//! `±1/sqrt(in_features)`), `B` zero so training starts from the base model, no dropout,
//! AdamW (betas 0.9/0.999, eps 1e-8, no weight decay) with the learning rate decaying
//! linearly to 0 over the run, causal-LM cross-entropy averaged over the batch's target
//! tokens. Batches are drawn from a seeded shuffle of the examples (reshuffled each epoch).
//! Everything random comes from ChaCha generators seeded by `seed`, so one seed gives the
//! same files byte for byte on one machine.
//!
//! `server train lora` drives it: flags, progress and the run's log stay in the binary; the
//! held-out split ([`hold_out`]) and the evaluation ([`mean_completion_ce`]) are here.
//!
//! The written `adapter_config.json` holds standard PEFT keys only (PEFT versions before
//! 0.14 refuse unknown keys); run metadata belongs in a separate file beside it.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use models::Projection;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use super::{module_path, ALL_PROJECTIONS, CONFIG_FILE, WEIGHTS_FILE};
use crate::base::BaseModel;
use crate::train::dense::{DenseLlama, LoraFactors, LoraPair};
use crate::train::{Batch, Example, Result, TrainError};

/// What to train and how.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTrainConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Scale by `alpha / sqrt(rank)` instead of `alpha / rank`.
    pub rslora: bool,
    pub targets: Vec<Projection>,
    pub steps: usize,
    pub batch_size: usize,
    /// Peak learning rate (the first step's); decays linearly to 0.
    pub lr: f64,
    pub seed: u64,
}

impl Default for LoraTrainConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            rslora: false,
            targets: ALL_PROJECTIONS.to_vec(),
            steps: 200,
            batch_size: 4,
            lr: 2e-4,
            seed: 0,
        }
    }
}

impl LoraTrainConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(TrainError::BadOption(m.into()));
        if self.rank == 0 {
            return bad("the rank must be at least 1");
        }
        if self.steps == 0 || self.batch_size == 0 {
            return bad("steps and batch size must be at least 1");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("the learning rate must be a positive number");
        }
        if !self.alpha.is_finite() {
            return bad("alpha must be a finite number");
        }
        if self.targets.is_empty() {
            return bad("at least one target module is needed");
        }
        Ok(())
    }

    /// The factor on `B A x`, as [`crate::lora::LoraConfig::scaling`] computes it at load.
    pub fn scaling(&self) -> f64 {
        match self.rslora {
            true => self.alpha / (self.rank as f64).sqrt(),
            false => self.alpha / self.rank as f64,
        }
    }
}

/// `q_proj,v_proj,...` -> projections, in layer order without repeats.
pub fn parse_targets(list: &str) -> Result<Vec<Projection>> {
    let mut wanted = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let p = ALL_PROJECTIONS
            .into_iter()
            .find(|p| p.hf_name() == name)
            .ok_or_else(|| TrainError::UnknownTarget(name.to_string()))?;
        wanted.push(p);
    }
    Ok(ALL_PROJECTIONS
        .into_iter()
        .filter(|p| wanted.contains(p))
        .collect())
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// From 1.
    pub step: usize,
    /// Mean cross-entropy of the batch's target tokens, before the update.
    pub loss: f32,
    /// The learning rate this step used.
    pub lr: f64,
    /// Real tokens in the batch (prompt and target).
    pub tokens: usize,
    pub target_tokens: usize,
}

/// Seeded epochs: each a fresh shuffle of the example indices, cut into batches.
#[derive(Debug)]
struct Sampler {
    rng: ChaCha8Rng,
    order: Vec<usize>,
    next: usize,
}

impl Sampler {
    fn new(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // Its own stream, so the batch order does not depend on how many factors were drawn.
        rng.set_stream(1);
        Self {
            rng,
            order: Vec::new(),
            next: 0,
        }
    }

    /// Up to `size` indices below `n`; the batch ending an epoch may be smaller.
    fn batch(&mut self, n: usize, size: usize) -> Vec<usize> {
        if self.next >= self.order.len() || self.order.len() != n {
            self.order = (0..n).collect();
            self.order.shuffle(&mut self.rng);
            self.next = 0;
        }
        let end = (self.next + size).min(n);
        let picked = self.order[self.next..end].to_vec();
        self.next = end;
        picked
    }
}

/// A LoRA adapter being trained against a [`DenseLlama`].
pub struct LoraTrainer<'m> {
    model: &'m DenseLlama,
    config: LoraTrainConfig,
    /// The same storage as `vars`: the optimizer updates what the forward pass reads.
    factors: LoraFactors,
    optimizer: AdamW,
    sampler: Sampler,
    step: usize,
}

impl<'m> LoraTrainer<'m> {
    /// Fresh factors on every targeted projection of every layer, initialised as PEFT does.
    pub fn new(model: &'m DenseLlama, config: LoraTrainConfig) -> Result<Self> {
        config.validate()?;
        let base = BaseModel {
            id: String::new(),
            config: model.config.clone(),
            device: model.device().clone(),
            tokenizer_hash: None,
            kv_dtype: models::KvDtype::F32,
        };
        let device = model.device();
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let mut factors = LoraFactors::new(model.config.num_layers, config.scaling());
        let mut vars = Vec::new();
        for layer in 0..model.config.num_layers {
            for &p in &config.targets {
                let (out, inp) = base.projection_shape(p);
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..config.rank * inp)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (config.rank, inp), device)?)?;
                let b = Var::zeros((out, config.rank), DType::F32, device)?;
                let pair = LoraPair {
                    a: a.as_tensor().clone(),
                    b: b.as_tensor().clone(),
                };
                factors.insert(layer, p, pair)?;
                vars.extend([a, b]);
            }
        }
        let params = ParamsAdamW {
            lr: config.lr,
            weight_decay: 0.0,
            ..ParamsAdamW::default()
        };
        Ok(Self {
            model,
            optimizer: AdamW::new(vars, params)?,
            sampler: Sampler::new(config.seed),
            config,
            factors,
            step: 0,
        })
    }

    /// One optimizer step on the next batch of `examples` (the same slice every call).
    pub fn step(&mut self, examples: &[Example]) -> Result<StepReport> {
        if examples.is_empty() {
            return Err(TrainError::BadOption("no examples to train on".into()));
        }
        let remaining = self.config.steps.saturating_sub(self.step);
        let lr = self.config.lr * remaining as f64 / self.config.steps as f64;
        self.optimizer.set_learning_rate(lr);
        let picked = self.sampler.batch(examples.len(), self.config.batch_size);
        let rows: Vec<&Example> = picked.iter().map(|&i| &examples[i]).collect();
        let batch = Batch::new(&rows, self.model.device())?;
        let loss = self.model.completion_loss(&batch, Some(&self.factors))?;
        self.optimizer.backward_step(&loss)?;
        self.step += 1;
        Ok(StepReport {
            step: self.step,
            loss: loss.to_scalar::<f32>()?,
            lr,
            tokens: batch.tokens,
            target_tokens: batch.target_tokens(),
        })
    }

    /// The model the adapter trains against.
    pub fn model(&self) -> &'m DenseLlama {
        self.model
    }

    /// The factors as trained so far (they change in place with every step).
    pub fn factors(&self) -> &LoraFactors {
        &self.factors
    }

    pub fn config(&self) -> &LoraTrainConfig {
        &self.config
    }

    /// Trainable parameters (entries of every `A` and `B`).
    pub fn parameters(&self) -> usize {
        self.factors
            .iter()
            .map(|(_, _, p)| p.a.elem_count() + p.b.elem_count())
            .sum()
    }

    /// The PEFT `adapter_config.json` of this adapter.
    pub fn adapter_config(&self, base_model_name: &str) -> Value {
        let targets: Vec<&str> = self.config.targets.iter().map(|p| p.hf_name()).collect();
        json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name,
            "r": self.config.rank,
            "lora_alpha": self.config.alpha,
            "target_modules": targets,
            "use_rslora": self.config.rslora,
            "lora_dropout": 0.0,
            "bias": "none",
            "use_dora": false,
            "fan_in_fan_out": false,
            "modules_to_save": null,
            "init_lora_weights": true,
            "inference_mode": true,
        })
    }

    /// The factors under their PEFT names (`base_model.model.model.layers.N....lora_A.weight`).
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (layer, p, pair) in self.factors.iter() {
            let path = module_path(layer, p);
            out.insert(
                format!("base_model.model.{path}.lora_A.weight"),
                pair.a.clone(),
            );
            out.insert(
                format!("base_model.model.{path}.lora_B.weight"),
                pair.b.clone(),
            );
        }
        out
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` (f32) into `dir`.
    pub fn save(&self, dir: &Path, base_model_name: &str) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        let config = self.adapter_config(base_model_name);
        let path = dir.join(CONFIG_FILE);
        let text =
            serde_json::to_string_pretty(&config).map_err(|e| TrainError::io(&path, e.into()))?;
        std::fs::write(&path, text).map_err(|e| TrainError::io(&path, e))?;
        let path = dir.join(WEIGHTS_FILE);
        candle_core::safetensors::save(&self.tensors(), &path)?;
        Ok(())
    }
}

/// Mean target-token cross-entropy over a set of examples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalReport {
    /// Nats per target token.
    pub ce: f64,
    pub target_tokens: usize,
    pub examples: usize,
}

/// The mean cross-entropy of every target token of `examples` under the model with `lora`
/// (or the base model alone), in batches of `batch_size`.
pub fn mean_completion_ce(
    model: &DenseLlama,
    examples: &[Example],
    lora: Option<&LoraFactors>,
    batch_size: usize,
) -> Result<EvalReport> {
    let (mut sum, mut tokens) = (0.0f64, 0usize);
    for chunk in examples.chunks(batch_size.max(1)) {
        let rows: Vec<&Example> = chunk.iter().collect();
        let batch = Batch::new(&rows, model.device())?;
        let n = batch.target_tokens();
        let mean = model.completion_loss(&batch, lora)?.to_scalar::<f32>()?;
        sum += mean as f64 * n as f64;
        tokens += n;
    }
    if tokens == 0 {
        return Err(TrainError::BadOption("no target tokens to evaluate".into()));
    }
    Ok(EvalReport {
        ce: sum / tokens as f64,
        target_tokens: tokens,
        examples: examples.len(),
    })
}

/// Every tenth example for evaluation (the last one when there are fewer than ten), the rest
/// for training; a single example is only trained on.
pub fn hold_out<T>(examples: Vec<T>) -> (Vec<T>, Vec<T>) {
    let n = examples.len();
    let held = |i: usize| match n {
        0 | 1 => false,
        2..=9 => i == n - 1,
        _ => i % 10 == 9,
    };
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (i, e) in examples.into_iter().enumerate() {
        match held(i) {
            true => eval.push(e),
            false => train.push(e),
        }
    }
    (train, eval)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tenth_example_or_the_last_of_a_few_is_held_out() {
        let split = |n: usize| hold_out((0..n).collect::<Vec<_>>());
        assert_eq!(split(1), (vec![0], vec![]));
        assert_eq!(split(3), (vec![0, 1], vec![2]));
        let (train, eval) = split(25);
        assert_eq!(eval, [9, 19]);
        assert_eq!(train.len(), 23);
    }

    #[test]
    fn each_epoch_visits_every_example_once_in_a_seeded_order() {
        let mut s = Sampler::new(3);
        let mut epoch: Vec<usize> = (0..3).flat_map(|_| s.batch(10, 4)).collect();
        let sizes: Vec<usize> = (0..3).map(|_| s.batch(10, 4).len()).collect();
        assert_eq!(sizes, [4, 4, 2], "the batch ending an epoch is smaller");
        let order = epoch.clone();
        epoch.sort_unstable();
        assert_eq!(epoch, (0..10).collect::<Vec<_>>());
        assert_ne!(order, epoch, "shuffled");
        let mut again = Sampler::new(3);
        let replay: Vec<usize> = (0..3).flat_map(|_| again.batch(10, 4)).collect();
        assert_eq!(order, replay);
    }

    #[test]
    fn targets_parse_in_layer_order_without_repeats() {
        let t = parse_targets(" down_proj, q_proj,q_proj ").unwrap_or_default();
        assert_eq!(t, [Projection::Q, Projection::Down]);
        assert!(parse_targets("lm_head").is_err());
    }
}
