//! The load loops: one phase of requests at one level, closed ([`closed`]) or open ([`open`]),
//! bounded by a request count and/or a duration, ending by itself.
//!
//! A phase stops issuing when its bound is reached; requests still running get the drain
//! timeout, and whatever is left then is cancelled through a watch channel each request
//! listens to, and comes back as an incomplete record. Nothing in a phase can wait forever:
//! every request also has its own `--timeout`.

mod arrivals;
mod closed;
mod open;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

pub use arrivals::Schedule;

use crate::client::Client;
use crate::config::{Arrivals, Level};
use crate::live::Live;
use crate::record::RequestRecord;
use crate::workload::Workload;

/// What one phase runs.
#[derive(Debug, Clone)]
pub struct PhaseSpec {
    pub level: Level,
    /// Workload index of the phase's first request.
    pub first_index: u64,
    pub max_requests: Option<u64>,
    pub duration: Option<Duration>,
    pub ramp_up: Option<Duration>,
    pub drain_timeout: Duration,
    pub arrivals: Arrivals,
    pub seed: u64,
}

/// What a phase's requests share.
#[derive(Clone)]
pub struct Env {
    pub client: Arc<Client>,
    pub workload: Arc<Workload>,
    pub live: Arc<Live>,
}

#[derive(Debug, Clone)]
pub struct PhaseResult {
    /// In no particular order.
    pub records: Vec<RequestRecord>,
    /// From the first request's scheduled start until the last record came back.
    pub elapsed: Duration,
}

/// Runs one phase to its end.
pub async fn run_phase(spec: &PhaseSpec, env: Env) -> PhaseResult {
    let origin = Instant::now();
    let records = match spec.level {
        Level::Concurrency(n) => closed::run(spec, n, origin, env).await,
        Level::Rate(r) => open::run(spec, r, origin, env).await,
    };
    PhaseResult {
        records,
        elapsed: origin.elapsed(),
    }
}

/// Collects every task of `tasks`; once `issue_end` has resolved and `drain` has passed, tells
/// the rest to cancel through `cancel` (they then return promptly) and keeps collecting.
async fn drain<T: 'static>(
    mut tasks: JoinSet<T>,
    issue_end: impl Future<Output = ()>,
    drain: Duration,
    cancel: watch::Sender<bool>,
) -> Vec<T> {
    let cutoff = async {
        issue_end.await;
        tokio::time::sleep(drain).await;
    };
    tokio::pin!(cutoff);
    let mut cancelled = false;
    let mut out = Vec::with_capacity(tasks.len());
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                Some(Ok(v)) => out.push(v),
                Some(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Some(Err(_)) => {}
                None => return out,
            },
            _ = &mut cutoff, if !cancelled => {
                cancel.send_replace(true);
                cancelled = true;
            }
        }
    }
}
