//! Held-out accuracy of a trained tower with the frozen model: questions from the test split
//! of [`super::data`], one per image, the kinds in turn. An answer counts as right when greedy
//! decoding would produce exactly its tokens and then end the turn; that is checked in one
//! teacher-forced pass (the argmax at each answer position is the answer's next token), which
//! is what greedy decoding does token by token.

use candle_core::D;

use super::data::{self, QuestionKind, Sample, Split};
use super::tower::TrainableTower;
use super::train::Trainer;
use crate::train::{Progress, Result};

/// The question kinds, in the order reports list them.
pub const KINDS: [QuestionKind; 5] = [
    QuestionKind::Colour,
    QuestionKind::Shape,
    QuestionKind::Count,
    QuestionKind::Side,
    QuestionKind::Text,
];

/// Questions evaluated per forward pass.
const BATCH: usize = 8;

/// Right answers out of questions asked, overall and by kind.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Accuracy {
    pub questions: usize,
    pub correct: usize,
    /// `(kind, questions, correct)`.
    pub by_kind: Vec<(String, usize, usize)>,
}

impl Accuracy {
    /// No questions yet, every kind listed.
    pub fn empty() -> Self {
        Self {
            questions: 0,
            correct: 0,
            by_kind: KINDS
                .iter()
                .map(|k| (format!("{k:?}").to_lowercase(), 0, 0))
                .collect(),
        }
    }

    /// One more question of kind `KINDS[kind]`.
    pub fn count(&mut self, kind: usize, right: bool) {
        self.questions += 1;
        self.correct += usize::from(right);
        if let Some(k) = self.by_kind.get_mut(kind) {
            k.1 += 1;
            k.2 += usize::from(right);
        }
    }

    pub fn fraction(&self) -> f64 {
        self.correct as f64 / self.questions.max(1) as f64
    }
}

/// A table of accuracy by kind, then overall.
impl std::fmt::Display for Accuracy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let percent = |right: usize, n: usize| 100.0 * right as f64 / n.max(1) as f64;
        writeln!(f, "kind     questions  accuracy")?;
        for (kind, n, right) in &self.by_kind {
            writeln!(f, "{kind:<8} {n:>9}  {:>7.1}%", percent(*right, *n))?;
        }
        write!(
            f,
            "all      {:>9}  {:>7.1}%",
            self.questions,
            percent(self.correct, self.questions)
        )
    }
}

/// `kind`'s place in [`KINDS`].
pub fn kind_index(kind: QuestionKind) -> usize {
    KINDS.iter().position(|k| *k == kind).unwrap_or(0)
}

/// Test question `i`: image `i` of the test split, asked a question of kind `i mod 5` when it
/// has one (only images with a word have a text question), else its first question.
pub fn test_question(seed: u64, i: usize) -> (Sample, usize) {
    let sample = data::sample(seed, Split::Test, i as u64);
    let kind = KINDS[i % KINDS.len()];
    let q = sample
        .questions
        .iter()
        .position(|q| q.kind == kind)
        .unwrap_or(0);
    (sample, q)
}

/// Accuracy on the first `questions` test questions for `seed`.
pub fn accuracy(
    trainer: &Trainer<'_>,
    tower: &TrainableTower,
    seed: u64,
    questions: usize,
    progress: &mut dyn Progress,
) -> Result<Accuracy> {
    progress.phase("test questions", questions);
    let mut accuracy = Accuracy::empty();
    for first in (0..questions).step_by(BATCH) {
        let items: Vec<(Sample, usize)> = (first..questions.min(first + BATCH))
            .map(|i| test_question(seed, i))
            .collect();
        let samples: Vec<Sample> = items.iter().map(|(s, _)| s.clone()).collect();
        let conversations = items
            .iter()
            .map(|(s, q)| {
                let q = &s.questions[*q];
                trainer
                    .renderer
                    .conversation(&[(q.text.as_str(), q.answer)])
            })
            .collect::<Result<Vec<_>>>()?;
        let features = tower.forward(&trainer.pixels(&samples)?)?.detach();
        let predicted: Vec<u32> = trainer
            .answer_logits(&conversations, &features)?
            .argmax(D::Minus1)?
            .to_vec1()?;
        let mut at = 0;
        for ((s, q), c) in items.iter().zip(&conversations) {
            let n = c.targets.len();
            let right = c
                .targets
                .iter()
                .zip(&predicted[at..at + n])
                .all(|(t, p)| t.1 == *p);
            at += n;
            accuracy.count(kind_index(s.questions[*q].kind), right);
        }
        progress.advance(items.len());
    }
    Ok(accuracy)
}
