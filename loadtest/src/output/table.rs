//! The human-readable summary on stdout: a block per level (counts, rates, a latency table,
//! the chains and their overheads, the conversation turns), and for a sweep one line per
//! level at the end.

use std::fmt::Write;

use crate::run::RunReport;
use crate::stats::{percentile_key, ChainStats, Distribution, LevelStats, TurnStats};

fn num(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.decimals$}"))
}

fn latency_row(out: &mut String, name: &str, d: &Option<Distribution>, ps: &[f64]) {
    let _ = write!(out, "  {name:<8}");
    let cells: Vec<Option<f64>> = match d {
        Some(d) => std::iter::once(Some(d.mean))
            .chain(ps.iter().map(|&p| d.percentile(p)))
            .chain(std::iter::once(Some(d.max)))
            .collect(),
        None => vec![None; ps.len() + 2],
    };
    for c in cells {
        let _ = write!(out, " {:>9}", num(c, 2));
    }
    out.push('\n');
}

/// The block of one level.
pub fn level_block(s: &LevelStats, percentiles: &[f64]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "== {}: {} sent, {} completed, {} errors, {} incomplete in {:.2} s (+{} warm-up)",
        s.label, s.sent, s.completed, s.errors, s.incomplete, s.duration_s, s.warmup_requests
    );
    if !s.errors_by_kind.is_empty() {
        let kinds: Vec<String> = s
            .errors_by_kind
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        let _ = writeln!(out, "  errors: {}", kinds.join(", "));
    }
    let goodput = s
        .goodput
        .map(|g| format!(", goodput {g:.2} req/s"))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "  {:.2} req/s (offered {}), {:.1} output tok/s, {:.1} total tok/s{goodput}",
        s.request_rate,
        num(s.offered_rate, 2),
        s.output_token_rate,
        s.total_token_rate
    );
    let sources: Vec<String> = s
        .token_sources
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    let _ = writeln!(
        out,
        "  tokens: {} in, {} out (counted from: {})",
        s.input_tokens,
        s.output_tokens,
        sources.join(", ")
    );
    let _ = write!(out, "  {:<8} {:>9}", "ms", "mean");
    for &p in percentiles {
        let _ = write!(out, " {:>9}", percentile_key(p));
    }
    let _ = writeln!(out, " {:>9}", "max");
    latency_row(&mut out, "ttft", &s.ttft_ms, percentiles);
    latency_row(&mut out, "tpot", &s.tpot_ms, percentiles);
    latency_row(&mut out, "itl", &s.itl_ms, percentiles);
    latency_row(&mut out, "e2e", &s.e2e_ms, percentiles);
    if s.chains.len() > 1 {
        chains(&mut out, &s.chains);
    }
    if !s.turns.is_empty() {
        turns(&mut out, &s.turns);
    }
    out
}

fn turns(out: &mut String, turns: &[TurnStats]) {
    let _ = writeln!(
        out,
        "  {:<6} {:>5} {:>9} {:>10} {:>10}",
        "turn", "done", "ttft p50", "prompt tok", "cached tok"
    );
    for t in turns {
        let _ = writeln!(
            out,
            "  {:<6} {:>5} {:>9} {:>10} {:>10}",
            t.turn,
            t.completed,
            num(t.median_ttft_ms, 2),
            num(t.mean_input_tokens, 0),
            num(t.mean_cached_tokens, 0)
        );
    }
}

fn chains(out: &mut String, chains: &[ChainStats]) {
    let _ = writeln!(
        out,
        "  {:<12} {:>5} {:>4} {:>9} {:>9} {:>9} {:>9}   vs base: {:>6} {:>6} {:>6} {:>6}",
        "chain",
        "done",
        "err",
        "ttft p50",
        "tpot p50",
        "e2e p50",
        "tok/s p50",
        "ttft",
        "tpot",
        "e2e",
        "tok/s"
    );
    for c in chains {
        let m = &c.median;
        let _ = write!(
            out,
            "  {:<12} {:>5} {:>4} {:>9} {:>9} {:>9} {:>9}",
            c.name,
            c.completed,
            c.errors,
            num(m.ttft, 2),
            num(m.tpot, 2),
            num(m.e2e, 2),
            num(m.output_tok_s, 1)
        );
        match &c.overhead {
            Some(o) => {
                let r = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("x{v:.2}"));
                let _ = writeln!(
                    out,
                    "   {:>16} {:>6} {:>6} {:>6}",
                    r(o.ttft),
                    r(o.tpot),
                    r(o.e2e),
                    r(o.output_tok_s)
                );
            }
            None => out.push('\n'),
        }
    }
}

/// `want` if it was asked for, else the asked percentile nearest to it.
fn pick(percentiles: &[f64], want: f64) -> f64 {
    percentiles
        .iter()
        .copied()
        .min_by(|a, b| (a - want).abs().total_cmp(&(b - want).abs()))
        .unwrap_or(want)
}

/// One line per level, for sweeps: the median-most and the tail-most of the asked percentiles.
pub fn sweep(report: &RunReport) -> String {
    let ps = &report.config.report.percentiles;
    let (mid, tail) = (pick(ps, 50.0), pick(ps, 99.0));
    let (m, t) = (percentile_key(mid), percentile_key(tail));
    let mut out = String::from("== sweep\n");
    let _ = writeln!(
        out,
        "  {:<18} {:>7} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "level",
        "req/s",
        "out tok/s",
        "goodput",
        format!("ttft {m}"),
        format!("ttft {t}"),
        format!("tpot {m}"),
        format!("itl {t}"),
        format!("e2e {m}"),
        "errors"
    );
    for l in &report.levels {
        let s = &l.stats;
        let p = |d: &Option<Distribution>, q: f64| d.as_ref().and_then(|d| d.percentile(q));
        let _ = writeln!(
            out,
            "  {:<18} {:>7.2} {:>9.1} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
            s.label,
            s.request_rate,
            s.output_token_rate,
            num(s.goodput, 2),
            num(p(&s.ttft_ms, mid), 2),
            num(p(&s.ttft_ms, tail), 2),
            num(p(&s.tpot_ms, mid), 2),
            num(p(&s.itl_ms, tail), 2),
            num(p(&s.e2e_ms, mid), 2),
            s.errors
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_columns_use_the_nearest_asked_percentiles() {
        assert_eq!(pick(&[50.0, 90.0, 99.0], 99.0), 99.0);
        assert_eq!(pick(&[25.0, 75.0, 99.9], 50.0), 25.0);
        assert_eq!(pick(&[25.0, 75.0, 99.9], 99.0), 99.9);
    }
}
