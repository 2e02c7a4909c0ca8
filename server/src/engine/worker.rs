//! The engine thread: the loop that owns the model and turns queued requests into tokens.
//!
//! [`RealEngine::submit`](super::RealEngine) sends requests here over a bounded channel; each
//! turn of [`Worker::run`] receives what arrived (blocking only when there is nothing to do),
//! drops sequences whose client went away, admits waiting sequences, runs one forward step
//! over the scheduler's batch, hands every row its logits, removes finished sequences (whose
//! KV caches go to the prefix cache, see `prefix_cache`, or are freed) and publishes the
//! figures `stats()` reads.
//!
//! A failing or panicking forward step fails the sequences of that batch and nothing else;
//! the loop goes on serving the rest. On shutdown the loop keeps stepping until every
//! accepted request finished or the drain deadline passed, fails what is left, and returns.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use models::{BatchRow, KvCache, Llama, Tokenizer};
use rayon::prelude::*;
use tokio::sync::mpsc;

use super::prefix_cache::PrefixCache;
use super::prefix_reuse::{keep_prefixes, reuse_prefixes};
use super::scheduler::{PlannedRow, Schedulable, Scheduler, SchedulerLimits};
use super::sequence::{PendingFork, Sequence};
use super::step_metrics::StepMetrics;
use super::{EngineError, Event, GenerateRequest};

/// What the engine thread needs from a model: [`Llama`] in production, a wrapper that fails
/// on demand in the robustness tests.
pub(crate) trait StepModel: Send + 'static {
    fn forward(&self, batch: &mut [BatchRow<'_>]) -> models::Result<Vec<Option<Tensor>>>;
    fn new_cache(&self) -> KvCache;
}

impl StepModel for Llama {
    fn forward(&self, batch: &mut [BatchRow<'_>]) -> models::Result<Vec<Option<Tensor>>> {
        Llama::forward(self, batch)
    }

    fn new_cache(&self) -> KvCache {
        Llama::new_cache(self)
    }
}

/// A request on its way to the engine thread, with the other choices of its prompt (empty
/// unless `n > 1`), which fork off it once its prompt is prefilled.
pub(crate) struct Submission {
    pub request: GenerateRequest,
    pub events: mpsc::Sender<Event>,
    pub submitted: Instant,
    pub forks: Vec<PendingFork>,
}

pub(crate) enum Message {
    Request(Box<Submission>),
    /// Stop once every accepted request is done or `deadline` has passed. Always the last
    /// message: the sender is dropped right after sending it.
    Shutdown {
        deadline: Instant,
    },
}

/// Figures shared between the engine thread and the handle.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Accepted but not yet running: in the channel or in the scheduler's queue. `submit`
    /// increments it before sending, so it bounds the queue exactly.
    pub waiting: AtomicUsize,
    /// Running sequences and their KV bytes, published together after each step so a
    /// reader never sees one step's count with another step's memory.
    pub running: Mutex<RunningLoad>,
    pub shutting_down: AtomicBool,
    /// What each step cost; written by the engine thread only.
    pub steps: StepMetrics,
}

/// What the running set holds, as of the last step.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct RunningLoad {
    pub sequences: usize,
    pub kv_bytes: usize,
}

impl Shared {
    /// The running figures; a poisoned lock still holds plain numbers, so it is read anyway.
    pub fn running_load(&self) -> std::sync::MutexGuard<'_, RunningLoad> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The engine thread's state.
pub(crate) struct Worker<M> {
    model: M,
    tokenizer: Arc<Tokenizer>,
    max_positions: usize,
    scheduler: Scheduler<Sequence>,
    inbox: Receiver<Message>,
    shared: Arc<Shared>,
    /// Set by `Shutdown`: past it, whatever is left fails.
    deadline: Option<Instant>,
    next_id: u64,
    /// Whether a step ran since memory was last given back.
    stepped_since_trim: bool,
    /// Prefixes kept for later requests (`None`: prefix caching is off).
    prefix: Option<PrefixCache>,
}

/// How long the engine waits idle before giving freed memory back to the system.
const IDLE_BEFORE_TRIM: Duration = Duration::from_millis(250);

impl<M: StepModel> Worker<M> {
    pub fn new(
        model: M,
        tokenizer: Arc<Tokenizer>,
        max_positions: usize,
        limits: SchedulerLimits,
        prefix_caching: bool,
        inbox: Receiver<Message>,
        shared: Arc<Shared>,
    ) -> Self {
        shared
            .steps
            .prefix
            .enabled
            .store(prefix_caching, Ordering::Relaxed);
        Self {
            model,
            tokenizer,
            max_positions,
            scheduler: Scheduler::new(limits),
            inbox,
            shared,
            deadline: None,
            next_id: 0,
            stepped_since_trim: false,
            prefix: prefix_caching.then(PrefixCache::default),
        }
    }

    /// Runs until shutdown (or until every sender is gone).
    pub fn run(mut self) {
        while self.turn() {}
        self.publish();
        tracing::info!("engine thread stopped");
    }

    /// One turn of the loop; `false` when the thread should exit.
    fn turn(&mut self) -> bool {
        if !self.receive() {
            return false;
        }
        self.drop_cancelled();
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            self.fail_all(EngineError::ShuttingDown);
        }
        self.make_room_for_admission();
        let before = self.scheduler.running().len();
        let admitted = self.scheduler.admit();
        self.shared.waiting.fetch_sub(admitted, Ordering::SeqCst);
        if let Some(store) = &mut self.prefix {
            let new = before..self.scheduler.running().len();
            let counters = &self.shared.steps.prefix;
            reuse_prefixes(store, self.scheduler.running_mut(), new, counters);
        }
        // Before the step too: a step can take long, and the gauges should show the admitted.
        self.publish();
        self.step();
        self.publish();
        true
    }

    /// Moves arrived messages into the scheduler, blocking while there is nothing to do.
    /// Returns `false` when idle with no more work to come.
    fn receive(&mut self) -> bool {
        if self.scheduler.is_idle() {
            if self.deadline.is_some() {
                return false;
            }
            match self.wait_while_idle() {
                Some(message) => self.handle(message),
                None => return false,
            }
        }
        loop {
            match self.inbox.try_recv() {
                Ok(message) => self.handle(message),
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => {
                    // The handle is gone without a Shutdown message: stop now.
                    self.deadline.get_or_insert_with(Instant::now);
                    return true;
                }
            }
        }
    }

    /// Blocks for the next message. When nothing arrives for [`IDLE_BEFORE_TRIM`] after a
    /// step, the memory the steps freed goes back to the system first (see
    /// [`crate::memory`]); back-to-back requests never wait for that.
    fn wait_while_idle(&mut self) -> Option<Message> {
        if self.stepped_since_trim {
            match self.inbox.recv_timeout(IDLE_BEFORE_TRIM) {
                Ok(message) => return Some(message),
                Err(RecvTimeoutError::Disconnected) => return None,
                Err(RecvTimeoutError::Timeout) => {}
            }
            crate::memory::release_free_memory();
            self.stepped_since_trim = false;
        }
        self.inbox.recv().ok()
    }

    fn handle(&mut self, message: Message) {
        match message {
            Message::Request(submission) => self.accept(*submission),
            Message::Shutdown { deadline } => self.deadline = Some(deadline),
        }
    }

    /// Makes the request's sequence, with its plug-in state, and queues it; a plug-in that
    /// cannot start fails the request (and its other choices) at once.
    fn accept(&mut self, submission: Submission) {
        let Submission {
            request,
            events,
            submitted,
            forks,
        } = submission;
        let cache = self.model.new_cache();
        self.next_id += 1;
        let mut seq = Sequence::new(
            self.next_id,
            request,
            events,
            submitted,
            cache,
            self.max_positions,
        )
        .with_forks(forks);
        match seq.attach_plugins() {
            Ok(()) => self.scheduler.enqueue(seq),
            Err(error) => {
                tracing::warn!(request_id = %seq.request_id(), %error, "plug-in state refused");
                self.shared
                    .waiting
                    .fetch_sub(seq.copies(), Ordering::SeqCst);
                seq.fail(error);
            }
        }
    }

    /// Drops sequences whose client went away; dropping a running one frees its cache.
    fn drop_cancelled(&mut self) {
        let waiting = self.scheduler.take_waiting(Sequence::is_cancelled);
        let places: usize = waiting.iter().map(Sequence::copies).sum();
        self.shared.waiting.fetch_sub(places, Ordering::SeqCst);
        let running = self.scheduler.take_running(Sequence::is_cancelled);
        for seq in waiting.iter().chain(&running) {
            tracing::info!(request_id = %seq.request_id(), "request cancelled by the client");
        }
        self.keep_prefixes(running);
    }

    /// Evicts kept prefixes until they fit beside the running sequences' claims and the
    /// claim of the next sequence to admit: a kept prefix never keeps a request waiting.
    fn make_room_for_admission(&mut self) {
        if let Some(store) = &mut self.prefix {
            let claims = self.scheduler.kv_claimed_bytes() + self.scheduler.next_claim();
            store.evict_to(self.scheduler.kv_budget_bytes().saturating_sub(claims));
            self.shared.steps.prefix.hold(store.bytes(), store.len());
        }
    }

    /// Hands ended sequences' caches to the prefix cache (or drops them), within what the
    /// KV budget leaves beside the running sequences' claims.
    fn keep_prefixes(&mut self, ended: Vec<Sequence>) {
        let Some(store) = &mut self.prefix else {
            return;
        };
        let room =
            (self.scheduler.kv_budget_bytes()).saturating_sub(self.scheduler.kv_claimed_bytes());
        keep_prefixes(store, ended, room);
        self.shared.steps.prefix.hold(store.bytes(), store.len());
    }

    fn fail_all(&mut self, error: EngineError) {
        let waiting = self.scheduler.take_waiting(|_| true);
        let places: usize = waiting.iter().map(Sequence::copies).sum();
        self.shared.waiting.fetch_sub(places, Ordering::SeqCst);
        let running = self.scheduler.take_running(|_| true);
        for mut seq in waiting.into_iter().chain(running) {
            seq.fail(error.clone());
        }
    }

    /// One forward step over the planned batch, then sampling and streaming for each row.
    fn step(&mut self) {
        let plan = self.feedable(self.scheduler.plan());
        if plan.is_empty() {
            return;
        }
        self.stepped_since_trim = true;
        let tokens = plan.iter().map(|row| row.tokens).sum();
        let started = Instant::now();
        let outputs = self.forward(&plan);
        let forward = started.elapsed();
        match outputs {
            Ok(outputs) => {
                self.after_step(&plan, outputs);
                self.count_verified(&plan);
                let sampling = started.elapsed() - forward;
                self.shared.steps.record(tokens, forward, Some(sampling));
            }
            Err(error) => {
                self.shared.steps.record(tokens, forward, None);
                tracing::error!(%error, rows = plan.len(), "forward step failed; failing its batch");
                let running = self.scheduler.running_mut();
                for row in &plan {
                    if let Some(seq) = running.get_mut(row.index) {
                        seq.fail(error.clone());
                    }
                }
            }
        }
        // Finished sequences leave their caches to the prefix cache or free them now, not at
        // the next turn.
        let ended = self.scheduler.take_running(Sequence::is_done);
        self.keep_prefixes(ended);
    }

    /// Samples, detokenizes and streams each row's result. Rows are independent (each
    /// sequence owns its sampler, seeded per request), so two or more run in parallel: with
    /// 16 rows at temperature > 0 this per-row work is a sizeable part of a decode step, and
    /// serially it would leave all but one core idle while the batch waits.
    fn after_step(&mut self, plan: &[PlannedRow], outputs: Vec<Option<Tensor>>) {
        let now = Instant::now();
        let running = self.scheduler.running_mut();
        let mut slots: Vec<Option<Option<Tensor>>> = vec![None; running.len()];
        for (row, logits) in plan.iter().zip(outputs) {
            if let Some(slot) = slots.get_mut(row.index) {
                *slot = Some(logits);
            }
        }
        // Choices of n > 1 requests whose prompt this step completed fork off now, on copies
        // of the cache their parent just filled, and sample from the same logits.
        let mut forked: Vec<(Sequence, Option<Tensor>)> = Vec::new();
        for (seq, slot) in running.iter_mut().zip(&slots) {
            if let (true, Some(logits)) = (seq.forks_due(), slot) {
                let children = seq.spawn_forks(&mut self.next_id);
                forked.extend(children.into_iter().map(|c| (c, logits.clone())));
            }
        }
        let work: Vec<(&mut Sequence, Option<Tensor>)> = running
            .iter_mut()
            .zip(slots)
            .filter_map(|(seq, slot)| slot.map(|logits| (seq, logits)))
            .chain(forked.iter_mut().map(|(seq, logits)| (seq, logits.take())))
            .collect();
        let tokenizer = &self.tokenizer;
        if work.len() < 2 {
            // Handing one row to the pool would only add two thread wake-ups to the step.
            for (seq, logits) in work {
                guarded_after_step(seq, logits, tokenizer, now);
            }
        } else {
            work.into_par_iter()
                .for_each(|(seq, logits)| guarded_after_step(seq, logits, tokenizer, now));
        }
        self.scheduler
            .adopt(forked.into_iter().map(|(seq, _)| seq).collect());
    }

    /// Adds the step's draft verifications to the speculative-decoding counters.
    fn count_verified(&self, plan: &[PlannedRow]) {
        let running = self.scheduler.running();
        for row in plan.iter().filter(|row| row.tokens > 1) {
            if let Some(seq) = running.get(row.index) {
                let v = seq.verified();
                self.shared.steps.spec.record(v.drafted, v.accepted);
            }
        }
    }

    /// The planned rows whose sequences have something to feed; the others (a scheduling
    /// bug, never expected) fail alone instead of failing the whole batch in the model.
    fn feedable(&mut self, plan: Vec<PlannedRow>) -> Vec<PlannedRow> {
        let running = self.scheduler.running_mut();
        plan.into_iter()
            .filter(|row| match running.get_mut(row.index) {
                Some(seq) if seq.can_feed() => true,
                Some(seq) => {
                    seq.fail(EngineError::Internal(
                        "scheduled with nothing to feed".into(),
                    ));
                    false
                }
                None => false,
            })
            .collect()
    }

    /// Builds the batch rows (plan indices ascending) and runs the model, containing errors
    /// and panics.
    fn forward(&mut self, plan: &[PlannedRow]) -> Result<Vec<Option<Tensor>>, EngineError> {
        let now = Instant::now();
        let mut rows = Vec::with_capacity(plan.len());
        let mut planned = plan.iter().peekable();
        for (index, seq) in self.scheduler.running_mut().iter_mut().enumerate() {
            if let Some(row) = planned.next_if(|r| r.index == index) {
                rows.push(seq.row(row.tokens, row.logits, now));
            }
        }
        let expected = rows.len();
        let model = &self.model;
        let outputs = catch_unwind(AssertUnwindSafe(|| model.forward(&mut rows)));
        match outputs {
            Ok(Ok(outputs)) if outputs.len() == expected && expected == plan.len() => Ok(outputs),
            Ok(Ok(_)) => Err(EngineError::Internal("forward step lost rows".into())),
            Ok(Err(e)) => Err(EngineError::Internal(format!("forward step failed: {e}"))),
            Err(panic) => Err(EngineError::Internal(format!(
                "forward step panicked: {}",
                plugins::panic_message(panic.as_ref())
            ))),
        }
    }

    /// Publishes the figures `stats()` reads.
    fn publish(&self) {
        let running = self.scheduler.running();
        let kv: usize = running.iter().map(Schedulable::kv_allocated_bytes).sum();
        *self.shared.running_load() = RunningLoad {
            sequences: running.len(),
            kv_bytes: kv,
        };
    }
}

/// Post-processing of one row, with a panic failing that sequence only.
fn guarded_after_step(seq: &mut Sequence, logits: Option<Tensor>, tk: &Tokenizer, now: Instant) {
    let outcome = catch_unwind(AssertUnwindSafe(|| seq.after_step(logits, tk, now)));
    if let Err(panic) = outcome {
        let message = plugins::panic_message(panic.as_ref());
        tracing::error!(request_id = %seq.request_id(), %message, "sampling panicked");
        seq.fail(EngineError::Internal(format!(
            "sampling panicked: {message}"
        )));
    }
}
