//! The measurements of one request while it runs: when content arrived, what `usage` said,
//! whether the response finished. Kept outside the request future so that a request cancelled
//! mid-stream still yields what it had measured.
//!
//! Content means a non-empty `delta.content` (chat; `reasoning_content`/`reasoning` too, since
//! reasoning models stream their thinking there and it costs the same decode steps, and
//! `tool_calls` pieces with a name or arguments, which are generated text as well) or a
//! non-empty `text` (completions). Role-only first chunks, empty deltas and usage-only chunks
//! are not tokens and must not start the TTFT clock.

use std::time::Duration;

use serde_json::Value;

use crate::record::{ErrorKind, Outcome, RequestRecord, TokenSource};
use crate::workload::PreparedRequest;

/// A failed request: its kind and the server's or the client's message.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub kind: ErrorKind,
    pub message: String,
}

impl Failure {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Failure {
            kind,
            message: message.into(),
        }
    }
}

#[derive(Debug, Default)]
pub struct Probe {
    ttft: Option<Duration>,
    last: Option<Duration>,
    gaps: Vec<Duration>,
    content_chunks: u64,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    /// `usage.prompt_tokens_details.cached_tokens` (OpenAI, vLLM, graft).
    cached_tokens: Option<u64>,
    /// The reply's text (first choice), which a conversation's next turn sends back.
    pub reply: String,
    /// A finish reason or `[DONE]` was seen: the response is whole.
    pub finished: bool,
    /// When the response ended (`[DONE]`, or the whole body), from the request's start.
    pub end: Option<Duration>,
}

impl Probe {
    /// One parsed stream chunk that arrived `at` after the request was sent; returns whether
    /// it carried content.
    pub fn chunk(&mut self, chunk: &Value, at: Duration) -> Result<bool, Failure> {
        if let Some(err) = chunk.get("error") {
            return Err(Failure::new(ErrorKind::Stream, error_message(err)));
        }
        self.usage(chunk);
        let choices = chunk.get("choices").and_then(Value::as_array);
        let mut content = false;
        for choice in choices.into_iter().flatten() {
            let delta = choice.get("delta").unwrap_or(choice);
            content |= has_content(delta);
            if choice.get("index").and_then(Value::as_u64).unwrap_or(0) == 0 {
                self.reply.push_str(reply_text(delta));
            }
            self.finished |= choice.get("finish_reason").is_some_and(|f| !f.is_null());
        }
        if content {
            self.content_at(at);
        }
        Ok(content)
    }

    /// A whole (non-stream) response body received `at` after the request was sent.
    pub fn whole(&mut self, body: &Value, at: Duration) -> Result<(), Failure> {
        if body.get("choices").and_then(Value::as_array).is_none() {
            return Err(Failure::new(ErrorKind::Stream, "response has no `choices`"));
        }
        self.usage(body);
        if let Some(first) = body.pointer("/choices/0") {
            self.reply = reply_text(first.get("message").unwrap_or(first)).to_string();
        }
        self.ttft = Some(at);
        self.finished = true;
        Ok(())
    }

    fn content_at(&mut self, at: Duration) {
        match self.last {
            None => self.ttft = Some(at),
            Some(last) => self.gaps.push(at.saturating_sub(last)),
        }
        self.last = Some(at);
        self.content_chunks += 1;
    }

    fn usage(&mut self, v: &Value) {
        let Some(usage) = v.get("usage").filter(|u| u.is_object()) else {
            return;
        };
        let count = |k: &str| usage.get(k).and_then(Value::as_u64);
        self.prompt_tokens = count("prompt_tokens").or(self.prompt_tokens);
        self.completion_tokens = count("completion_tokens").or(self.completion_tokens);
        let cached = usage.pointer("/prompt_tokens_details/cached_tokens");
        self.cached_tokens = cached.and_then(Value::as_u64).or(self.cached_tokens);
    }

    /// The record of `req`, sent at `start` (from the phase start), ended after `e2e`.
    pub fn into_record(
        self,
        req: &PreparedRequest,
        start: Duration,
        e2e: Duration,
        outcome: Outcome,
        streamed: bool,
    ) -> RequestRecord {
        let (token_source, input_tokens, output_tokens) = match self.completion_tokens {
            Some(n) => (TokenSource::Usage, self.prompt_tokens, Some(n)),
            None if streamed => (TokenSource::Chunks, None, Some(self.content_chunks)),
            None => (TokenSource::Unknown, None, None),
        };
        RequestRecord {
            index: req.index,
            turn: req.turn,
            chain: req.chain.clone(),
            start,
            ttft: self.ttft,
            e2e,
            gaps: self.gaps,
            content_chunks: self.content_chunks,
            input_tokens,
            cached_tokens: self.cached_tokens,
            output_tokens,
            token_source,
            max_tokens: req.max_tokens,
            streamed,
            outcome,
        }
    }
}

/// The text of a chat message or delta (`content`) or a completion choice (`text`).
fn reply_text(v: &Value) -> &str {
    ["content", "text"]
        .iter()
        .find_map(|k| v.get(k).and_then(Value::as_str))
        .unwrap_or_default()
}

fn has_content(v: &Value) -> bool {
    let text = |v: &Value, k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty())
    };
    let call = |c: &Value| {
        let function = &c["function"];
        text(function, "name") || text(function, "arguments")
    };
    ["content", "reasoning_content", "reasoning", "text"]
        .iter()
        .any(|k| text(v, k))
        || v.get("tool_calls")
            .and_then(Value::as_array)
            .is_some_and(|calls| calls.iter().any(call))
}

/// The message of an OpenAI-shaped error (`{"message": ...}`) or the value itself.
pub fn error_message(err: &Value) -> String {
    match err.get("message").and_then(Value::as_str) {
        Some(m) => m.to_string(),
        None => err.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn req() -> PreparedRequest {
        PreparedRequest {
            index: 3,
            turn: 1,
            chain: "base".into(),
            body: Vec::new(),
            max_tokens: 8,
        }
    }

    #[test]
    fn role_and_empty_chunks_do_not_start_the_clock() {
        let mut p = Probe::default();
        let role = json!({"choices": [{"delta": {"role": "assistant", "content": ""}}]});
        assert!(!p.chunk(&role, ms(5)).unwrap());
        assert!(p
            .chunk(&json!({"choices": [{"delta": {"content": "a"}}]}), ms(40))
            .unwrap());
        p.chunk(&json!({"choices": [{"delta": {"content": "b"}}]}), ms(55))
            .unwrap();
        let fin = json!({"choices": [{"delta": {}, "finish_reason": "length"}], "usage": null});
        p.chunk(&fin, ms(56)).unwrap();
        let usage = json!({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}});
        p.chunk(&usage, ms(57)).unwrap();
        assert!(p.finished);
        let r = p.into_record(&req(), ms(0), ms(60), Outcome::Ok, true);
        assert_eq!(r.ttft, Some(ms(40)));
        assert_eq!(r.gaps, vec![ms(15)]);
        assert_eq!((r.input_tokens, r.output_tokens), (Some(9), Some(2)));
        assert_eq!(r.token_source, TokenSource::Usage);
    }

    #[test]
    fn tool_call_pieces_are_content() {
        let mut p = Probe::default();
        let piece = |args: &str| json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": args}}]}}]});
        assert!(!p.chunk(&piece(""), ms(5)).unwrap());
        let start = json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "call_1",
            "type": "function", "function": {"name": "f", "arguments": ""}}]}}]});
        assert!(p.chunk(&start, ms(10)).unwrap());
        assert!(p.chunk(&piece("{\"a\""), ms(20)).unwrap());
    }

    #[test]
    fn without_usage_streams_count_chunks_and_whole_bodies_know_nothing() {
        let mut p = Probe::default();
        for t in [10, 20, 30] {
            p.chunk(&json!({"choices": [{"text": "x"}]}), ms(t))
                .unwrap();
        }
        let r = p.into_record(&req(), ms(0), ms(30), Outcome::Ok, true);
        assert_eq!(
            (r.output_tokens, r.token_source),
            (Some(3), TokenSource::Chunks)
        );
        let mut p = Probe::default();
        p.whole(
            &json!({"choices": [{"message": {"content": "hi"}}]}),
            ms(80),
        )
        .unwrap();
        let r = p.into_record(&req(), ms(0), ms(80), Outcome::Ok, false);
        assert_eq!(r.ttft, Some(ms(80)));
        assert_eq!(
            (r.output_tokens, r.token_source),
            (None, TokenSource::Unknown)
        );
        assert_eq!(r.tpot(), None, "no TPOT without a stream");
    }

    #[test]
    fn an_error_event_is_a_stream_error_with_its_message() {
        let mut p = Probe::default();
        let err = p
            .chunk(&json!({"error": {"message": "engine died"}}), ms(1))
            .unwrap_err();
        assert_eq!(err, Failure::new(ErrorKind::Stream, "engine died"));
    }
}
