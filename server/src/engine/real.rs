//! [`RealEngine`]: the production [`Engine`], a handle to the engine thread that owns the model.
//!
//! The HTTP layer holds it as `Arc<dyn Engine>`. Text work (chat template, tokenize,
//! detokenize) runs on the caller's thread with a shared tokenizer; generation requests go
//! over a bounded channel to the engine thread (`worker`), which batches them continuously
//! and streams each request's events back on its own channel. `submit` never blocks: the
//! number of accepted-but-not-running requests is capped at `max_waiting` before sending.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use models::bundle::LoadedModel;
use models::chat_template::{ChatMessage, ChatTemplate, RenderOptions};
use models::vision::VisionModel;
use models::Tokenizer;
use tokio::sync::mpsc;

use super::scheduler::SchedulerLimits;
use super::sequence::PendingFork;
use super::sequence::EVENT_SLACK;
use super::worker::{Message, Shared, StepModel, Submission, Worker};
use super::{
    Engine, EngineError, EngineStats, EventReceiver, GenerateRequest, ModelInfo,
    StepMetricsSnapshot,
};
use crate::structured::Grammars;

/// Limits of the engine and its scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// The id clients put in `model`.
    pub model_id: String,
    /// Sequences generating at once (the batch's decode rows).
    pub max_running: usize,
    /// Tokens in one forward step: one per decoding sequence plus prompt chunks.
    pub max_batch_tokens: usize,
    /// Longest prompt piece one sequence feeds in one step.
    pub prefill_chunk: usize,
    /// Accepted requests not yet running; beyond it `submit` answers `QueueFull`.
    pub max_waiting: usize,
    /// KV-cache memory the running sequences may claim, in bytes.
    pub kv_budget_bytes: usize,
    /// Speculative drafts are verified only in steps with at most this many decoding
    /// sequences (0: never); see `scheduler`.
    pub speculation_max_batch: usize,
    /// Whether ended sequences' caches are kept for later requests with the same prefix
    /// (automatic prefix caching, within the KV budget; see `prefix_cache`).
    pub prefix_caching: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            model_id: "default".to_string(),
            max_running: 16,
            max_batch_tokens: 512,
            prefill_chunk: 256,
            max_waiting: 256,
            kv_budget_bytes: 1 << 30,
            speculation_max_batch: 4,
            prefix_caching: true,
        }
    }
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("engine config: {field} must be {requirement}, got {value}")]
    Config {
        field: &'static str,
        requirement: &'static str,
        value: usize,
    },
    #[error("cannot start the engine thread: {0}")]
    Spawn(#[from] std::io::Error),
}

impl EngineConfig {
    /// Checks the limits: all positive, and a step holds every running sequence's decode
    /// token plus one whole prompt chunk (chunks never shrink to fit, see `scheduler`), so
    /// prefill always progresses.
    pub fn validate(&self) -> Result<(), StartError> {
        let positive = [
            ("max_running", self.max_running),
            ("max_batch_tokens", self.max_batch_tokens),
            ("prefill_chunk", self.prefill_chunk),
            ("max_waiting", self.max_waiting),
            ("kv_budget_bytes", self.kv_budget_bytes),
        ];
        if let Some(&(field, value)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(StartError::Config {
                field,
                requirement: "at least 1",
                value,
            });
        }
        if self.max_batch_tokens < self.max_running.saturating_add(self.prefill_chunk) {
            return Err(StartError::Config {
                field: "max_batch_tokens",
                requirement: "at least max_running + prefill_chunk",
                value: self.max_batch_tokens,
            });
        }
        Ok(())
    }
}

/// What the handle needs to know about the model the engine thread owns.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ModelFacts {
    pub max_positions: usize,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub kv_bytes_per_token: usize,
}

/// The real engine. Dropping it shuts the engine thread down without a drain.
pub struct RealEngine {
    info: ModelInfo,
    config: EngineConfig,
    tokenizer: Arc<Tokenizer>,
    chat_template: Option<ChatTemplate>,
    /// Built on first use: by the server right after start-up, off the async threads (building
    /// the vocabulary's trie takes a moment no request should wait for), or by the first
    /// constrained request, whichever comes first; `None` inside if it could not be built.
    grammars: OnceLock<Option<Grammars>>,
    shared: Arc<Shared>,
    /// `None` once shut down; taken under the lock so no request can follow `Shutdown`.
    inbox: Mutex<Option<SyncSender<Message>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// A vision-language model's image side; the HTTP layer encodes images with it.
    vision: Option<Arc<VisionModel>>,
}

impl RealEngine {
    /// Starts the engine thread, which takes ownership of the model.
    pub fn new(loaded: LoadedModel, config: EngineConfig) -> Result<Self, StartError> {
        let LoadedModel {
            model,
            tokenizer,
            chat_template,
            vision,
            ..
        } = loaded;
        let facts = ModelFacts {
            max_positions: model.max_positions(),
            vocab_size: model.config.vocab_size,
            hidden_size: model.config.hidden_size,
            kv_bytes_per_token: model.kv_bytes_per_token(),
        };
        let mut engine = Self::start(model, facts, tokenizer, chat_template, config)?;
        engine.vision = vision;
        Ok(engine)
    }

    pub(crate) fn start<M: StepModel>(
        model: M,
        facts: ModelFacts,
        tokenizer: Tokenizer,
        chat_template: Option<ChatTemplate>,
        config: EngineConfig,
    ) -> Result<Self, StartError> {
        config.validate()?;
        let tokenizer = Arc::new(tokenizer);
        let shared = Arc::new(Shared::default());
        // One slot more than the waiting bound: room for the Shutdown message.
        let (sender, inbox) = sync_channel(config.max_waiting + 1);
        let limits = SchedulerLimits {
            max_running: config.max_running,
            max_batch_tokens: config.max_batch_tokens,
            prefill_chunk: config.prefill_chunk,
            kv_budget_bytes: config.kv_budget_bytes,
            kv_bytes_per_token: facts.kv_bytes_per_token,
            speculation_max_batch: config.speculation_max_batch,
        };
        let worker = Worker::new(
            model,
            tokenizer.clone(),
            facts.max_positions,
            limits,
            config.prefix_caching,
            inbox,
            shared.clone(),
        );
        let thread = spawn_worker(worker)?;
        let info = ModelInfo {
            id: config.model_id.clone(),
            context_length: facts.max_positions,
            vocab_size: facts.vocab_size,
            hidden_size: facts.hidden_size,
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        Ok(Self {
            info,
            config,
            tokenizer,
            chat_template,
            grammars: OnceLock::new(),
            shared,
            inbox: Mutex::new(Some(sender)),
            vision: None,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Stops admitting requests (`submit` answers `ShuttingDown`), lets accepted requests
    /// run until `drain` has passed, fails the rest with `ShuttingDown`, and joins the
    /// engine thread. Blocks for up to `drain` plus one step: call it from a blocking
    /// context (`spawn_blocking` under tokio). Later calls return at once.
    pub fn shutdown(&self, drain: Duration) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        let inbox = lock(&self.inbox).take();
        if let Some(inbox) = inbox {
            let now = Instant::now();
            // A drain too long for `Instant` means "wait for everything".
            let deadline = now
                .checked_add(drain)
                .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600));
            if inbox.send(Message::Shutdown { deadline }).is_err() {
                tracing::warn!("engine thread was already gone at shutdown");
            }
        }
        let thread = lock(&self.thread).take();
        if let Some(thread) = thread {
            if thread.join().is_err() {
                tracing::error!("engine thread panicked");
            }
        }
    }

    /// Requests the engine must never see: the HTTP layer checks these, so reaching here
    /// is a caller bug (an `Internal` error), but one bad row would fail a whole batch.
    fn check(&self, request: &GenerateRequest) -> Result<(), EngineError> {
        if request.prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let context = self.info.context_length;
        if request.prompt.len() > context {
            return Err(EngineError::Internal(format!(
                "prompt of {} tokens exceeds the context of {context}",
                request.prompt.len()
            )));
        }
        let vocab = self.info.vocab_size;
        if let Some(id) = request.prompt.iter().find(|&&id| id as usize >= vocab) {
            return Err(EngineError::Internal(format!(
                "prompt token {id} is outside the vocabulary of {vocab}"
            )));
        }
        Ok(())
    }

    /// Claims `places` of the `max_waiting` queue places, all or none.
    fn reserve_places(&self, places: usize) -> Result<(), EngineError> {
        let capacity = self.config.max_waiting;
        self.shared
            .waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n + places <= capacity).then_some(n + places)
            })
            .map(|_| ())
            .map_err(|_| EngineError::QueueFull { capacity })
    }

    /// Sends `requests` to the engine thread as one submission: the first runs, the others
    /// fork off it after its prompt (the caller checked they share it).
    fn send(&self, requests: Vec<GenerateRequest>) -> Result<Vec<EventReceiver>, EngineError> {
        requests.iter().try_for_each(|r| self.check(r))?;
        if self.shared.shutting_down.load(Ordering::SeqCst) {
            return Err(EngineError::ShuttingDown);
        }
        let places = requests.len();
        self.reserve_places(places)?;
        let submitted = Instant::now();
        let mut receivers = Vec::with_capacity(places);
        let mut channels = requests.into_iter().map(|request| {
            // More room than the sequence ever uses, so the engine thread never waits on it.
            let capacity = request.max_tokens.min(self.info.context_length) + EVENT_SLACK;
            let (events, receiver) = mpsc::channel(capacity);
            receivers.push(receiver);
            (request, events)
        });
        let Some((request, events)) = channels.next() else {
            self.shared.waiting.fetch_sub(places, Ordering::SeqCst);
            return Ok(Vec::new());
        };
        let forks = channels
            .map(|(request, events)| PendingFork {
                request,
                events,
                submitted,
            })
            .collect();
        let message = Message::Request(Box::new(Submission {
            request,
            events,
            submitted,
            forks,
        }));
        if let Err(e) = self.deliver(message) {
            self.shared.waiting.fetch_sub(places, Ordering::SeqCst);
            return Err(e);
        }
        Ok(receivers)
    }

    fn deliver(&self, message: Message) -> Result<(), EngineError> {
        match lock(&self.inbox).as_ref() {
            None => Err(EngineError::ShuttingDown),
            Some(inbox) => inbox.try_send(message).map_err(|e| match e {
                TrySendError::Full(_) => EngineError::QueueFull {
                    capacity: self.config.max_waiting,
                },
                TrySendError::Disconnected(_) => {
                    EngineError::Internal("the engine thread has stopped".into())
                }
            }),
        }
    }
}

impl Engine for RealEngine {
    fn vision(&self) -> Option<Arc<VisionModel>> {
        self.vision.clone()
    }

    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn render_chat(
        &self,
        messages: &[ChatMessage],
        options: &RenderOptions,
    ) -> Result<String, EngineError> {
        let template = self
            .chat_template
            .as_ref()
            .ok_or(EngineError::NoChatTemplate)?;
        template
            .render_with(messages, options)
            .map_err(|e| EngineError::Template(e.to_string()))
    }

    fn template_renders_tools(&self) -> bool {
        self.chat_template
            .as_ref()
            .is_some_and(ChatTemplate::renders_tools)
    }

    fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<u32>, EngineError> {
        let ids = match add_special {
            true => self.tokenizer.encode_with_bos(text, true),
            false => self.tokenizer.encode(text, true),
        };
        ids.map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    fn detokenize(&self, ids: &[u32]) -> Result<String, EngineError> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    fn token_text(&self, id: u32) -> String {
        self.tokenizer
            .token_bytes(id)
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default()
    }

    fn eos_token_ids(&self) -> Vec<u32> {
        self.tokenizer.eos_ids().to_vec()
    }

    fn submit(&self, request: GenerateRequest) -> Result<EventReceiver, EngineError> {
        let mut receivers = self.send(vec![request])?;
        receivers
            .pop()
            .ok_or_else(|| EngineError::Internal("no receiver for a submitted request".into()))
    }

    /// Choices that share their prompt, chain and prompt log-probs go to the engine thread
    /// as one sequence whose prompt is prefilled once and forked for the others.
    fn submit_choices(
        &self,
        choices: Vec<GenerateRequest>,
    ) -> Result<Vec<EventReceiver>, EngineError> {
        if shares_prompt(&choices) {
            self.send(choices)
        } else {
            choices.into_iter().map(|c| self.submit(c)).collect()
        }
    }

    fn step_metrics(&self) -> Option<StepMetricsSnapshot> {
        Some(self.shared.steps.snapshot())
    }

    fn grammars(&self) -> Option<&Grammars> {
        let built = self.grammars.get_or_init(|| {
            let vocab = self.info.vocab_size;
            Grammars::new(self.tokenizer.clone(), vocab)
                .inspect_err(|error| tracing::error!(%error, "structured outputs unavailable"))
                .ok()
        });
        built.as_ref()
    }

    fn stats(&self) -> EngineStats {
        let load = *self.shared.running_load();
        EngineStats {
            running: load.sequences,
            waiting: self.shared.waiting.load(Ordering::SeqCst),
            kv_used_bytes: load.kv_bytes,
            kv_capacity_bytes: self.config.kv_budget_bytes,
        }
    }
}

impl Drop for RealEngine {
    fn drop(&mut self) {
        self.shutdown(Duration::ZERO);
    }
}

/// Whether the choices can share one prefill: the same prompt, the same plug-in calls (the
/// same hook objects with the same parameters) and the same prompt log-probs.
fn shares_prompt(choices: &[GenerateRequest]) -> bool {
    let Some(first) = choices.first() else {
        return true;
    };
    let same_chain = |r: &GenerateRequest| {
        r.hooks.len() == first.hooks.len()
            && r.hooks
                .iter()
                .zip(&first.hooks)
                .all(|(a, b)| Arc::ptr_eq(&a.hook, &b.hook) && Arc::ptr_eq(&a.params, &b.params))
    };
    choices.iter().all(|r| {
        r.prompt == first.prompt && r.prompt_logprobs == first.prompt_logprobs && same_chain(r)
    })
}

/// Locks, ignoring poisoning: the guarded values (a sender, a join handle) stay valid.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs the worker on its own named thread. A panic that escapes the per-step guards ends
/// the thread (its sequences' channels close); it is logged, and later submits fail with
/// `Internal` because the inbox is disconnected.
fn spawn_worker<M: StepModel>(worker: Worker<M>) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("graft-engine".into())
        .spawn(move || {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.run()));
            if outcome.is_err() {
                tracing::error!("engine thread panicked outside a step; the engine has stopped");
            }
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Condvar;

    use crate::engine::OutputRules;

    use candle_core::Tensor;
    use models::sampling::SamplingParams;
    use models::{BatchRow, KvCache, Llama, ModelError};

    use super::*;
    use crate::engine::testing::{
        collect_events as collect, tiny_char_id, tiny_loaded_model, wait_until,
    };
    use crate::engine::{Event, FinishReason};

    /// Blocks forward steps while closed.
    #[derive(Default)]
    struct Gate {
        open: Mutex<bool>,
        changed: Condvar,
    }

    impl Gate {
        fn set(&self, open: bool) {
            *lock(&self.open) = open;
            self.changed.notify_all();
        }

        fn wait(&self) {
            let mut open = lock(&self.open);
            while !*open {
                open = self.changed.wait(open).unwrap();
            }
        }
    }

    /// The tiny model, behind a gate, failing on demand: a prompt containing `~` makes its
    /// step return an error, one containing `}` makes it panic.
    struct Flaky {
        inner: Llama,
        gate: Arc<Gate>,
    }

    impl StepModel for Flaky {
        fn forward(&self, batch: &mut [BatchRow<'_>]) -> models::Result<Vec<Option<Tensor>>> {
            self.gate.wait();
            // Only prompt chunks (empty caches) trigger, never sampled tokens.
            let has = |c: char| {
                let id = tiny_char_id(c).unwrap();
                batch
                    .iter()
                    .any(|r| r.cache.is_empty() && r.tokens.contains(&id))
            };
            if has('~') {
                return Err(ModelError::Batch("injected failure".into()));
            }
            if has('}') {
                panic!("injected panic");
            }
            self.inner.forward(batch)
        }

        fn new_cache(&self) -> KvCache {
            self.inner.new_cache()
        }
    }

    struct Fixture {
        engine: RealEngine,
        gate: Arc<Gate>,
        _dir: tempfile::TempDir,
    }

    impl Drop for Fixture {
        /// A failed assertion must not leave the engine thread blocked: the engine's own
        /// drop joins it.
        fn drop(&mut self) {
            self.gate.set(true);
        }
    }

    fn fixture(config: EngineConfig) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let loaded = tiny_loaded_model(dir.path(), 3).unwrap();
        let facts = ModelFacts {
            max_positions: loaded.model.max_positions(),
            vocab_size: loaded.model.config.vocab_size,
            hidden_size: loaded.model.config.hidden_size,
            kv_bytes_per_token: loaded.model.kv_bytes_per_token(),
        };
        let gate = Arc::new(Gate::default());
        gate.set(true);
        let model = Flaky {
            inner: loaded.model,
            gate: gate.clone(),
        };
        let engine =
            RealEngine::start(model, facts, loaded.tokenizer, loaded.chat_template, config)
                .unwrap();
        Fixture {
            engine,
            gate,
            _dir: dir,
        }
    }

    fn request(prompt: &str, max_tokens: usize) -> GenerateRequest {
        GenerateRequest {
            id: prompt.into(),
            prompt: prompt.chars().map(|c| tiny_char_id(c).unwrap()).collect(),
            sampling: SamplingParams::default(),
            seed: 1,
            max_tokens,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            prompt_logprobs: None,
            hooks: Vec::new(),
            output: OutputRules::default(),
            cache_prompt: true,
            constraint: None,
            embed: false,
        }
    }

    fn last(events: &[Event]) -> &Event {
        events.last().unwrap()
    }

    #[test]
    fn a_failing_step_fails_its_batch_and_the_engine_serves_on() {
        let f = fixture(EngineConfig::default());
        f.gate.set(false);
        let first = f.engine.submit(request("xy", 50)).unwrap();
        wait_until("first step under way", || f.engine.stats().running == 1);
        // These arrive while the first step is blocked, so all three share the next step.
        let good = f.engine.submit(request("ab", 50)).unwrap();
        let bad = f.engine.submit(request("a~", 50)).unwrap();
        f.gate.set(true);
        for events in [collect(first), collect(good), collect(bad)] {
            assert!(
                matches!(last(&events), Event::Failed(EngineError::Internal(m)) if m.contains("injected failure")),
                "{events:?}"
            );
        }
        let after = collect(f.engine.submit(request("ab", 5)).unwrap());
        assert!(matches!(last(&after), Event::Finished { .. }), "{after:?}");
        wait_until("caches freed", || f.engine.stats().kv_used_bytes == 0);
    }

    #[test]
    fn a_panicking_step_is_contained() {
        let f = fixture(EngineConfig::default());
        let events = collect(f.engine.submit(request("a}", 5)).unwrap());
        assert!(
            matches!(last(&events), Event::Failed(EngineError::Internal(m)) if m.contains("panicked")),
            "{events:?}"
        );
        let after = collect(f.engine.submit(request("ab", 5)).unwrap());
        assert!(matches!(last(&after), Event::Finished { .. }), "{after:?}");
    }

    #[test]
    fn every_step_is_recorded_with_its_tokens_and_phases() {
        let f = fixture(EngineConfig::default());
        // One step that panics in the forward pass: timed, but nothing was sampled.
        collect(f.engine.submit(request("a}", 5)).unwrap());
        let events = collect(f.engine.submit(request("abc", 6)).unwrap());
        let &Event::Finished {
            completion_tokens: n,
            ..
        } = last(&events)
        else {
            panic!("{events:?}")
        };
        let steps = || {
            f.engine
                .step_metrics()
                .expect("a real engine has step metrics")
        };
        // The finish is streamed before its step is recorded.
        wait_until("last step recorded", || steps().sampling.count == n as u64);
        let s = steps();
        // The prompt's step yields the first token; each later token costs a one-token step.
        assert_eq!(s.forward.count, 1 + n as u64);
        assert_eq!(s.tokens.count, 1 + n as u64);
        assert_eq!(s.tokens.sum, (2 + 3 + n - 1) as f64);
        assert!(s.forward.sum > 0.0 && s.sampling.sum > 0.0);
    }

    #[test]
    fn a_full_queue_answers_queue_full_and_frees_up() {
        let config = EngineConfig {
            max_running: 1,
            max_waiting: 2,
            ..EngineConfig::default()
        };
        let f = fixture(config);
        f.gate.set(false);
        let first = f.engine.submit(request("ab", 3)).unwrap();
        wait_until("first admitted", || f.engine.stats().running == 1);
        let queued = [
            f.engine.submit(request("cd", 3)).unwrap(),
            f.engine.submit(request("ef", 3)).unwrap(),
        ];
        assert_eq!(f.engine.stats().waiting, 2);
        let full = f.engine.submit(request("gh", 3)).unwrap_err();
        assert_eq!(full, EngineError::QueueFull { capacity: 2 });
        f.gate.set(true);
        for rx in std::iter::once(first).chain(queued) {
            assert!(matches!(last(&collect(rx)), Event::Finished { .. }));
        }
        assert!(f.engine.submit(request("gh", 3)).is_ok());
    }

    #[test]
    fn shutdown_drains_accepted_requests_then_refuses_new_ones() {
        let config = EngineConfig {
            max_running: 1,
            ..EngineConfig::default()
        };
        let f = fixture(config);
        let receivers: Vec<_> = (0..3)
            .map(|_| f.engine.submit(request("ab", 20)).unwrap())
            .collect();
        f.engine.shutdown(Duration::from_secs(60));
        for rx in receivers {
            let events = collect(rx);
            assert!(
                matches!(
                    last(&events),
                    Event::Finished {
                        reason: FinishReason::Length,
                        completion_tokens: 20,
                        ..
                    }
                ),
                "{events:?}"
            );
        }
        let refused = f.engine.submit(request("ab", 1)).unwrap_err();
        assert_eq!(refused, EngineError::ShuttingDown);
        assert_eq!(f.engine.stats().running, 0);
    }

    #[test]
    fn shutdown_past_the_drain_fails_what_is_left() {
        let f = fixture(EngineConfig::default());
        f.gate.set(false);
        let rx = f.engine.submit(request("ab", 200)).unwrap();
        wait_until("admitted", || f.engine.stats().running == 1);
        std::thread::scope(|s| {
            let stopping = s.spawn(|| f.engine.shutdown(Duration::ZERO));
            wait_until("shutting down", || {
                f.engine.shared.shutting_down.load(Ordering::SeqCst)
                    && lock(&f.engine.inbox).is_none()
            });
            f.gate.set(true);
            stopping.join().unwrap();
        });
        let events = collect(rx);
        assert_eq!(last(&events), &Event::Failed(EngineError::ShuttingDown));
        assert_eq!(f.engine.stats().kv_used_bytes, 0);
    }

    #[test]
    fn submit_rejects_what_the_engine_must_never_run() {
        let f = fixture(EngineConfig::default());
        let empty = f.engine.submit(request("", 5)).unwrap_err();
        assert_eq!(empty, EngineError::EmptyPrompt);
        let mut bad_id = request("ab", 5);
        bad_id.prompt.push(96);
        assert!(matches!(
            f.engine.submit(bad_id),
            Err(EngineError::Internal(_))
        ));
        let long = request(&"a".repeat(257), 1);
        assert!(matches!(
            f.engine.submit(long),
            Err(EngineError::Internal(_))
        ));
        assert_eq!(f.engine.stats().waiting, 0);
    }

    #[test]
    fn the_config_is_checked() {
        let bad = EngineConfig {
            max_running: 16,
            prefill_chunk: 256,
            max_batch_tokens: 271,
            ..EngineConfig::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(StartError::Config {
                field: "max_batch_tokens",
                ..
            })
        ));
        let zero = EngineConfig {
            prefill_chunk: 0,
            ..EngineConfig::default()
        };
        assert!(zero.validate().is_err());
        assert!(EngineConfig::default().validate().is_ok());
    }
}
