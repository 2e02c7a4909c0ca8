//! How many of its drafts a sequence feeds: as many as pay for themselves.
//!
//! On the CPU decode is compute-bound: a verification row of `1 + d` tokens costs about
//! `1 + FIXED + COST * d` one-token steps (each position runs every layer and the LM head;
//! `cargo bench -p models --bench verify` measured 1.41-1.56 for one draft and 2.58-2.80 for
//! four on the default model, 2 AVX2 cores), and a step of `B` one-token rows about
//! `1 + COST * (B - 1)`, so a row's share of it is that over `B`. If each draft is accepted
//! with probability `a` once the ones before it were, the row emits `(1 - a^(d+1)) / (1 - a)`
//! tokens on average. The policy feeds the `d` (up to what the drafter proposed) that
//! maximises emitted tokens per cost, and none unless that beats a plain step by `MARGIN` (the
//! costs are medians of noisy timings and a sequence's acceptance drifts; open chat measured
//! 6% slower with drafts fed from break-even). Drafts are fed from `a` = 0.68 alone in a step
//! (four from 0.87), 0.83 beside one other decoding row, 0.95 in a step of 4 and never in a
//! step of 8, whose row share is already cheap: under load speculation turns itself off.
//!
//! `a` is the sequence's own acceptance, a decaying count of how its drafter's proposals
//! fared: after every step the proposal made before it is walked against the tokens the step
//! emitted, each match a success and the first mismatch a failure (positions past the emitted
//! tokens are unobserved). Proposals are observed whether or not they were fed, so a sequence
//! that stopped drafting sees when its drafter starts to be right again. None of this changes
//! a sequence's output, only how many steps it takes.

/// Cost of one more position in a step, in one-token steps (see the module docs).
pub(crate) const COST: f64 = 0.40;

/// Cost of making a decode row a multi-token row (logits at every position), in one-token
/// steps.
pub(crate) const FIXED: f64 = 0.10;

/// How much better than a plain step drafting must be expected to do.
pub(crate) const MARGIN: f64 = 1.10;

/// Weight of past observations against new ones, per step.
const DECAY: f64 = 0.9;

/// The acceptance estimate before any observation: 1 success in 2 trials, just short of
/// what pays for a draft, so a sequence drafts once its proposals have proved right.
const PRIOR: (f64, f64) = (1.0, 2.0);

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct DraftPolicy {
    successes: f64,
    trials: f64,
}

impl Default for DraftPolicy {
    fn default() -> Self {
        Self {
            successes: PRIOR.0,
            trials: PRIOR.1,
        }
    }
}

impl DraftPolicy {
    /// The estimated probability that the next draft is accepted.
    pub fn acceptance(&self) -> f64 {
        self.successes / self.trials
    }

    /// How many of `proposed` drafts to feed in a step where `decoding` sequences decode.
    pub fn length(&self, proposed: usize, decoding: usize) -> usize {
        let a = self.acceptance().clamp(0.0, 0.999);
        let rows = decoding.max(1) as f64;
        let share = (1.0 + COST * (rows - 1.0)) / rows;
        let mut best = (MARGIN / share, 0);
        for d in 1..=proposed {
            let emitted = (1.0 - a.powi(d as i32 + 1)) / (1.0 - a);
            let value = emitted / (share + FIXED + COST * d as f64);
            if value > best.0 {
                best = (value, d);
            }
        }
        best.1
    }

    /// Walks the proposal made before a step against the tokens the step emitted.
    pub fn observe(&mut self, proposal: &[u32], emitted: &[u32]) {
        let (mut successes, mut trials) = (0.0, 0.0);
        for (p, e) in proposal.iter().zip(emitted) {
            trials += 1.0;
            if p != e {
                break;
            }
            successes += 1.0;
        }
        if trials > 0.0 {
            self.successes = DECAY * self.successes + successes;
            self.trials = DECAY * self.trials + trials;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(a: f64) -> DraftPolicy {
        DraftPolicy {
            successes: a * 100.0,
            trials: 100.0,
        }
    }

    #[test]
    fn drafts_are_fed_only_where_they_pay_and_more_as_acceptance_grows() {
        assert_eq!(at(0.45).length(4, 1), 0);
        assert_eq!(at(0.65).length(4, 1), 0);
        assert_eq!(at(0.7).length(4, 1), 2);
        assert_eq!(at(0.8).length(4, 1), 2);
        assert_eq!(at(0.95).length(4, 1), 4);
        assert_eq!(at(0.95).length(2, 1), 2, "never more than proposed");
        assert_eq!(at(0.95).length(0, 1), 0);
        assert_eq!(at(0.95).length(4, 0), 4, "0 decoding counts as 1");
        let lengths: Vec<usize> = (0..=20).map(|i| at(i as f64 / 20.0).length(8, 1)).collect();
        assert!(lengths.windows(2).all(|w| w[0] <= w[1]), "{lengths:?}");
    }

    #[test]
    fn bigger_batches_need_surer_drafts_and_eight_rows_take_none() {
        assert_eq!(at(0.8).length(4, 2), 0);
        assert_eq!(at(0.9).length(4, 2), 3);
        assert_eq!(at(0.9).length(4, 4), 0);
        assert_eq!(at(0.97).length(4, 4), 4);
        assert_eq!(at(0.999).length(4, 8), 0, "never in a step of 8");
    }

    #[test]
    fn a_new_sequence_waits_for_its_proposals_to_prove_right() {
        assert_eq!(DraftPolicy::default().length(4, 1), 0);
        let mut p = DraftPolicy::default();
        p.observe(&[1, 2], &[1]);
        p.observe(&[3, 4], &[3]);
        assert!(p.length(4, 1) >= 1, "acceptance {}", p.acceptance());
    }

    #[test]
    fn proposals_are_scored_up_to_the_first_miss() {
        let mut p = DraftPolicy {
            successes: 0.0,
            trials: 0.0,
        };
        p.observe(&[1, 2, 3, 4], &[1, 2, 9]); // 2 right, then a miss; 4 unobserved
        assert_eq!((p.successes, p.trials), (2.0, 3.0));
        p.observe(&[5, 6], &[5]); // one right, the second unobserved
        assert_eq!((p.successes, p.trials), (0.9 * 2.0 + 1.0, 0.9 * 3.0 + 1.0));
        let before = p;
        p.observe(&[], &[1, 2]); // no proposal: nothing learned
        p.observe(&[1], &[]);
        assert_eq!(p, before);
    }

    #[test]
    fn a_drafter_that_keeps_missing_is_switched_off_and_back_on_when_it_recovers() {
        let mut p = DraftPolicy::default();
        for _ in 0..10 {
            p.observe(&[1, 2], &[9]);
        }
        assert_eq!(p.length(4, 1), 0, "acceptance {}", p.acceptance());
        for _ in 0..10 {
            p.observe(&[1, 2, 3, 4], &[1, 2, 3, 4, 5]);
        }
        assert!(p.length(4, 1) >= 3, "acceptance {}", p.acceptance());
    }
}
