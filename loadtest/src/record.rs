//! What one request measured: its timings, token counts and how it ended.
//!
//! Records are the raw material of everything else: statistics, the per-request files and the
//! plots are all computed from them, so they hold durations, never derived percentages.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

/// Why a request failed. `Incomplete` is not here: a request cancelled at the end of a level is
/// the load tester's doing, not the server's fault.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorKind {
    /// A non-2xx status.
    Http(u16),
    /// The connection could not be opened (refused, unreachable, or not within 10 s).
    Connect,
    /// The request took longer than `--timeout`.
    Timeout,
    /// The request failed after connecting, before a response (e.g. the connection was reset).
    Request,
    /// The response body failed or did not parse: a read error, a malformed chunk or body, an
    /// `error` event in the stream, or a stream that ended without `[DONE]` or a finish reason.
    Stream,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::Http(status) => write!(f, "http_{status}"),
            ErrorKind::Connect => f.write_str("connect"),
            ErrorKind::Timeout => f.write_str("timeout"),
            ErrorKind::Request => f.write_str("request"),
            ErrorKind::Stream => f.write_str("stream"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Ok,
    Error {
        kind: ErrorKind,
        message: String,
    },
    /// Still running when the level's drain timeout ran out; cancelled.
    Incomplete,
}

impl Outcome {
    /// `ok`, `incomplete`, or the error kind (`http_429`, `connect`, ...).
    pub fn key(&self) -> String {
        match self {
            Outcome::Ok => "ok".into(),
            Outcome::Incomplete => "incomplete".into(),
            Outcome::Error { kind, .. } => kind.to_string(),
        }
    }
}

/// Where a record's token counts come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenSource {
    /// The server's `usage`.
    Usage,
    /// No usage: output tokens are the number of streamed chunks with content (a lower bound
    /// when a server bundles several tokens per chunk), input tokens unknown.
    Chunks,
    /// No usage and no stream: unknown.
    Unknown,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RequestRecord {
    /// The workload index (the same request in every level).
    pub index: u64,
    /// Its turn in its conversation, from 1.
    pub turn: u32,
    pub chain: String,
    /// When the request was sent, from the start of the level's measured phase.
    pub start: Duration,
    /// Until the first non-empty content (streams) or the whole body (no stream); `None` when
    /// no content arrived.
    pub ttft: Option<Duration>,
    /// Until the end of the response, the error, or the cancellation.
    pub e2e: Duration,
    /// Inter-token latencies: the gaps between consecutive content chunks of a stream.
    pub gaps: Vec<Duration>,
    /// Streamed chunks that carried content.
    pub content_chunks: u64,
    pub input_tokens: Option<u64>,
    /// Prompt tokens the server took from its prefix cache, where its `usage` says
    /// (`prompt_tokens_details.cached_tokens`).
    pub cached_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub token_source: TokenSource,
    pub max_tokens: u32,
    /// Whether the response was streamed (TPOT and ITL exist only for streams).
    pub streamed: bool,
    pub outcome: Outcome,
}

impl RequestRecord {
    pub fn is_ok(&self) -> bool {
        self.outcome == Outcome::Ok
    }

    /// Time per output token after the first: `(e2e - ttft) / (output_tokens - 1)`; `None`
    /// with fewer than two tokens, and without a stream (where TTFT is the whole latency).
    pub fn tpot(&self) -> Option<Duration> {
        if !self.streamed {
            return None;
        }
        let ttft = self.ttft?;
        let n = self.output_tokens?;
        if n < 2 {
            return None;
        }
        let rest = self.e2e.saturating_sub(ttft);
        Some(rest.div_f64((n - 1) as f64))
    }

    /// This request's output tokens per second of its own end-to-end latency.
    pub fn output_tps(&self) -> Option<f64> {
        let n = self.output_tokens?;
        let secs = self.e2e.as_secs_f64();
        (secs > 0.0).then(|| n as f64 / secs)
    }

    /// When each content chunk arrived, from the request's start: `ttft`, then each gap added.
    pub fn chunk_times(&self) -> Vec<Duration> {
        let Some(mut t) = self.ttft else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(self.gaps.len() + 1);
        out.push(t);
        for g in &self.gaps {
            t += *g;
            out.push(t);
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A successful streamed record: first token at `ttft_ms`, then `gaps_ms`, ending at
    /// `e2e_ms`, with `usage` of `tokens` output tokens.
    pub fn ok(ttft_ms: u64, gaps_ms: &[u64], e2e_ms: u64, tokens: u64) -> RequestRecord {
        RequestRecord {
            index: 0,
            turn: 1,
            chain: "base".into(),
            start: Duration::ZERO,
            ttft: Some(Duration::from_millis(ttft_ms)),
            e2e: Duration::from_millis(e2e_ms),
            gaps: gaps_ms.iter().map(|&g| Duration::from_millis(g)).collect(),
            content_chunks: gaps_ms.len() as u64 + 1,
            input_tokens: Some(10),
            cached_tokens: None,
            output_tokens: Some(tokens),
            token_source: TokenSource::Usage,
            max_tokens: tokens as u32,
            streamed: true,
            outcome: Outcome::Ok,
        }
    }

    #[test]
    fn tpot_excludes_the_first_token() {
        let r = ok(100, &[10, 10, 10], 130, 4);
        assert_eq!(r.tpot(), Some(Duration::from_millis(10)));
        assert_eq!(ok(100, &[], 100, 1).tpot(), None);
    }

    #[test]
    fn chunk_times_accumulate_gaps() {
        let r = ok(100, &[10, 20], 130, 3);
        let ms: Vec<u128> = r.chunk_times().iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, vec![100, 110, 130]);
        assert_eq!(r.output_tps(), Some(3.0 / 0.13));
    }

    #[test]
    fn outcome_keys() {
        let e = |kind| Outcome::Error {
            kind,
            message: String::new(),
        };
        assert_eq!(e(ErrorKind::Http(429)).key(), "http_429");
        assert_eq!(e(ErrorKind::Connect).key(), "connect");
        assert_eq!(Outcome::Incomplete.key(), "incomplete");
    }
}
