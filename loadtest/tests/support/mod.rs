//! A scripted OpenAI-compatible server on 127.0.0.1 (port 0) whose latencies and token streams
//! are known exactly, for the integration tests of the load tester.
//!
//! The request's `model` picks the script, so a `--chain` fragment can steer requests to one:
//! - anything else (`scripted`): stream a role-only chunk at once, the first content token
//!   after [`TTFT`], one more every [`GAP`] up to `max_tokens`, a finish chunk, a usage chunk
//!   (`prompt_tokens` [`PROMPT_TOKENS`]), `[DONE]`; without `stream`, the same total wait and
//!   one JSON body with usage;
//! - `slow-first`: the same with a first token after [`SLOW_TTFT`];
//! - `no-usage`: the stream without the usage chunk;
//! - `e429` / `e500`: that status with an OpenAI error body;
//! - `broken`: two content chunks, then the body ends without a finish reason or `[DONE]`;
//! - `hang`: one content chunk after 10 ms, then nothing for 30 s;
//! - `instant`: a non-stream reply with no wait.
//!
//! It counts requests and the most in flight at once (a stream leaves the count just before
//! its `[DONE]`, so the count never includes a request the client already saw end), and serves
//! `/v1/models` and a `/metrics` text with a request counter.

// Each test binary uses a different part of the script.
#![allow(dead_code)]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

pub const TTFT: Duration = Duration::from_millis(40);
pub const SLOW_TTFT: Duration = Duration::from_millis(120);
pub const GAP: Duration = Duration::from_millis(20);
pub const PROMPT_TOKENS: u64 = 7;

#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicUsize,
    pub in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
}

/// Counts a request in flight until dropped.
struct InFlight(Arc<Counters>);

impl InFlight {
    fn new(c: &Arc<Counters>) -> InFlight {
        c.requests.fetch_add(1, Ordering::SeqCst);
        let now = c.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        c.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(c.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct Scripted {
    pub url: String,
    pub counters: Arc<Counters>,
}

impl Scripted {
    pub fn max_in_flight(&self) -> usize {
        self.counters.max_in_flight.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> usize {
        self.counters.requests.load(Ordering::SeqCst)
    }
}

#[derive(Clone, Copy)]
enum Route {
    Chat,
    Completions,
}

/// Starts the server on the current runtime.
pub async fn start() -> Scripted {
    let counters = Arc::new(Counters::default());
    let app = Router::new()
        .route(
            "/v1/chat/completions",
            post(|s, b| generate(s, b, Route::Chat)),
        )
        .route(
            "/v1/completions",
            post(|s, b| generate(s, b, Route::Completions)),
        )
        .route(
            "/v1/models",
            get(|| async { Json(json!({"data": [{"id": "scripted"}]})) }),
        )
        .route("/metrics", get(metrics))
        .with_state(counters.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    // Nagle's algorithm would hold the first token behind the role chunk until the client's
    // delayed ACK (~40 ms on Linux): the script's timings would no longer be the truth.
    let listener = listener.tap_io(|tcp| tcp.set_nodelay(true).unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Scripted { url, counters }
}

async fn metrics(State(c): State<Arc<Counters>>) -> String {
    format!(
        "# TYPE scripted_requests_total counter\nscripted_requests_total {}\n# TYPE scripted_in_flight gauge\nscripted_in_flight {}\n",
        c.requests.load(Ordering::SeqCst),
        c.in_flight.load(Ordering::SeqCst)
    )
}

async fn generate(
    State(c): State<Arc<Counters>>,
    Json(body): Json<Value>,
    route: Route,
) -> Response {
    let guard = InFlight::new(&c);
    let model = body["model"].as_str().unwrap_or("").to_string();
    let n = body["max_tokens"].as_u64().unwrap_or(5);
    let stream = body["stream"].as_bool().unwrap_or(false);
    match model.as_str() {
        "e429" => return error(StatusCode::TOO_MANY_REQUESTS, "queue full"),
        "e500" => return error(StatusCode::INTERNAL_SERVER_ERROR, "boom"),
        "instant" => return Json(whole(route, n)).into_response(),
        _ => {}
    }
    let ttft = if model == "slow-first" {
        SLOW_TTFT
    } else {
        TTFT
    };
    if !stream {
        tokio::time::sleep(ttft + GAP * (n as u32 - 1)).await;
        drop(guard);
        return Json(whole(route, n)).into_response();
    }
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(16);
    tokio::spawn(script(tx, model, route, n, ttft, guard));
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(ReceiverStream::new(rx)))
        .unwrap()
}

/// The body of a streamed reply, sent event by event with the script's waits.
async fn script(
    tx: mpsc::Sender<Result<Bytes, Infallible>>,
    model: String,
    route: Route,
    n: u64,
    ttft: Duration,
    guard: InFlight,
) {
    let send = |v: Value| {
        let tx = tx.clone();
        async move {
            tx.send(Ok(Bytes::from(format!("data: {v}\n\n"))))
                .await
                .is_ok()
        }
    };
    // Deadlines from the start, not sleeps after each send: timer overshoot must not add up.
    let begin = tokio::time::Instant::now();
    send(chunk(route, None, None)).await;
    let count = match model.as_str() {
        "broken" => 2,
        "hang" => 1,
        _ => n,
    };
    for i in 0..count {
        tokio::time::sleep_until(begin + ttft + GAP * i as u32).await;
        if !send(chunk(route, Some("tok "), None)).await {
            return;
        }
    }
    match model.as_str() {
        "broken" => return,
        "hang" => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            return;
        }
        _ => {}
    }
    send(chunk(route, None, Some("length"))).await;
    if model != "no-usage" {
        send(json!({"choices": [], "usage": usage(n)})).await;
    }
    drop(guard);
    let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
}

fn usage(n: u64) -> Value {
    json!({"prompt_tokens": PROMPT_TOKENS, "completion_tokens": n, "total_tokens": PROMPT_TOKENS + n})
}

fn chunk(route: Route, text: Option<&str>, finish: Option<&str>) -> Value {
    match route {
        Route::Chat => {
            let delta = match text {
                Some(t) => json!({"content": t}),
                None if finish.is_none() => json!({"role": "assistant", "content": ""}),
                None => json!({}),
            };
            json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], "usage": null})
        }
        Route::Completions => {
            json!({"object": "text_completion", "choices": [{"index": 0, "text": text.unwrap_or(""), "finish_reason": finish}], "usage": null})
        }
    }
}

fn whole(route: Route, n: u64) -> Value {
    let text = "tok ".repeat(n as usize);
    let choice = match route {
        Route::Chat => {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
        }
        Route::Completions => json!({"index": 0, "text": text, "finish_reason": "length"}),
    };
    json!({"choices": [choice], "usage": usage(n)})
}

fn error(status: StatusCode, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": "scripted", "code": status.as_u16()}});
    (status, Json(body)).into_response()
}
