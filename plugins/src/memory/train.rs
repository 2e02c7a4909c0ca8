//! Training a memory decoder (Memory Decoder §3.2, the reference's `train_memdec.py` and
//! `utils/cal_loss.py`): a small causal LM learns to imitate the kNN-LM of a domain corpus,
//! `L = α · KL(p_kNN ‖ p_mem) + (1 − α) · CE(next token)`, α = 0.5.
//!
//! At this project's scale (2 CPU cores, a 135M base) the memory is made of base layers
//! ([`DenseLlama::trainable_subset`]): the base's embeddings and LM head, shared and frozen, and
//! a chosen subset of its layers plus the final norm, all trained. Blocks of the corpus
//! ([`Corpus::blocks`]) are drawn in a seeded shuffle each epoch; the learning rate decays
//! linearly to 0 (the reference's schedule); AdamW without weight decay. A checkpoint
//! (weights, optimizer moments, steps taken) is written every `checkpoint_every` steps and a
//! run given the same work folder resumes from it, producing what an uninterrupted run would.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor, D};
use models::tiny::TinyModel;
use models::Llama;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::corpus::Corpus;
use super::datastore::SharedInputs;
use super::targets::KnnTargets;
use super::{GraftBlock, GGUF_FILE, SAFETENSORS_FILE, TYPE};
use crate::train::adamw::AdamW;
use crate::train::{DenseLlama, Progress, Result, TrainError};

pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";

/// How to train.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryTrainConfig {
    /// Base layers the memory starts from, in order (its layer `i` is base layer
    /// `base_layers[i]`).
    pub base_layers: Vec<usize>,
    /// Weight of the KL term (the rest is cross-entropy).
    pub alpha: f64,
    /// Peak learning rate (the first step's).
    pub lr: f64,
    pub epochs: usize,
    /// Tokens per training block.
    pub block_len: usize,
    /// Blocks per step.
    pub batch_size: usize,
    pub seed: u64,
    /// Steps between checkpoints (0: none).
    pub checkpoint_every: usize,
}

impl MemoryTrainConfig {
    pub fn validate(&self, base_layers: usize) -> Result<()> {
        let bad = |m: String| Err(TrainError::BadOption(m));
        if self.base_layers.is_empty() {
            return bad("the memory needs at least one layer".into());
        }
        if let Some(l) = self.base_layers.iter().find(|&&l| l >= base_layers) {
            return bad(format!(
                "base layer {l} does not exist (the base has {base_layers})"
            ));
        }
        if !(0.0..=1.0).contains(&self.alpha) {
            return bad(format!("alpha must be within [0, 1], got {}", self.alpha));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("the learning rate must be a positive number".into());
        }
        if self.epochs == 0 || self.batch_size == 0 || self.block_len < 2 {
            return bad("epochs and batch size must be at least 1, the block length 2".into());
        }
        Ok(())
    }
}

/// The losses of one step, averaged over its predicted positions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepLosses {
    pub loss: f32,
    pub kl: f32,
    pub ce: f32,
}

impl MemoryTrainConfig {
    /// Base layers below the memory's first, whose output the memory reads (0: it embeds
    /// the tokens itself).
    pub fn shared_layers(&self) -> usize {
        self.base_layers.first().copied().unwrap_or(0)
    }
}

/// Trains a memory on `corpus` with `targets` (row `i` = the corpus's position `i`),
/// checkpointing into `work_dir`; returns the trained model. A memory that shares base
/// layers reads `inputs`, made by [`super::datastore::Datastore::build`] over the blocks of
/// `config.block_len` this training uses.
pub fn train(
    base: &Llama,
    corpus: &Corpus,
    targets: &KnnTargets,
    inputs: Option<&SharedInputs>,
    config: &MemoryTrainConfig,
    work_dir: &Path,
    progress: &mut dyn Progress,
) -> Result<DenseLlama> {
    config.validate(base.config.num_layers)?;
    if targets.len() + 1 < corpus.tokens.len() {
        return Err(TrainError::BadOption(format!(
            "{} kNN targets for a corpus of {} tokens",
            targets.len(),
            corpus.tokens.len()
        )));
    }
    let device = Device::Cpu;
    let (model, vars) =
        DenseLlama::trainable_subset(base, &config.base_layers, config.block_len, &device)?;
    let mut optimizer = AdamW::new(vars, 0.0)?;
    let checkpoint = work_dir.join(CHECKPOINT_FILE);
    if checkpoint.exists() {
        optimizer.restore(&candle_core::safetensors::load(&checkpoint, &device)?)?;
    }
    let blocks = corpus.blocks(config.block_len);
    let block_inputs = split_inputs(inputs, &blocks, config.shared_layers())?;
    let per_epoch = blocks.len().div_ceil(config.batch_size);
    let total = per_epoch * config.epochs;
    progress.phase("steps", total);
    progress.advance(optimizer.steps().min(total));
    let mut order = Vec::new();
    for step in optimizer.steps()..total {
        let epoch = step / per_epoch;
        if order.is_empty() || step % per_epoch == 0 {
            order = (0..blocks.len()).collect();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(config.seed ^ epoch as u64));
        }
        let first = (step % per_epoch) * config.batch_size;
        let chosen = &order[first..(first + config.batch_size).min(order.len())];
        let picked: Vec<(usize, &[u32])> = chosen.iter().map(|&b| blocks[b]).collect();
        let picked_inputs: Option<Vec<&[f32]>> = block_inputs
            .as_ref()
            .map(|all| chosen.iter().map(|&b| all[b]).collect());
        let (loss, losses) = step_loss(
            &model,
            &picked,
            picked_inputs.as_deref(),
            targets,
            config.alpha,
        )?;
        let grads = loss.backward()?;
        let lr = config.lr * (1.0 - step as f64 / total as f64);
        optimizer.step(&grads, lr)?;
        progress.losses(
            step,
            &[("loss", losses.loss), ("kl", losses.kl), ("ce", losses.ce)],
        );
        progress.advance(1);
        let done = step + 1;
        // The last step too: a run whose writing fails reruns in no time.
        if config.checkpoint_every > 0 && (done % config.checkpoint_every == 0 || done == total) {
            save_checkpoint(&optimizer, &checkpoint)?;
        }
    }
    Ok(model)
}

/// Each block's rows of `inputs` (blocks lie one after another there); `None` for a memory
/// without shared layers.
fn split_inputs<'a>(
    inputs: Option<&'a SharedInputs>,
    blocks: &[(usize, &[u32])],
    shared_layers: usize,
) -> Result<Option<Vec<&'a [f32]>>> {
    if shared_layers == 0 {
        return Ok(None);
    }
    let inputs = inputs.ok_or_else(|| {
        TrainError::BadOption("a memory sharing base layers needs their outputs".into())
    })?;
    let total: usize = blocks.iter().map(|b| b.1.len()).sum();
    if inputs.rows.len() != total * inputs.dim {
        return Err(TrainError::BadOption(format!(
            "{} input rows for {total} block tokens: the inputs were made with other blocks",
            inputs.rows.len() / inputs.dim.max(1)
        )));
    }
    let mut at = 0;
    let mut out = Vec::with_capacity(blocks.len());
    for (_, block) in blocks {
        out.push(&inputs.rows[at * inputs.dim..(at + block.len()) * inputs.dim]);
        at += block.len();
    }
    Ok(Some(out))
}

fn save_checkpoint(optimizer: &AdamW, path: &Path) -> Result<()> {
    // Written beside, then renamed: a run killed mid-write keeps the previous checkpoint.
    let partial = path.with_extension("partial");
    candle_core::safetensors::save(&optimizer.state()?, &partial)?;
    std::fs::rename(&partial, path).map_err(|e| TrainError::io(path, e))
}

/// The loss of one batch of blocks (right-padded to the longest): a scalar to differentiate,
/// and its parts.
pub fn step_loss(
    model: &DenseLlama,
    blocks: &[(usize, &[u32])],
    inputs: Option<&[&[f32]]>,
    targets: &KnnTargets,
    alpha: f64,
) -> Result<(Tensor, StepLosses)> {
    let device = model.device().clone();
    let t = blocks.iter().map(|b| b.1.len()).max().unwrap_or(0);
    let (mut ids, mut flat, mut positions, mut next) = (vec![], vec![], vec![], vec![]);
    for (row, (start, block)) in blocks.iter().enumerate() {
        ids.extend_from_slice(block);
        ids.extend(std::iter::repeat_n(0, t - block.len()));
        for i in 0..block.len() - 1 {
            flat.push((row * t + i) as u32);
            positions.push(start + i);
            next.push(block[i + 1]);
        }
    }
    let h = match inputs {
        None => model.hidden(&Tensor::from_vec(ids, (blocks.len(), t), &device)?, None)?,
        Some(rows) => {
            let dim = model.config.hidden_size;
            let mut x = Vec::with_capacity(blocks.len() * t * dim);
            for rows in rows {
                x.extend_from_slice(rows);
                x.extend(std::iter::repeat_n(0.0, t * dim - rows.len()));
            }
            let x = Tensor::from_vec(x, (blocks.len(), t, dim), &device)?;
            model.hidden_from(&x, None)?
        }
    };
    let h = h.flatten_to(1)?; // (b * t, hidden)
    let h = h.index_select(&Tensor::new(flat.as_slice(), &device)?, 0)?; // (n, hidden)
    let logp = candle_nn::ops::log_softmax(&model.head(&h)?, D::Minus1)?; // (n, vocab)
    let n = next.len();
    let next = Tensor::from_vec(next, (n, 1), &device)?;
    let ce = logp.gather(&next, 1)?.mean_all()?.neg()?;
    let (knn_ids, knn_probs) = targets.rows(&positions, &device)?;
    let cross = (logp.gather(&knn_ids, 1)? * knn_probs)?
        .sum(1)?
        .mean_all()?
        .neg()?;
    let loss = ((&cross * alpha)? + (&ce * (1.0 - alpha))?)?;
    let neg_entropy: f32 = positions
        .iter()
        .map(|&p| targets.neg_entropy(p))
        .sum::<f32>()
        / n as f32;
    let scalar = |t: &Tensor| t.to_scalar::<f32>();
    let losses = StepLosses {
        loss: scalar(&loss)?,
        kl: scalar(&cross)? + neg_entropy,
        ce: scalar(&ce)?,
    };
    Ok((loss, losses))
}

/// How a trained memory's weights are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsFormat {
    /// `model.safetensors`, f32.
    Safetensors,
    /// `model.gguf`, matrices quantized to this type.
    Gguf(GgmlDType),
}

/// Writes `model` as a memory folder the server loads: config.json (the Hugging Face fields
/// and `graft`) and the weights. Returns the weights file.
pub fn write_memory(
    model: &DenseLlama,
    graft: &GraftBlock,
    format: WeightsFormat,
    out: &Path,
) -> Result<PathBuf> {
    if graft.kind != TYPE {
        return Err(TrainError::BadOption(format!("graft.type must be {TYPE}")));
    }
    let weights = TinyModel {
        config: model.config.clone(),
        tensors: model
            .named_weights()
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_device(&Device::Cpu)?)))
            .collect::<Result<HashMap<_, _>>>()?,
    };
    weights.write_safetensors(out)?;
    let path = match format {
        WeightsFormat::Safetensors => out.join(SAFETENSORS_FILE),
        WeightsFormat::Gguf(dtype) => {
            let st = out.join(SAFETENSORS_FILE);
            std::fs::remove_file(&st).map_err(|e| TrainError::io(&st, e))?;
            let path = out.join(GGUF_FILE);
            weights.write_gguf(&path, dtype)?;
            path
        }
    };
    let block = serde_json::to_value(graft).map_err(|e| TrainError::BadOption(e.to_string()))?;
    super::tiny::edit_config(out, |c| c["graft"] = block)?;
    Ok(path)
}
