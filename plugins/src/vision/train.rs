//! `server train vision`: LLaVA's first stage at this project's scale. The language model stays
//! frozen; a small SigLIP encoder and the connector learn, from the seeded synthetic question
//! set of [`super::data`], to write images into the model's input so that it answers
//! questions about them.
//!
//! Two phases. **Alignment** (cheap: the language model does not run) teaches the tower to
//! write each image as words the frozen model already reads: at each image token, the input
//! embedding of one word about its patch. An object's patches cycle through its colour, shape
//! and side along each row (shifted by one on the next row), so the prompt holds phrases like
//! "red circle left"; the written word's patches say the word; the background says how many
//! objects there are. **Answering** then trains tower and connector end to end through the
//! frozen model on multi-turn conversations about each image (one image's tokens serve several
//! answers), cross-entropy on the answers' tokens. AdamW, linear warm-up then cosine decay
//! to a tenth in each phase; checkpoints every `checkpoint_every` steps resume where a run
//! stopped, with the same samples (sample `i` of a phase is a function of the seed and `i`).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use models::vision::ImageProcessor;

use super::data::{self, Owner, Sample, Split};
use super::prompt::{Conversation, Renderer};
use super::tower::{TowerShape, TrainableTower};
use crate::train::adamw::AdamW;
use crate::train::{DenseLlama, Progress, Result, TrainError};

/// Where phase 2's samples start, so the two phases never show the same image.
const ANSWER_SAMPLES: u64 = 1 << 32;
const WARMUP: usize = 20;
/// Weight of reading each image token as a word in the alignment loss.
const CLASSIFY: f64 = 1.0;
/// How sharply alignment's reading tells words apart: logits are `-|f - e|^2` over the
/// words' mean square norm, times this.
const READ_SHARPNESS: f64 = 10.0;

/// How a tower is trained: its shape, the seed of its samples and initialisation, and each
/// phase's steps, batch and peak learning rate.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainOptions {
    pub shape: TowerShape,
    pub seed: u64,
    pub align_steps: usize,
    /// Images per alignment step.
    pub align_batch: usize,
    pub align_lr: f64,
    pub steps: usize,
    /// Images per answering step.
    pub batch: usize,
    /// Questions asked about each image in one answering conversation.
    pub turns: usize,
    pub lr: f64,
    pub checkpoint_every: usize,
    /// Alignment also makes the last row of image tokens spell a summary of the image
    /// ([`summary_words`]): each shape's colour, name and side, the count and the word.
    #[serde(default)]
    pub summary_row: bool,
    /// With `summary_row`, the weight in phase 2 of the alignment loss on the summary row, so
    /// that answering keeps it spelled while the other image tokens learn whatever helps the
    /// model answer.
    #[serde(default)]
    pub keep_summary: f64,
}

impl TrainOptions {
    /// Settings a run cannot start with, named.
    pub fn validate(&self) -> Result<()> {
        self.shape.validate()?;
        let side = self.shape.image_size / self.shape.patch_size;
        if self.summary_row && side < 14 {
            return Err(TrainError::BadOption(format!(
                "a summary row needs 14 image tokens per row, the tower has {side}"
            )));
        }
        for (name, value) in [
            ("align batch", self.align_batch),
            ("batch", self.batch),
            ("turns", self.turns),
        ] {
            if value == 0 {
                return Err(TrainError::BadOption(format!("{name} must be at least 1")));
            }
        }
        Ok(())
    }
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            shape: TowerShape {
                hidden_size: 192,
                intermediate_size: 768,
                num_hidden_layers: 4,
                num_attention_heads: 3,
                image_size: data::IMAGE_SIZE,
                patch_size: 16,
                scale_factor: 1,
            },
            seed: 0,
            align_steps: 400,
            align_batch: 16,
            align_lr: 1e-3,
            steps: 900,
            batch: 2,
            turns: 8,
            lr: 1e-3,
            checkpoint_every: 50,
            summary_row: false,
            keep_summary: 1.0,
        }
    }
}

/// What training needs from the frozen model and how images are written into its prompt.
pub struct Trainer<'a> {
    pub dense: &'a DenseLlama,
    pub renderer: Renderer<'a>,
    pub image_id: u32,
    pub processor: ImageProcessor,
}

/// Trains a tower per `opts`, resuming from `work_dir`'s checkpoint when there is one.
pub fn train(
    trainer: &Trainer<'_>,
    opts: &TrainOptions,
    work_dir: &Path,
    progress: &mut dyn Progress,
) -> Result<TrainableTower> {
    opts.validate()?;
    let checkpoint = Checkpoint::new(work_dir);
    let text_hidden = trainer.dense.config.hidden_size;
    let (tower, phase, done) = match checkpoint.read(opts, text_hidden)? {
        Some(resumed) => resumed,
        None => (
            TrainableTower::new(opts.shape, text_hidden, opts.seed)?,
            0,
            0,
        ),
    };
    let phases: [(&str, usize, f64); 2] = [
        ("alignment steps", opts.align_steps, opts.align_lr),
        ("answering steps", opts.steps, opts.lr),
    ];
    for (p, &(name, steps, lr)) in phases.iter().enumerate().skip(phase) {
        let start = if p == phase { done } else { 0 };
        let mut optimizer = AdamW::new(tower.vars(), 0.0)?;
        if start > 0 {
            checkpoint.restore(&mut optimizer)?;
        }
        progress.phase(name, steps);
        progress.advance(start);
        for step in start..steps {
            let loss = match p {
                0 => trainer.alignment_loss(&tower, opts, &align_samples(opts, step))?,
                _ => trainer.answering_loss(&tower, opts, &answer_samples(opts, step))?,
            };
            let value = loss.to_scalar::<f32>()?;
            optimizer.step(&loss.backward()?, schedule(lr, step, steps))?;
            // One step count across phases (a resumed run logs its steps after the checkpoint
            // again; the loss chart keeps each step's last line).
            let (name, offset) = match p {
                0 => ("align_loss", 0),
                _ => ("answer_loss", opts.align_steps),
            };
            progress.losses(offset + step, &[(name, value)]);
            progress.advance(1);
            let finished = step + 1;
            if opts.checkpoint_every > 0 && finished % opts.checkpoint_every == 0 {
                checkpoint.write(&tower, &optimizer, Position::at(p, finished, opts))?;
            }
        }
        checkpoint.write(&tower, &optimizer, Position::at(p + 1, 0, opts))?;
    }
    Ok(tower)
}

fn align_samples(opts: &TrainOptions, step: usize) -> Vec<Sample> {
    let first = (step * opts.align_batch) as u64;
    (first..first + opts.align_batch as u64)
        .map(|i| data::sample(opts.seed, Split::Train, i))
        .collect()
}

fn answer_samples(opts: &TrainOptions, step: usize) -> Vec<Sample> {
    let first = ANSWER_SAMPLES + (step * opts.batch) as u64;
    (first..first + opts.batch as u64)
        .map(|i| data::sample(opts.seed, Split::Train, i))
        .collect()
}

/// Linear warm-up over [`WARMUP`] steps, then cosine decay from `peak` to `peak / 10`.
pub(crate) fn schedule(peak: f64, step: usize, steps: usize) -> f64 {
    if step < WARMUP {
        return peak * (step + 1) as f64 / WARMUP as f64;
    }
    let t = (step - WARMUP) as f64 / (steps.saturating_sub(WARMUP).max(1)) as f64;
    peak * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))
}

impl Trainer<'_> {
    /// `(n, 3, size, size)` pixel values of `samples`, as the server's processor makes them.
    pub fn pixels(&self, samples: &[Sample]) -> Result<Tensor> {
        let size = data::IMAGE_SIZE as u32;
        let images = samples
            .iter()
            .map(|s| {
                self.processor
                    .pixel_values(&s.rgb, size, size, &Device::Cpu)
            })
            .collect::<models::Result<Vec<_>>>()?;
        Ok(Tensor::stack(&images, 0)?)
    }

    /// Phase 1: mean squared distance of each image token to the embedding of its patch's
    /// word, relative to the targets' mean square, plus [`CLASSIFY`] times the cross-entropy of
    /// reading each token as its nearest answer word. The squared distance alone taught the
    /// tower little: its best guess under doubt is the mean of the words, which reads as none
    /// of them. With `last_row_only`, only the last row of image tokens counts (phase 2 keeps
    /// the summary row spelled while the other tokens learn freely).
    /// `out`: the tower's tokens for `samples`, `(n, tokens, hidden)`.
    fn align_loss(
        &self,
        shape: TowerShape,
        out: Tensor,
        summary_row: bool,
        samples: &[Sample],
        last_row_only: bool,
    ) -> Result<Tensor> {
        let (weights, table) = self.patch_words(shape, summary_row, samples)?;
        let (out, weights) = match last_row_only {
            true => {
                let side = shape.image_size / shape.patch_size;
                let first = shape.tokens() - side;
                (out.narrow(1, first, side)?, weights.narrow(1, first, side)?)
            }
            false => (out, weights),
        };
        let (n, v, hidden) = out.dims3()?;
        let words = table.dim(0)?;
        alignment(
            &out.reshape((n * v, hidden))?,
            &weights.reshape((n * v, words))?,
            &table,
        )
    }

    /// Per image token, the weight of each answer word its patch says, `(n, tokens, words)`,
    /// and the words' input embeddings `(words, hidden)`.
    fn patch_words(
        &self,
        shape: TowerShape,
        opts_summary: bool,
        samples: &[Sample],
    ) -> Result<(Tensor, Tensor)> {
        if shape.scale_factor != 1 {
            return Err(TrainError::BadOption(
                "alignment needs one image token per patch (scale factor 1)".into(),
            ));
        }
        let words = data::answer_words();
        let ids = words
            .iter()
            .map(|w| self.word_id(w))
            .collect::<Result<Vec<u32>>>()?;
        let table = self.dense.embed(&Tensor::new(ids, &Device::Cpu)?)?;
        let position = |w: &str| words.iter().position(|x| *x == w).unwrap_or(0);
        // Patches in the rendered image's pixels, which the processor resizes to the tower's.
        let patch = data::IMAGE_SIZE / (shape.image_size / shape.patch_size);
        let mut rows = Vec::new();
        let side_patches = shape.image_size / shape.patch_size;
        for s in samples {
            let owners = data::patch_owners(&s.scene, patch, 0.2);
            let summary = opts_summary.then(|| summary_words(&s.scene, side_patches));
            for (k, owner) in owners.into_iter().enumerate() {
                let said: Vec<&str> = match owner {
                    Owner::Background => vec![count_word(s.scene.objects.len())],
                    Owner::Word => s.scene.word.iter().map(|w| w.text).collect(),
                    // An object's patches read, along each row, its colour, shape and side in
                    // turn ("red circle left red ..."), shifted by a word on each row, so
                    // that the prompt holds the phrase "red circle" wherever the object is.
                    Owner::Object(i) => s.scene.objects.get(i).map_or(vec![], |o| {
                        let words = [o.colour.name(), o.shape.name(), side(o.cx)];
                        let (row, col) = (k / side_patches, k % side_patches);
                        vec![words[(row + col) % 3]]
                    }),
                };
                let slot = k + side_patches;
                let said = match summary
                    .as_ref()
                    .and_then(|w| w.get(slot.checked_sub(shape.tokens())?))
                {
                    Some(word) => vec![*word],
                    None => said,
                };
                let mut weights = vec![0f32; words.len()];
                for w in &said {
                    weights[position(w)] += 1.0 / said.len() as f32;
                }
                rows.push(weights);
            }
        }
        let weights = Tensor::from_vec(
            rows.concat(),
            (samples.len(), shape.tokens(), words.len()),
            &Device::Cpu,
        )?;
        Ok((weights, table))
    }

    /// `(n, tokens, hidden)`: what alignment asks of each image token of `samples`, the input
    /// embedding of its patch's word (a mean where a patch says several). For probes that put
    /// the exact words in the image's place (`plugins/examples/vision_oracle.rs`).
    pub fn word_targets(
        &self,
        shape: TowerShape,
        summary_row: bool,
        samples: &[Sample],
    ) -> Result<Tensor> {
        let (weights, table) = self.patch_words(shape, summary_row, samples)?;
        Ok(weights.broadcast_matmul(&table)?)
    }

    /// The first token of `word` as an answer starts with it.
    fn word_id(&self, word: &str) -> Result<u32> {
        let ids = self
            .renderer
            .tokenizer
            .encode(word, false)
            .map_err(|e| TrainError::Prompt(e.to_string()))?;
        ids.first()
            .copied()
            .ok_or_else(|| TrainError::Prompt(format!("`{word}` encodes to no token")))
    }

    /// Phase 1's loss: [`Trainer::align_loss`] over every image token.
    fn alignment_loss(
        &self,
        tower: &TrainableTower,
        opts: &TrainOptions,
        samples: &[Sample],
    ) -> Result<Tensor> {
        let out = tower.forward(&self.pixels(samples)?)?;
        self.align_loss(opts.shape, out, opts.summary_row, samples, false)
    }

    /// Phase 2's loss: the answers' cross-entropy, plus the summary row's alignment when the
    /// tower has one and `keep_summary` weighs it.
    fn answering_loss(
        &self,
        tower: &TrainableTower,
        opts: &TrainOptions,
        samples: &[Sample],
    ) -> Result<Tensor> {
        let features = tower.forward(&self.pixels(samples)?)?;
        let answers = self.answer_loss(&features, samples, opts.turns)?;
        if !opts.summary_row || opts.keep_summary == 0.0 {
            return Ok(answers);
        }
        let summary = self.align_loss(tower.shape, features, true, samples, true)?;
        Ok((answers + (summary * opts.keep_summary)?)?)
    }

    /// Phase 2: mean cross-entropy of the answers of a conversation of `turns` questions about
    /// each sample's image.
    fn answer_loss(&self, features: &Tensor, samples: &[Sample], turns: usize) -> Result<Tensor> {
        let conversations = samples
            .iter()
            .map(|s| {
                let qa: Vec<(&str, &str)> = s
                    .questions
                    .iter()
                    .take(turns)
                    .map(|q| (q.text.as_str(), q.answer))
                    .collect();
                self.renderer.conversation(&qa)
            })
            .collect::<Result<Vec<_>>>()?;
        let logits = self.answer_logits(&conversations, features)?;
        let targets: Vec<u32> = conversations
            .iter()
            .flat_map(|c| c.targets.iter().map(|&(_, t)| t))
            .collect();
        let targets = Tensor::new(targets, &Device::Cpu)?;
        Ok(candle_nn::loss::cross_entropy(&logits, &targets)?)
    }

    /// The frozen model's logits at every target position of `conversations` (in order), with
    /// `features` `(n, tokens, hidden)` at their image tokens: `(targets, vocab)`.
    pub fn answer_logits(
        &self,
        conversations: &[Conversation],
        features: &Tensor,
    ) -> Result<Tensor> {
        let (x, wanted) = self.spliced(conversations, features)?;
        let (n, t, hidden) = x.dims3()?;
        let h = self.dense.hidden_from(&x, None)?.reshape((n * t, hidden))?;
        self.dense.head(&h.index_select(&wanted, 0)?)
    }

    /// The inputs to layer 0 of `conversations` right-padded into one batch, with `features`
    /// `(n, tokens, hidden)` at their image tokens: `(n, t, hidden)`, and the flat indices
    /// (into `n * t`) of every target position in order.
    pub fn spliced(
        &self,
        conversations: &[Conversation],
        features: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (n, v, hidden) = features.dims3()?;
        if conversations.len() != n {
            return Err(TrainError::Prompt(format!(
                "{} conversations for the features of {n} images",
                conversations.len()
            )));
        }
        let t = conversations
            .iter()
            .map(|c| c.tokens.len())
            .max()
            .unwrap_or(0);
        let mut ids = vec![0u32; n * t];
        let mut index = Vec::with_capacity(n * t);
        let mut wanted = Vec::new();
        for (r, c) in conversations.iter().enumerate() {
            ids[r * t..r * t + c.tokens.len()].copy_from_slice(&c.tokens);
            let k = c.tokens.iter().filter(|&&id| id == self.image_id).count();
            if k != v {
                return Err(TrainError::Prompt(format!(
                    "conversation {r} holds {k} image tokens, the tower writes {v}"
                )));
            }
            let mut image = 0;
            for p in 0..t {
                if c.tokens.get(p) == Some(&self.image_id) {
                    index.push((n * t + r * v + image) as u32);
                    image += 1;
                } else {
                    index.push((r * t + p) as u32);
                }
            }
            wanted.extend(c.targets.iter().map(|&(p, _)| (r * t + p) as u32));
        }
        let embeds = self.dense.embed(&Tensor::new(ids, &Device::Cpu)?)?;
        let all = Tensor::cat(&[embeds, features.reshape((n * v, hidden))?], 0)?;
        let x = all
            .index_select(&Tensor::new(index, &Device::Cpu)?, 0)?
            .reshape((n, t, hidden))?;
        Ok((x, Tensor::new(wanted, &Device::Cpu)?))
    }
}

/// Alignment of image tokens `out` `(n, hidden)` to the words they should say: `weights`
/// `(n, words)` (each row sums to 1, or 0 for a token that says nothing) over the words'
/// embeddings `table` `(words, hidden)`. The squared distance to the weighted embedding,
/// relative to its mean square, plus [`CLASSIFY`] times the cross-entropy of reading each
/// token as its nearest word (logits `-|f - e|^2`, up to a per-token constant, over the
/// words' mean square norm, times [`READ_SHARPNESS`]).
fn alignment(out: &Tensor, weights: &Tensor, table: &Tensor) -> Result<Tensor> {
    let target = weights.matmul(table)?;
    let distance = ((out - &target)?.sqr()?.mean_all()? / target.sqr()?.mean_all()?)?;
    let norms = table.sqr()?.sum(1)?; // (words,)
    let spread = norms.mean_all()?.to_scalar::<f32>()? as f64;
    let closeness = (out.matmul(&table.t()?)? * 2.0)?.broadcast_sub(&norms.unsqueeze(0)?)?;
    let log_p = candle_nn::ops::log_softmax(&(closeness * (READ_SHARPNESS / spread))?, 1)?;
    let reading = (weights * log_p)?.sum(1)?.mean_all()?.neg()?;
    Ok((distance + (reading * CLASSIFY)?)?)
}

/// What the last row of image tokens spells with `summary_row`, one word per token: for each
/// shape in `data::SHAPES` order its colour, name and side (the count word where the image
/// has no such shape), then the count, then the written word (or the count again).
fn summary_words(scene: &data::Scene, side_patches: usize) -> Vec<&'static str> {
    let count = count_word(scene.objects.len());
    let mut out = Vec::with_capacity(side_patches);
    for shape in data::SHAPES {
        match scene.objects.iter().find(|o| o.shape == shape) {
            Some(o) => out.extend([o.colour.name(), o.shape.name(), side(o.cx)]),
            None => out.extend([count; 3]),
        }
    }
    out.push(count);
    out.push(scene.word.as_ref().map_or(count, |w| w.text));
    out.resize(side_patches, count);
    out
}

fn count_word(n: usize) -> &'static str {
    data::COUNTS[n.clamp(1, 4) - 1]
}

fn side(cx: f32) -> &'static str {
    if cx < data::IMAGE_SIZE as f32 / 2.0 {
        "left"
    } else {
        "right"
    }
}

/// `work_dir/checkpoint/`: the tower, the optimizer's moments and where training stood
/// (`state.json`, with the run's settings). All three are written into `checkpoint.new/`, which
/// then replaces the folder, so a run killed at any point leaves one consistent checkpoint:
/// `checkpoint/`, or, killed between the two renames, `checkpoint.old/`.
struct Checkpoint {
    dir: PathBuf,
}

/// Where a run stood: `done` steps of phase `phase` (0: alignment, 1: answering, 2: both
/// finished).
#[derive(serde::Serialize, serde::Deserialize)]
struct Position {
    phase: usize,
    done: usize,
    /// A run resumes only with the settings it started with (the same samples, the same
    /// schedule).
    options: TrainOptions,
}

impl Position {
    fn at(phase: usize, done: usize, options: &TrainOptions) -> Self {
        Self {
            phase,
            done,
            options: options.clone(),
        }
    }
}

impl Checkpoint {
    fn new(work_dir: &Path) -> Self {
        Self {
            dir: work_dir.join("checkpoint"),
        }
    }

    fn sibling(&self, suffix: &str) -> PathBuf {
        self.dir.with_file_name(format!("checkpoint.{suffix}"))
    }

    /// The folder holding the last complete checkpoint, if any.
    fn current(&self) -> Option<PathBuf> {
        [self.dir.clone(), self.sibling("old")]
            .into_iter()
            .find(|d| d.join("state.json").exists())
    }

    fn read(
        &self,
        opts: &TrainOptions,
        hidden: usize,
    ) -> Result<Option<(TrainableTower, usize, usize)>> {
        let Some(dir) = self.current() else {
            return Ok(None);
        };
        let state = dir.join("state.json");
        let text = std::fs::read_to_string(&state).map_err(|e| TrainError::io(&state, e))?;
        let at: Position = serde_json::from_str(&text)
            .map_err(|e| TrainError::BadOption(format!("{}: {e}", state.display())))?;
        if at.options != *opts {
            return Err(TrainError::BadOption(format!(
                "{} was written by a run with other settings: {}; resume with those, or start \
                 afresh",
                state.display(),
                differences(&at.options, opts)
            )));
        }
        let tower = TrainableTower::load(opts.shape, hidden, &dir.join("tower.safetensors"))?;
        Ok(Some((tower, at.phase, at.done)))
    }

    fn restore(&self, optimizer: &mut AdamW) -> Result<()> {
        let dir = self.current().unwrap_or_else(|| self.dir.clone());
        let state =
            candle_core::safetensors::load(dir.join("optimizer.safetensors"), &Device::Cpu)?;
        optimizer.restore(&state)
    }

    fn write(&self, tower: &TrainableTower, optimizer: &AdamW, at: Position) -> Result<()> {
        let new = self.sibling("new");
        let old = self.sibling("old");
        for stale in [&new, &old] {
            if stale.exists() {
                std::fs::remove_dir_all(stale).map_err(|e| TrainError::io(stale, e))?;
            }
        }
        std::fs::create_dir_all(&new).map_err(|e| TrainError::io(&new, e))?;
        tower.save(&new.join("tower.safetensors"))?;
        candle_core::safetensors::save(&optimizer.state()?, new.join("optimizer.safetensors"))?;
        let state = serde_json::to_string(&at)
            .map_err(|e| TrainError::BadOption(format!("cannot write the checkpoint: {e}")))?;
        let path = new.join("state.json");
        std::fs::write(&path, state).map_err(|e| TrainError::io(&path, e))?;
        if self.dir.exists() {
            rename(&self.dir, &old)?;
        }
        rename(&new, &self.dir)?;
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| TrainError::io(&old, e))?;
        }
        Ok(())
    }
}

/// The settings that differ, `name: was -> now`.
fn differences(was: &TrainOptions, now: &TrainOptions) -> String {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(was), serde_json::to_value(now))
    else {
        return format!("{was:?}");
    };
    a.iter()
        .filter(|(k, v)| b.get(*k) != Some(v))
        .map(|(k, v)| {
            format!(
                "{k}: {v} -> {}",
                b.get(k).unwrap_or(&serde_json::Value::Null)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|e| TrainError::io(to, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_row_spells_each_shape_then_the_count_and_the_word() {
        let scene = (0..)
            .map(|i| data::sample(3, Split::Train, i).scene)
            .find(|s| s.objects.len() == 2 && s.word.is_some())
            .expect("a two-object scene with a word");
        let words = summary_words(&scene, 16);
        assert_eq!(words.len(), 16);
        let count = count_word(2);
        for (i, shape) in data::SHAPES.iter().enumerate() {
            let slots = &words[3 * i..3 * i + 3];
            match scene.objects.iter().find(|o| o.shape == *shape) {
                Some(o) => assert_eq!(slots, [o.colour.name(), o.shape.name(), side(o.cx)]),
                None => assert_eq!(slots, [count; 3]),
            }
        }
        let word = scene.word.as_ref().map(|w| w.text);
        assert_eq!(&words[12..], [count, word.unwrap_or(count), count, count]);
    }

    /// Alignment rewards saying the word: a token at its word's embedding scores far lower
    /// than one at the mean of all words, which the squared distance alone prefers under
    /// doubt, and the reading term tells the two apart where the distance barely does.
    #[test]
    fn alignment_scores_the_word_below_the_mean_of_words() -> Result<()> {
        let table = Tensor::randn(0f32, 1.0, (6, 32), &Device::Cpu)?;
        let weights = Tensor::eye(6, candle_core::DType::F32, &Device::Cpu)?;
        let exact = alignment(&table, &weights, &table)?.to_scalar::<f32>()?;
        let mean = table.mean_keepdim(0)?.broadcast_as((6, 32))?.contiguous()?;
        let vague = alignment(&mean, &weights, &table)?.to_scalar::<f32>()?;
        assert!(exact < 0.01, "{exact}");
        assert!(vague > 1.0 + exact, "{vague}");
        Ok(())
    }

    #[test]
    fn the_schedule_warms_up_then_decays_to_a_tenth() {
        assert!((schedule(1.0, 0, 100) - 1.0 / WARMUP as f64).abs() < 1e-12);
        assert!((schedule(1.0, WARMUP, 100) - 1.0).abs() < 1e-12);
        assert!((schedule(1.0, 100, 100) - 0.1).abs() < 1e-12);
    }
}
