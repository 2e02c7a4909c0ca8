//! The validated configuration of a run: what to call ([`Target`]), how hard ([`LoadPlan`]),
//! with what ([`WorkloadSpec`]) and what to report ([`ReportSpec`]).
//!
//! The command line ([`crate::cli::Args`]) is turned into this once, with every cross-flag
//! check done there; everything downstream trusts it. It is written verbatim (minus the API
//! key) into `summary.json`, so a result always carries the exact settings that produced it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Serialize, Serializer};
use serde_json::Value;

use crate::parse::{MixEntry, Slo};

#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub target: Target,
    pub load: LoadPlan,
    pub workload: WorkloadSpec,
    pub report: ReportSpec,
}

/// Which OpenAI route to call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    /// `POST /v1/chat/completions` with `messages`.
    Chat,
    /// `POST /v1/completions` with `prompt`.
    Completions,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// Base URL without a trailing slash, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    pub endpoint: Endpoint,
    pub stream: bool,
    /// Never written out: results get shared, keys must not travel with them.
    #[serde(skip)]
    pub api_key: Option<String>,
    /// `None`: the first model of `GET /v1/models`, resolved before the first level.
    pub model: Option<String>,
    /// Per-request limit, after which the request is an error of kind `timeout`.
    #[serde(serialize_with = "secs")]
    pub timeout: Duration,
}

/// The offered load of one level.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// Closed loop: this many requests in flight, each worker sending its next request as soon
    /// as the previous one ends.
    Concurrency(usize),
    /// Open loop: requests per second, sent on schedule whatever the server's latency.
    Rate(f64),
}

impl Level {
    /// The level's load as one number, the x axis of sweep plots.
    pub fn value(self) -> f64 {
        match self {
            Level::Concurrency(n) => n as f64,
            Level::Rate(r) => r,
        }
    }

    pub fn label(self) -> String {
        match self {
            Level::Concurrency(n) => format!("concurrency {n}"),
            Level::Rate(r) => format!("rate {r}/s"),
        }
    }
}

/// How open-loop arrival times are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Arrivals {
    /// Exponential gaps (a Poisson process), seeded.
    Poisson,
    /// Equal gaps of 1/rate.
    Constant,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadPlan {
    /// One level, or several for a sweep; each runs in turn with the same workload.
    pub levels: Vec<Level>,
    pub arrivals: Arrivals,
    /// Measured requests per level (warm-up excluded).
    pub requests: Option<u64>,
    /// Measured time per level: no request starts after it.
    #[serde(serialize_with = "opt_secs")]
    pub duration: Option<Duration>,
    /// Requests sent before each level's measurement and left out of its results.
    pub warmup: u64,
    /// Linear increase of the concurrency or rate from (almost) zero to the level.
    #[serde(serialize_with = "opt_secs")]
    pub ramp_up: Option<Duration>,
    /// How long requests still running when a level stops issuing may finish; then they are
    /// cancelled and recorded as incomplete.
    #[serde(serialize_with = "secs")]
    pub drain_timeout: Duration,
}

/// The length of synthetic prompts or outputs: a normal distribution rounded and clamped to
/// at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LengthDist {
    pub mean: u32,
    pub std: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkloadSpec {
    /// Prompts from a JSONL file; `None`: synthetic prompts of `input` words.
    pub prompts: Option<PathBuf>,
    pub input: LengthDist,
    /// `max_tokens` of each request unless its JSONL line sets one.
    pub output: LengthDist,
    pub seed: u64,
    /// Sends `ignore_eos: true`, so each request generates exactly `max_tokens`.
    pub ignore_eos: bool,
    /// Words of the synthetic system prompt every request starts with (0: none).
    pub system_tokens: u32,
    /// Turns per conversation (1: independent requests).
    pub turns: u32,
    /// Shares of chains; `base` is the plain request. Empty: every request is `base`.
    pub mix: Vec<MixEntry>,
    /// Request-body fragments by chain name, merged into the body.
    pub chains: BTreeMap<String, Value>,
    /// Merged into every request body before the chain fragment (e.g. `temperature`).
    pub extra_body: Option<Value>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReportSpec {
    pub percentiles: Vec<f64>,
    pub slo: Slo,
    pub out: Option<PathBuf>,
    pub scrape_metrics: bool,
    pub progress: bool,
}

fn secs<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

fn opt_secs<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

/// Serializes an optional duration as milliseconds (SLOs read like latencies).
pub(crate) fn opt_ms<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&(d.as_secs_f64() * 1e3)),
        None => s.serialize_none(),
    }
}
