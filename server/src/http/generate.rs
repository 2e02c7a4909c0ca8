//! Submitting validated requests to the engine and reading their events back: the part of
//! the request path both generation routes share, streaming or not.
//!
//! Each submitted request carries a [`Tracker`] that sees every event on its way to the
//! client and records time to first token, inter-token gaps, queue time and token counts.
//! A tracker dropped before its request finished means the client went away or the request
//! ran past its [`Deadline`] (the event receiver is dropped with it, which cancels the request
//! in the engine and frees its KV cache); a request the server itself gives up on (a sibling
//! refused with 429, failed, or timed out) is [`Tracker::abandon`]ed first, so
//! `graft_requests_cancelled_total` counts only clients that left. For a key with a
//! tokens-per-minute limit the tracker also charges the tokens its request used to the key's
//! [`Meter`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::try_join_all;
use serde::Serialize;

use super::auth::Meter;
use super::error::{ApiError, ErrorKind};
use super::metrics::Metrics;
use crate::engine::{
    Engine, Event, EventReceiver, FinishReason, GenerateRequest, Timings, TokenLogprob,
};

/// Watches one request's events for metrics and logs.
pub struct Tracker {
    metrics: Arc<Metrics>,
    id: String,
    started: Instant,
    last_token: Option<Instant>,
    done: bool,
    meter: Option<Meter>,
    /// Tokens to charge: the prompt's (for one choice per prompt) plus those generated.
    tokens: usize,
    /// The request's LoRA adapters while it waits for its first output
    /// (`vllm:lora_requests_info`'s `waiting_lora_adapters`).
    waiting_on: Vec<String>,
}

impl Tracker {
    pub fn new(metrics: Arc<Metrics>, id: String) -> Self {
        Self {
            metrics,
            id,
            started: Instant::now(),
            last_token: None,
            done: false,
            meter: None,
            tokens: 0,
            waiting_on: Vec::new(),
        }
    }

    /// Counts the request's LoRA adapters as waiting until its first event.
    pub fn waiting_on(mut self, adapters: &[String]) -> Self {
        self.metrics.adapters_waiting(adapters);
        self.waiting_on = adapters.to_vec();
        self
    }

    fn started(&mut self) {
        if !self.waiting_on.is_empty() {
            self.metrics.adapters_started(&self.waiting_on);
            self.waiting_on.clear();
        }
    }

    /// Charges `prompt_tokens` and the tokens generated to `meter` when the request ends.
    pub fn charging(mut self, meter: Option<Meter>, prompt_tokens: usize) -> Self {
        self.meter = meter;
        self.tokens = prompt_tokens;
        self
    }

    pub fn observe(&mut self, event: &Event) {
        self.started();
        match event {
            Event::PromptLogprobs(_) | Event::Embedding(_) => {}
            Event::Token { .. } => self.on_token(),
            Event::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
                timings,
                ..
            } => {
                self.done = true;
                let e2e = self.started.elapsed();
                self.metrics
                    .finished(e2e, timings.queue, *prompt_tokens, *completion_tokens);
                tracing::info!(
                    request_id = %self.id,
                    prompt_tokens,
                    completion_tokens,
                    finish_reason = reason.as_str(),
                    queue_ms = ms(timings.queue),
                    e2e_ms = ms(e2e),
                    "generation finished"
                );
            }
            Event::Failed(e) => {
                self.done = true;
                tracing::warn!(request_id = %self.id, error = %e, "generation failed");
            }
        }
    }

    /// Ends tracking without counting a cancellation: the server answers this request with
    /// an error (its client is still there), and dropping it cancels it in the engine.
    pub fn abandon(&mut self) {
        if !self.done {
            self.done = true;
            tracing::debug!(request_id = %self.id, "generation abandoned with its request");
        }
    }

    fn on_token(&mut self) {
        self.tokens += 1;
        let now = Instant::now();
        match self.last_token {
            None => self.metrics.time_to_first_token(now - self.started),
            Some(last) => self.metrics.inter_token_latency(now - last),
        }
        self.last_token = Some(now);
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.started();
        if let Some(meter) = &self.meter {
            meter.charge(self.tokens);
        }
        if !self.done {
            self.metrics.cancelled();
            tracing::info!(request_id = %self.id, "generation cancelled before it finished");
        }
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One request in the engine: its events and their tracker.
pub struct Submission {
    pub rx: EventReceiver,
    pub tracker: Tracker,
}

/// Submits every request, or none: on a failure (a full queue) the ones already submitted
/// are dropped here, which cancels them. A refused request is answered (429 or 503), not
/// cancelled, so neither it nor its dropped siblings count in `graft_requests_cancelled_total`.
/// `requests` are `n` choices per prompt in a row (as `fan_out` makes them); `meter` is
/// charged each prompt once, as `usage` counts it; `loras` are the LoRA adapters the requests
/// run with, counted as waiting until each request's first output.
pub fn submit_all(
    engine: &dyn Engine,
    requests: Vec<GenerateRequest>,
    metrics: &Arc<Metrics>,
    meter: Option<Meter>,
    n: usize,
    loras: &[String],
) -> Result<Vec<Submission>, ApiError> {
    let mut subs = Vec::with_capacity(requests.len());
    let mut requests = requests.into_iter().peekable();
    while requests.peek().is_some() {
        // One prompt's choices go together, so the engine can prefill the prompt once.
        let choices: Vec<GenerateRequest> = requests.by_ref().take(n.max(1)).collect();
        let prompt = choices.first().map_or(0, |r| r.prompt.len());
        let ids: Vec<String> = choices.iter().map(|r| r.id.clone()).collect();
        match engine.submit_choices(choices) {
            Ok(receivers) => {
                for (i, (rx, id)) in receivers.into_iter().zip(ids).enumerate() {
                    let charged = if i == 0 { prompt } else { 0 };
                    subs.push(Submission {
                        rx,
                        tracker: Tracker::new(metrics.clone(), id)
                            .charging(meter.clone(), charged)
                            .waiting_on(loras),
                    });
                }
            }
            Err(e) => {
                subs.iter_mut().for_each(|sub| sub.tracker.abandon());
                return Err(e.into());
            }
        }
    }
    Ok(subs)
}

/// One generated token as the routes need it.
#[derive(Debug, Clone, PartialEq)]
pub struct GenToken {
    pub id: u32,
    pub text: String,
    pub logprob: Option<TokenLogprob>,
}

/// A finished generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub text: String,
    pub tokens: Vec<GenToken>,
    pub finish_reason: FinishReason,
    pub prompt_logprobs: Option<Vec<TokenLogprob>>,
    /// An embedding request's vector.
    pub embedding: Option<Vec<f32>>,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub timings: Timings,
}

/// The error for an event channel that closed without a final event (the engine stopped).
pub fn engine_gone() -> ApiError {
    ApiError::new(
        ErrorKind::Internal,
        "the engine stopped before the request finished",
    )
}

/// Reads one request's events to the end.
pub async fn collect(sub: &mut Submission) -> Result<Outcome, ApiError> {
    let mut tokens = Vec::new();
    let mut prompt_logprobs = None;
    let mut embedding = None;
    while let Some(event) = sub.rx.recv().await {
        sub.tracker.observe(&event);
        match event {
            Event::PromptLogprobs(lps) => prompt_logprobs = Some(lps),
            Event::Embedding(vector) => embedding = Some(vector),
            Event::Token { id, text, logprob } => tokens.push(GenToken { id, text, logprob }),
            Event::Finished {
                reason,
                prompt_tokens,
                cached_tokens,
                completion_tokens,
                trailing_text,
                timings,
            } => {
                let mut text: String = tokens.iter().map(|t: &GenToken| t.text.as_str()).collect();
                text.push_str(&trailing_text);
                return Ok(Outcome {
                    text,
                    tokens,
                    finish_reason: reason,
                    prompt_logprobs,
                    embedding,
                    prompt_tokens,
                    cached_tokens,
                    completion_tokens,
                    timings,
                });
            }
            Event::Failed(e) => return Err(e.into()),
        }
    }
    Err(engine_gone())
}

/// Reads every request concurrently; the first failure, or the deadline passing, drops
/// (cancels) the others, which end with the request's error rather than as cancellations.
pub async fn collect_all(
    mut subs: Vec<Submission>,
    deadline: Option<Deadline>,
) -> Result<Vec<Outcome>, ApiError> {
    let all = try_join_all(subs.iter_mut().map(collect));
    let outcomes = match deadline {
        None => all.await,
        Some(d) => tokio::time::timeout_at(d.at, all)
            .await
            .unwrap_or_else(|_| Err(d.expired())),
    };
    if outcomes.is_err() {
        subs.iter_mut().for_each(|sub| sub.tracker.abandon());
    }
    outcomes
}

/// When a generation must end (`request_timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    pub at: tokio::time::Instant,
    limit: Duration,
}

impl Deadline {
    /// `limit` from now.
    pub fn after(limit: Duration) -> Self {
        Self {
            at: tokio::time::Instant::now() + limit,
            limit,
        }
    }

    /// The error for a request that ran past it (its sequences are cancelled by the caller
    /// dropping them).
    pub fn expired(&self) -> ApiError {
        tracing::warn!(limit = ?self.limit, "generation ran past the request timeout; cancelled");
        ApiError::new(
            ErrorKind::RequestTimeout,
            format!(
                "the request ran longer than the server's request timeout ({:?}, \
                 request_timeout) and was cancelled",
                self.limit
            ),
        )
    }
}

/// OpenAI `usage`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

/// OpenAI `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the prefix cache rather than prefilled.
    pub cached_tokens: usize,
}

/// Server-side timings under llama.cpp's names, plus the time spent queued.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct TimingsOut {
    /// Prompt tokens taken from the prefix cache.
    pub cache_n: usize,
    /// Prompt tokens prefilled (the prompt less `cache_n`).
    pub prompt_n: usize,
    pub prompt_ms: f64,
    pub predicted_n: usize,
    pub predicted_ms: f64,
    pub queue_ms: f64,
}

/// One finished choice, for usage and timings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChoiceTotals {
    pub index: usize,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub timings: Timings,
}

/// Usage and timings over all choices: each prompt counted once (not once per choice, as
/// OpenAI reports `n > 1`), completions summed, times the slowest choice's.
pub fn summarize(choices: &[ChoiceTotals], n: usize) -> (Usage, TimingsOut) {
    let mut usage = Usage::default();
    let mut timings = TimingsOut::default();
    for c in choices {
        if c.index % n.max(1) == 0 {
            usage.prompt_tokens += c.prompt_tokens;
            usage.prompt_tokens_details.cached_tokens += c.cached_tokens;
        }
        usage.completion_tokens += c.completion_tokens;
        timings.prompt_ms = timings.prompt_ms.max(ms(c.timings.prompt));
        timings.predicted_ms = timings.predicted_ms.max(ms(c.timings.generation));
        timings.queue_ms = timings.queue_ms.max(ms(c.timings.queue));
    }
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
    timings.cache_n = usage.prompt_tokens_details.cached_tokens;
    timings.prompt_n = usage.prompt_tokens - timings.cache_n;
    timings.predicted_n = usage.completion_tokens;
    (usage, timings)
}

impl Outcome {
    pub fn totals(&self, index: usize) -> ChoiceTotals {
        ChoiceTotals {
            index,
            prompt_tokens: self.prompt_tokens,
            cached_tokens: self.cached_tokens,
            completion_tokens: self.completion_tokens,
            timings: self.timings,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn summarize_counts_each_prompt_once() {
        let t = |ms| Timings {
            queue: Duration::from_millis(ms),
            prompt: Duration::from_millis(ms),
            generation: Duration::from_millis(ms),
        };
        let choices: Vec<ChoiceTotals> = (0..4)
            .map(|i| ChoiceTotals {
                index: i,
                prompt_tokens: 10 + (i / 2),
                cached_tokens: i / 2 * 4,
                completion_tokens: 3,
                timings: t(i as u64),
            })
            .collect();
        let (usage, timings) = summarize(&choices, 2);
        assert_eq!(usage.prompt_tokens, 10 + 11);
        assert_eq!(usage.completion_tokens, 12);
        assert_eq!(usage.total_tokens, 33);
        assert_eq!(timings.queue_ms, 3.0);
        assert_eq!(timings.predicted_n, 12);
        assert_eq!(usage.prompt_tokens_details.cached_tokens, 4);
        assert_eq!((timings.cache_n, timings.prompt_n), (4, 21 - 4));
    }
}
