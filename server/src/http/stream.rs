//! Server-sent events for streaming requests: engine events of every choice merged into one
//! SSE body of `data: {chunk}` lines, a final chunk per choice with its `finish_reason`, an
//! optional usage chunk, then `data: [DONE]`.
//!
//! The route-specific chunk shapes live behind [`ChunkFormat`] (chat and legacy completions);
//! the ordering rules live in [`StreamState`], a synchronous state machine tested without an
//! engine. The returned stream owns the event receivers, so when the client disconnects and
//! axum drops the body, the receivers are dropped and the engine cancels the requests.
//! An engine failure mid-stream, or the request's deadline passing, becomes one
//! `data: {"error": ...}` event (the same body as a JSON error reply) followed by `[DONE]`.

use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, select_all, StreamExt};
use plugins::ChainEntry;
use serde_json::{json, Value};
use tokio_stream::wrappers::ReceiverStream;

use super::error::ApiError;
use super::generate::{
    engine_gone, summarize, ChoiceTotals, Deadline, GenToken, Submission, TimingsOut, Tracker,
    Usage,
};
use crate::engine::{Event, FinishReason, TokenLogprob};

/// One SSE frame before encoding.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Json(Value),
    Done,
}

impl Frame {
    /// Whether this is a response chunk (error bodies are not).
    fn is_chunk(&self) -> bool {
        matches!(self, Frame::Json(v) if v.get("choices").is_some())
    }

    fn into_sse(self) -> SseEvent {
        match self {
            Frame::Json(v) => SseEvent::default().data(v.to_string()),
            Frame::Done => SseEvent::default().data("[DONE]"),
        }
    }
}

/// The fields every chunk of one response shares.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    /// With `stream_options.include_usage`, every chunk carries `"usage": null` and the last
    /// one the totals (OpenAI's convention).
    pub include_usage: bool,
    /// The resolved plug-in chain, echoed on the response (the first chunk of a stream).
    pub plugins: Vec<ChainEntry>,
}

impl Envelope {
    /// A chunk holding `choices`.
    pub fn chunk(&self, choices: Vec<Value>) -> Value {
        let mut chunk = json!({
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if self.include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    }

    /// Adds `"plugins"` (the resolved chain) to a body or chunk when a chain ran.
    pub fn echo_plugins(&self, body: &mut Value) {
        if !self.plugins.is_empty() {
            body["plugins"] = json!(self.plugins);
        }
    }

    /// The usage chunk: no choices, totals and server-side timings.
    pub fn usage_chunk(&self, usage: Usage, timings: TimingsOut) -> Value {
        let mut chunk = self.chunk(Vec::new());
        chunk["usage"] = json!(usage);
        chunk["timings"] = json!(timings);
        chunk
    }
}

/// How one route shapes its chunks. Every method returns whole chunks (envelope included).
pub trait ChunkFormat: Send + 'static {
    /// Chunks sent as soon as the stream opens, before any engine event.
    fn opening(&mut self, index: usize) -> Vec<Value>;
    fn prompt_logprobs(&mut self, index: usize, logprobs: Vec<TokenLogprob>) -> Option<Value>;
    /// `None` when there is nothing to send (text held back and no log-probs).
    fn token(&mut self, index: usize, token: GenToken) -> Option<Value>;
    /// The chunks that end choice `index`; `totals` are its token counts and timings.
    fn finish(
        &mut self,
        index: usize,
        reason: FinishReason,
        trailing: String,
        totals: &ChoiceTotals,
    ) -> Vec<Value>;
    fn envelope(&self) -> &Envelope;
}

/// The ordering rules of a streamed response with several choices.
pub struct StreamState<F> {
    format: F,
    trackers: Vec<Tracker>,
    finished: Vec<Option<ChoiceTotals>>,
    n: usize,
    ended: bool,
    /// Whether the first chunk (which carries the plug-in echo) has gone out.
    echoed: bool,
}

impl<F: ChunkFormat> StreamState<F> {
    /// `n` choices per prompt (for usage); one tracker per choice.
    pub fn new(format: F, trackers: Vec<Tracker>, n: usize) -> Self {
        let finished = vec![None; trackers.len()];
        Self {
            format,
            trackers,
            finished,
            n,
            ended: false,
            echoed: false,
        }
    }

    pub fn opening(&mut self) -> Vec<Frame> {
        let mut frames: Vec<Frame> = (0..self.finished.len())
            .flat_map(|i| self.format.opening(i))
            .map(Frame::Json)
            .collect();
        self.echo_once(&mut frames);
        frames
    }

    /// Puts the plug-in echo on the stream's first chunk, whichever call produces it.
    fn echo_once(&mut self, frames: &mut [Frame]) {
        if self.echoed {
            return;
        }
        // Error bodies are not chunks and carry no echo.
        let first = frames.first_mut().filter(|f| f.is_chunk());
        if let Some(Frame::Json(chunk)) = first {
            self.format.envelope().echo_plugins(chunk);
            self.echoed = true;
        }
    }

    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// Frames for one event of choice `index`; `None` means its channel closed.
    pub fn on_event(&mut self, index: usize, event: Option<Event>) -> Vec<Frame> {
        let mut frames = self.event_frames(index, event);
        self.echo_once(&mut frames);
        frames
    }

    fn event_frames(&mut self, index: usize, event: Option<Event>) -> Vec<Frame> {
        if self.ended {
            return Vec::new();
        }
        let Some(event) = event else {
            return match self.finished.get(index) {
                Some(Some(_)) => Vec::new(),
                _ => self.fail(engine_gone()),
            };
        };
        if let Some(tracker) = self.trackers.get_mut(index) {
            tracker.observe(&event);
        }
        let chunk = match event {
            Event::PromptLogprobs(lps) => self.format.prompt_logprobs(index, lps),
            // Embeddings are never streamed.
            Event::Embedding(_) => None,
            Event::Token { id, text, logprob } => {
                self.format.token(index, GenToken { id, text, logprob })
            }
            Event::Finished {
                reason,
                prompt_tokens,
                cached_tokens,
                completion_tokens,
                trailing_text,
                timings,
            } => {
                let totals = ChoiceTotals {
                    index,
                    prompt_tokens,
                    cached_tokens,
                    completion_tokens,
                    timings,
                };
                if let Some(slot) = self.finished.get_mut(index) {
                    *slot = Some(totals);
                }
                let mut chunks = self.format.finish(index, reason, trailing_text, &totals);
                // Server-side timings of this choice ride on its final chunk, as llama.cpp's do.
                if let Some(chunk) = chunks.first_mut().filter(|c| c.get("choices").is_some()) {
                    chunk["timings"] = json!(summarize(&[totals], 1).1);
                }
                return self.after_finish(chunks);
            }
            Event::Failed(e) => return self.fail(e.into()),
        };
        chunk.map(Frame::Json).into_iter().collect()
    }

    fn after_finish(&mut self, chunks: Vec<Value>) -> Vec<Frame> {
        let mut frames: Vec<Frame> = chunks.into_iter().map(Frame::Json).collect();
        let totals: Option<Vec<ChoiceTotals>> = self.finished.iter().copied().collect();
        if let Some(totals) = totals {
            let envelope = self.format.envelope();
            if envelope.include_usage {
                let (usage, timings) = summarize(&totals, self.n);
                frames.push(Frame::Json(envelope.usage_chunk(usage, timings)));
            }
            frames.push(Frame::Done);
            self.ended = true;
        }
        frames
    }

    fn fail(&mut self, error: ApiError) -> Vec<Frame> {
        self.ended = true;
        // The other choices end with this error, not as cancellations: the client is still here.
        self.trackers.iter_mut().for_each(Tracker::abandon);
        vec![Frame::Json(error.body()), Frame::Done]
    }
}

/// The SSE response for `subs`, shaped by `format`, ended with an error event at `deadline`.
pub fn sse_response<F: ChunkFormat>(
    subs: Vec<Submission>,
    format: F,
    n: usize,
    deadline: Option<Deadline>,
) -> Response {
    let mut receivers = Vec::with_capacity(subs.len());
    let mut trackers = Vec::with_capacity(subs.len());
    for sub in subs {
        receivers.push(sub.rx);
        trackers.push(sub.tracker);
    }
    let mut state = StreamState::new(format, trackers, n);
    let opening = state.opening();
    let merged = select_all(receivers.into_iter().enumerate().map(|(i, rx)| {
        ReceiverStream::new(rx)
            .map(move |event| (i, Some(event)))
            .chain(stream::iter([(i, None)]))
    }));
    let frames = stream::unfold(Some((merged, state)), move |st| async move {
        let (mut merged, mut state) = st?;
        loop {
            let next = match deadline {
                None => merged.next().await,
                Some(d) => match tokio::time::timeout_at(d.at, merged.next()).await {
                    Ok(next) => next,
                    // Dropping `merged` cancels every choice still running.
                    Err(_) => return Some((state.fail(d.expired()), None)),
                },
            };
            let Some((index, event)) = next else {
                // Every channel closed and reported: cannot happen without `ended`, but end
                // the body rather than wait forever.
                return None;
            };
            let frames = state.on_event(index, event);
            if state.is_ended() {
                // Dropping `merged` here cancels choices still running after a failure.
                return Some((frames, None));
            }
            if !frames.is_empty() {
                return Some((frames, Some((merged, state))));
            }
        }
    });
    let body = stream::iter(opening)
        .chain(frames.flat_map(stream::iter))
        .map(|frame| Ok::<_, Infallible>(frame.into_sse()));
    Sse::new(body)
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::engine::{EngineError, Timings};
    use crate::http::metrics::Metrics;

    struct Plain(Envelope);

    impl ChunkFormat for Plain {
        fn opening(&mut self, index: usize) -> Vec<Value> {
            vec![self.0.chunk(vec![json!({"index": index, "open": true})])]
        }
        fn prompt_logprobs(&mut self, _: usize, _: Vec<TokenLogprob>) -> Option<Value> {
            None
        }
        fn token(&mut self, index: usize, t: GenToken) -> Option<Value> {
            Some(self.0.chunk(vec![json!({"index": index, "text": t.text})]))
        }
        fn finish(&mut self, i: usize, r: FinishReason, _: String, _: &ChoiceTotals) -> Vec<Value> {
            vec![self
                .0
                .chunk(vec![json!({"index": i, "finish_reason": r.as_str()})])]
        }
        fn envelope(&self) -> &Envelope {
            &self.0
        }
    }

    fn state(choices: usize, include_usage: bool) -> StreamState<Plain> {
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let trackers = (0..choices)
            .map(|i| Tracker::new(metrics.clone(), format!("r-{i}")))
            .collect();
        let envelope = Envelope {
            id: "x".into(),
            object: "t",
            created: 0,
            model: "m".into(),
            include_usage,
            plugins: Vec::new(),
        };
        StreamState::new(Plain(envelope), trackers, choices)
    }

    fn finished(completion_tokens: usize) -> Event {
        Event::Finished {
            reason: FinishReason::Length,
            prompt_tokens: 5,
            cached_tokens: 0,
            completion_tokens,
            trailing_text: String::new(),
            timings: Timings::default(),
        }
    }

    fn token(text: &str) -> Event {
        Event::Token {
            id: 1,
            text: text.into(),
            logprob: None,
        }
    }

    #[test]
    fn usage_and_done_come_after_the_last_choice_finishes() {
        let mut s = state(2, true);
        assert_eq!(s.opening().len(), 2);
        assert_eq!(s.on_event(0, Some(token("a"))).len(), 1);
        let f = s.on_event(0, Some(finished(1)));
        assert_eq!(f.len(), 1, "choice 1 still running");
        assert!(
            s.on_event(0, None).is_empty(),
            "a closed finished channel is quiet"
        );
        let f = s.on_event(1, Some(finished(2)));
        assert_eq!(f.len(), 3);
        let Frame::Json(usage) = &f[1] else {
            panic!("usage chunk expected")
        };
        assert_eq!(usage["usage"]["completion_tokens"], 3);
        assert_eq!(usage["usage"]["prompt_tokens"], 5);
        assert_eq!(f[2], Frame::Done);
        assert!(s.is_ended());
    }

    #[test]
    fn failure_is_an_error_event_then_done() {
        let mut s = state(1, false);
        s.on_event(0, Some(token("a")));
        let f = s.on_event(0, Some(Event::Failed(EngineError::Internal("boom".into()))));
        let Frame::Json(err) = &f[0] else {
            panic!("error event expected")
        };
        assert_eq!(err["error"]["code"], "internal_error");
        assert!(err["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("boom")));
        assert_eq!(f[1], Frame::Done);
        assert!(s.on_event(0, Some(token("b"))).is_empty());
    }

    #[test]
    fn channel_closed_early_is_an_error() {
        let mut s = state(1, false);
        let f = s.on_event(0, None);
        assert_eq!(f.len(), 2);
        assert_eq!(f[1], Frame::Done);
    }
}
