//! The command line: raw flags ([`Args`], clap) and their validation into a [`Config`].
//!
//! Single-flag shapes are checked by the value parsers of [`crate::parse`]; the checks that
//! involve several flags (mix names against chain definitions, the URL scheme, the default
//! bound) live in [`Args::into_config`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde_json::Value;

use crate::config::{
    Arrivals, Config, Endpoint, LengthDist, Level, LoadPlan, ReportSpec, Target, WorkloadSpec,
};
use crate::parse::{self, ChainSpec, MixEntry, Slo};

/// Requests per level when neither `--requests` nor `--duration` is given.
pub const DEFAULT_REQUESTS: u64 = 100;

/// Load tester for OpenAI-compatible servers (graft, llama.cpp, vLLM) over HTTP.
// `std::vec::Vec` (not `Vec`) marks list values that one flag parses whole: clap's derive
// would otherwise read a `Vec` field as a repeatable flag.
#[derive(Debug, Clone, Parser)]
#[command(name = "loadtest", version)]
#[command(group = clap::ArgGroup::new("load").multiple(false))]
pub struct Args {
    /// Base URL of the server (http only).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Which route to call.
    #[arg(long, value_enum, default_value = "chat")]
    pub endpoint: Endpoint,
    /// Stream responses (SSE); the default.
    #[arg(long, overrides_with = "no_stream")]
    pub stream: bool,
    /// Ask for whole responses (TTFT is then the end-to-end latency).
    #[arg(long, overrides_with = "stream")]
    pub no_stream: bool,
    /// Sent as `Authorization: Bearer KEY`.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Model name; default: the first one `GET /v1/models` lists.
    #[arg(long)]
    pub model: Option<String>,
    /// Per-request time limit (an error of kind `timeout` past it).
    #[arg(long, value_parser = parse::duration, default_value = "300s")]
    pub timeout: Duration,

    /// Closed loop with N requests in flight [default: 1].
    #[arg(long, group = "load")]
    pub concurrency: Option<usize>,
    /// Open loop at R requests per second.
    #[arg(long, group = "load")]
    pub rate: Option<f64>,
    /// Closed-loop sweep, one level per concurrency, e.g. 1,4,8,16.
    #[arg(long, group = "load", value_name = "N,...", value_parser = parse::count_list)]
    pub sweep_concurrency: Option<std::vec::Vec<usize>>,
    /// Open-loop sweep, one level per rate (requests/s), e.g. 0.5,1,2.
    #[arg(long, group = "load", value_name = "R,...", value_parser = parse::number_list)]
    pub sweep_rate: Option<std::vec::Vec<f64>>,
    /// Arrival process of the open loop (seeded).
    #[arg(long, value_enum, default_value = "poisson")]
    pub arrivals: Arrivals,
    /// Measured requests per level [default: 100 when --duration is not given either].
    #[arg(long)]
    pub requests: Option<u64>,
    /// Measured time per level, e.g. 30s; no request starts after it.
    #[arg(long, value_parser = parse::duration)]
    pub duration: Option<Duration>,
    /// Requests sent before each level and left out of its results.
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    /// Increase the concurrency or rate linearly over this time, e.g. 10s.
    #[arg(long, value_parser = parse::duration)]
    pub ramp_up: Option<Duration>,
    /// Time left to requests still running when a level stops; then they are cancelled and
    /// recorded as incomplete.
    #[arg(long, value_parser = parse::duration, default_value = "30s")]
    pub drain_timeout: Duration,

    /// JSONL prompts: {"messages": [...]} or {"prompt": "..."} per line, optional "max_tokens".
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Synthetic prompt length (words of one token each, roughly; usage has the exact count).
    #[arg(long, default_value_t = 128, conflicts_with = "prompts")]
    pub input_tokens: u32,
    /// Standard deviation of the synthetic prompt length.
    #[arg(long, default_value_t = 0.0, conflicts_with = "prompts")]
    pub input_std: f64,
    /// A synthetic system prompt of about this many tokens, the same in every request (0:
    /// none): a shared prefix, as deployed chat front-ends send.
    #[arg(long, default_value_t = 0, conflicts_with = "prompts")]
    pub system_tokens: u32,
    /// Turns per conversation: each request resends the conversation so far (the system
    /// prompt, the earlier user messages and the server's own replies), as chat clients do.
    /// Chat and the closed loop only; `--requests` and `--warmup` count turns.
    #[arg(long, default_value_t = 1, conflicts_with = "prompts")]
    pub turns: u32,
    /// `max_tokens` of each request (unless its JSONL line sets one).
    #[arg(long, default_value_t = 128)]
    pub output_tokens: u32,
    /// Standard deviation of `max_tokens`.
    #[arg(long, default_value_t = 0.0)]
    pub output_std: f64,
    /// Seed of the prompts, lengths, chain assignment and arrivals.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Send `ignore_eos: true` so each request generates exactly `max_tokens`.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Shares of chains, e.g. base=50,sql=30,steer=20 (`base`: no fragment).
    #[arg(long, value_name = "NAME=WEIGHT,...", value_parser = parse::mix)]
    pub mix: Option<std::vec::Vec<MixEntry>>,
    /// A chain: NAME=JSON merged into the request body (repeatable).
    #[arg(long = "chain", value_name = "NAME=JSON", value_parser = parse::chain)]
    pub chains: Vec<ChainSpec>,
    /// JSON merged into every request body, e.g. '{"temperature":0}'.
    #[arg(long, value_name = "JSON", value_parser = parse::json_object)]
    pub extra_body: Option<Value>,

    /// Percentiles to report.
    #[arg(long, value_parser = parse::percentiles, default_value = "50,90,95,99")]
    pub percentiles: std::vec::Vec<f64>,
    /// SLOs for goodput, e.g. ttft=500ms,tpot=50ms,e2e=10s.
    #[arg(long, value_name = "KEY=DURATION,...", value_parser = parse::slo)]
    pub slo: Option<Slo>,
    /// Write summary.json, requests.jsonl, requests.csv and report.html here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Fetch the server's /metrics before and after each level.
    #[arg(long)]
    pub scrape_metrics: bool,
    /// No live progress line on stderr.
    #[arg(long)]
    pub no_progress: bool,
}

/// A combination of flags that cannot run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("--url must be an http:// URL (this tool speaks plain HTTP only), got `{0}`")]
    Url(String),
    #[error("--rate must be a positive number, got {0}")]
    Rate(f64),
    #[error("--concurrency must be at least 1")]
    Concurrency,
    #[error("--requests must be at least 1")]
    Requests,
    #[error("--mix names `{0}`, which no --chain defines (only `base` needs none)")]
    UnknownChain(String),
    #[error("--chain `{0}` is defined but not in --mix")]
    UnusedChain(String),
    #[error("--chain `{0}` is defined twice")]
    DuplicateChain(String),
    #[error("--input-std and --output-std must be finite and >= 0")]
    Std,
    #[error("--turns must be at least 1")]
    Turns,
    #[error(
        "--turns above 1 needs --endpoint chat and a closed loop (--concurrency or \
         --sweep-concurrency): a conversation's next turn is sent when its reply is in"
    )]
    TurnsNeedClosedChat,
}

impl Args {
    /// Checks the flags against each other and builds the run's configuration.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let url = self.url.trim_end_matches('/').to_string();
        if !url.starts_with("http://") {
            return Err(ConfigError::Url(self.url));
        }
        for std in [self.input_std, self.output_std] {
            if !(std.is_finite() && std >= 0.0) {
                return Err(ConfigError::Std);
            }
        }
        let levels = self.levels()?;
        if self.turns == 0 {
            return Err(ConfigError::Turns);
        }
        let closed = levels.iter().all(|l| matches!(l, Level::Concurrency(_)));
        if self.turns > 1 && !(closed && self.endpoint == Endpoint::Chat) {
            return Err(ConfigError::TurnsNeedClosedChat);
        }
        let (mix, chains) = check_chains(self.mix.unwrap_or_default(), self.chains)?;
        let requests = match (self.requests, self.duration) {
            (Some(0), _) => return Err(ConfigError::Requests),
            (None, None) => Some(DEFAULT_REQUESTS),
            (r, _) => r,
        };
        Ok(Config {
            target: Target {
                url,
                endpoint: self.endpoint,
                stream: !self.no_stream,
                api_key: self.api_key.filter(|k| !k.is_empty()),
                model: self.model,
                timeout: self.timeout,
            },
            load: LoadPlan {
                levels,
                arrivals: self.arrivals,
                requests,
                duration: self.duration,
                warmup: self.warmup,
                ramp_up: self.ramp_up.filter(|d| !d.is_zero()),
                drain_timeout: self.drain_timeout,
            },
            workload: WorkloadSpec {
                prompts: self.prompts,
                input: LengthDist {
                    mean: self.input_tokens.max(1),
                    std: self.input_std,
                },
                output: LengthDist {
                    mean: self.output_tokens.max(1),
                    std: self.output_std,
                },
                seed: self.seed,
                ignore_eos: self.ignore_eos,
                system_tokens: self.system_tokens,
                turns: self.turns,
                mix,
                chains,
                extra_body: self.extra_body,
            },
            report: ReportSpec {
                percentiles: self.percentiles,
                slo: self.slo.unwrap_or_default(),
                out: self.out,
                scrape_metrics: self.scrape_metrics,
                progress: !self.no_progress,
            },
        })
    }

    fn levels(&self) -> Result<Vec<Level>, ConfigError> {
        let levels = if let Some(rate) = self.rate {
            vec![Level::Rate(rate)]
        } else if let Some(rates) = &self.sweep_rate {
            rates.iter().map(|&r| Level::Rate(r)).collect()
        } else if let Some(counts) = &self.sweep_concurrency {
            counts.iter().map(|&n| Level::Concurrency(n)).collect()
        } else {
            vec![Level::Concurrency(self.concurrency.unwrap_or(1))]
        };
        for level in &levels {
            match *level {
                Level::Concurrency(0) => return Err(ConfigError::Concurrency),
                Level::Rate(r) if !(r.is_finite() && r > 0.0) => return Err(ConfigError::Rate(r)),
                _ => {}
            }
        }
        Ok(levels)
    }
}

/// Every mix name but `base` needs a chain, and every chain must be used by the mix: an unused
/// chain is almost always a typo that would silently measure the wrong thing.
fn check_chains(
    mix: Vec<MixEntry>,
    specs: Vec<ChainSpec>,
) -> Result<(Vec<MixEntry>, BTreeMap<String, Value>), ConfigError> {
    let mut chains = BTreeMap::new();
    for spec in specs {
        if chains.insert(spec.name.clone(), spec.fragment).is_some() {
            return Err(ConfigError::DuplicateChain(spec.name));
        }
    }
    if let Some(e) = mix
        .iter()
        .find(|e| e.name != "base" && !chains.contains_key(&e.name))
    {
        return Err(ConfigError::UnknownChain(e.name.clone()));
    }
    if let Some(name) = chains.keys().find(|n| !mix.iter().any(|e| &e.name == *n)) {
        return Err(ConfigError::UnusedChain(name.clone()));
    }
    Ok((mix, chains))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["loadtest"];
        argv.extend_from_slice(args);
        Args::try_parse_from(argv).unwrap().into_config()
    }

    #[test]
    fn defaults_are_one_closed_level_of_100_streamed_chat_requests() {
        let c = config(&[]).unwrap();
        assert_eq!(c.load.levels, vec![Level::Concurrency(1)]);
        assert_eq!(c.load.requests, Some(DEFAULT_REQUESTS));
        assert!(c.target.stream);
        assert_eq!(c.target.endpoint, Endpoint::Chat);
        assert_eq!(c.report.percentiles, vec![50.0, 90.0, 95.0, 99.0]);
    }

    #[test]
    fn no_stream_and_sweeps_and_duration_bound() {
        let c = config(&["--no-stream", "--sweep-rate", "1,2", "--duration", "5s"]).unwrap();
        assert!(!c.target.stream);
        assert_eq!(c.load.levels, vec![Level::Rate(1.0), Level::Rate(2.0)]);
        assert_eq!(
            c.load.requests, None,
            "a duration bound alone adds no request bound"
        );
        let c = config(&["--no-stream", "--stream"]).unwrap();
        assert!(c.target.stream, "the last of --stream/--no-stream wins");
    }

    #[test]
    fn load_flags_are_exclusive() {
        let r = Args::try_parse_from(["loadtest", "--rate", "1", "--concurrency", "2"]);
        assert!(r.is_err());
    }

    #[test]
    fn cross_flag_errors() {
        assert_eq!(
            config(&["--url", "https://x"]).unwrap_err(),
            ConfigError::Url("https://x".into())
        );
        assert_eq!(
            config(&["--mix", "base=1,sql=1"]).unwrap_err(),
            ConfigError::UnknownChain("sql".into())
        );
        assert_eq!(
            config(&["--chain", r#"sql={"model":"x"}"#]).unwrap_err(),
            ConfigError::UnusedChain("sql".into())
        );
        assert_eq!(
            config(&["--rate", "0"]).unwrap_err(),
            ConfigError::Rate(0.0)
        );
        assert_eq!(
            config(&["--requests", "0"]).unwrap_err(),
            ConfigError::Requests
        );
    }

    #[test]
    fn api_key_is_not_serialized() {
        let c = config(&["--api-key", "sekrit"]).unwrap();
        assert_eq!(c.target.api_key.as_deref(), Some("sekrit"));
        let json = serde_json::to_string(&c).unwrap();
        assert!(!json.contains("sekrit"));
    }
}
