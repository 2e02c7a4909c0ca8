//! The per-request sampler: one row of logits in, one token id out.
//!
//! The engine thread owns one [`Sampler`] per sequence and calls [`Sampler::sample`] once per
//! generated token with that row's final logits (after the plug-in logits hook, copied to the
//! CPU). Processing follows vLLM and Hugging Face, in this order:
//!
//! 1. logit bias (OpenAI `logit_bias`, added to the raw logits);
//! 2. penalties: repetition (HF, over prompt and generated tokens), then frequency and
//!    presence (OpenAI, over generated tokens only), as vLLM's `apply_penalties` does;
//! 3. temperature (below 1e-5, `0` included, stops here and takes the argmax, as vLLM does);
//! 4. truncation: top-k, then top-p, then min-p (Hugging Face's warper order; vLLM v1 applies
//!    min-p before top-k/top-p, which only differs when both top-p and min-p are set);
//! 5. a draw from what is left, using the request's own seeded RNG.
//!
//! Reproducibility: the RNG is ChaCha8 keyed with the seed's little-endian bytes
//! (`rand_chacha` documents its stream as portable and stable), uniforms are built from its
//! `next_u64` with our own arithmetic, and every candidate list is walked in a fixed order
//! (probability descending, ties toward the lower id, or plain id order), so one seed gives
//! one token sequence on every platform and across versions of `rand` and of Rust's sort.
//!
//! Cost: this runs once per token over a 49k-152k vocabulary, so the buffers live in the
//! sampler and are reused, greedy never sorts, top-k/top-p use partial selection
//! (`select_nth_unstable_by`) and sort only the survivors, and log-probabilities are computed
//! only when the request asks for them.

use std::cmp::Ordering;
use std::collections::HashMap;

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::logprobs::{log_sum_exp, top_n_into};
use super::SamplingParams;
use crate::kernels::exp_weights::{exp_weights_into, row_max};

/// One sampled token.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    /// The chosen token id.
    pub id: u32,
    /// Its log-probability under the raw logits; `None` unless the request set `logprobs`,
    /// because the log-sum-exp over the vocabulary is not free for every row of every batch.
    pub logprob: Option<f32>,
    /// The `top_logprobs` most likely `(id, logprob)` under the raw logits, most likely
    /// first; empty unless requested.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Chooses the next tokens of one sequence; see the module docs for the processing order.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Distinct prompt tokens, sorted; kept only when a repetition penalty is set.
    prompt_tokens: Vec<u32>,
    /// How often each token has been generated; kept only when a penalty is set.
    generated: HashMap<u32, u32>,
    /// The biased and penalised logits; reused across calls.
    work: Vec<f32>,
    /// Candidate token ids during truncation; reused across calls.
    order: Vec<u32>,
    /// Unnormalised probabilities aligned with the candidates being drawn from; reused.
    weights: Vec<f32>,
}

impl Sampler {
    /// A sampler for one sequence. `seed` is the request's `seed`, or a random one the caller
    /// drew when the request gave none (the sampler itself never reads ambient entropy, so a
    /// test or a replay can always reproduce a run).
    pub fn new(params: SamplingParams, seed: u64) -> Self {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        Self {
            params,
            rng: ChaCha8Rng::from_seed(key),
            prompt_tokens: Vec::new(),
            generated: HashMap::new(),
            work: Vec::new(),
            order: Vec::new(),
            weights: Vec::new(),
        }
    }

    /// The parameters this sampler was built with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Records prompt tokens for the repetition penalty (call once per prompt, or per chunk
    /// of a chunked prefill; repeated ids are fine). A no-op without a repetition penalty.
    pub fn observe_prompt(&mut self, tokens: &[u32]) {
        if self.params.repetition_penalty == 1.0 {
            return;
        }
        self.prompt_tokens.extend_from_slice(tokens);
        self.prompt_tokens.sort_unstable();
        self.prompt_tokens.dedup();
    }

    /// Records a token that joined the generated sequence without being drawn here (a forced
    /// or replayed token). [`Sampler::sample`] records its own picks; do not call this for them.
    pub fn accept(&mut self, id: u32) {
        if self.needs_history() {
            *self.generated.entry(id).or_insert(0) += 1;
        }
    }

    /// Chooses the next token from one row of logits (`logits.len()` = vocabulary size) and
    /// records it for the penalties. An empty row yields id 0.
    pub fn sample(&mut self, logits: &[f32]) -> SampledToken {
        let id = self.choose(logits);
        self.accept(id);
        if !self.params.logprobs {
            return SampledToken {
                id,
                logprob: None,
                top_logprobs: Vec::new(),
            };
        }
        let lse = log_sum_exp(logits);
        let logprob = logits.get(id as usize).map(|l| l - lse);
        let mut top_logprobs = Vec::with_capacity(self.params.top_logprobs);
        top_n_into(logits, self.params.top_logprobs, &mut top_logprobs);
        for entry in &mut top_logprobs {
            entry.1 -= lse;
        }
        SampledToken {
            id,
            logprob,
            top_logprobs,
        }
    }

    fn needs_history(&self) -> bool {
        self.params.repetition_penalty != 1.0
            || self.params.presence_penalty != 0.0
            || self.params.frequency_penalty != 0.0
    }

    fn choose(&mut self, logits: &[f32]) -> u32 {
        let scores: &[f32] = if self.params.leaves_logits_unchanged() {
            logits
        } else {
            self.apply_bias_and_penalties(logits);
            &self.work
        };
        if self.params.is_greedy() {
            return argmax(scores);
        }
        let max = row_max(scores);
        if !max.is_finite() {
            // Every token masked (-inf) or one forced (+inf): nothing to draw.
            return argmax(scores);
        }
        let scale = Scaled {
            scores,
            max,
            inv_t: 1.0 / self.params.temperature,
        };
        let u = uniform(&mut self.rng);
        if !truncates(&self.params, scores.len()) {
            return draw_all(&scale, &mut self.weights, u);
        }
        truncate(&scale, &self.params, &mut self.order);
        draw_from(&scale, &self.order, &mut self.weights, u)
    }

    /// Steps 1-2: writes `logits` plus bias, minus penalties, into `self.work`.
    fn apply_bias_and_penalties(&mut self, logits: &[f32]) {
        self.work.clear();
        self.work.extend_from_slice(logits);
        for &(id, bias) in &self.params.logit_bias {
            if let Some(l) = self.work.get_mut(id as usize) {
                *l += bias;
            }
        }
        let rep = self.params.repetition_penalty;
        if rep != 1.0 {
            let generated_only = self
                .generated
                .keys()
                .filter(|id| self.prompt_tokens.binary_search(id).is_err());
            for &id in self.prompt_tokens.iter().chain(generated_only) {
                if let Some(l) = self.work.get_mut(id as usize) {
                    *l = if *l > 0.0 { *l / rep } else { *l * rep };
                }
            }
        }
        let (freq, presence) = (self.params.frequency_penalty, self.params.presence_penalty);
        if freq != 0.0 || presence != 0.0 {
            for (&id, &count) in &self.generated {
                if let Some(l) = self.work.get_mut(id as usize) {
                    *l -= freq * count as f32 + presence;
                }
            }
        }
    }
}

/// Temperature-scaled view of one row: `weight(i) = exp((score_i - max) / T)`, so the top
/// token weighs 1 and a weight is also the token's probability relative to the top one.
struct Scaled<'a> {
    scores: &'a [f32],
    max: f32,
    inv_t: f32,
}

impl Scaled<'_> {
    fn weight(&self, id: u32) -> f32 {
        self.scores
            .get(id as usize)
            .map_or(0.0, |s| ((s - self.max) * self.inv_t).exp())
    }

    /// Most likely first, ties toward the lower id: a total order, so partial selection and
    /// sorting give the same candidate list whatever algorithm the standard library uses.
    fn by_score_desc(&self, a: &u32, b: &u32) -> Ordering {
        let score = |id: &u32| {
            self.scores
                .get(*id as usize)
                .copied()
                .unwrap_or(f32::NEG_INFINITY)
        };
        score(b).total_cmp(&score(a)).then(a.cmp(b))
    }
}

fn truncates(params: &SamplingParams, vocab: usize) -> bool {
    (params.top_k > 0 && params.top_k < vocab) || params.top_p < 1.0 || params.min_p > 0.0
}

/// Step 4: leaves the surviving candidate ids in `order`.
fn truncate(scale: &Scaled<'_>, params: &SamplingParams, order: &mut Vec<u32>) {
    order.clear();
    order.extend(0..scale.scores.len() as u32);
    let mut sorted = false;
    let k = params.top_k;
    if k > 0 && k < order.len() {
        order.select_nth_unstable_by(k - 1, |a, b| scale.by_score_desc(a, b));
        order.truncate(k);
        order.sort_unstable_by(|a, b| scale.by_score_desc(a, b));
        sorted = true;
    }
    if params.top_p < 1.0 {
        let keep = top_p_len(scale, order, sorted, params.top_p);
        order.truncate(keep);
    }
    if params.min_p > 0.0 {
        // The top token weighs 1 and is never removed by top-k or top-p, so the min-p
        // threshold relative to it is just `min_p`.
        order.retain(|&id| scale.weight(id) >= params.min_p);
    }
}

/// The length of the shortest most-likely-first prefix of `order` whose probability mass
/// reaches `top_p` (at least one token), sorting that prefix in place.
///
/// Without top-k the candidates are the whole vocabulary, so instead of sorting it all the
/// prefix is grown in chunks of 64, 128, 256, ...: each chunk is selected from the rest with
/// `select_nth_unstable_by` and only the chunk is sorted. Peaked distributions stop in the
/// first chunk; flat ones cost O(vocab log(prefix)).
fn top_p_len(scale: &Scaled<'_>, order: &mut [u32], sorted: bool, top_p: f32) -> usize {
    let total: f64 = order.iter().map(|&id| f64::from(scale.weight(id))).sum();
    let target = f64::from(top_p) * total;
    let mut mass = 0.0f64;
    let (mut done, mut chunk) = (0usize, 64usize);
    while done < order.len() {
        let end = (done + chunk).min(order.len());
        if !sorted {
            let rest = &mut order[done..];
            if end - done < rest.len() {
                rest.select_nth_unstable_by(end - done - 1, |a, b| scale.by_score_desc(a, b));
            }
            order[done..end].sort_unstable_by(|a, b| scale.by_score_desc(a, b));
        }
        for (pos, &id) in order.iter().enumerate().take(end).skip(done) {
            mass += f64::from(scale.weight(id));
            if mass >= target {
                return pos + 1;
            }
        }
        done = end;
        chunk *= 2;
    }
    order.len()
}

/// Step 5 without truncation: a draw over the whole row, in id order.
fn draw_all(scale: &Scaled<'_>, weights: &mut Vec<f32>, u: f64) -> u32 {
    exp_weights_into(scale.scores, scale.max, scale.inv_t, weights);
    pick(weights, u) as u32
}

/// Step 5 after truncation: a draw over the candidates, in `order`'s order.
fn draw_from(scale: &Scaled<'_>, order: &[u32], weights: &mut Vec<f32>, u: f64) -> u32 {
    weights.clear();
    weights.extend(order.iter().map(|&id| scale.weight(id)));
    order.get(pick(weights, u)).copied().unwrap_or(0)
}

/// Inverse-CDF draw: the position where the running sum of `weights` first exceeds
/// `u * total`. Zero weights can never be picked; rounding past the end picks the last
/// positive weight. The running sum moves a block at a time (f32 within a block, f64 across
/// blocks), so only the block holding the target is walked weight by weight.
fn pick(weights: &[f32], u: f64) -> usize {
    let block_sum = |b: &[f32]| -> f64 {
        let mut lanes = [0f32; 16];
        let mut chunks = b.chunks_exact(16);
        for c in &mut chunks {
            for (l, &w) in lanes.iter_mut().zip(c) {
                *l += w;
            }
        }
        f64::from(lanes.iter().chain(chunks.remainder()).sum::<f32>())
    };
    let sums: Vec<f64> = weights.chunks(PICK_BLOCK).map(block_sum).collect();
    let total: f64 = sums.iter().sum();
    let target = u * total;
    let mut acc = 0.0f64;
    for (i, (block, &s)) in weights.chunks(PICK_BLOCK).zip(&sums).enumerate() {
        if acc + s > target {
            for (pos, &w) in block.iter().enumerate() {
                acc += f64::from(w);
                if acc > target {
                    return i * PICK_BLOCK + pos;
                }
            }
        } else {
            acc += s;
        }
    }
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(0)
}

/// Weights per block of [`pick`]'s running sum.
const PICK_BLOCK: usize = 256;

/// The first index of the largest score (lowest id on ties); NaN never wins.
fn argmax(scores: &[f32]) -> u32 {
    let mut best = (0u32, f32::NEG_INFINITY);
    for (id, &s) in (0u32..).zip(scores) {
        if s > best.1 {
            best = (id, s);
        }
    }
    best.0
}

/// A uniform draw in `[0, 1)` from the top 53 bits of one `u64`, spelled out here so the
/// mapping cannot change under us with a `rand` upgrade.
fn uniform(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::{log_softmax_at, GREEDY_BELOW_TEMPERATURE};

    fn params() -> SamplingParams {
        SamplingParams::default()
    }

    fn ln(ps: &[f32]) -> Vec<f32> {
        ps.iter().map(|p| p.ln()).collect()
    }

    /// Relative frequency of each token over `n` draws from the same logits.
    fn frequencies(params: SamplingParams, logits: &[f32], n: usize, seed: u64) -> Vec<f64> {
        let mut sampler = Sampler::new(params, seed);
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..n {
            counts[sampler.sample(logits).id as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / n as f64).collect()
    }

    fn assert_close(got: &[f64], want: &[f64], tol: f64) {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() < tol,
                "token {i}: frequency {g:.4}, expected {w:.4} (all: {got:?})"
            );
        }
    }

    #[test]
    fn blockwise_pick_lands_where_the_running_sum_crosses_the_target() {
        let weights: Vec<f32> = (0..5000)
            .map(|i| {
                if i % 7 == 0 {
                    0.0
                } else {
                    ((i * 7919) % 1000) as f32 / 1000.0
                }
            })
            .collect();
        let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
        let mut before = vec![0f64; weights.len() + 1];
        for (i, &w) in weights.iter().enumerate() {
            before[i + 1] = before[i] + f64::from(w);
        }
        for k in 0..1000 {
            let u = k as f64 / 1000.0;
            let pos = pick(&weights, u);
            let target = u * total;
            assert!(weights[pos] > 0.0, "u {u}: picked a zero weight at {pos}");
            assert!(
                before[pos] <= target * (1.0 + 1e-6) + 1e-9,
                "u {u}: {pos} too late"
            );
            assert!(
                before[pos + 1] >= target * (1.0 - 1e-6),
                "u {u}: {pos} too early"
            );
        }
        assert_eq!(pick(&weights, 0.999_999_999), 4999);
    }

    #[test]
    fn greedy_takes_the_argmax_and_the_lower_id_on_ties() {
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 0.0,
                ..params()
            },
            1,
        );
        assert_eq!(s.sample(&[0.1, 2.0, -1.0, 1.9]).id, 1);
        assert_eq!(s.sample(&[3.0, 1.0, 3.0]).id, 0);
        assert_eq!(s.sample(&[f32::NAN, -1.0, -0.5]).id, 2);
    }

    #[test]
    fn greedy_ignores_truncation_and_consumes_no_randomness() {
        let p = SamplingParams {
            temperature: 0.0,
            top_k: 2,
            top_p: 0.1,
            min_p: 0.9,
            ..params()
        };
        let mut a = Sampler::new(p.clone(), 7);
        let mut b = Sampler::new(p, 8);
        for _ in 0..20 {
            assert_eq!(a.sample(&[0.0, 5.0, 1.0]).id, 1);
            assert_eq!(b.sample(&[0.0, 5.0, 1.0]).id, 1);
        }
    }

    /// Below about 3e-39, `1 / temperature` overflowed to infinity, the top token's weight
    /// became `0 * inf = NaN` and the draw fell back to id 0 (the end of sequence on most
    /// models): an empty completion.
    #[test]
    fn regression_tiny_temperatures_are_greedy_not_id_0() {
        let logits = [0.5, 2.0, -1.0, 1.9, 0.0];
        for temperature in [f32::from_bits(1), 1e-39, 1e-38, 1e-20, 9.9e-6] {
            for seed in 0..8 {
                let p = SamplingParams {
                    temperature,
                    top_p: 0.9,
                    ..params()
                };
                let mut s = Sampler::new(p.clone(), seed);
                assert_eq!(s.sample(&logits).id, 1, "temperature {temperature:e}");
                let mut plain = Sampler::new(SamplingParams { top_p: 1.0, ..p }, seed);
                assert_eq!(plain.sample(&logits).id, 1, "temperature {temperature:e}");
            }
        }
        let at_threshold = SamplingParams {
            temperature: GREEDY_BELOW_TEMPERATURE,
            ..params()
        };
        assert!(
            !at_threshold.is_greedy(),
            "1e-5 itself is a (very sharp) draw"
        );
    }

    #[test]
    fn empirical_frequencies_match_the_softmax() {
        let probs = [0.1f32, 0.2, 0.3, 0.4];
        let freq = frequencies(params(), &ln(&probs), 20_000, 3);
        // Binomial sd at p = 0.4, n = 20k is 0.0035; 0.015 is over four sd.
        assert_close(&freq, &[0.1, 0.2, 0.3, 0.4], 0.015);
    }

    #[test]
    fn temperature_flattens_and_sharpens() {
        // softmax([0, ln 3]) = [1/4, 3/4]; at T = 2 the logits halve: [1, sqrt 3] / (1 + sqrt 3).
        let logits = [0.0f32, 3f32.ln()];
        let hot = frequencies(
            SamplingParams {
                temperature: 2.0,
                ..params()
            },
            &logits,
            20_000,
            4,
        );
        let s3 = 3f64.sqrt();
        assert_close(&hot, &[1.0 / (1.0 + s3), s3 / (1.0 + s3)], 0.015);
        // At T = 0.5 the logits double: [1, 9] / 10.
        let cold = frequencies(
            SamplingParams {
                temperature: 0.5,
                ..params()
            },
            &logits,
            20_000,
            4,
        );
        assert_close(&cold, &[0.1, 0.9], 0.015);
    }

    #[test]
    fn top_k_one_is_greedy_for_any_seed() {
        let logits = [0.3f32, 1.2, 1.1, -0.4, 1.19];
        for seed in 0..50 {
            let mut s = Sampler::new(
                SamplingParams {
                    temperature: 1.5,
                    top_k: 1,
                    ..params()
                },
                seed,
            );
            assert_eq!(s.sample(&logits).id, 1, "seed {seed}");
        }
    }

    #[test]
    fn top_k_renormalises_over_the_k_best() {
        let freq = frequencies(
            SamplingParams {
                top_k: 2,
                ..params()
            },
            &ln(&[0.1, 0.2, 0.3, 0.4]),
            20_000,
            5,
        );
        assert_close(&freq, &[0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0], 0.015);
    }

    fn kept(params: &SamplingParams, logits: &[f32]) -> Vec<u32> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let scale = Scaled {
            scores: logits,
            max,
            inv_t: 1.0 / params.temperature,
        };
        let mut order = Vec::new();
        truncate(&scale, params, &mut order);
        order
    }

    #[test]
    fn top_p_keeps_the_minimal_set_reaching_the_mass() {
        let logits = ln(&[0.15, 0.5, 0.05, 0.3]);
        let with = |top_p| kept(&SamplingParams { top_p, ..params() }, &logits);
        // Thresholds sit away from the exact sums (0.5, 0.8, 0.95) so rounding cannot decide.
        assert_eq!(with(0.4), vec![1], "0.5 alone reaches 0.4");
        assert_eq!(with(0.79), vec![1, 3], "0.5 + 0.3 reaches 0.79");
        assert_eq!(with(0.81), vec![1, 3, 0], "0.8 falls short of 0.81");
        assert_eq!(with(0.96), vec![1, 3, 0, 2]);
    }

    #[test]
    fn top_p_draws_only_from_the_nucleus() {
        let p = SamplingParams {
            top_p: 0.79,
            ..params()
        };
        let freq = frequencies(p, &ln(&[0.15, 0.5, 0.05, 0.3]), 20_000, 6);
        assert_close(&freq, &[0.0, 0.625, 0.0, 0.375], 0.015);
    }

    #[test]
    fn top_p_over_a_large_vocab_matches_a_full_sort() {
        // A flat-ish 5000-token row whose nucleus needs hundreds of tokens, so the chunked
        // selection has to grow several times; compared against a plain full sort.
        let logits: Vec<f32> = (0..5000u32)
            .map(|i| ((i * 7919) % 5000) as f32 / 700.0)
            .collect();
        for top_p in [0.2f32, 0.5, 0.9] {
            let got = kept(&SamplingParams { top_p, ..params() }, &logits);
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let w: Vec<f64> = logits.iter().map(|l| f64::from((l - max).exp())).collect();
            let total: f64 = w.iter().sum();
            let mut ids: Vec<u32> = (0..5000).collect();
            ids.sort_by(|&a, &b| {
                logits[b as usize]
                    .total_cmp(&logits[a as usize])
                    .then(a.cmp(&b))
            });
            let mut mass = 0.0;
            let n = ids
                .iter()
                .position(|&i| {
                    mass += w[i as usize];
                    mass >= f64::from(top_p) * total
                })
                .unwrap()
                + 1;
            assert!(
                n > 64,
                "top_p {top_p}: the test needs a nucleus beyond the first chunk, got {n}"
            );
            assert_eq!(got, ids[..n].to_vec(), "top_p {top_p}");
        }
    }

    #[test]
    fn min_p_drops_tokens_below_the_fraction_of_the_top() {
        let logits = ln(&[0.15, 0.5, 0.05, 0.3]);
        // min_p 0.2: threshold 0.1 keeps 0.5, 0.3, 0.15 (id order, no sort needed).
        assert_eq!(
            kept(
                &SamplingParams {
                    min_p: 0.2,
                    ..params()
                },
                &logits
            ),
            vec![0, 1, 3]
        );
        assert_eq!(
            kept(
                &SamplingParams {
                    min_p: 0.5,
                    ..params()
                },
                &logits
            ),
            vec![1, 3]
        );
        // Temperature applies first: at T = 0.5 the ratios square, 0.3/0.5 -> 0.36.
        let cold = SamplingParams {
            min_p: 0.4,
            temperature: 0.5,
            ..params()
        };
        assert_eq!(kept(&cold, &logits), vec![1]);
    }

    #[test]
    fn truncations_compose_in_order() {
        let logits = ln(&[0.15, 0.5, 0.05, 0.3]);
        let p = SamplingParams {
            top_k: 3,
            top_p: 0.95,
            min_p: 0.35,
            ..params()
        };
        // top-k 3 -> {1, 3, 0}, mass 0.95; top-p 0.95 of that is 0.9025, which 0.5 + 0.3
        // misses, so all three stay; min-p 0.35 of 0.5 = 0.175 then drops 0.15 (token 0).
        assert_eq!(kept(&p, &logits), vec![1, 3]);
    }

    fn processed(
        params: SamplingParams,
        prompt: &[u32],
        generated: &[u32],
        logits: &[f32],
    ) -> Vec<f32> {
        let mut s = Sampler::new(params, 0);
        s.observe_prompt(prompt);
        for &id in generated {
            s.accept(id);
        }
        s.apply_bias_and_penalties(logits);
        s.work
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..params()
        };
        // Token 0 in the prompt, token 1 generated, token 3 both: each penalised once.
        let got = processed(p, &[0, 3, 3], &[1, 3], &[2.0, -1.0, 1.0, 4.0]);
        assert_eq!(got, vec![1.0, -2.0, 1.0, 2.0]);
    }

    #[test]
    fn presence_and_frequency_penalties_count_generated_tokens_only() {
        let presence = SamplingParams {
            presence_penalty: 0.5,
            ..params()
        };
        assert_eq!(
            processed(presence, &[2], &[0, 0, 1], &[1.0, 1.0, 1.0]),
            vec![0.5, 0.5, 1.0]
        );
        let frequency = SamplingParams {
            frequency_penalty: 0.5,
            ..params()
        };
        assert_eq!(
            processed(frequency, &[2], &[0, 0, 1], &[1.0, 1.0, 1.0]),
            vec![0.0, 0.5, 1.0]
        );
        let negative = SamplingParams {
            frequency_penalty: -1.0,
            ..params()
        };
        assert_eq!(
            processed(negative, &[], &[1, 1], &[0.0, 0.0]),
            vec![0.0, 2.0]
        );
    }

    #[test]
    fn logit_bias_applies_before_penalties() {
        // Bias makes token 0 negative, so the repetition penalty multiplies instead of divides.
        let p = SamplingParams {
            logit_bias: vec![(0, -3.0)],
            repetition_penalty: 2.0,
            ..params()
        };
        assert_eq!(processed(p, &[0], &[], &[1.0, 1.0]), vec![-4.0, 1.0]);
    }

    #[test]
    fn sample_records_its_picks_for_the_penalties() {
        let p = SamplingParams {
            temperature: 0.0,
            frequency_penalty: 2.0,
            ..params()
        };
        let mut s = Sampler::new(p, 0);
        let picks: Vec<u32> = (0..4).map(|_| s.sample(&[1.0, 0.5]).id).collect();
        // 1.0 | then 1-2 = -1 < 0.5 | then -1 > 0.5-2 | then 1-4 = -3 < -1.5
        assert_eq!(picks, vec![0, 1, 0, 1]);
    }

    #[test]
    fn logit_bias_minus_100_bans_and_plus_100_forces() {
        let logits = [5.0f32, 0.0, 0.0, 1.0];
        let ban = SamplingParams {
            logit_bias: vec![(0, -100.0)],
            ..params()
        };
        assert_eq!(frequencies(ban, &logits, 2000, 9)[0], 0.0);
        let force = SamplingParams {
            logit_bias: vec![(2, 100.0)],
            ..params()
        };
        assert_eq!(frequencies(force, &logits, 2000, 9)[2], 1.0);
        let greedy_ban = SamplingParams {
            temperature: 0.0,
            logit_bias: vec![(0, -100.0)],
            ..params()
        };
        assert_eq!(Sampler::new(greedy_ban, 0).sample(&logits).id, 3);
    }

    fn sequence(seed: u64, n: usize) -> Vec<u32> {
        let mut s = Sampler::new(params(), seed);
        (0..n).map(|_| s.sample(&[0.0; 16]).id).collect()
    }

    #[test]
    fn same_seed_same_sequence_different_seed_different_sequence() {
        assert_eq!(sequence(1234, 500), sequence(1234, 500));
        let other = sequence(1235, 500);
        let same = sequence(1234, 500)
            .iter()
            .zip(&other)
            .filter(|(a, b)| a == b)
            .count();
        // Two independent uniform 16-way sequences agree on about 1/16 of 500 positions.
        assert!(same < 80, "{same} of 500 positions agree across seeds");
    }

    #[test]
    fn seeded_stream_is_pinned() {
        // Pins ChaCha8 keying, the u64 -> uniform mapping and the id-order walk: if this
        // changes, seeded requests no longer reproduce earlier outputs.
        assert_eq!(sequence(42, 12), PINNED_SEED_42);
    }

    const PINNED_SEED_42: [u32; 12] = [5, 4, 7, 5, 13, 1, 7, 4, 7, 12, 9, 13];

    #[test]
    fn logprobs_are_of_the_raw_logits_whatever_the_settings() {
        let logits = [0.2f32, 1.5, -0.3, 0.9, 1.4];
        let p = SamplingParams {
            temperature: 0.7,
            top_k: 2,
            logit_bias: vec![(0, 3.0)],
            presence_penalty: 1.0,
            logprobs: true,
            top_logprobs: 3,
            ..params()
        };
        let mut s = Sampler::new(p, 11);
        for _ in 0..20 {
            let t = s.sample(&logits);
            let want = log_softmax_at(&logits, &[t.id]).unwrap()[0];
            assert_eq!(t.logprob, Some(want));
            let ids: Vec<u32> = t.top_logprobs.iter().map(|e| e.0).collect();
            assert_eq!(ids, vec![1, 4, 3]);
            assert!(t.top_logprobs.windows(2).all(|w| w[0].1 >= w[1].1));
            assert_eq!(
                t.top_logprobs[0].1,
                log_softmax_at(&logits, &[1]).unwrap()[0]
            );
        }
    }

    #[test]
    fn logprobs_off_returns_nothing() {
        let t = Sampler::new(params(), 0).sample(&[0.0, 1.0]);
        assert_eq!((t.logprob, t.top_logprobs.len()), (None, 0));
        let p = SamplingParams {
            logprobs: true,
            ..params()
        };
        let t = Sampler::new(p, 0).sample(&[0.0, 1.0]);
        assert!(t.logprob.is_some() && t.top_logprobs.is_empty());
    }

    #[test]
    fn masked_rows_do_not_panic() {
        let mut s = Sampler::new(params(), 0);
        assert_eq!(s.sample(&[f32::NEG_INFINITY, f32::NEG_INFINITY]).id, 0);
        assert_eq!(s.sample(&[f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY]).id, 1);
        assert_eq!(s.sample(&[0.0, f32::INFINITY]).id, 1);
        assert_eq!(s.sample(&[]).id, 0);
        let trunc = SamplingParams {
            top_p: 0.5,
            min_p: 0.1,
            top_k: 1,
            ..params()
        };
        assert_eq!(
            Sampler::new(trunc, 0).sample(&[f32::NEG_INFINITY, 0.0]).id,
            1
        );
    }
}
