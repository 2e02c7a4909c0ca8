//! Log-probabilities of tokens under one row of logits.
//!
//! Used twice in the request path: by the [`Sampler`](super::Sampler) when a request asks for
//! `logprobs` / `top_logprobs` on generated tokens, and by the server's `echo` to score prompt
//! tokens (one row of logits per prompt position). Like vLLM's default (`logprobs_mode =
//! raw_logprobs`), these are the log-softmax of the model's RAW logits: before logit bias,
//! penalties, temperature and truncation, so they describe the model, not the sampling
//! settings, and a token outside the top-p set still gets a finite log-probability.

use super::SamplingError;

/// A token's log-probability and, when asked for, the row's most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// `log p(id)` under the raw logits.
    pub logprob: f32,
    /// The `top_n` most likely `(id, logprob)`, most likely first, ties toward the lower id.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// `log(sum(exp(logits)))`, computed stably by factoring out the maximum.
///
/// Returns the maximum itself when it is not finite (an empty row or every token masked to
/// `-inf` gives `-inf`), so callers never see a NaN produced here.
pub fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    // f64 accumulation: 150k terms summed in f32 lose about three digits.
    let sum: f64 = logits.iter().map(|&l| f64::from((l - max).exp())).sum();
    max + sum.ln() as f32
}

/// The log-probabilities of `ids` under one row of raw logits.
pub fn log_softmax_at(logits: &[f32], ids: &[u32]) -> Result<Vec<f32>, SamplingError> {
    let lse = log_sum_exp(logits);
    ids.iter()
        .map(|&id| Ok(logit_of(logits, id)? - lse))
        .collect()
}

/// `id`'s log-probability under one row of raw logits, with the `top_n` most likely tokens.
pub fn token_logprobs(
    logits: &[f32],
    id: u32,
    top_n: usize,
) -> Result<TokenLogprobs, SamplingError> {
    let lse = log_sum_exp(logits);
    let logprob = logit_of(logits, id)? - lse;
    let mut top_logprobs = Vec::with_capacity(top_n);
    top_n_into(logits, top_n, &mut top_logprobs);
    for entry in &mut top_logprobs {
        entry.1 -= lse;
    }
    Ok(TokenLogprobs {
        logprob,
        top_logprobs,
    })
}

fn logit_of(logits: &[f32], id: u32) -> Result<f32, SamplingError> {
    logits
        .get(id as usize)
        .copied()
        .ok_or(SamplingError::TokenOutOfRange {
            id,
            vocab_size: logits.len(),
        })
}

/// Fills `out` with the `n` largest `(id, logit)` pairs, largest first, ties toward the lower
/// id; NaN logits are skipped.
///
/// One pass with a small sorted buffer instead of a sort of the vocabulary: `n` is at most 20
/// and almost every logit loses the comparison against the buffer's last entry.
pub(crate) fn top_n_into(logits: &[f32], n: usize, out: &mut Vec<(u32, f32)>) {
    out.clear();
    if n == 0 {
        return;
    }
    for (id, &value) in (0u32..).zip(logits) {
        if value.is_nan() {
            continue;
        }
        if out.len() == n {
            // Equal values lose: scanning in id order keeps the lower id on ties.
            match out.last() {
                Some(&(_, last)) if value > last => {
                    out.pop();
                }
                _ => continue,
            }
        }
        let pos = out.partition_point(|&(_, v)| v >= value);
        out.insert(pos, (id, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() < 1e-5
    }

    #[test]
    fn log_softmax_matches_hand_computation() {
        // softmax([ln 1, ln 2, ln 3, ln 4]) = [0.1, 0.2, 0.3, 0.4]
        let logits = [1f32.ln(), 2f32.ln(), 3f32.ln(), 4f32.ln()];
        let lp = log_softmax_at(&logits, &[0, 1, 2, 3]).unwrap();
        for (got, p) in lp.iter().zip([0.1f32, 0.2, 0.3, 0.4]) {
            assert!(close(*got, p.ln()), "{got} vs ln {p}");
        }
    }

    #[test]
    fn logprobs_normalise_even_for_large_logits() {
        // Naive exp(1000) overflows; the max-shifted form must still sum to one.
        let logits = [1000.0f32, 999.0, 998.0, -5.0, 0.0];
        let ids: Vec<u32> = (0..logits.len() as u32).collect();
        let lp = log_softmax_at(&logits, &ids).unwrap();
        let total: f32 = lp.iter().map(|l| l.exp()).sum();
        // f32 spacing near 1000 is 6e-5, so that is the precision the inputs carry.
        assert!((total - 1.0).abs() < 2e-4, "sum of probabilities {total}");
        assert!(total.is_finite());
        assert!(lp.iter().all(|l| *l <= 0.0));
    }

    #[test]
    fn all_masked_row_gives_neg_infinity_not_nan() {
        let logits = [f32::NEG_INFINITY; 3];
        assert_eq!(log_sum_exp(&logits), f32::NEG_INFINITY);
        assert_eq!(log_sum_exp(&[]), f32::NEG_INFINITY);
    }

    #[test]
    fn top_logprobs_are_sorted_descending_with_ties_to_lower_id() {
        let logits = [0.5f32, 3.0, -1.0, 3.0, 2.0, f32::NAN, 0.5];
        let out = token_logprobs(&logits, 2, 4).unwrap();
        let ids: Vec<u32> = out.top_logprobs.iter().map(|&(id, _)| id).collect();
        assert_eq!(ids, vec![1, 3, 4, 0]);
    }

    #[test]
    fn top_logprobs_values_match_log_softmax() {
        let logits = [0.1f32, 2.0, -3.0, 1.5, 0.7, 1.9];
        let out = token_logprobs(&logits, 2, 3).unwrap();
        let expect = log_softmax_at(&logits, &[1, 5, 3]).unwrap();
        assert_eq!(out.top_logprobs.len(), 3);
        for ((id, lp), (want_id, want)) in
            out.top_logprobs.iter().zip([1u32, 5, 3].iter().zip(expect))
        {
            assert_eq!(id, want_id);
            assert!(close(*lp, want));
        }
        assert!(out.top_logprobs.windows(2).all(|w| w[0].1 >= w[1].1));
        assert!(close(
            out.logprob,
            log_softmax_at(&logits, &[2]).unwrap()[0]
        ));
    }

    #[test]
    fn top_n_larger_than_vocab_returns_whole_row() {
        let mut out = Vec::new();
        top_n_into(&[1.0, 3.0, 2.0], 20, &mut out);
        assert_eq!(out, vec![(1, 3.0), (2, 2.0), (0, 1.0)]);
        top_n_into(&[1.0, 3.0, 2.0], 0, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn out_of_range_id_is_an_error_naming_it() {
        let err = token_logprobs(&[0.0, 1.0], 7, 0).unwrap_err();
        assert_eq!(
            err,
            SamplingError::TokenOutOfRange {
                id: 7,
                vocab_size: 2
            }
        );
        assert!(err.to_string().contains("token id 7"));
        assert!(log_softmax_at(&[0.0], &[1]).is_err());
    }
}
