//! The open loop: requests leave on the arrival schedule whatever the server's latency, each in
//! its own task, with no cap on how many are in flight. That is what makes it "open": an
//! overloaded server shows up as growing latency and backlog, not as a lower offered rate.

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{drain, Env, PhaseSpec, Schedule};
use crate::record::RequestRecord;

pub(super) async fn run(
    spec: &PhaseSpec,
    rate: f64,
    origin: Instant,
    env: Env,
) -> Vec<RequestRecord> {
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let schedule = Schedule::new(rate, spec.arrivals, spec.ramp_up, spec.seed);
    let mut tasks = JoinSet::new();
    for (i, at) in schedule.enumerate() {
        let i = i as u64;
        let past_bound = spec.max_requests.is_some_and(|m| i >= m);
        if past_bound || spec.duration.is_some_and(|d| at >= d) {
            break;
        }
        tokio::time::sleep_until(origin + at).await;
        let req = env.workload.request(spec.first_index + i);
        let (env, cancel) = (env.clone(), cancel_rx.clone());
        tasks.spawn(async move {
            let (record, _) = env.client.send(req, origin, cancel, &env.live).await;
            env.live.finished(&record);
            record
        });
    }
    // The drain timeout counts from the end of the schedule's window, not its last arrival.
    let issue_end = async {
        if let Some(d) = spec.duration {
            tokio::time::sleep_until(origin + d).await;
        }
    };
    drain(tasks, issue_end, spec.drain_timeout, cancel_tx).await
}
