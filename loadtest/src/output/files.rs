//! The machine-readable outputs of `--out DIR`: `summary.json` (the configuration and the
//! aggregates of every level and chain), `requests.jsonl` (one record per measured request,
//! with its inter-token gaps), `requests.csv` (the same without the gaps, for spreadsheets),
//! and with `--scrape-metrics` the raw `/metrics` texts under `metrics/`.
//!
//! Times are milliseconds (`_ms`) or seconds (`_s`), named so in every field.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use serde::Serialize;

use super::OutputError;
use crate::config::Config;
use crate::record::{Outcome, RequestRecord, TokenSource};
use crate::run::{LevelResult, RunReport};
use crate::scrape::Scrape;
use crate::stats::LevelStats;

#[derive(Serialize)]
struct Summary<'a> {
    tool: &'static str,
    version: &'static str,
    model: &'a str,
    chains: &'a [String],
    config: &'a Config,
    levels: Vec<LevelOut<'a>>,
}

#[derive(Serialize)]
struct LevelOut<'a> {
    #[serde(flatten)]
    stats: &'a LevelStats,
    metrics: Option<&'a Scrape>,
}

/// One request as a flat row (the CSV columns; JSONL adds the gaps).
#[derive(Serialize)]
struct Row<'a> {
    level: usize,
    level_label: &'a str,
    load: f64,
    index: u64,
    turn: u32,
    chain: &'a str,
    outcome: String,
    error: Option<&'a str>,
    start_ms: f64,
    ttft_ms: Option<f64>,
    tpot_ms: Option<f64>,
    e2e_ms: f64,
    content_chunks: u64,
    input_tokens: Option<u64>,
    cached_tokens: Option<u64>,
    output_tokens: Option<u64>,
    token_source: TokenSource,
    max_tokens: u32,
    streamed: bool,
}

#[derive(Serialize)]
struct JsonRow<'a> {
    #[serde(flatten)]
    row: Row<'a>,
    itl_ms: Vec<f64>,
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn row<'a>(level: usize, l: &'a LevelResult, r: &'a RequestRecord) -> Row<'a> {
    Row {
        level,
        level_label: &l.stats.label,
        load: l.stats.level.value(),
        index: r.index,
        turn: r.turn,
        chain: &r.chain,
        outcome: r.outcome.key(),
        error: match &r.outcome {
            Outcome::Error { message, .. } => Some(message),
            _ => None,
        },
        start_ms: ms(r.start),
        ttft_ms: r.ttft.map(ms),
        tpot_ms: r.tpot().map(ms),
        e2e_ms: ms(r.e2e),
        content_chunks: r.content_chunks,
        input_tokens: r.input_tokens,
        cached_tokens: r.cached_tokens,
        output_tokens: r.output_tokens,
        token_source: r.token_source,
        max_tokens: r.max_tokens,
        streamed: r.streamed,
    }
}

pub fn write_summary(dir: &Path, report: &RunReport) -> Result<(), OutputError> {
    let summary = Summary {
        tool: "graft loadtest",
        version: env!("CARGO_PKG_VERSION"),
        model: &report.model,
        chains: &report.chains,
        config: &report.config,
        levels: report
            .levels
            .iter()
            .map(|l| LevelOut {
                stats: &l.stats,
                metrics: l.scrape.as_ref(),
            })
            .collect(),
    };
    let path = dir.join("summary.json");
    let mut w = BufWriter::new(File::create(&path).map_err(|e| OutputError::io(&path, e))?);
    serde_json::to_writer_pretty(&mut w, &summary).map_err(|e| OutputError::json(&path, e))?;
    writeln!(w)
        .and_then(|_| w.flush())
        .map_err(|e| OutputError::io(&path, e))
}

pub fn write_requests(dir: &Path, report: &RunReport) -> Result<(), OutputError> {
    let path = dir.join("requests.jsonl");
    let mut w = BufWriter::new(File::create(&path).map_err(|e| OutputError::io(&path, e))?);
    for (i, l) in report.levels.iter().enumerate() {
        for r in &l.records {
            let itl_ms = r.gaps.iter().copied().map(ms).collect();
            let line = JsonRow {
                row: row(i, l, r),
                itl_ms,
            };
            serde_json::to_writer(&mut w, &line).map_err(|e| OutputError::json(&path, e))?;
            writeln!(w).map_err(|e| OutputError::io(&path, e))?;
        }
    }
    w.flush().map_err(|e| OutputError::io(&path, e))?;

    let path = dir.join("requests.csv");
    let mut csv = csv::Writer::from_path(&path).map_err(|e| OutputError::csv(&path, e))?;
    for (i, l) in report.levels.iter().enumerate() {
        for r in &l.records {
            csv.serialize(row(i, l, r))
                .map_err(|e| OutputError::csv(&path, e))?;
        }
    }
    csv.flush().map_err(|e| OutputError::io(&path, e))
}

/// `metrics/level-N-before.txt` and `-after.txt` for each level that was scraped.
pub fn write_metrics(dir: &Path, report: &RunReport) -> Result<(), OutputError> {
    let scraped: Vec<(usize, &Scrape)> = report
        .levels
        .iter()
        .enumerate()
        .filter_map(|(i, l)| l.scrape.as_ref().map(|s| (i, s)))
        .collect();
    if scraped.is_empty() {
        return Ok(());
    }
    let sub = dir.join("metrics");
    std::fs::create_dir_all(&sub).map_err(|e| OutputError::io(&sub, e))?;
    for (i, s) in scraped {
        for (when, text) in [("before", &s.before), ("after", &s.after)] {
            let path = sub.join(format!("level-{i}-{when}.txt"));
            std::fs::write(&path, text).map_err(|e| OutputError::io(&path, e))?;
        }
    }
    Ok(())
}
