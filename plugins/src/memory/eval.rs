//! Perplexity of a memory decoder's mixture and of the kNN-LM baseline (Memory Decoder §4,
//! `evaluate_joint.py`).
//!
//! Both mix another distribution into the base's with weight λ, and a mixture's probability of
//! the actual token depends only on the two models' probabilities of that token:
//! `p = (1 − λ) p_base + λ p_other`. So one pass per model over the text gives the whole λ
//! curve ([`mixture`]). The serving path scores the base and the memory (`server eval
//! perplexity` reads prompt log-probs from the engine); [`knn_logprobs`] scores the kNN-LM,
//! which is an evaluation mode only: real retrieval from the datastore for every scored token.

use models::Llama;

use super::datastore::{capture, Datastore};
use super::knn::{distribution, search};
use crate::train::{Progress, Result};

/// `exp(−mean log p)`; infinite when a token has probability 0.
pub fn perplexity(logprobs: &[f32]) -> f64 {
    if logprobs.is_empty() {
        return f64::NAN;
    }
    let total: f64 = logprobs.iter().map(|&l| f64::from(l)).sum();
    (-total / logprobs.len() as f64).exp()
}

/// Per-token `log((1 − λ) e^base + λ e^other)`, computed without underflow.
pub fn mixture(base: &[f32], other: &[f32], lambda: f64) -> Vec<f32> {
    base.iter()
        .zip(other)
        .map(|(&b, &o)| {
            let a = (1.0 - lambda).ln() + f64::from(b);
            let c = lambda.ln() + f64::from(o);
            let m = a.max(c);
            if m == f64::NEG_INFINITY {
                return f32::NEG_INFINITY;
            }
            (m + ((a - m).exp() + (c - m).exp()).ln()) as f32
        })
        .collect()
}

/// The kNN-LM's log-probability of every scored token of `windows` (as
/// [`super::corpus::Corpus::windows`] gives them): the base's key at each predicting position
/// searched exactly in `store`, `k` neighbours, temperature `tau`. A token no neighbour holds
/// has probability 0 (`-inf`); the mixture with the base keeps it finite.
pub fn knn_logprobs(
    model: &Llama,
    store: &Datastore,
    windows: &[(&[u32], usize)],
    k: usize,
    tau: f32,
    progress: &mut dyn Progress,
) -> Result<Vec<f32>> {
    let (mut queries, mut targets) = (Vec::new(), Vec::new());
    progress.phase("keys", windows.len());
    for (window, first) in windows {
        let keys = capture(model, &[window], 0)?.remove(0).0; // (len, hidden)
        let n = window.len() - first;
        queries.extend(
            keys.narrow(0, first - 1, n)?
                .flatten_all()?
                .to_vec1::<f32>()?,
        );
        targets.extend_from_slice(&window[*first..]);
        progress.advance(1);
    }
    let found = search(store, &queries, k, None, progress)?;
    Ok(found
        .per_query
        .iter()
        .zip(&targets)
        .map(|(neighbours, &target)| {
            let p: f32 = distribution(neighbours, &store.values, tau)
                .iter()
                .filter(|(t, _)| *t == target)
                .map(|(_, p)| p)
                .sum();
            p.ln()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mixture_is_the_weighted_sum_of_probabilities() {
        let (base, other) = (
            [0.5f32.ln(), 0.1f32.ln()],
            [0.25f32.ln(), f32::NEG_INFINITY],
        );
        let m = mixture(&base, &other, 0.2);
        assert!((m[0] - (0.8f32 * 0.5 + 0.2 * 0.25).ln()).abs() < 1e-6);
        assert!((m[1] - (0.8f32 * 0.1).ln()).abs() < 1e-6);
        // λ = 0 is the base, λ = 1 the other model.
        assert!((mixture(&base, &other, 0.0)[0] - base[0]).abs() < 1e-6);
        assert!((mixture(&base, &other, 1.0)[0] - other[0]).abs() < 1e-6);
        assert!((perplexity(&[0.5f32.ln(), 0.125f32.ln()]) - 4.0).abs() < 1e-5);
    }
}
