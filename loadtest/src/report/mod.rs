//! `report.html`: one self-contained page (inline CSS and SVG, no scripts) with the run's
//! settings, a table per level, and the plots: latency percentiles against load across the
//! levels, the latency distribution (CDF) of each level, output throughput over time, and the
//! per-chain breakdown.

mod svg;

use std::fmt::Write;

pub use svg::{esc, line_chart, Chart, Series};

use crate::record::RequestRecord;
use crate::run::{LevelResult, RunReport};
use crate::stats::{percentile_key, Distribution, LevelStats};

/// CDFs keep about this many steps per level: enough for a smooth curve at 500 px.
const CDF_POINTS: usize = 200;

const STYLE: &str = "body{font-family:sans-serif;margin:24px;color:#222}\
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}\
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}\
.charts{display:flex;flex-wrap:wrap;gap:12px}pre{background:#f6f6f6;padding:8px;overflow:auto}";

/// The whole page.
pub fn html(report: &RunReport) -> String {
    let mut h = String::new();
    let t = &report.config.target;
    let _ = write!(
        h,
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>loadtest report</title><style>{STYLE}</style></head><body>\
         <h1>Load test: {}</h1><p>{} {} ({}), {} level(s), chains: {}</p>",
        esc(&report.model),
        esc(&t.url),
        esc(t.endpoint.path()),
        if t.stream { "streaming" } else { "not streaming" },
        report.levels.len(),
        esc(&report.chains.join(", "))
    );
    summary_table(&mut h, report);
    let ps = &report.config.report.percentiles;
    h.push_str("<h2>Latency against load</h2><div class=\"charts\">");
    let x_label = axis_label(report);
    for (name, get) in metrics() {
        h.push_str(&line_chart(&against_load(report, name, get, ps, &x_label)));
    }
    h.push_str("</div><h2>Latency distributions (CDF per level)</h2><div class=\"charts\">");
    for (name, samples) in record_metrics() {
        h.push_str(&line_chart(&cdf(report, name, samples)));
    }
    h.push_str("</div><h2>Output throughput over time</h2><div class=\"charts\">");
    h.push_str(&line_chart(&timeline(report)));
    h.push_str("</div>");
    for l in &report.levels {
        if l.stats.chains.len() > 1 {
            chain_table(&mut h, &l.stats);
        }
    }
    let config = serde_json::to_string_pretty(&report.config).unwrap_or_default();
    let _ = write!(
        h,
        "<h2>Configuration</h2><pre>{}</pre></body></html>",
        esc(&config)
    );
    h
}

type Getter = fn(&LevelStats) -> &Option<Distribution>;

fn metrics() -> [(&'static str, Getter); 4] {
    [
        ("TTFT", |s| &s.ttft_ms),
        ("TPOT", |s| &s.tpot_ms),
        ("ITL", |s| &s.itl_ms),
        ("E2E", |s| &s.e2e_ms),
    ]
}

type Sampler = fn(&RequestRecord) -> Vec<f64>;

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn record_metrics() -> [(&'static str, Sampler); 4] {
    [
        ("TTFT", |r| r.ttft.map(ms).into_iter().collect()),
        ("TPOT", |r| r.tpot().map(ms).into_iter().collect()),
        ("ITL", |r| r.gaps.iter().copied().map(ms).collect()),
        ("E2E", |r| vec![ms(r.e2e)]),
    ]
}

fn axis_label(report: &RunReport) -> String {
    match report.levels.first().map(|l| l.stats.level) {
        Some(crate::config::Level::Rate(_)) => "offered rate (req/s)".into(),
        _ => "concurrency".into(),
    }
}

/// The percentiles to plot against load: p50, p90 and p99 where asked for, else all.
fn plotted(ps: &[f64]) -> Vec<f64> {
    let wanted: Vec<f64> = ps
        .iter()
        .copied()
        .filter(|p| [50.0, 90.0, 99.0].contains(p))
        .collect();
    if wanted.is_empty() {
        ps.to_vec()
    } else {
        wanted
    }
}

fn against_load(report: &RunReport, name: &str, get: Getter, ps: &[f64], x: &str) -> Chart {
    let series = plotted(ps)
        .into_iter()
        .map(|p| Series {
            name: percentile_key(p),
            points: report
                .levels
                .iter()
                .filter_map(|l| {
                    Some((
                        l.stats.level.value(),
                        get(&l.stats).as_ref()?.percentile(p)?,
                    ))
                })
                .collect(),
        })
        .collect();
    Chart {
        title: format!("{name} percentiles"),
        x_label: x.to_string(),
        y_label: "ms".into(),
        series,
        markers: true,
    }
}

/// The empirical CDF of one metric, a series per level, as steps thinned to about
/// [`CDF_POINTS`] (a straight line between two samples would invent values between them).
fn cdf(report: &RunReport, name: &str, samples: Sampler) -> Chart {
    let series = report
        .levels
        .iter()
        .map(|l| {
            let mut v: Vec<f64> = l
                .records
                .iter()
                .filter(|r| r.is_ok())
                .flat_map(samples)
                .collect();
            v.sort_by(f64::total_cmp);
            Series {
                name: l.stats.label.clone(),
                points: steps(&v),
            }
        })
        .collect();
    Chart {
        title: format!("{name} CDF"),
        x_label: "ms".into(),
        y_label: "fraction of requests".into(),
        series,
        markers: false,
    }
}

/// The step outline of the ECDF of sorted `v`: up at each kept sample, always at the last.
fn steps(v: &[f64]) -> Vec<(f64, f64)> {
    let n = v.len();
    let stride = n.div_ceil(CDF_POINTS).max(1);
    let mut kept: Vec<usize> = (stride - 1..n).step_by(stride).collect();
    if n > 0 && kept.last() != Some(&(n - 1)) {
        kept.push(n - 1);
    }
    let mut points = Vec::with_capacity(2 * kept.len());
    let mut below = 0.0;
    for i in kept {
        let up = (i + 1) as f64 / n as f64;
        points.push((v[i], below));
        points.push((v[i], up));
        below = up;
    }
    points
}

fn timeline(report: &RunReport) -> Chart {
    let series = report
        .levels
        .iter()
        .map(|l| Series {
            name: l.stats.label.clone(),
            // At each bucket's middle: the rate is the bucket's average.
            points: l
                .stats
                .timeline
                .iter()
                .map(|p| (p.t_s + 0.5, p.output_tok_s))
                .collect(),
        })
        .collect();
    Chart {
        title: "Output tokens/s, per second".into(),
        x_label: "seconds since the level started".into(),
        y_label: "tok/s".into(),
        series,
        markers: true,
    }
}

fn cell(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.2}"))
}

fn summary_table(h: &mut String, report: &RunReport) {
    let ps = &report.config.report.percentiles;
    h.push_str("<h2>Levels</h2><table><tr><th>level</th><th>completed</th><th>errors</th><th>incomplete</th><th>req/s</th><th>out tok/s</th><th>total tok/s</th><th>goodput</th>");
    for (m, _) in metrics() {
        for &p in ps {
            let _ = write!(h, "<th>{m} {} ms</th>", percentile_key(p));
        }
    }
    h.push_str("</tr>");
    for LevelResult { stats: s, .. } in &report.levels {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.2}</td><td>{:.1}</td><td>{:.1}</td><td>{}</td>",
            esc(&s.label), s.completed, s.errors, s.incomplete, s.request_rate, s.output_token_rate, s.total_token_rate, cell(s.goodput)
        );
        for (_, get) in metrics() {
            for &p in ps {
                let _ = write!(
                    h,
                    "<td>{}</td>",
                    cell(get(s).as_ref().and_then(|d| d.percentile(p)))
                );
            }
        }
        h.push_str("</tr>");
    }
    h.push_str("</table>");
}

fn chain_table(h: &mut String, s: &LevelStats) {
    let _ = write!(
        h,
        "<h2>Chains at {}</h2><table><tr><th>chain</th><th>completed</th><th>errors</th><th>TTFT p50 ms</th><th>TPOT p50 ms</th><th>E2E p50 ms</th><th>tok/s p50</th><th>TTFT vs base</th><th>TPOT vs base</th><th>E2E vs base</th><th>tok/s vs base</th></tr>",
        esc(&s.label)
    );
    for c in &s.chains {
        let m = &c.median;
        let o = c.overhead.unwrap_or_default();
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&c.name), c.completed, c.errors, cell(m.ttft), cell(m.tpot), cell(m.e2e), cell(m.output_tok_s),
            cell(o.ttft), cell(o.tpot), cell(o.e2e), cell(o.output_tok_s)
        );
    }
    h.push_str("</table>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdf_steps_rise_at_each_sample_and_end_at_one() {
        assert_eq!(
            steps(&[1.0, 2.0, 4.0]),
            vec![
                (1.0, 0.0),
                (1.0, 1.0 / 3.0),
                (2.0, 1.0 / 3.0),
                (2.0, 2.0 / 3.0),
                (4.0, 2.0 / 3.0),
                (4.0, 1.0)
            ]
        );
        let many: Vec<f64> = (0..1000).map(f64::from).collect();
        let s = steps(&many);
        assert_eq!(s.len(), 2 * CDF_POINTS);
        assert_eq!(s.last(), Some(&(999.0, 1.0)));
        assert!(steps(&[]).is_empty());
    }
}
