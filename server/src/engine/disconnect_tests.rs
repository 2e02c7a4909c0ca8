//! A client that leaves during a long prefill, over a real socket: the whole chain from the
//! closed connection to the engine (hyper sees the end of the stream, the handler or the SSE
//! body is dropped with the request's event receiver, the engine thread drops the sequence
//! before its next prompt chunk) must stop the prefill within the step that was running.
//!
//! The real engine runs the tiny model behind a gate that lets one step through at a time,
//! so the test counts steps, never seconds.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use models::{BatchRow, KvCache, Llama};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use super::real::{EngineConfig, ModelFacts, RealEngine};
use super::testing::tiny_loaded_model;
use super::worker::StepModel;
use super::Engine;
use crate::http::{app, AppState, EngineSlot, HttpConfig};

/// Steps entered, and how many more may start.
#[derive(Default)]
struct Steps {
    entered: usize,
    permits: usize,
    open: bool,
}

/// Holds each forward step until the test lets it through.
#[derive(Default)]
struct StepGate {
    steps: Mutex<Steps>,
    changed: Condvar,
}

impl StepGate {
    fn lock(&self) -> MutexGuard<'_, Steps> {
        self.steps.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Called by the model at the start of each step: counts it, then waits for a permit.
    fn enter(&self) {
        let mut steps = self.lock();
        steps.entered += 1;
        self.changed.notify_all();
        while !steps.open && steps.permits == 0 {
            steps = self
                .changed
                .wait(steps)
                .unwrap_or_else(PoisonError::into_inner);
        }
        steps.permits = steps.permits.saturating_sub(1);
    }

    fn allow(&self, steps: usize) {
        self.lock().permits += steps;
        self.changed.notify_all();
    }

    fn open(&self) {
        self.lock().open = true;
        self.changed.notify_all();
    }

    fn entered(&self) -> usize {
        self.lock().entered
    }
}

struct Gated {
    inner: Llama,
    gate: Arc<StepGate>,
}

impl StepModel for Gated {
    fn forward(&self, batch: &mut [BatchRow<'_>]) -> models::Result<Vec<Option<Tensor>>> {
        self.gate.enter();
        self.inner.forward(batch)
    }

    fn new_cache(&self) -> KvCache {
        self.inner.new_cache()
    }
}

/// Polls `cond`; the bound only keeps a broken build from hanging, it is not what the test
/// measures.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out: {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Sends a 200-token prompt (25 chunks of 8) and closes the connection while the third
/// chunk's step runs; returns the steps the engine entered in all.
async fn steps_run_after_leaving(stream: bool) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let loaded = tiny_loaded_model(dir.path(), 5).unwrap();
    let facts = ModelFacts {
        max_positions: loaded.model.max_positions(),
        vocab_size: loaded.model.config.vocab_size,
        hidden_size: loaded.model.config.hidden_size,
        kv_bytes_per_token: loaded.model.kv_bytes_per_token(),
    };
    let gate = Arc::new(StepGate::default());
    let model = Gated {
        inner: loaded.model,
        gate: gate.clone(),
    };
    let config = EngineConfig {
        max_running: 1,
        prefill_chunk: 8,
        max_batch_tokens: 9,
        ..EngineConfig::default()
    };
    let engine = Arc::new(
        RealEngine::start(model, facts, loaded.tokenizer, loaded.chat_template, config).unwrap(),
    );
    let state = AppState::new(EngineSlot::ready(engine.clone()), HttpConfig::default()).unwrap();
    let metrics = state.metrics.clone();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app(state)).await });

    let prompt: Vec<u32> = (0..200).map(|i| 2 + i % 90).collect();
    let body = serde_json::json!({"prompt": prompt, "max_tokens": 1, "stream": stream});
    let body = body.to_string();
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut client = TcpStream::connect(address).await.unwrap();
    client.write_all(request.as_bytes()).await.unwrap();
    gate.allow(2);
    wait_until("the third step started", || gate.entered() == 3).await;
    drop(client);
    // The HTTP side has let go of the request once its tracker counted the cancellation.
    let cancelled = || {
        metrics
            .render(None, None)
            .contains("graft_requests_cancelled_total 1\n")
    };
    wait_until("the server saw the client leave", cancelled).await;
    gate.open();
    wait_until("the engine dropped the sequence", || {
        let stats = engine.stats();
        stats.running == 0 && stats.kv_used_bytes == 0
    })
    .await;
    gate.entered()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_prefill_stops_it_within_the_running_step() {
    assert_eq!(steps_run_after_leaving(false).await, 3, "non-streaming");
    assert_eq!(steps_run_after_leaving(true).await, 3, "streaming");
}
