//! The breakdown by conversation turn (`--turns`): how the first turn, which prefills the
//! shared system prompt, compares with the later ones, which a server with a prefix cache
//! starts from what the turn before left.

use serde::Serialize;

use super::distribution::{median, Distribution};
use super::{Samples, MS_RESOLUTION};
use crate::record::RequestRecord;

#[derive(Debug, Clone, Serialize)]
pub struct TurnStats {
    /// `"1"`, `"2"`, ..., and `"2+"` for every turn after the first together.
    pub turn: String,
    pub completed: u64,
    pub median_ttft_ms: Option<f64>,
    pub ttft_ms: Option<Distribution>,
    /// Mean prompt tokens, from `usage`.
    pub mean_input_tokens: Option<f64>,
    /// Mean prompt tokens the server reported taking from its prefix cache.
    pub mean_cached_tokens: Option<f64>,
}

/// One row per turn and one for turns 2 and later; empty when no request was a later turn.
pub fn by_turn(records: &[RequestRecord], percentiles: &[f64]) -> Vec<TurnStats> {
    let last = records.iter().map(|r| r.turn).max().unwrap_or(1);
    if last < 2 {
        return Vec::new();
    }
    let mut rows: Vec<TurnStats> = (1..=last)
        .map(|t| turn_stats(t.to_string(), records, |r| r.turn == t, percentiles))
        .collect();
    rows.push(turn_stats(
        "2+".into(),
        records,
        |r| r.turn >= 2,
        percentiles,
    ));
    rows
}

fn turn_stats(
    turn: String,
    records: &[RequestRecord],
    selected: impl Fn(&RequestRecord) -> bool,
    percentiles: &[f64],
) -> TurnStats {
    let ok: Vec<&RequestRecord> = records
        .iter()
        .filter(|r| r.is_ok() && selected(r))
        .collect();
    let s = Samples::of(ok.iter().copied());
    let mean = |values: Vec<u64>| {
        (!values.is_empty()).then(|| values.iter().sum::<u64>() as f64 / values.len() as f64)
    };
    TurnStats {
        turn,
        completed: ok.len() as u64,
        median_ttft_ms: median(&s.ttft),
        ttft_ms: Distribution::new(&s.ttft, MS_RESOLUTION, percentiles),
        mean_input_tokens: mean(ok.iter().filter_map(|r| r.input_tokens).collect()),
        mean_cached_tokens: mean(ok.iter().filter_map(|r| r.cached_tokens).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::tests::ok;

    fn turn(t: u32, ttft_ms: u64, cached: Option<u64>) -> RequestRecord {
        RequestRecord {
            turn: t,
            cached_tokens: cached,
            ..ok(ttft_ms, &[], ttft_ms, 1)
        }
    }

    #[test]
    fn later_turns_are_summarized_apart_from_the_first() {
        let records = [
            turn(1, 900, Some(0)),
            turn(2, 100, Some(40)),
            turn(1, 1100, Some(0)),
            turn(2, 120, Some(60)),
            turn(3, 140, None),
        ];
        let rows = by_turn(&records, &[50.0]);
        let names: Vec<&str> = rows.iter().map(|r| r.turn.as_str()).collect();
        assert_eq!(names, ["1", "2", "3", "2+"]);
        assert_eq!(rows[0].median_ttft_ms, Some(1000.0));
        assert_eq!(rows[1].mean_cached_tokens, Some(50.0));
        assert_eq!(rows[2].mean_cached_tokens, None, "no server figure");
        assert_eq!(
            (rows[3].completed, rows[3].median_ttft_ms),
            (3, Some(120.0))
        );
        assert!(by_turn(&records[..1], &[50.0]).is_empty());
    }
}
