//! Steering directions from two prompt sets (what `server train steer` runs): the residual
//! stream after every decoder layer at each prompt's last token, collected with the serving
//! forward pass, then one unit direction per layer that separates the positive prompts from
//! the negative ones, and a report of how well each layer's direction separates held-out
//! prompts, to choose layers by. [`train_vector`] runs it all; `server train steer` parses
//! the flags, prints the table and writes the file.
//!
//! Methods: `mean-diff` is the difference of the class means (Arditi et al.'s refusal
//! direction, algorithms.md 1.1); `pca` follows repeng's `pca_diff`: the first principal axis
//! of the differences of paired prompts, signed so positives project higher (algorithms.md
//! 1.3). One departure: repeng's sklearn PCA mean-centres the differences, which discards a
//! difference every pair shares (the very thing to steer along) and returns the axis along
//! which pairs differ most *from each other*; on pairs that differ by a steady offset that is
//! noise. The axis of the uncentred second moment keeps the shared difference. Both are normalised to unit length, as llama.cpp's cvector-generator
//! does: raw mean differences are large enough to wreck the output at small scales, and unit
//! vectors make a scale mean the same here and in llama.cpp.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::Tensor;
use models::bundle::LoadedModel;
use models::{Hook, HookCall, HookGroup, HookPoints, Llama};

use super::ControlVector;
use crate::error::{PluginError, Result};
use crate::train::prompts::{chat_ids_all, tokens};
use crate::train::{Progress, Result as TrainResult};

/// Which direction estimate to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// The difference of the two sets' mean activations.
    MeanDiff,
    /// The first principal axis of the paired differences.
    Pca,
}

/// Records each row's last-position residual stream after every layer.
#[derive(Default)]
struct Capture {
    /// `(seq_id, layer)` -> the hidden vector.
    seen: Mutex<HashMap<(u64, usize), Vec<f32>>>,
}

impl Hook for Capture {
    fn name(&self) -> &str {
        "capture"
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
        let mut end = 0;
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        for (row, &n) in group.rows.iter().zip(&group.lengths) {
            end += n;
            seen.insert((row.seq_id, layer), h.get(end - 1)?.to_vec1::<f32>()?);
        }
        Ok(None)
    }
}

/// `[prompt][layer][hidden]`: the residual stream after each layer at each prompt's last
/// token, prompts fed `batch` at a time as whole prefill rows.
pub fn last_token_activations(
    model: &Llama,
    prompts: &[Vec<u32>],
    batch: usize,
    progress: &mut dyn Progress,
) -> Result<Vec<Vec<Vec<f32>>>> {
    let capture = Arc::new(Capture::default());
    let hook: Arc<dyn Hook> = capture.clone();
    let chain = [HookCall::bare(hook)];
    let layers = model.config.num_layers;
    let mut out = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(batch.max(1)) {
        let chunk_rows: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
        crate::train::prefill(model, &chunk_rows, &chain).map_err(|e| {
            PluginError::Incompatible {
                name: "capture".into(),
                message: e.to_string(),
            }
        })?;
        let mut seen = capture.seen.lock().unwrap_or_else(|p| p.into_inner());
        for i in 0..chunk.len() as u64 {
            let per_layer: Option<Vec<Vec<f32>>> =
                (0..layers).map(|l| seen.remove(&(i, l))).collect();
            out.push(per_layer.ok_or_else(|| PluginError::Incompatible {
                name: "capture".into(),
                message: "a layer's activations were not captured".into(),
            })?);
        }
        progress.advance(chunk.len());
    }
    Ok(out)
}

/// One layer's unit direction from positive and negative activations `[n][hidden]`.
pub fn direction(method: Method, pos: &[Vec<f32>], neg: &[Vec<f32>]) -> Vec<f32> {
    let raw = match method {
        Method::MeanDiff => sub(&mean(pos), &mean(neg)),
        Method::Pca => {
            let diffs: Vec<Vec<f64>> = pos
                .iter()
                .zip(neg)
                .map(|(p, n)| sub(&to64(p), &to64(n)))
                .collect();
            let pc = first_component(&diffs);
            // Sign: positives above negatives for most pairs.
            let agree = diffs.iter().filter(|d| dot(d, &pc) > 0.0).count();
            match agree * 2 >= diffs.len() {
                true => pc,
                false => pc.iter().map(|x| -x).collect(),
            }
        }
    };
    let norm = dot(&raw, &raw).sqrt();
    raw.iter()
        .map(|x| (x / norm.max(f64::MIN_POSITIVE)) as f32)
        .collect()
}

/// How well a direction separates held-out prompts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Separation {
    /// Probability that a random positive projects higher than a random negative.
    pub auroc: f64,
    /// Accuracy of the threshold halfway between the training class means' projections.
    pub accuracy: f64,
    /// Difference of held-out class means in units of their pooled standard deviation.
    pub cohens_d: f64,
}

/// Scores `dir` on held-out activations, the threshold taken from training ones.
pub fn separation(
    dir: &[f32],
    train: (&[Vec<f32>], &[Vec<f32>]),
    held: (&[Vec<f32>], &[Vec<f32>]),
) -> Separation {
    let d = to64(dir);
    let project = |xs: &[Vec<f32>]| -> Vec<f64> { xs.iter().map(|x| dot(&to64(x), &d)).collect() };
    let avg = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let threshold = (avg(&project(train.0)) + avg(&project(train.1))) / 2.0;
    let (p, n) = (project(held.0), project(held.1));
    let correct = p.iter().filter(|&&x| x > threshold).count()
        + n.iter().filter(|&&x| x <= threshold).count();
    let var = |v: &[f64]| {
        let m = avg(v);
        v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len().max(2) - 1) as f64
    };
    let pooled = ((var(&p) + var(&n)) / 2.0).sqrt();
    Separation {
        auroc: auroc(&p, &n),
        accuracy: correct as f64 / (p.len() + n.len()).max(1) as f64,
        cohens_d: (avg(&p) - avg(&n)) / pooled.max(f64::MIN_POSITIVE),
    }
}

/// Probability that a random `positive` score exceeds a random `negative` one (ties count
/// half): the area under the ROC curve, by counting all pairs.
pub fn auroc<T: PartialOrd>(positive: &[T], negative: &[T]) -> f64 {
    let wins: f64 = positive
        .iter()
        .map(|a| {
            negative
                .iter()
                .map(|b| {
                    if a > b {
                        1.0
                    } else if a == b {
                        0.5
                    } else {
                        0.0
                    }
                })
                .sum::<f64>()
        })
        .sum();
    wins / (positive.len() * negative.len()).max(1) as f64
}

/// What [`train_vector`] builds a vector from, besides the prompts.
#[derive(Debug, Clone, Copy)]
pub struct VectorOptions<'a> {
    pub method: Method,
    /// Inclusive layer range written to the file.
    pub layers: (usize, usize),
    /// Fraction of each prompt set held out to score the directions.
    pub holdout: f64,
    /// Text appended to every positive and every negative prompt after the generation prompt
    /// (the start of the assistant's reply), for behaviour directions as repeng builds them.
    pub replies: (&'a str, &'a str),
}

/// One layer's held-out score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerScore {
    pub layer: usize,
    pub separation: Separation,
}

/// A trained vector and how well each of its layers separates held-out prompts.
#[derive(Debug, Clone)]
pub struct TrainedVector {
    pub vector: ControlVector,
    pub scores: Vec<LayerScore>,
    /// Held-out (positive, negative) prompts the scores come from.
    pub held_out: (usize, usize),
}

/// Per-layer unit directions from chat-rendered `positive` and `negative` prompts (what
/// `server train steer` runs), each scored on held-out prompts; all of them when a set is too
/// small to hold any out.
pub fn train_vector(
    loaded: &LoadedModel,
    positive: &[String],
    negative: &[String],
    options: &VectorOptions<'_>,
    progress: &mut dyn Progress,
) -> TrainResult<TrainedVector> {
    let mut acts = |prompts: &[String], reply: &str| -> TrainResult<Vec<Vec<Vec<f32>>>> {
        let mut ids = chat_ids_all(loaded, prompts)?;
        let reply_ids = tokens(loaded, reply, false)?;
        ids.iter_mut().for_each(|i| i.extend_from_slice(&reply_ids));
        progress.phase("activations", ids.len());
        Ok(last_token_activations(&loaded.model, &ids, 16, progress)?)
    };
    let (pa, na) = (
        acts(positive, options.replies.0)?,
        acts(negative, options.replies.1)?,
    );
    let split = |n: usize| n - ((n as f64 * options.holdout).round() as usize).min(n - 1);
    let (sp, sn) = (split(pa.len()), split(na.len()));
    let mut directions = std::collections::BTreeMap::new();
    let mut scores = Vec::new();
    for layer in options.layers.0..=options.layers.1 {
        let at = |xs: &[Vec<Vec<f32>>]| xs.iter().map(|x| x[layer].clone()).collect::<Vec<_>>();
        let (p, n) = (at(&pa), at(&na));
        let d = direction(options.method, &p[..sp], &n[..sn]);
        let held = if sp < p.len() && sn < n.len() {
            (&p[sp..], &n[sn..])
        } else {
            (&p[..], &n[..])
        };
        let score = separation(&d, (&p[..sp], &n[..sn]), held);
        scores.push(LayerScore {
            layer,
            separation: score,
        });
        directions.insert(layer, d);
    }
    let hint = loaded.model.config.architecture.name().to_string();
    Ok(TrainedVector {
        vector: ControlVector {
            model_hint: Some(hint),
            directions,
        },
        scores,
        held_out: (pa.len() - sp, na.len() - sn),
    })
}

fn to64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn mean(xs: &[Vec<f32>]) -> Vec<f64> {
    let dim = xs.first().map_or(0, Vec::len);
    let mut m = vec![0f64; dim];
    for x in xs {
        for (a, &b) in m.iter_mut().zip(x) {
            *a += b as f64;
        }
    }
    m.iter().map(|v| v / xs.len().max(1) as f64).collect()
}

fn sub(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The leading eigenvector of `sum x x^T` over the rows of `xs` (uncentred; see the module
/// documentation), by power iteration without forming the matrix.
fn first_component(xs: &[Vec<f64>]) -> Vec<f64> {
    let dim = xs.first().map_or(0, Vec::len);
    // A fixed, irregular start, so the iteration never starts orthogonal to the answer.
    let mut v: Vec<f64> = (0..dim).map(|j| 1.0 + (j as f64 * 0.618).fract()).collect();
    for _ in 0..200 {
        let mut next = vec![0f64; dim];
        for x in xs {
            let s = dot(x, &v);
            for (a, b) in next.iter_mut().zip(x) {
                *a += s * b;
            }
        }
        let norm = dot(&next, &next).sqrt();
        if norm == 0.0 {
            break;
        }
        v = next.iter().map(|x| x / norm).collect();
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Positives and negatives that differ along axis 0 only, plus shared noise on axis 1.
    fn classes() -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let pos = (0..20)
            .map(|i| vec![2.0 + (i % 3) as f32 * 0.1, (i as f32).sin() * 5.0, 0.3])
            .collect();
        let neg = (0..20)
            .map(|i| vec![-1.0 - (i % 2) as f32 * 0.1, (i as f32).sin() * 5.0, 0.3])
            .collect();
        (pos, neg)
    }

    #[test]
    fn both_methods_find_the_separating_axis_as_a_unit_vector() {
        let (pos, neg) = classes();
        for method in [Method::MeanDiff, Method::Pca] {
            let d = direction(method, &pos, &neg);
            let norm: f32 = d.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "{method:?} norm {norm}");
            assert!(
                d[0] > 0.99,
                "{method:?} points along axis 0, positives up: {d:?}"
            );
        }
    }

    #[test]
    fn separation_scores_a_good_and_a_useless_direction() {
        let (pos, neg) = classes();
        let good = separation(&[1.0, 0.0, 0.0], (&pos, &neg), (&pos, &neg));
        assert_eq!((good.auroc, good.accuracy), (1.0, 1.0));
        assert!(good.cohens_d > 10.0);
        let useless = separation(&[0.0, 0.0, 1.0], (&pos, &neg), (&pos, &neg));
        assert_eq!(useless.auroc, 0.5);
    }
}
