//! The breakdown by chain, and each chain's overhead against `base` measured in the same run
//! (so under the same load, on the same batch mix).
//!
//! Overheads are ratios of medians, chain over base: TTFT, TPOT, ITL and E2E above 1 are
//! slower; per-request output tokens/s below 1 is slower. Medians, not means, so that a few
//! queueing outliers in one chain do not pass for plug-in cost.

use serde::Serialize;

use super::distribution::{median, Distribution};
use super::Samples;
use crate::record::{Outcome, RequestRecord};
use crate::workload::BASE;

#[derive(Debug, Clone, Serialize)]
pub struct ChainStats {
    pub name: String,
    pub completed: u64,
    pub errors: u64,
    pub incomplete: u64,
    /// Exact medians of the completed requests: TTFT/TPOT/ITL/E2E in ms, output tok/s.
    pub median: Medians,
    pub ttft_ms: Option<Distribution>,
    pub tpot_ms: Option<Distribution>,
    pub e2e_ms: Option<Distribution>,
    pub output_tok_s: Option<Distribution>,
    /// Medians over `base`'s; `None` for `base` itself or without a `base` chain.
    pub overhead: Option<Medians>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Medians {
    pub ttft: Option<f64>,
    pub tpot: Option<f64>,
    pub itl: Option<f64>,
    pub e2e: Option<f64>,
    pub output_tok_s: Option<f64>,
}

impl Medians {
    fn of(s: &Samples) -> Medians {
        Medians {
            ttft: median(&s.ttft),
            tpot: median(&s.tpot),
            itl: median(&s.itl),
            e2e: median(&s.e2e),
            output_tok_s: median(&s.output_tps),
        }
    }

    /// Field by field `self / base`, where both exist and base is positive.
    fn over(&self, base: &Medians) -> Medians {
        let r = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        Medians {
            ttft: r(self.ttft, base.ttft),
            tpot: r(self.tpot, base.tpot),
            itl: r(self.itl, base.itl),
            e2e: r(self.e2e, base.e2e),
            output_tok_s: r(self.output_tok_s, base.output_tok_s),
        }
    }
}

/// One entry per name of `names` (the mix order), each from the records of that chain.
pub fn by_chain(
    records: &[RequestRecord],
    names: &[String],
    percentiles: &[f64],
) -> Vec<ChainStats> {
    let mut out: Vec<ChainStats> = names
        .iter()
        .map(|name| {
            let mine: Vec<&RequestRecord> = records.iter().filter(|r| &r.chain == name).collect();
            one(name, &mine, percentiles)
        })
        .collect();
    if let Some(base) = out.iter().find(|c| c.name == BASE).map(|c| c.median) {
        for c in out.iter_mut().filter(|c| c.name != BASE) {
            c.overhead = Some(c.median.over(&base));
        }
    }
    out
}

fn one(name: &str, records: &[&RequestRecord], percentiles: &[f64]) -> ChainStats {
    let count = |f: fn(&Outcome) -> bool| records.iter().filter(|r| f(&r.outcome)).count() as u64;
    let s = Samples::of(records.iter().copied());
    ChainStats {
        name: name.to_string(),
        completed: count(|o| *o == Outcome::Ok),
        errors: count(|o| matches!(o, Outcome::Error { .. })),
        incomplete: count(|o| *o == Outcome::Incomplete),
        median: Medians::of(&s),
        ttft_ms: Distribution::new(&s.ttft, 0.001, percentiles),
        tpot_ms: Distribution::new(&s.tpot, 0.001, percentiles),
        e2e_ms: Distribution::new(&s.e2e, 0.001, percentiles),
        output_tok_s: Distribution::new(&s.output_tps, 0.001, percentiles),
        overhead: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::tests::ok;

    fn chain(mut r: RequestRecord, name: &str) -> RequestRecord {
        r.chain = name.into();
        r
    }

    #[test]
    fn overhead_is_the_ratio_of_medians_against_base() {
        let records = vec![
            chain(ok(100, &[10], 110, 2), "base"),
            chain(ok(100, &[10], 110, 2), "base"),
            chain(ok(900, &[10], 910, 2), "base"), // an outlier the median ignores
            chain(ok(150, &[20], 170, 2), "sql"),
        ];
        let names = vec!["base".to_string(), "sql".to_string(), "none".to_string()];
        let c = by_chain(&records, &names, &[50.0]);
        assert_eq!(c[0].completed, 3);
        assert!(c[0].overhead.is_none());
        let o = c[1].overhead.unwrap();
        assert!((o.ttft.unwrap() - 1.5).abs() < 1e-9);
        assert!((o.tpot.unwrap() - 2.0).abs() < 1e-9);
        assert!((o.itl.unwrap() - 2.0).abs() < 1e-9);
        assert!((o.e2e.unwrap() - 170.0 / 110.0).abs() < 1e-9);
        // tok/s: 2/0.17 over 2/0.11
        assert!((o.output_tok_s.unwrap() - 110.0 / 170.0).abs() < 1e-9);
        assert_eq!(c[2].completed, 0);
        assert_eq!(c[2].overhead.unwrap().ttft, None, "no requests, no ratio");
    }
}
