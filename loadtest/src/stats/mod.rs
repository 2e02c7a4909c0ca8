//! Aggregates of one level: counts by outcome, rates, token totals, latency distributions,
//! goodput, the per-chain and per-turn breakdowns and the throughput timeline.
//!
//! Latencies come from completed requests only (an error's or a cancelled request's timings
//! describe the failure, not the service). Rates divide by the measured phase's elapsed time,
//! from its first request's scheduled start until its last record came back.

mod chains;
mod distribution;
mod slo;
mod timeline;
mod turns;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

pub use chains::{ChainStats, Medians};
pub use distribution::{key as percentile_key, median, Distribution};
pub use slo::{goodput, meets, per_second};
pub use timeline::{output_timeline, TimelinePoint};
pub use turns::{by_turn, TurnStats};

use crate::config::{Level, ReportSpec};
use crate::record::{Outcome, RequestRecord, TokenSource};

/// Latency values resolved to a microsecond, in ms.
pub(crate) const MS_RESOLUTION: f64 = 0.001;

#[derive(Debug, Clone, Serialize)]
pub struct LevelStats {
    pub level: Level,
    pub label: String,
    pub duration_s: f64,
    pub warmup_requests: u64,
    /// Measured requests sent: completed + errors + incomplete.
    pub sent: u64,
    pub completed: u64,
    pub errors: u64,
    /// By kind: `http_429`, `connect`, `timeout`, `request`, `stream`.
    pub errors_by_kind: BTreeMap<String, u64>,
    pub incomplete: u64,
    /// Completed requests per second.
    pub request_rate: f64,
    /// Requests sent per second between the first and the last send: the load actually offered.
    pub offered_rate: Option<f64>,
    /// Completed requests meeting every SLO, per second; `None` without `--slo`.
    pub goodput: Option<f64>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Completed requests by where their token counts came from (`usage`, `chunks`, `unknown`).
    pub token_sources: BTreeMap<String, u64>,
    pub output_token_rate: f64,
    pub total_token_rate: f64,
    pub ttft_ms: Option<Distribution>,
    pub tpot_ms: Option<Distribution>,
    pub itl_ms: Option<Distribution>,
    pub e2e_ms: Option<Distribution>,
    pub output_tok_s_per_request: Option<Distribution>,
    pub chains: Vec<ChainStats>,
    /// By conversation turn, with `--turns`; empty otherwise.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub turns: Vec<TurnStats>,
    pub timeline: Vec<TimelinePoint>,
}

/// The per-metric samples of completed requests (ms; tok/s).
#[derive(Debug, Default)]
pub(crate) struct Samples {
    pub ttft: Vec<f64>,
    pub tpot: Vec<f64>,
    pub itl: Vec<f64>,
    pub e2e: Vec<f64>,
    pub output_tps: Vec<f64>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Samples {
    pub(crate) fn of<'a>(records: impl Iterator<Item = &'a RequestRecord>) -> Samples {
        let mut s = Samples::default();
        for r in records.filter(|r| r.is_ok()) {
            s.ttft.extend(r.ttft.map(ms));
            s.tpot.extend(r.tpot().map(ms));
            s.itl.extend(r.gaps.iter().copied().map(ms));
            s.e2e.push(ms(r.e2e));
            s.output_tps.extend(r.output_tps());
        }
        s
    }
}

/// The statistics of one level's measured phase.
pub fn level_stats(
    level: Level,
    records: &[RequestRecord],
    elapsed: Duration,
    warmup_requests: u64,
    chains: &[String],
    spec: &ReportSpec,
) -> LevelStats {
    let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.is_ok()).collect();
    let mut errors_by_kind = BTreeMap::new();
    for r in records {
        if let Outcome::Error { kind, .. } = &r.outcome {
            *errors_by_kind.entry(kind.to_string()).or_insert(0) += 1;
        }
    }
    let mut token_sources = BTreeMap::new();
    for r in &ok {
        *token_sources.entry(source_key(r.token_source)).or_insert(0) += 1;
    }
    let input_tokens: u64 = ok.iter().filter_map(|r| r.input_tokens).sum();
    let output_tokens: u64 = ok.iter().filter_map(|r| r.output_tokens).sum();
    let s = Samples::of(ok.iter().copied());
    let ps = &spec.percentiles;
    LevelStats {
        level,
        label: level.label(),
        duration_s: elapsed.as_secs_f64(),
        warmup_requests,
        sent: records.len() as u64,
        completed: ok.len() as u64,
        errors: errors_by_kind.values().sum(),
        errors_by_kind,
        incomplete: records
            .iter()
            .filter(|r| r.outcome == Outcome::Incomplete)
            .count() as u64,
        request_rate: per_second(ok.len() as f64, elapsed),
        offered_rate: offered_rate(records),
        goodput: goodput(records, &spec.slo, elapsed),
        input_tokens,
        output_tokens,
        token_sources,
        output_token_rate: per_second(output_tokens as f64, elapsed),
        total_token_rate: per_second((input_tokens + output_tokens) as f64, elapsed),
        ttft_ms: Distribution::new(&s.ttft, MS_RESOLUTION, ps),
        tpot_ms: Distribution::new(&s.tpot, MS_RESOLUTION, ps),
        itl_ms: Distribution::new(&s.itl, MS_RESOLUTION, ps),
        e2e_ms: Distribution::new(&s.e2e, MS_RESOLUTION, ps),
        output_tok_s_per_request: Distribution::new(&s.output_tps, 0.001, ps),
        chains: chains::by_chain(records, chains, ps),
        turns: by_turn(records, ps),
        timeline: output_timeline(records, elapsed),
    }
}

fn source_key(s: TokenSource) -> String {
    match s {
        TokenSource::Usage => "usage",
        TokenSource::Chunks => "chunks",
        TokenSource::Unknown => "unknown",
    }
    .to_string()
}

/// `(n - 1) / (last start - first start)`: sends per second, from at least two sends.
fn offered_rate(records: &[RequestRecord]) -> Option<f64> {
    let first = records.iter().map(|r| r.start).min()?;
    let last = records.iter().map(|r| r.start).max()?;
    let span = (last - first).as_secs_f64();
    (records.len() >= 2 && span > 0.0).then(|| (records.len() - 1) as f64 / span)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::Slo;
    use crate::record::tests::ok;
    use crate::record::ErrorKind;

    fn spec(slo: Slo) -> ReportSpec {
        ReportSpec {
            percentiles: vec![50.0, 99.0],
            slo,
            out: None,
            scrape_metrics: false,
            progress: false,
        }
    }

    fn started(mut r: RequestRecord, ms: u64) -> RequestRecord {
        r.start = Duration::from_millis(ms);
        r
    }

    #[test]
    fn rates_and_counts_of_a_known_level() {
        let mut records: Vec<RequestRecord> = (0..8)
            .map(|i| started(ok(100, &[10; 9], 190, 10), i * 250))
            .collect();
        records.push(started(
            RequestRecord {
                outcome: Outcome::Error {
                    kind: ErrorKind::Http(429),
                    message: String::new(),
                },
                ..ok(5, &[], 5, 0)
            },
            2000,
        ));
        records.push(RequestRecord {
            outcome: Outcome::Incomplete,
            ..ok(1, &[], 1, 0)
        });
        let slo = Slo {
            ttft: Some(Duration::from_millis(150)),
            ..Slo::default()
        };
        let s = level_stats(
            Level::Rate(4.0),
            &records,
            Duration::from_secs(4),
            2,
            &["base".into()],
            &spec(slo),
        );
        assert_eq!((s.sent, s.completed, s.errors, s.incomplete), (10, 8, 1, 1));
        assert_eq!(s.errors_by_kind.get("http_429"), Some(&1));
        assert_eq!(s.request_rate, 2.0);
        assert_eq!(s.goodput, Some(2.0));
        // 10 sends from 0 to 2 s (the incomplete one at 0): 9 gaps over 2 s.
        assert_eq!(s.offered_rate, Some(4.5));
        assert_eq!((s.input_tokens, s.output_tokens), (80, 80));
        assert_eq!(s.output_token_rate, 20.0);
        assert_eq!(s.total_token_rate, 40.0);
        assert_eq!(s.tpot_ms.as_ref().unwrap().percentile(50.0), Some(10.0));
        assert_eq!(s.itl_ms.as_ref().unwrap().count, 72);
        assert_eq!(
            s.ttft_ms.as_ref().unwrap().count,
            8,
            "only completed requests"
        );
        assert_eq!(s.token_sources.get("usage"), Some(&8));
        assert_eq!(s.chains[0].completed, 8);
    }
}
