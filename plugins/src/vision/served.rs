//! Questions about images answered by the serving forward pass (`models::Llama` with the
//! image-splice hook, as the server runs a chat request): greedy decoding, the prefill timed
//! apart from the vision tower. `server eval vision` reports accuracy this way, so what it
//! measures is what the server answers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::D;
use models::vision::{ImagePlacement, ImageSplice, VisionModel};
use models::{BatchRow, HookCall, Llama, LogitsWanted};

use super::eval::{kind_index, Accuracy};
use super::prompt::Renderer;
use crate::train::{Progress, Result, TrainError};

/// Answers are one word: a few tokens and the end of the turn.
const MAX_ANSWER_TOKENS: usize = 4;

/// The served model with an attached vision tower.
pub struct Served<'a> {
    pub model: &'a Llama,
    pub vision: &'a VisionModel,
    pub renderer: Renderer<'a>,
}

/// One answer and where its time went.
#[derive(Debug, Clone)]
pub struct Answer {
    pub text: String,
    /// The prompt's tokens (the image's included).
    pub prompt: Vec<u32>,
    pub prompt_tokens: usize,
    pub encode: Duration,
    pub prefill: Duration,
}

impl Answer {
    pub fn prefill_ms(&self) -> f64 {
        self.prefill.as_secs_f64() * 1e3
    }
}

/// The upper median of `values` (0 for none).
pub fn upper_median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

impl Served<'_> {
    /// The greedy answer to `question` about the `width x height` RGB image `rgb`.
    pub fn answer(&self, rgb: &[u8], width: u32, height: u32, question: &str) -> Result<Answer> {
        self.answer_with(rgb, width, height, question, &[])
    }

    /// [`Served::answer`] with `chain` (a pruning plug-in) after the image splice.
    pub fn answer_with(
        &self,
        rgb: &[u8],
        width: u32,
        height: u32,
        question: &str,
        chain: &[HookCall],
    ) -> Result<Answer> {
        let started = Instant::now();
        let features = self.vision.features(&[(rgb, width, height)])?;
        let encode = started.elapsed();
        let prompt = self.renderer.question(question)?;
        let image = self.vision.tower.config().image_token_id;
        let placement = ImagePlacement::for_prompt(&prompt, image, features)?;
        let splice = HookCall::new(Arc::new(ImageSplice::new(image)), Arc::new(placement));
        let hooks: Vec<HookCall> = std::iter::once(splice)
            .chain(chain.iter().cloned())
            .collect();
        let mut cache = self.model.new_cache();
        let started = Instant::now();
        let mut next = self.step(&prompt, &mut cache, &hooks)?;
        let prefill = started.elapsed();
        let end = self.renderer.tokenizer.eos_ids();
        let mut out = Vec::new();
        while !end.contains(&next) && out.len() < MAX_ANSWER_TOKENS {
            out.push(next);
            next = self.step(&[next], &mut cache, &hooks)?;
        }
        let text = self
            .renderer
            .tokenizer
            .decode(&out, true)
            .map_err(|e| TrainError::Prompt(e.to_string()))?;
        Ok(Answer {
            text: text.trim().to_string(),
            prompt_tokens: prompt.len(),
            prompt,
            encode,
            prefill,
        })
    }

    /// Feeds `tokens` and returns the greedy next token.
    fn step(&self, tokens: &[u32], cache: &mut models::KvCache, hooks: &[HookCall]) -> Result<u32> {
        let mut rows = [BatchRow {
            seq_id: 0,
            tokens,
            cache,
            hooks,
            logits: LogitsWanted::Last,
        }];
        let logits = self.model.forward(&mut rows)?.into_iter().next().flatten();
        let logits = logits.ok_or_else(|| TrainError::Prompt("no logits".into()))?;
        Ok(logits
            .flatten_all()?
            .argmax(D::Minus1)?
            .to_scalar::<u32>()?)
    }
}

/// One test question as the served model answered it.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub answer: Answer,
    pub right: bool,
}

/// Accuracy of the served model on the first `questions` test questions (the same ones as
/// [`super::eval::accuracy`]; an answer is right when, trimmed and lower-cased, it is the
/// expected word), with each question's answer in order.
pub fn served_accuracy(
    served: &Served<'_>,
    seed: u64,
    questions: usize,
    progress: &mut dyn Progress,
) -> Result<(Accuracy, Vec<Verdict>)> {
    let mut runs = served_sweep(served, &[Vec::new()], seed, questions, progress)?;
    runs.pop()
        .ok_or_else(|| TrainError::Prompt("the sweep lost its run".into()))
}

/// [`served_accuracy`] for each of `chains` (plug-ins after the image splice; empty: the
/// model alone), each question asked of every chain in turn before the next, so that machine
/// noise falls on all of them alike.
pub fn served_sweep(
    served: &Served<'_>,
    chains: &[Vec<HookCall>],
    seed: u64,
    questions: usize,
    progress: &mut dyn Progress,
) -> Result<Vec<(Accuracy, Vec<Verdict>)>> {
    progress.phase("test questions", questions * chains.len());
    let mut runs: Vec<(Accuracy, Vec<Verdict>)> = chains
        .iter()
        .map(|_| (Accuracy::empty(), Vec::with_capacity(questions)))
        .collect();
    let size = super::data::IMAGE_SIZE as u32;
    for i in 0..questions {
        let (sample, q) = super::eval::test_question(seed, i);
        let question = &sample.questions[q];
        for (chain, (accuracy, verdicts)) in chains.iter().zip(runs.iter_mut()) {
            let answer = served.answer_with(&sample.rgb, size, size, &question.text, chain)?;
            let right = answer.text.to_lowercase() == question.answer;
            accuracy.count(kind_index(question.kind), right);
            verdicts.push(Verdict { answer, right });
            progress.advance(1);
        }
    }
    Ok(runs)
}
