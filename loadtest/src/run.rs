//! A whole run: resolve the model, then each level in turn: warm-up, the metrics scrape before,
//! the measured phase, the scrape after, the statistics.
//!
//! Levels run one after the other with the same workload (request `i` is the same request in
//! every level), so a sweep compares loads, not prompts. The warm-up sends requests `0..W` and
//! the measured phase starts at `W`, in every level.

use std::sync::Arc;

use crate::client::{Client, ClientError};
use crate::config::{Config, Level};
use crate::live::{Live, Progress};
use crate::load::{run_phase, Env, PhaseResult, PhaseSpec};
use crate::record::RequestRecord;
use crate::scrape::Scrape;
use crate::stats::{level_stats, LevelStats};
use crate::workload::{PromptsError, Workload};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Prompts(#[from] PromptsError),
}

/// One level's outcome.
#[derive(Debug, Clone)]
pub struct LevelResult {
    pub stats: LevelStats,
    /// The measured requests, in order of their start.
    pub records: Vec<RequestRecord>,
    pub scrape: Option<Scrape>,
}

#[derive(Debug, Clone)]
pub struct RunReport {
    pub config: Config,
    /// The model the requests named (from `--model` or `/v1/models`).
    pub model: String,
    /// The chain names of the mix, `base` alone without one.
    pub chains: Vec<String>,
    pub levels: Vec<LevelResult>,
}

/// Runs every level of `config`; `on_level` sees each level as soon as it ends.
pub async fn run(
    config: &Config,
    mut on_level: impl FnMut(&LevelResult),
) -> Result<RunReport, RunError> {
    let client = Arc::new(Client::new(&config.target)?);
    let model = match &config.target.model {
        Some(m) => m.clone(),
        None => client.first_model().await?,
    };
    let workload = Arc::new(Workload::new(
        &config.workload,
        &config.target,
        model.clone(),
    )?);
    let chains = workload.chains().to_vec();
    let mut levels = Vec::new();
    for &level in &config.load.levels {
        let result = run_level(config, level, &client, &workload, &chains).await;
        on_level(&result);
        levels.push(result);
    }
    Ok(RunReport {
        config: config.clone(),
        model,
        chains,
        levels,
    })
}

async fn run_level(
    config: &Config,
    level: Level,
    client: &Arc<Client>,
    workload: &Arc<Workload>,
    chains: &[String],
) -> LevelResult {
    let plan = &config.load;
    let phase = |first_index, max_requests, duration, ramp_up| PhaseSpec {
        level,
        first_index,
        max_requests,
        duration,
        ramp_up,
        drain_timeout: plan.drain_timeout,
        arrivals: plan.arrivals,
        seed: config.workload.seed,
    };
    let show = config.report.progress;
    if plan.warmup > 0 {
        let spec = phase(0, Some(plan.warmup), None, None);
        let label = format!("{} warm-up", level.label());
        run_shown(&spec, client, workload, label, show).await;
    }
    let before = match config.report.scrape_metrics {
        true => Some(metrics(client).await),
        false => None,
    };
    let spec = phase(plan.warmup, plan.requests, plan.duration, plan.ramp_up);
    let PhaseResult {
        mut records,
        elapsed,
    } = run_shown(&spec, client, workload, level.label(), show).await;
    let scrape = match before {
        Some(before) => Some(scrape(before, metrics(client).await)),
        None => None,
    };
    records.sort_by_key(|r| (r.start, r.index));
    let stats = level_stats(
        level,
        &records,
        elapsed,
        plan.warmup,
        chains,
        &config.report,
    );
    LevelResult {
        stats,
        records,
        scrape,
    }
}

/// Runs a phase with its progress line, when asked for one.
async fn run_shown(
    spec: &PhaseSpec,
    client: &Arc<Client>,
    workload: &Arc<Workload>,
    label: String,
    show: bool,
) -> PhaseResult {
    let live = Arc::new(Live::default());
    let progress = show.then(|| Progress::start(label, live.clone(), spec.max_requests));
    let env = Env {
        client: client.clone(),
        workload: workload.clone(),
        live,
    };
    let result = run_phase(spec, env).await;
    if let Some(p) = progress {
        p.finish().await;
    }
    result
}

async fn metrics(client: &Client) -> Result<String, ClientError> {
    client.get_text("/metrics").await
}

fn scrape(before: Result<String, ClientError>, after: Result<String, ClientError>) -> Scrape {
    match (before, after) {
        (Ok(b), Ok(a)) => Scrape::new(b, a),
        (b, a) => Scrape {
            error: b.err().or(a.err()).map(|e| e.to_string()),
            ..Scrape::default()
        },
    }
}
