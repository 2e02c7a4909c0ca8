//! POST /v1/responses over the scripted fake engine: the response object, the event stream,
//! continuing a stored response (and only one's own), and the 400s.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use axum::http::StatusCode;
use common::{post, send};
use serde_json::{json, Value};
use server::engine::fake::{FakeConfig, FakeEngine};
use server::http::{app, AppState, EngineSlot, HttpConfig};

fn fake_app() -> axum::Router {
    let fake = Arc::new(FakeEngine::new(FakeConfig::default()));
    let slot = EngineSlot::ready(fake);
    app(AppState::new(slot, HttpConfig::default()).unwrap())
}

async fn respond(app: &axum::Router, body: Value) -> common::Answer {
    send(app, post("/v1/responses", body.to_string())).await
}

#[tokio::test]
async fn a_response_holds_the_answer_usage_and_what_the_request_set() {
    let app = fake_app();
    let r = respond(&app, json!({"input": "hello", "instructions": "be brief", "max_output_tokens": 50, "metadata": {"k": "v"}})).await;
    let body = r.ok();
    assert_eq!(body["object"], "response");
    assert!(body["id"].as_str().unwrap().starts_with("resp_"));
    assert_eq!(body["status"], "completed");
    let message = &body["output"][0];
    assert_eq!(
        (message["type"].as_str(), message["role"].as_str()),
        (Some("message"), Some("assistant"))
    );
    let text = message["content"][0]["text"].as_str().unwrap();
    assert!(!text.is_empty());
    assert_eq!(message["content"][0]["type"], "output_text");
    let usage = &body["usage"];
    assert!(usage["input_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        usage["total_tokens"],
        usage["input_tokens"].as_u64().unwrap() + usage["output_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        (
            body["instructions"].as_str(),
            body["metadata"]["k"].as_str()
        ),
        (Some("be brief"), Some("v"))
    );
    assert_eq!(body["store"], true);
}

#[tokio::test]
async fn a_stream_is_the_responses_events_in_order_ending_with_the_whole_response() {
    let app = fake_app();
    let r = respond(&app, json!({"input": "hello", "stream": true})).await;
    assert_eq!(r.status, StatusCode::OK);
    let events: Vec<Value> = r
        .sse_data()
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        &kinds[..4],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added"
        ]
    );
    assert_eq!(
        &kinds[kinds.len() - 4..],
        [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    let numbers: Vec<u64> = events
        .iter()
        .map(|e| e["sequence_number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, (0..events.len() as u64).collect::<Vec<_>>());
    let deltas: String = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    let last = events.last().unwrap();
    assert_eq!(
        last["response"]["output"][0]["content"][0]["text"],
        deltas.as_str()
    );
    assert_eq!(events[events.len() - 4]["text"], deltas.as_str());
    assert!(last["response"]["usage"]["output_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn a_stored_response_is_continued_and_an_unstored_one_is_a_400() {
    let app = fake_app();
    let first = respond(&app, json!({"input": "hello"})).await.ok();
    let id = first["id"].as_str().unwrap();
    let next = respond(&app, json!({"input": "more", "previous_response_id": id}))
        .await
        .ok();
    assert_eq!(next["previous_response_id"], id);
    // The continued prompt holds the first exchange: more input tokens than the first.
    assert!(next["usage"]["input_tokens"].as_u64() > first["usage"]["input_tokens"].as_u64());
    let unstored = respond(&app, json!({"input": "hello", "store": false}))
        .await
        .ok();
    let e = respond(
        &app,
        json!({"input": "x", "previous_response_id": unstored["id"]}),
    )
    .await
    .error(StatusCode::BAD_REQUEST, "invalid_value");
    assert_eq!(e["param"], "previous_response_id");
}

#[tokio::test]
async fn unsupported_and_malformed_requests_are_400s_naming_the_field() {
    let app = fake_app();
    for (body, param) in [
        (
            json!({"input": "x", "tools": [{"type": "file_search"}]}),
            "tools[0].type",
        ),
        (
            json!({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]}),
            "input[0].content[0]",
        ),
        (json!({"input": "x", "temperature": 9}), "temperature"),
    ] {
        let r = respond(&app, body.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(r.json()["error"]["param"], param, "{body}");
    }
    let r = respond(&app, json!({"input": "x", "bogus": 1})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}
