//! The closed loop: `n` workers, each sending its next request as soon as its previous one
//! ends, so exactly `n` requests are in flight (fewer only at the very end).
//!
//! Workers draw request indices from one shared counter, so the set of requests sent does not
//! depend on which worker is fast. With a ramp-up, worker `k` starts at `ramp * k / n`: the
//! concurrency climbs linearly from 1 to `n`. A worker stops taking requests at the deadline
//! or when the counter passes the request bound.
//!
//! With `--turns T` the counter hands out conversations: a worker sends a conversation's `T`
//! turns one after the other, each with the replies to the turns before it, so `n` workers
//! hold `n` conversations open, as `n` chat users would. A failed turn ends its conversation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{drain, Env, PhaseSpec};
use crate::record::RequestRecord;

/// Shared by the workers of one phase.
struct Shared {
    env: Env,
    origin: Instant,
    deadline: Option<Instant>,
    max: Option<u64>,
    first_index: u64,
    next: AtomicU64,
    /// Turns true when the last request of the bound has been taken.
    issued_all: watch::Sender<bool>,
}

pub(super) async fn run(
    spec: &PhaseSpec,
    n: usize,
    origin: Instant,
    env: Env,
) -> Vec<RequestRecord> {
    let (issued_all, mut issued_rx) = watch::channel(false);
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        env,
        origin,
        deadline: spec.duration.map(|d| origin + d),
        max: spec.max_requests,
        first_index: spec.first_index,
        next: AtomicU64::new(0),
        issued_all,
    });
    let mut workers = JoinSet::new();
    for k in 0..n {
        let delay = spec
            .ramp_up
            .map(|r| r.mul_f64(k as f64 / n as f64))
            .unwrap_or_default();
        workers.spawn(worker(shared.clone(), origin + delay, cancel_rx.clone()));
    }
    let deadline = shared.deadline;
    let issue_end = async move {
        let all_issued = async {
            let _ = issued_rx.wait_for(|all| *all).await;
        };
        match deadline {
            Some(d) => tokio::select! {
                _ = tokio::time::sleep_until(d) => {}
                _ = all_issued => {}
            },
            None => all_issued.await,
        }
    };
    let per_worker = drain(workers, issue_end, spec.drain_timeout, cancel_tx).await;
    per_worker.into_iter().flatten().collect()
}

async fn worker(
    shared: Arc<Shared>,
    begin: Instant,
    cancel: watch::Receiver<bool>,
) -> Vec<RequestRecord> {
    let mut records = Vec::new();
    let begin = shared.deadline.map_or(begin, |d| begin.min(d));
    tokio::time::sleep_until(begin).await;
    let turns = u64::from(shared.env.workload.turns());
    while !shared.stopped(&cancel) {
        let conversation = shared.next.fetch_add(1, Ordering::Relaxed);
        let mut replies = Vec::new();
        for turn in 0..turns {
            let i = conversation * turns + turn;
            if !shared.take(i) || (turn > 0 && shared.stopped(&cancel)) {
                return records;
            }
            let req = shared.env.workload.turn(shared.first_index + i, &replies);
            let env = &shared.env;
            let (record, reply) = env
                .client
                .send(req, shared.origin, cancel.clone(), &env.live)
                .await;
            env.live.finished(&record);
            let ok = record.is_ok();
            records.push(record);
            if !ok {
                break;
            }
            replies.push(reply);
        }
    }
    records
}

impl Shared {
    /// Past the deadline, or cancelled: no new request starts.
    fn stopped(&self, cancel: &watch::Receiver<bool>) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d) || *cancel.borrow()
    }

    /// Whether request `i` of the phase is within the bound (and marks the bound issued when
    /// `i` is its last request).
    fn take(&self, i: u64) -> bool {
        let Some(max) = self.max else {
            return true;
        };
        if i + 1 == max {
            self.issued_all.send_replace(true);
        }
        i < max
    }
}
