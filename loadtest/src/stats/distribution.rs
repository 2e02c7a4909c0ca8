//! Summary of one metric's values: count, mean, min, max (exact) and percentiles (from an
//! HdrHistogram with three significant digits, so within 0.1% of the exact nearest-rank value
//! whatever the spread, in memory that does not grow with the number of samples).
//!
//! Percentiles use the nearest-rank definition (the smallest value with at least p% of the
//! samples at or below it), which is what HdrHistogram computes; they are clamped to the exact
//! min and max so a bucket's upper edge never reports more than was measured.

use hdrhistogram::Histogram;
use serde::ser::{Serialize, SerializeMap, Serializer};

#[derive(Debug, Clone, PartialEq)]
pub struct Distribution {
    pub count: u64,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    /// `(p, value)` in the order asked for.
    pub percentiles: Vec<(f64, f64)>,
}

impl Distribution {
    /// Summarizes `values` (in their own unit, non-negative); `resolution` is the smallest
    /// difference kept (values are recorded as integer multiples of it). `None` when empty.
    pub fn new(values: &[f64], resolution: f64, percentiles: &[f64]) -> Option<Distribution> {
        if values.is_empty() {
            return None;
        }
        let units = |v: f64| (v.max(0.0) / resolution).round() as u64;
        let (mut min, mut max, mut sum) = (f64::INFINITY, f64::NEG_INFINITY, 0.0);
        for &v in values {
            min = min.min(v);
            max = max.max(v);
            sum += v;
        }
        // Bounds from the data: `saturating_record` clamps to the current bounds and never
        // resizes, so an auto-resizing histogram would hold nothing but its tiny initial range.
        let mut hist = Histogram::<u64>::new_with_bounds(1, units(max).max(2), 3).ok()?;
        for &v in values {
            hist.saturating_record(units(v));
        }
        let percentiles = percentiles
            .iter()
            .map(|&p| {
                let v = hist.value_at_quantile(p / 100.0) as f64 * resolution;
                (p, v.clamp(min, max))
            })
            .collect();
        Some(Distribution {
            count: values.len() as u64,
            mean: sum / values.len() as f64,
            min,
            max,
            percentiles,
        })
    }

    /// The value at percentile `p`, if it was asked for.
    pub fn percentile(&self, p: f64) -> Option<f64> {
        self.percentiles
            .iter()
            .find(|(q, _)| *q == p)
            .map(|(_, v)| *v)
    }
}

/// The key of percentile `p` in outputs: `p50`, `p99.9`.
pub fn key(p: f64) -> String {
    format!("p{p}")
}

impl Serialize for Distribution {
    /// `{"count", "mean", "min", "max", "p50", "p90", ...}`: percentiles as flat keys, which
    /// is what plotting scripts and `jq` want.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(4 + self.percentiles.len()))?;
        m.serialize_entry("count", &self.count)?;
        m.serialize_entry("mean", &self.mean)?;
        m.serialize_entry("min", &self.min)?;
        m.serialize_entry("max", &self.max)?;
        for (p, v) in &self.percentiles {
            m.serialize_entry(&key(*p), v)?;
        }
        m.end()
    }
}

/// The exact median (mean of the middle two for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

#[cfg(test)]
mod tests {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;

    /// Nearest rank, computed by sorting: the reference the histogram must match.
    fn exact(values: &[f64], p: f64) -> f64 {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
        v[rank - 1]
    }

    fn check(values: &[f64], ps: &[f64]) {
        let d = Distribution::new(values, 0.001, ps).unwrap();
        for &p in ps {
            let (got, want) = (d.percentile(p).unwrap(), exact(values, p));
            assert!(
                (got - want).abs() <= want * 1e-3 + 1e-3,
                "p{p}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn percentiles_match_exact_nearest_rank_on_known_data() {
        // 1..=1000 ms shuffled: p50 is 500, p99 is 990, p99.9 is 999.
        let mut v: Vec<f64> = (1..=1000).map(f64::from).collect();
        v.shuffle(&mut ChaCha8Rng::seed_from_u64(3));
        let d = Distribution::new(&v, 0.001, &[50.0, 99.0, 99.9]).unwrap();
        assert!((d.percentile(50.0).unwrap() - 500.0).abs() <= 0.5, "{d:?}");
        assert!((d.percentile(99.0).unwrap() - 990.0).abs() <= 1.0);
        assert_eq!((d.count, d.min, d.max, d.mean), (1000, 1.0, 1000.0, 500.5));
        check(&v, &[1.0, 25.0, 50.0, 90.0, 95.0, 99.0, 99.9, 100.0]);
    }

    #[test]
    fn percentiles_hold_on_heavy_tails_and_sub_millisecond_values() {
        // Log-uniform over six decades, like latencies under overload.
        let v: Vec<f64> = (0..5000)
            .map(|i| 10f64.powf(-2.0 + 6.0 * f64::from(i) / 5000.0))
            .collect();
        check(&v, &[10.0, 50.0, 90.0, 99.0]);
        let tiny = [0.2, 0.4, 0.6];
        let d = Distribution::new(&tiny, 0.001, &[50.0]).unwrap();
        assert!((d.percentile(50.0).unwrap() - 0.4).abs() < 1e-9);
    }

    #[test]
    fn a_constant_sample_reports_itself_and_empty_is_none() {
        let d = Distribution::new(&[20.0; 7], 0.001, &[50.0, 99.0]).unwrap();
        assert_eq!(d.percentiles, vec![(50.0, 20.0), (99.0, 20.0)]);
        assert!(Distribution::new(&[], 0.001, &[50.0]).is_none());
    }

    #[test]
    fn serializes_flat_percentile_keys_and_median_is_exact() {
        let d = Distribution::new(&[1.0, 2.0], 0.001, &[50.0, 99.9]).unwrap();
        let j = serde_json::to_value(&d).unwrap();
        assert_eq!(j["p50"], 1.0);
        assert_eq!(j["p99.9"], 2.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }
}
