//! Open-loop arrival times: a seeded Poisson process or equal gaps, at a fixed rate or one that
//! rises linearly from zero over a ramp-up.
//!
//! Both are drawn in "unit time" first (gaps of exactly 1, or exponential gaps of mean 1) and
//! then mapped to real time through the inverse of the cumulative rate `Λ(t)` (the standard
//! time-change construction of an inhomogeneous Poisson process). With a constant rate `R`,
//! `Λ(t) = R t`; with a ramp of length `T`, `Λ(t) = R t² / 2T` up to `T` and linear after it.
//! The first request leaves at time zero.

use std::time::Duration;

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::config::Arrivals;
use crate::workload::{seeded, Purpose};

#[derive(Debug, Clone)]
pub struct Schedule {
    rate: f64,
    ramp: Option<f64>,
    kind: Arrivals,
    rng: ChaCha8Rng,
    /// Unit time of the next arrival.
    unit: f64,
}

impl Schedule {
    /// Arrivals at `rate` per second (positive), ramped over `ramp`, seeded by `seed`.
    pub fn new(rate: f64, kind: Arrivals, ramp: Option<Duration>, seed: u64) -> Schedule {
        Schedule {
            rate,
            ramp: ramp.map(|d| d.as_secs_f64()).filter(|&t| t > 0.0),
            kind,
            rng: seeded(seed, Purpose::Arrivals, 0),
            unit: 0.0,
        }
    }

    /// Real time (seconds) at which the cumulative rate reaches `unit`.
    fn time_of(&self, unit: f64) -> f64 {
        let r = self.rate;
        match self.ramp {
            None => unit / r,
            Some(t) if unit <= r * t / 2.0 => (2.0 * t * unit / r).sqrt(),
            Some(t) => t + (unit - r * t / 2.0) / r,
        }
    }
}

impl Iterator for Schedule {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let at = self.time_of(self.unit);
        let gap = match self.kind {
            Arrivals::Constant => 1.0,
            // Inverse transform of Exp(1); 1 - u is in (0, 1], so the log is finite.
            Arrivals::Poisson => -(1.0 - self.rng.random::<f64>()).ln(),
        };
        self.unit += gap;
        Duration::try_from_secs_f64(at).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: &mut Schedule, n: usize) -> Vec<f64> {
        s.take(n).map(|d| d.as_secs_f64()).collect()
    }

    #[test]
    fn constant_arrivals_are_evenly_spaced_from_zero() {
        let t = secs(&mut Schedule::new(4.0, Arrivals::Constant, None, 0), 5);
        assert_eq!(t, vec![0.0, 0.25, 0.5, 0.75, 1.0]);
    }

    #[test]
    fn poisson_arrivals_have_the_rate_and_exponential_gaps() {
        let t = secs(&mut Schedule::new(50.0, Arrivals::Poisson, None, 1), 20001);
        let gaps: Vec<f64> = t.windows(2).map(|w| w[1] - w[0]).collect();
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        let sd = (gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64).sqrt();
        // Exponential: mean 1/rate, coefficient of variation 1 (constant gaps would give 0).
        assert!((mean * 50.0 - 1.0).abs() < 0.03, "mean gap {mean}");
        assert!((sd / mean - 1.0).abs() < 0.05, "cv {}", sd / mean);
        let again = secs(&mut Schedule::new(50.0, Arrivals::Poisson, None, 1), 100);
        assert_eq!(again[..], t[..100], "seeded");
    }

    #[test]
    fn ramp_up_is_linear_then_flat() {
        // Rate 10/s reached after 2 s: 10 arrivals in the ramp (half of 20), then 10/s.
        let t = secs(
            &mut Schedule::new(10.0, Arrivals::Constant, Some(Duration::from_secs(2)), 0),
            21,
        );
        assert_eq!(t.iter().filter(|&&x| x < 2.0).count(), 10);
        // In the ramp the k-th arrival is at sqrt(2Tk/R): 0, 0.632, 0.894, ...
        assert!((t[1] - (0.4f64).sqrt()).abs() < 1e-9);
        assert!((t[20] - t[19] - 0.1).abs() < 1e-9);
        assert!((t[10] - 2.0).abs() < 1e-9);
    }
}
