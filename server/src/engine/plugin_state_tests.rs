//! Per-sequence plug-in state through the real engine on the tiny model: made when a
//! sequence starts, freed however it ends (finished, cancelled, failed), forked for the
//! choices of an `n > 1` request (whose prompt is prefilled once), and counted as KV memory.
//! A test hook keeps a log of what it saw and counts its live states.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use candle_core::quantized::GgmlDType;
use models::hooks::HookParams;
use models::sampling::SamplingParams;
use models::{Hook, HookCall, HookGroup, HookPoints, HookState};

use super::real::{EngineConfig, RealEngine};
use super::testing::{collect_events as collect, tiny_char_id, tiny_loaded_model_as, wait_until};
use super::{Engine, EngineError, Event, GenerateRequest, OutputRules};

/// Bytes each [`Tokens`] state reports per token it holds.
const BYTES_PER_TOKEN: usize = 1000;

/// What the hook saw at the start of one row's step: the sequence, the row's first position
/// and how many tokens its state already held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    seq_id: u64,
    start: usize,
    held: usize,
}

#[derive(Debug, Default)]
struct Shared {
    live: AtomicUsize,
    log: Mutex<Vec<Seen>>,
    /// While set, a row at this position or later waits in `step_tokens`.
    hold_from: Mutex<Option<usize>>,
    released: Condvar,
    /// A row at this position fails the step.
    fail_at: Mutex<Option<usize>>,
}

/// The tokens one sequence fed, as its hook state.
#[derive(Debug)]
struct Tokens {
    seen: Vec<u32>,
    shared: Arc<Shared>,
}

impl Tokens {
    fn new(seen: Vec<u32>, shared: &Arc<Shared>) -> Box<Self> {
        shared.live.fetch_add(1, Ordering::SeqCst);
        Box::new(Self {
            seen,
            shared: shared.clone(),
        })
    }
}

impl Drop for Tokens {
    fn drop(&mut self) {
        self.shared.live.fetch_sub(1, Ordering::SeqCst);
    }
}

impl HookState for Tokens {
    fn allocated_bytes(&self) -> usize {
        self.seen.len() * BYTES_PER_TOKEN
    }
    fn fork(&self) -> models::Result<Box<dyn HookState>> {
        Ok(Tokens::new(self.seen.clone(), &self.shared))
    }
    fn truncate(&mut self, len: usize) -> models::Result<()> {
        self.seen.truncate(len);
        Ok(())
    }
}

struct Recorder(Arc<Shared>);

impl Hook for Recorder {
    fn name(&self) -> &str {
        "recorder"
    }
    fn points(&self) -> HookPoints {
        HookPoints {
            tokens: true,
            ..HookPoints::default()
        }
    }
    fn new_state(&self, _: &HookParams) -> models::Result<Option<Box<dyn HookState>>> {
        Ok(Some(Tokens::new(Vec::new(), &self.0)))
    }
    fn state_bytes_per_token(&self, _: &HookParams) -> usize {
        BYTES_PER_TOKEN
    }
    fn step_tokens(&self, group: &HookGroup<'_>) -> models::Result<()> {
        for row in &group.rows {
            self.hold(row.start_position);
            if *self.0.fail_at.lock().unwrap() == Some(row.start_position) {
                return Err(models::ModelError::Batch("recorder told to fail".into()));
            }
            let held = row.with_state(self.name(), |t: &mut Tokens| {
                let held = t.seen.len();
                t.seen.extend_from_slice(row.tokens);
                held
            })?;
            self.0.log.lock().unwrap().push(Seen {
                seq_id: row.seq_id,
                start: row.start_position,
                held,
            });
        }
        Ok(())
    }
}

impl Recorder {
    fn hold(&self, position: usize) {
        let mut hold = self.0.hold_from.lock().unwrap();
        while hold.is_some_and(|from| position >= from) {
            hold = self.0.released.wait(hold).unwrap();
        }
    }
}

struct Fixture {
    engine: RealEngine,
    shared: Arc<Shared>,
    hook: HookCall,
    _dir: tempfile::TempDir,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        *self.shared.hold_from.lock().unwrap() = None;
        self.shared.released.notify_all();
    }
}

fn fixture(config: EngineConfig) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let loaded = tiny_loaded_model_as(dir.path(), 3, GgmlDType::Q8_0).unwrap();
    let shared = Arc::new(Shared::default());
    let hook = HookCall::bare(Arc::new(Recorder(shared.clone())));
    Fixture {
        engine: RealEngine::new(loaded, config).unwrap(),
        shared,
        hook,
        _dir: dir,
    }
}

fn request(f: &Fixture, prompt: &str, max_tokens: usize, seed: u64) -> GenerateRequest {
    GenerateRequest {
        id: format!("{prompt}-{seed}"),
        prompt: prompt.chars().map(|c| tiny_char_id(c).unwrap()).collect(),
        sampling: SamplingParams {
            temperature: 1.0,
            ..SamplingParams::default()
        },
        seed,
        max_tokens,
        stop: Vec::new(),
        stop_token_ids: Vec::new(),
        prompt_logprobs: None,
        hooks: vec![f.hook.clone()],
        output: OutputRules::default(),
        cache_prompt: true,
        constraint: None,
        embed: false,
    }
}

fn tokens(events: &[Event]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Token { id, .. } => Some(*id),
            _ => None,
        })
        .collect()
}

#[test]
fn state_is_made_per_sequence_and_freed_when_it_finishes() {
    let f = fixture(EngineConfig::default());
    let a = f.engine.submit(request(&f, "abc", 4, 1)).unwrap();
    let b = f.engine.submit(request(&f, "xyz", 4, 2)).unwrap();
    assert_eq!(tokens(&collect(a)).len(), 4);
    assert_eq!(tokens(&collect(b)).len(), 4);
    wait_until("states freed", || f.shared.live.load(Ordering::SeqCst) == 0);
    // Each sequence's state saw its own tokens only: 3 prompt tokens, then one per step.
    let log = f.shared.log.lock().unwrap().clone();
    for seq in [
        log[0].seq_id,
        log.iter()
            .find(|s| s.seq_id != log[0].seq_id)
            .unwrap()
            .seq_id,
    ] {
        let mine: Vec<(usize, usize)> = log
            .iter()
            .filter(|s| s.seq_id == seq)
            .map(|s| (s.start, s.held))
            .collect();
        assert_eq!(mine, vec![(0, 0), (3, 3), (4, 4), (5, 5)], "sequence {seq}");
    }
}

#[test]
fn state_is_freed_when_the_client_goes_away_or_the_step_fails() {
    let f = fixture(EngineConfig::default());
    *f.shared.hold_from.lock().unwrap() = Some(5);
    let rx = f.engine.submit(request(&f, "abc", 50, 1)).unwrap();
    wait_until("held at position 5", || {
        f.shared.log.lock().unwrap().len() == 3
    });
    assert_eq!(f.shared.live.load(Ordering::SeqCst), 1);
    drop(rx);
    *f.shared.hold_from.lock().unwrap() = None;
    f.shared.released.notify_all();
    wait_until("cancelled state freed", || {
        f.shared.live.load(Ordering::SeqCst) == 0
    });

    *f.shared.fail_at.lock().unwrap() = Some(4);
    let events = collect(f.engine.submit(request(&f, "abc", 50, 1)).unwrap());
    assert!(
        matches!(events.last(), Some(Event::Failed(EngineError::Internal(m))) if m.contains("told to fail")),
        "{events:?}"
    );
    wait_until("failed state freed", || {
        f.shared.live.load(Ordering::SeqCst) == 0
    });
    // The engine publishes its figures right after it drops the sequence.
    wait_until("no KV memory claimed", || {
        f.engine.stats().kv_used_bytes == 0
    });
}

#[test]
fn choices_prefill_once_fork_the_state_and_equal_separate_requests() {
    let f = fixture(EngineConfig::default());
    let prompt = "the prompt";
    let choices: Vec<_> = (0..3).map(|i| request(&f, prompt, 5, 10 + i)).collect();
    let receivers = f.engine.submit_choices(choices).unwrap();
    let forked: Vec<Vec<u32>> = receivers
        .into_iter()
        .map(|rx| tokens(&collect(rx)))
        .collect();
    wait_until("states freed", || f.shared.live.load(Ordering::SeqCst) == 0);
    let steps = f.engine.step_metrics().unwrap();
    // One prefill of the prompt, then one token per choice per later step.
    assert_eq!(steps.tokens.sum, (prompt.len() + 3 * 4) as f64);
    let log = f.shared.log.lock().unwrap().clone();
    let prefills: Vec<_> = log.iter().filter(|s| s.start == 0).collect();
    assert_eq!(prefills.len(), 1, "{log:?}");
    // Each fork's state started as a copy of the parent's (the prompt), not empty, and is
    // its own: three sequences at position 10, each holding exactly its own 10 tokens.
    let at_10: Vec<&Seen> = log.iter().filter(|s| s.start == prompt.len()).collect();
    assert_eq!(at_10.len(), 3, "{log:?}");
    assert!(at_10.iter().all(|s| s.held == prompt.len()), "{log:?}");
    let mut ids: Vec<u64> = at_10.iter().map(|s| s.seq_id).collect();
    ids.dedup();
    assert_eq!(ids.len(), 3);

    // The same choices submitted one at a time sample the same tokens, bit for bit.
    for (i, want) in forked.iter().enumerate() {
        let alone = f
            .engine
            .submit(request(&f, prompt, 5, 10 + i as u64))
            .unwrap();
        assert_eq!(&tokens(&collect(alone)), want, "choice {i}");
    }
}

#[test]
fn state_bytes_are_kv_memory() {
    let f = fixture(EngineConfig::default());
    *f.shared.hold_from.lock().unwrap() = Some(8);
    let rx = f.engine.submit(request(&f, "abcdef", 50, 1)).unwrap();
    wait_until("held at position 8", || {
        f.shared.log.lock().unwrap().len() == 3 && f.engine.stats().running == 1
    });
    // 8 tokens in the state (6 prompt + 2), on top of the model's own keys and values.
    let used = f.engine.stats().kv_used_bytes;
    assert!(used >= 8 * BYTES_PER_TOKEN, "{used}");
    drop(rx);
}

#[test]
fn a_chains_state_estimate_is_part_of_its_admission_claim() {
    // Room for two sequences' keys and values, but not for their plug-in state too.
    let kv = models::tiny::tiny_config(models::Architecture::Llama).kv_bytes_per_token();
    let f = fixture(EngineConfig {
        kv_budget_bytes: 2 * ((3 + 50) * kv + 10 * BYTES_PER_TOKEN),
        ..EngineConfig::default()
    });
    let first = f.engine.submit(request(&f, "abc", 50, 1)).unwrap();
    let second = f.engine.submit(request(&f, "xyz", 50, 2)).unwrap();
    assert_eq!(tokens(&collect(first)).len(), 50);
    assert_eq!(tokens(&collect(second)).len(), 50);
    // The second never ran beside the first: all of the first's steps came before its.
    let log = f.shared.log.lock().unwrap().clone();
    let first_id = log[0].seq_id;
    let last_of_first = log.iter().rposition(|s| s.seq_id == first_id).unwrap();
    assert_eq!(last_of_first, 50 - 1, "{log:?}");
}

/// The recorder, for a chain that needs its whole prompt in one step (a pruning plug-in).
struct WholePrompt(Recorder);

impl Hook for WholePrompt {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn points(&self) -> HookPoints {
        self.0.points()
    }
    fn new_state(&self, p: &HookParams) -> models::Result<Option<Box<dyn HookState>>> {
        self.0.new_state(p)
    }
    fn step_tokens(&self, group: &HookGroup<'_>) -> models::Result<()> {
        self.0.step_tokens(group)
    }
    fn whole_prompt(&self, _: &HookParams) -> bool {
        true
    }
}

#[test]
fn a_chain_that_needs_the_whole_prompt_gets_it_in_one_step() {
    let config = EngineConfig {
        prefill_chunk: 8,
        ..EngineConfig::default()
    };
    let mut f = fixture(config);
    let prompt = "abcdefghijklmnopqrst"; // 20 tokens: three chunks of 8 otherwise
    let plain = f.engine.submit(request(&f, prompt, 2, 1)).unwrap();
    collect(plain);
    let starts = |log: &[Seen]| -> Vec<usize> { log.iter().map(|s| s.start).collect() };
    assert_eq!(starts(&f.shared.log.lock().unwrap()), vec![0, 8, 16, 20]);
    f.shared.log.lock().unwrap().clear();
    f.hook = HookCall::bare(Arc::new(WholePrompt(Recorder(f.shared.clone()))));
    let whole = f.engine.submit(request(&f, prompt, 2, 1)).unwrap();
    collect(whole);
    assert_eq!(starts(&f.shared.log.lock().unwrap()), vec![0, 20]);
}
