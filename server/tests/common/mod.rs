//! Test helpers shared by the suites: HTTP through `server::http::app` with
//! `tower::ServiceExt::oneshot` (no socket), and reading an engine request's events.

#![allow(dead_code, clippy::unwrap_used)]

use axum::body::{to_bytes, Body, Bytes};
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::Router;
use serde_json::Value;
use tower::ServiceExt;

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// Checks for 200 and returns the JSON body.
    pub fn ok(&self) -> Value {
        assert_eq!(
            self.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        self.json()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// Checks the OpenAI error shape and returns `error`.
    pub fn error(&self, status: StatusCode, code: &str) -> Value {
        assert_eq!(
            self.status,
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        let body = self.json();
        let error = &body["error"];
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
        assert!(error["type"].is_string(), "{body}");
        assert!(error.get("param").is_some(), "{body}");
        assert_eq!(error["code"], code, "{body}");
        error.clone()
    }

    /// The `data:` payloads of an SSE body, in order.
    pub fn sse_data(&self) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.body);
        text.split("\n\n")
            .filter(|event| !event.trim().is_empty())
            .map(|event| {
                let data = event.strip_prefix("data: ");
                data.unwrap_or_else(|| panic!("not a data line: {event:?}"))
                    .to_string()
            })
            .collect()
    }
}

pub async fn send(app: &Router, req: Request<Body>) -> Answer {
    let response = app.clone().oneshot(req).await.expect("infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let body = to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    Answer {
        status,
        headers,
        body,
    }
}

pub fn post(uri: &str, body: impl Into<String>) -> Request<Body> {
    Request::post(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.into()))
        .expect("request")
}

pub fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).expect("request")
}

pub async fn chat(app: &Router, body: Value) -> Answer {
    send(app, post("/v1/chat/completions", body.to_string())).await
}

/// A request's tokens and how many of its prompt tokens came from the prefix cache.
pub fn tokens_and_cached(mut rx: server::engine::EventReceiver) -> (Vec<u32>, usize) {
    use server::engine::Event;
    let (mut out, mut cached) = (Vec::new(), usize::MAX);
    while let Some(event) = rx.blocking_recv() {
        match event {
            Event::Token { id, .. } => out.push(id),
            Event::Finished { cached_tokens, .. } => cached = cached_tokens,
            Event::Failed(e) => panic!("request failed: {e}"),
            _ => {}
        }
    }
    (out, cached)
}
