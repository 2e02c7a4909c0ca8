//! The HTTP side: sends one prepared request to the target and measures it into a
//! [`RequestRecord`], classifying failures by kind. Also the two auxiliary GETs (`/v1/models`
//! to find a default model, `/metrics` for scrapes).
//!
//! The clock starts just before the request is handed to the HTTP client (the body is already
//! serialized) and each content chunk is stamped when its bytes come off the socket, before
//! parsing. Proxies from the environment are ignored: a load test measures the server, not a
//! proxy in front of it.

mod probe;
mod sse;

use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;
use tokio::time::Instant;

pub use probe::Failure;
use probe::{error_message, Probe};
pub use sse::SseParser;

use crate::config::Target;
use crate::live::Live;
use crate::record::{ErrorKind, Outcome, RequestRecord};
use crate::workload::PreparedRequest;

/// How long a finished stream may take to close, off the clock, so its connection is reused.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Longest wait for a connection (under `--timeout` when that is shorter).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot build the HTTP client: {0}")]
    Build(reqwest::Error),
    #[error("GET {url} failed: {reason}")]
    Get { url: String, reason: String },
}

#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    route: String,
    stream: bool,
    timeout: Duration,
    api_key: Option<String>,
}

impl Client {
    pub fn new(target: &Target) -> Result<Self, ClientError> {
        // No idle pool: a server may close a kept-alive connection at any moment (llama-server
        // does between streamed responses), and a request that goes out on it fails before the
        // server sees it, an error that is the client's, not the server's. A fresh connection
        // per request costs ~0.1 ms on loopback, the same for every server measured.
        // https targets: rustls with ring (see the workspace Cargo.toml); the server may have
        // installed the same provider in this process already.
        #[allow(deprecated)] // ring lacks post-quantum key exchange; a load test does not need it
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .tcp_nodelay(true)
            .connect_timeout(target.timeout.min(CONNECT_TIMEOUT))
            .build()
            .map_err(ClientError::Build)?;
        Ok(Client {
            http,
            base: target.url.clone(),
            route: format!("{}{}", target.url, target.endpoint.path()),
            stream: target.stream,
            timeout: target.timeout,
            api_key: target.api_key.clone(),
        })
    }

    /// Sends `req` and measures it; `start` is stamped from `origin`. When `cancel` turns true
    /// before the response ends, the request is dropped and recorded as incomplete. Returns
    /// the record and the reply's text (what a conversation's next turn sends back).
    pub async fn send(
        &self,
        mut req: PreparedRequest,
        origin: Instant,
        mut cancel: watch::Receiver<bool>,
        live: &Live,
    ) -> (RequestRecord, String) {
        let body = std::mem::take(&mut req.body);
        let builder = self.authorized(self.http.post(&self.route)).body(body);
        let builder = builder.header("content-type", "application/json");
        let t0 = Instant::now();
        let mut probe = Probe::default();
        let outcome = {
            let exchange = self.exchange(builder, t0, &mut probe, live);
            tokio::select! {
                biased;
                _ = cancelled(&mut cancel) => Outcome::Incomplete,
                r = tokio::time::timeout(self.timeout, exchange) => match r {
                    Ok(Ok(())) => Outcome::Ok,
                    Ok(Err(f)) => Outcome::Error { kind: f.kind, message: f.message },
                    Err(_) => Outcome::Error {
                        kind: ErrorKind::Timeout,
                        message: format!("no complete response within {:?}", self.timeout),
                    },
                },
            }
        };
        let e2e = match (&outcome, probe.end) {
            (Outcome::Ok, Some(end)) => end,
            _ => t0.elapsed(),
        };
        let start = t0.saturating_duration_since(origin);
        let reply = std::mem::take(&mut probe.reply);
        (
            probe.into_record(&req, start, e2e, outcome, self.stream),
            reply,
        )
    }

    async fn exchange(
        &self,
        builder: reqwest::RequestBuilder,
        t0: Instant,
        probe: &mut Probe,
        live: &Live,
    ) -> Result<(), Failure> {
        let resp = builder
            .send()
            .await
            .map_err(|e| Failure::new(classify(&e), e.to_string()))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err(Failure::new(
                ErrorKind::Http(status.as_u16()),
                http_message(&text),
            ));
        }
        if self.stream {
            read_stream(resp, t0, probe, live).await
        } else {
            let body = resp
                .bytes()
                .await
                .map_err(|e| Failure::new(ErrorKind::Stream, e.to_string()))?;
            let at = t0.elapsed();
            let v: Value = serde_json::from_slice(&body)
                .map_err(|e| Failure::new(ErrorKind::Stream, format!("bad JSON body: {e}")))?;
            probe.whole(&v, at)?;
            probe.end = Some(at);
            Ok(())
        }
    }

    /// The first model `GET /v1/models` lists.
    pub async fn first_model(&self) -> Result<String, ClientError> {
        let url = format!("{}/v1/models", self.base);
        let fail = |reason: String| ClientError::Get {
            url: url.clone(),
            reason,
        };
        let text = self.get_text("/v1/models").await?;
        let v: Value = serde_json::from_str(&text).map_err(|e| fail(e.to_string()))?;
        v.pointer("/data/0/id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| fail("no `data[0].id` in the reply; give --model".into()))
    }

    /// `GET {url}{path}` as text; a non-2xx status is an error.
    pub async fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let url = format!("{}{}", self.base, path);
        let fail = |reason: String| ClientError::Get {
            url: url.clone(),
            reason,
        };
        let req = self.authorized(self.http.get(&url)).timeout(self.timeout);
        let resp = req.send().await.map_err(|e| fail(e.to_string()))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| fail(e.to_string()))?;
        if !status.is_success() {
            return Err(fail(format!("status {status}: {}", http_message(&text))));
        }
        Ok(text)
    }

    fn authorized(&self, b: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(key) => b.bearer_auth(key),
            None => b,
        }
    }
}

/// Reads an SSE body into `probe` until `[DONE]` (or the end of the body).
async fn read_stream(
    mut resp: reqwest::Response,
    t0: Instant,
    probe: &mut Probe,
    live: &Live,
) -> Result<(), Failure> {
    let mut sse = SseParser::default();
    let stream_err = |e: &dyn std::fmt::Display| Failure::new(ErrorKind::Stream, e.to_string());
    'body: while let Some(bytes) = resp.chunk().await.map_err(|e| stream_err(&e))? {
        let at = t0.elapsed();
        for data in sse.push(&bytes) {
            if data.trim() == "[DONE]" {
                probe.finished = true;
                probe.end = Some(at);
                break 'body;
            }
            let chunk: Value = serde_json::from_str(&data)
                .map_err(|e| stream_err(&format!("bad chunk `{data}`: {e}")))?;
            if probe.chunk(&chunk, at)? {
                live.chunk();
            }
        }
    }
    if probe.end.is_some() {
        // Read the body's end off the clock, so the connection goes back to the pool.
        let _ = tokio::time::timeout(CLOSE_GRACE, drain(resp)).await;
        return Ok(());
    }
    if probe.finished {
        probe.end = Some(t0.elapsed());
        return Ok(());
    }
    Err(Failure::new(
        ErrorKind::Stream,
        "the stream ended before [DONE] or a finish reason",
    ))
}

async fn drain(mut resp: reqwest::Response) {
    while let Ok(Some(_)) = resp.chunk().await {}
}

/// Resolves when `cancel` turns true; never, if its sender is gone without cancelling.
async fn cancelled(cancel: &mut watch::Receiver<bool>) {
    if cancel.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn classify(e: &reqwest::Error) -> ErrorKind {
    if e.is_connect() {
        ErrorKind::Connect
    } else if e.is_timeout() {
        ErrorKind::Timeout
    } else {
        ErrorKind::Request
    }
}

/// The message of an error reply: OpenAI's `error.message`, else the start of the body.
fn http_message(text: &str) -> String {
    match serde_json::from_str::<Value>(text) {
        Ok(v) if v.get("error").is_some() => error_message(&v["error"]),
        _ => text.chars().take(300).collect(),
    }
}
