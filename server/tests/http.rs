//! HTTP tests: the whole router (`server::http::app`) driven with `tower::ServiceExt::oneshot`
//! over the scripted fake engine, no socket. Covers routing, every error status and body,
//! SSE framing, `n > 1`, legacy completions `echo` + `logprobs`, /tokenize, /metrics, the
//! request id header, cancellation on disconnect, and the config file staying in sync.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use futures::StreamExt;
use serde_json::{json, Value};
use server::config::ServeConfig;
use server::engine::fake::{FakeConfig, FakeEngine, Reply, BOS, BYTE_OFFSET, FAKE_LOGPROB};
use server::engine::{Engine, EngineError, EngineStats, Event, FinishReason, OutputRules, Timings};
use server::http::{app, AppState, EngineSlot, HttpConfig};
use tower::ServiceExt;

mod common;

use common::{chat, get, post, send};

fn state_with(fake: Arc<FakeEngine>, http: HttpConfig) -> AppState {
    AppState::new(EngineSlot::ready(fake), http).expect("app state")
}

fn fake_app(config: FakeConfig) -> (Router, Arc<FakeEngine>) {
    let fake = Arc::new(FakeEngine::new(config));
    (app(state_with(fake.clone(), HttpConfig::default())), fake)
}

fn echo_app() -> (Router, Arc<FakeEngine>) {
    fake_app(FakeConfig::default())
}

fn hello() -> Value {
    json!([{"role": "user", "content": "hello"}])
}

// ---------------------------------------------------------------- routing and basics

#[tokio::test]
async fn models_lists_the_served_model() {
    let (app, _) = echo_app();
    let r = send(&app, get("/v1/models")).await;
    assert_eq!(r.status, StatusCode::OK);
    let body = r.json();
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"][0]["id"], "fake-model");
    assert_eq!(body["data"][0]["object"], "model");
    assert_eq!(body["data"][0]["max_model_len"], 128);
}

#[tokio::test]
async fn unknown_route_is_404_and_wrong_method_405_in_our_shape() {
    let (app, _) = echo_app();
    send(&app, get("/v2/nothing"))
        .await
        .error(StatusCode::NOT_FOUND, "not_found");
    send(&app, get("/v1/chat/completions"))
        .await
        .error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    let req = Request::builder()
        .method(Method::DELETE)
        .uri("/health")
        .body(Body::empty())
        .expect("request");
    send(&app, req)
        .await
        .error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
}

#[tokio::test]
async fn health_is_503_while_loading_then_200() {
    let state = AppState::new(EngineSlot::loading(), HttpConfig::default()).expect("state");
    let app = app(state.clone());
    send(&app, get("/health"))
        .await
        .error(StatusCode::SERVICE_UNAVAILABLE, "model_loading");
    chat(&app, json!({"messages": hello()}))
        .await
        .error(StatusCode::SERVICE_UNAVAILABLE, "model_loading");
    send(&app, get("/v1/models"))
        .await
        .error(StatusCode::SERVICE_UNAVAILABLE, "model_loading");
    // Liveness is not readiness: a loading process is alive.
    assert_eq!(send(&app, get("/live")).await.json()["status"], "alive");
    assert!(state.slot.fill(Arc::new(FakeEngine::default())));
    let r = send(&app, get("/health")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["status"], "ok");
}

#[tokio::test]
async fn shutting_down_is_503() {
    let fake = Arc::new(FakeEngine::default());
    let state = state_with(fake, HttpConfig::default());
    state.slot.begin_shutdown();
    let app = app(state);
    let r = chat(&app, json!({"messages": hello()})).await;
    r.error(StatusCode::SERVICE_UNAVAILABLE, "shutting_down");
    assert_eq!(r.headers[header::RETRY_AFTER], "1");
    send(&app, get("/health"))
        .await
        .error(StatusCode::SERVICE_UNAVAILABLE, "shutting_down");
    let live = send(&app, get("/live")).await;
    assert_eq!(live.status, StatusCode::OK, "a draining process is alive");
}

#[tokio::test]
async fn every_reply_has_a_request_id_matching_the_completion_id() {
    let (app, _) = echo_app();
    let r = chat(&app, json!({"messages": hello(), "max_tokens": 2})).await;
    let rid = r.headers["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert!(!rid.is_empty());
    assert_eq!(r.json()["id"], format!("chatcmpl-{rid}"));
    let r = send(&app, get("/nope")).await;
    assert!(r.headers.contains_key("x-request-id"));
}

// ---------------------------------------------------------------- error bodies

#[tokio::test]
async fn malformed_json_is_400_invalid_json() {
    let (app, _) = echo_app();
    let r = send(&app, post("/v1/chat/completions", "{\"messages\": [")).await;
    let e = r.error(StatusCode::BAD_REQUEST, "invalid_json");
    assert!(e["message"]
        .as_str()
        .is_some_and(|m| m.contains("not valid JSON")));
}

#[tokio::test]
async fn wrong_type_is_400_naming_the_field_path() {
    let (app, _) = echo_app();
    let r = chat(&app, json!({"messages": [{"role": "user", "content": 5}]})).await;
    let e = r.error(StatusCode::BAD_REQUEST, "invalid_value");
    assert_eq!(e["param"], "messages[0].content");
    let r = chat(&app, json!({"messages": hello(), "temperature": "hot"})).await;
    let e = r.error(StatusCode::BAD_REQUEST, "invalid_value");
    assert_eq!(e["param"], "temperature");
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("invalid type")),
        "{e}"
    );
    let r = chat(&app, json!({"max_tokens": 3})).await;
    let e = r.error(StatusCode::BAD_REQUEST, "invalid_value");
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("messages")),
        "{e}"
    );
}

#[tokio::test]
async fn oversize_body_is_413_in_our_shape_with_or_without_content_length() {
    let fake = Arc::new(FakeEngine::default());
    let http = HttpConfig {
        max_body_bytes: 64,
        ..HttpConfig::default()
    };
    let app = app(state_with(fake, http));
    let big = json!({"messages": [{"role": "user", "content": "x".repeat(200)}]}).to_string();
    let announced = Request::post("/v1/chat/completions")
        .header(header::CONTENT_LENGTH, big.len())
        .body(Body::from(big.clone()))
        .expect("request");
    let e = send(&app, announced)
        .await
        .error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("64 bytes")),
        "{e}"
    );
    let chunks = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from(big))]);
    let streamed = Request::post("/v1/chat/completions")
        .body(Body::from_stream(chunks))
        .expect("request");
    send(&app, streamed)
        .await
        .error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
}

#[tokio::test]
async fn context_overflow_is_400_with_both_numbers() {
    let (app, _) = echo_app();
    // "<|user|>hello\n<|assistant|>" is 27 bytes, plus BOS: 28 prompt tokens.
    let r = chat(&app, json!({"messages": hello(), "max_tokens": 120})).await;
    let e = r.error(StatusCode::BAD_REQUEST, "context_length_exceeded");
    let message = e["message"].as_str().unwrap_or_default();
    assert!(message.contains("28 in the prompt"), "{message}");
    assert!(message.contains("120 for the completion"), "{message}");
    assert!(message.contains("128 tokens"), "{message}");
    assert_eq!(e["param"], "max_tokens");
}

#[tokio::test]
async fn unknown_model_is_404_and_the_served_or_missing_model_is_fine() {
    let (app, _) = echo_app();
    let r = chat(&app, json!({"model": "gpt-4o", "messages": hello()})).await;
    let e = r.error(StatusCode::NOT_FOUND, "model_not_found");
    assert_eq!(e["param"], "model");
    let r = chat(
        &app,
        json!({"model": "fake-model", "messages": hello(), "max_tokens": 1}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn out_of_range_parameters_are_400_naming_the_field() {
    let (app, _) = echo_app();
    for (field, value) in [
        ("temperature", json!(3.0)),
        ("top_p", json!(0.0)),
        ("presence_penalty", json!(5)),
        ("n", json!(0)),
        ("n", json!(100)),
        ("logit_bias", json!({"99999": 1.0})),
        ("stop", json!(["a", "b", "c", "d", "e"])),
        ("top_logprobs", json!(3)),
        ("max_tokens", json!(0)),
    ] {
        let mut body = json!({"messages": hello()});
        body[field] = value;
        let e = chat(&app, body)
            .await
            .error(StatusCode::BAD_REQUEST, "invalid_value");
        assert_eq!(e["param"], field, "{e}");
    }
}

#[tokio::test]
async fn output_changing_unsupported_fields_are_400_and_harmless_ones_accepted() {
    let (app, _) = echo_app();
    for (field, value) in [
        ("response_format", json!({"type": "json_object"})),
        ("functions", json!([{"name": "f"}])),
        ("guided_json", json!({"type": "object"})),
    ] {
        let mut body = json!({"messages": hello()});
        body[field] = value;
        let e = chat(&app, body)
            .await
            .error(StatusCode::BAD_REQUEST, "unsupported_parameter");
        assert_eq!(e["param"], field, "{e}");
    }
    let body = json!({
        "messages": hello(), "max_tokens": 1, "user": "u", "metadata": {"k": "v"},
        "store": false, "tool_choice": "none", "response_format": {"type": "text"},
    });
    assert_eq!(chat(&app, body).await.status, StatusCode::OK);
}

#[tokio::test]
async fn queue_full_is_429_with_retry_after() {
    let (app, _) = fake_app(FakeConfig {
        queue_full: true,
        ..FakeConfig::default()
    });
    let r = chat(&app, json!({"messages": hello()})).await;
    r.error(StatusCode::TOO_MANY_REQUESTS, "queue_full");
    assert_eq!(r.headers[header::RETRY_AFTER], "1");
}

#[tokio::test]
async fn api_keys_guard_everything_but_health_and_metrics() {
    let http = HttpConfig {
        api_keys: server::http::auth::KeyTable::parse("k1\nk2\n").expect("keys"),
        ..HttpConfig::default()
    };
    let app = app(state_with(Arc::new(FakeEngine::default()), http));
    send(&app, get("/v1/models"))
        .await
        .error(StatusCode::UNAUTHORIZED, "invalid_api_key");
    let wrong = Request::get("/v1/models")
        .header(header::AUTHORIZATION, "Bearer nope")
        .body(Body::empty())
        .expect("request");
    send(&app, wrong)
        .await
        .error(StatusCode::UNAUTHORIZED, "invalid_api_key");
    let right = Request::get("/v1/models")
        .header(header::AUTHORIZATION, "Bearer k2")
        .body(Body::empty())
        .expect("request");
    assert_eq!(send(&app, right).await.status, StatusCode::OK);
    let r = send(
        &app,
        post(
            "/v1/chat/completions",
            json!({"messages": hello()}).to_string(),
        ),
    );
    r.await.error(StatusCode::UNAUTHORIZED, "invalid_api_key");
    assert_eq!(send(&app, get("/health")).await.status, StatusCode::OK);
    assert_eq!(send(&app, get("/metrics")).await.status, StatusCode::OK);
}

// ---------------------------------------------------------------- chat

#[tokio::test]
async fn chat_reply_has_choices_usage_and_timings() {
    let (app, fake) = echo_app();
    let body = json!({
        "messages": [{"role": "system", "content": [{"type": "text", "text": "s"}]},
                     {"role": "user", "content": "hi"}],
        "max_completion_tokens": 4, "seed": 11, "temperature": 0,
    });
    let r = chat(&app, body).await;
    assert_eq!(r.status, StatusCode::OK);
    let body = r.json();
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"]
        .as_str()
        .is_some_and(|id| id.starts_with("chatcmpl-")));
    assert_eq!(body["model"], "fake-model");
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], "<|sy");
    assert_eq!(choice["finish_reason"], "length");
    assert!(choice["logprobs"].is_null());
    assert_eq!(body["usage"]["completion_tokens"], 4);
    let prompt_tokens = body["usage"]["prompt_tokens"].as_u64().unwrap_or_default();
    assert_eq!(body["usage"]["total_tokens"], prompt_tokens + 4);
    assert_eq!(body["timings"]["prompt_ms"], 2.0);
    assert_eq!(body["timings"]["predicted_ms"], 3.0);
    assert_eq!(body["timings"]["queue_ms"], 1.0);
    let sent = &fake.submitted()[0];
    assert_eq!(sent.seed, 11);
    assert_eq!(sent.max_tokens, 4);
    assert_eq!(sent.sampling.temperature, 0.0);
    assert_eq!(sent.stop_token_ids, vec![server::engine::fake::EOS]);
    assert_eq!(sent.prompt[0], BOS);
}

// ------------------------------------------------- vLLM's and SGLang's extension fields

/// The fields vllm-router 0.1.17 adds to every chat request (read off the router's traffic).
fn as_vllm_router_sends_it(mut body: Value) -> Value {
    let added = json!({
        "logprobs": false, "no_stop_trim": false, "ignore_eos": false,
        "continue_final_message": false, "skip_special_tokens": true,
        "separate_reasoning": true, "stream_reasoning": true, "return_hidden_states": false,
        "include_reasoning": true,
    });
    for (k, v) in added.as_object().into_iter().flatten() {
        body[k] = v.clone();
    }
    body
}

#[tokio::test]
async fn requests_as_vllm_router_rewrites_them_are_served() {
    let (app, fake) = echo_app();
    let body = as_vllm_router_sends_it(json!({"messages": hello(), "max_tokens": 2}));
    assert_eq!(chat(&app, body).await.status, StatusCode::OK);
    // On completions it adds fewer, and `echo: false`.
    let body = json!({"prompt": "hi", "max_tokens": 2, "stream": false, "echo": false,
        "no_stop_trim": false, "ignore_eos": false, "skip_special_tokens": true,
        "return_hidden_states": false});
    let answer = send(&app, post("/v1/completions", body.to_string())).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json());
    let sent = fake.submitted();
    assert_eq!(sent.len(), 2);
    assert!(sent.iter().all(|r| r.output == OutputRules::default()));
}

#[tokio::test]
async fn vllm_output_fields_reach_the_engine() {
    let (app, fake) = echo_app();
    let body = json!({"messages": hello(), "max_tokens": 4, "min_tokens": 2,
        "stop_token_ids": [7, 7], "include_stop_str_in_output": true,
        "skip_special_tokens": false});
    assert_eq!(chat(&app, body).await.status, StatusCode::OK);
    let sent = fake.submitted().pop().expect("submitted");
    let expected = OutputRules {
        min_tokens: 2,
        include_stop_str: true,
        skip_special_tokens: false,
    };
    assert_eq!(sent.output, expected);
    // The model's end-of-sequence stays a stop token; the request's is added once.
    assert_eq!(sent.stop_token_ids, vec![fake.eos_token_ids()[0], 7]);
    let body = json!({"messages": hello(), "ignore_eos": true, "stop_token_ids": [7],
        "no_stop_trim": true});
    assert_eq!(chat(&app, body).await.status, StatusCode::OK);
    let sent = fake.submitted().pop().expect("submitted");
    assert_eq!(sent.stop_token_ids, vec![7]);
    assert!(sent.output.include_stop_str);
}

#[tokio::test]
async fn chat_rendering_fields_shape_the_prompt() {
    let (app, fake) = echo_app();
    let prompt_text = |fake: &FakeEngine| {
        let sent = fake.submitted().pop().expect("submitted");
        fake.detokenize(&sent.prompt).expect("bytes")
    };
    let messages = json!([{"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Once upon"}]);
    let body = json!({"messages": messages, "continue_final_message": true,
        "add_generation_prompt": false});
    assert_eq!(chat(&app, body).await.status, StatusCode::OK);
    assert!(prompt_text(&fake).ends_with("<|assistant|>Once upon"));
    let body = json!({"messages": hello(), "add_generation_prompt": false});
    assert_eq!(chat(&app, body).await.status, StatusCode::OK);
    assert!(prompt_text(&fake).ends_with("hello\n"));
    let body = json!({"messages": hello(), "chat_template_kwargs": {"enable_thinking": false}});
    assert_eq!(chat(&app, body).await.status, StatusCode::OK);
}

#[tokio::test]
async fn extension_values_that_are_not_implemented_or_contradict_are_400_naming_them() {
    let (app, _) = echo_app();
    for (extra, param) in [
        (json!({"use_beam_search": true}), "use_beam_search"),
        (
            json!({"return_hidden_states": true}),
            "return_hidden_states",
        ),
        (json!({"min_tokens": 9, "max_tokens": 4}), "min_tokens"),
        (json!({"stop_token_ids": [1_000_000]}), "stop_token_ids"),
        (
            json!({"chat_template_kwargs": {"messages": []}}),
            "chat_template_kwargs",
        ),
        (
            json!({"continue_final_message": true, "add_generation_prompt": true}),
            "continue_final_message",
        ),
        (
            json!({"include_stop_str_in_output": true, "no_stop_trim": false}),
            "no_stop_trim",
        ),
    ] {
        let mut body = json!({"messages": hello()});
        for (k, v) in extra.as_object().into_iter().flatten() {
            body[k] = v.clone();
        }
        let answer = chat(&app, body).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{extra}");
        assert_eq!(answer.json()["error"]["param"], param, "{}", answer.json());
    }
}

#[tokio::test]
async fn missing_seed_is_drawn_and_sent() {
    let (app, fake) = echo_app();
    for _ in 0..2 {
        chat(&app, json!({"messages": hello(), "max_tokens": 1})).await;
    }
    let seeds: Vec<_> = fake.submitted().iter().map(|r| r.seed).collect();
    assert_ne!(seeds[0], seeds[1], "two random seeds should differ");
}

#[tokio::test]
async fn n_greater_than_one_submits_n_requests_and_merges_choices() {
    let (app, fake) = echo_app();
    let r = chat(
        &app,
        json!({"messages": hello(), "n": 3, "seed": 40, "max_tokens": 2}),
    )
    .await;
    let body = r.json();
    let choices = body["choices"].as_array().cloned().unwrap_or_default();
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["finish_reason"], "length");
    }
    assert_eq!(body["usage"]["completion_tokens"], 6);
    assert_eq!(body["usage"]["prompt_tokens"], 28, "the prompt counts once");
    let rid = r.headers["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_string();
    let sent = fake.submitted();
    let ids: Vec<_> = sent.iter().map(|s| s.id.clone()).collect();
    assert_eq!(
        ids,
        (0..3).map(|i| format!("{rid}-{i}")).collect::<Vec<_>>()
    );
    let seeds: Vec<_> = sent.iter().map(|s| s.seed).collect();
    assert_eq!(seeds, [40, 41, 42]);
}

#[tokio::test]
async fn chat_logprobs_have_token_bytes_and_top() {
    let (app, _) = echo_app();
    let body = json!({"messages": hello(), "max_tokens": 2, "logprobs": true, "top_logprobs": 2});
    let body = chat(&app, body).await.json();
    let content = &body["choices"][0]["logprobs"]["content"];
    assert_eq!(content.as_array().map(Vec::len), Some(2));
    assert_eq!(content[0]["token"], "<");
    assert_eq!(content[0]["logprob"], f64::from(FAKE_LOGPROB));
    assert_eq!(content[0]["bytes"], json!([60]));
    assert_eq!(content[0]["top_logprobs"].as_array().map(Vec::len), Some(2));
}

#[tokio::test]
async fn chat_stream_is_framed_like_openai() {
    let (app, _) = echo_app();
    let body = json!({"messages": hello(), "max_tokens": 3, "stream": true,
                      "stream_options": {"include_usage": true}});
    let r = chat(&app, body).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers[header::CONTENT_TYPE]
        .to_str()
        .is_ok_and(|t| t.starts_with("text/event-stream")));
    let data = r.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("chunk JSON"))
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let ids: BTreeSet<_> = chunks.iter().map(|c| c["id"].to_string()).collect();
    assert_eq!(ids.len(), 1, "one id for all chunks");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "<|u");
    let last_choice = &chunks[chunks.len() - 2];
    assert_eq!(last_choice["choices"][0]["finish_reason"], "length");
    assert!(last_choice["usage"].is_null());
    assert!(last_choice["timings"]["predicted_ms"].is_number());
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 3);
    assert_eq!(usage["usage"]["prompt_tokens"], 28);
}

#[tokio::test]
async fn stream_without_include_usage_has_no_usage_chunk() {
    let (app, _) = echo_app();
    let body = json!({"messages": hello(), "max_tokens": 2, "stream": true, "n": 2});
    let data = chat(&app, body).await.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("chunk JSON"))
        .collect();
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
    let finished: BTreeSet<_> = chunks
        .iter()
        .filter(|c| !c["choices"][0]["finish_reason"].is_null())
        .map(|c| c["choices"][0]["index"].as_u64())
        .collect();
    assert_eq!(finished.len(), 2, "each choice finishes once");
}

#[tokio::test]
async fn engine_failure_mid_stream_is_an_error_event_then_done() {
    let (app, _) = fake_app(FakeConfig {
        fail_after: Some(2),
        ..FakeConfig::default()
    });
    let body = json!({"messages": hello(), "max_tokens": 5, "stream": true});
    let r = chat(&app, body).await;
    assert_eq!(r.status, StatusCode::OK);
    let data = r.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let error: Value = serde_json::from_str(&data[data.len() - 2]).expect("error JSON");
    assert_eq!(error["error"]["code"], "internal_error");
    assert_eq!(error["error"]["type"], "server_error");
    assert!(error["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("scripted failure")));
}

#[tokio::test]
async fn engine_failure_without_stream_is_a_json_error() {
    let (app, _) = fake_app(FakeConfig {
        reply: Reply::Script(vec![Event::Failed(EngineError::Internal("boom".into()))]),
        ..FakeConfig::default()
    });
    chat(&app, json!({"messages": hello()}))
        .await
        .error(StatusCode::INTERNAL_SERVER_ERROR, "internal_error");
}

#[tokio::test]
async fn scripted_trailing_text_and_stop_reason_reach_the_client() {
    let script = vec![
        Event::Token {
            id: 70,
            text: "ok".into(),
            logprob: None,
        },
        Event::Finished {
            reason: FinishReason::Stop,
            prompt_tokens: 3,
            completion_tokens: 1,
            trailing_text: "!".into(),
            timings: Timings::default(),
            cached_tokens: 0,
        },
    ];
    let (app, _) = fake_app(FakeConfig {
        reply: Reply::Script(script),
        ..FakeConfig::default()
    });
    let body = chat(&app, json!({"messages": hello(), "stop": "\n"}))
        .await
        .json();
    assert_eq!(body["choices"][0]["message"]["content"], "ok!");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn client_disconnect_cancels_the_request() {
    let (app, fake) = fake_app(FakeConfig {
        delay: Duration::from_millis(20),
        ..FakeConfig::default()
    });
    let body = json!({"messages": hello(), "max_tokens": 20, "stream": true});
    let response = app
        .clone()
        .oneshot(post("/v1/chat/completions", body.to_string()))
        .await
        .expect("infallible");
    let mut frames = response.into_body().into_data_stream();
    assert!(frames.next().await.is_some(), "first frame arrives");
    drop(frames);
    for _ in 0..2000 {
        if fake.cancelled() == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the engine never saw the cancellation");
}

#[tokio::test]
async fn abandoned_non_streaming_request_is_cancelled_and_counted_499() {
    let (app, fake) = fake_app(FakeConfig {
        delay: Duration::from_millis(20),
        ..FakeConfig::default()
    });
    let body = json!({"messages": hello(), "max_tokens": 20}).to_string();
    let call = app.clone().oneshot(post("/v1/chat/completions", body));
    assert!(tokio::time::timeout(Duration::from_millis(50), call)
        .await
        .is_err());
    for _ in 0..2000 {
        if fake.cancelled() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(fake.cancelled(), 1, "the engine saw the cancellation");
    let text = String::from_utf8_lossy(&send(&app, get("/metrics")).await.body).into_owned();
    assert!(text.contains("status=\"499\"} 1"), "{text}");
    assert!(text.contains("graft_requests_cancelled_total 1"), "{text}");
}

/// The /metrics page as text.
async fn metrics_text(app: &Router) -> String {
    String::from_utf8_lossy(&send(app, get("/metrics")).await.body).into_owned()
}

/// The sum of the samples of `name` whose label set contains `labels` (`""`: all of them).
fn metric_sum(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter_map(|line| line.rsplit_once(' '))
        .filter(|(series, _)| {
            let labelled = series.strip_prefix(name);
            labelled.is_some_and(|rest| rest.is_empty() || rest.starts_with('{'))
                && series.contains(labels)
        })
        .map(|(_, value)| value.parse::<f64>().expect("a sample value"))
        .sum()
}

/// Under overload every request ends as exactly one outcome: served (200), refused (429) or
/// left by its client (499), and only the last are cancellations. Pins the bug where a
/// refused request's tracker was dropped unfinished and counted as cancelled.
#[tokio::test]
async fn regression_429s_are_not_cancellations_and_outcomes_add_up_under_overload() {
    // Room for 6 sequences: 3 clients that leave, then 7 requests of 2 choices each, of
    // which one is served, one gets a choice in before the queue is full, and 6 are refused.
    let (app, fake) = fake_app(FakeConfig {
        capacity: Some(6),
        delay: Duration::from_millis(5),
        ..FakeConfig::default()
    });
    let leaving: Vec<_> = (0..3)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(
                async move { chat(&app, json!({"messages": hello(), "max_tokens": 50})).await },
            )
        })
        .collect();
    while fake.submitted().len() < 3 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for call in leaving {
        call.abort();
        assert!(call.await.is_err_and(|e| e.is_cancelled()));
    }
    let body = json!({"messages": hello(), "max_tokens": 2, "n": 2});
    let answers = futures::future::join_all((0..7).map(|_| chat(&app, body.clone()))).await;
    let count = |status| answers.iter().filter(|a| a.status == status).count();
    assert_eq!(count(StatusCode::OK), 1);
    assert_eq!(count(StatusCode::TOO_MANY_REQUESTS), 6);

    let text = metrics_text(&app).await;
    let total = |labels| metric_sum(&text, "graft_requests_total", labels);
    assert_eq!(total("route=\"/v1/chat/completions\""), 10.0, "{text}");
    assert_eq!(total("status=\"200\""), 1.0, "{text}");
    assert_eq!(total("status=\"429\""), 6.0, "{text}");
    assert_eq!(total("status=\"499\""), 3.0, "{text}");
    let cancelled = metric_sum(&text, "graft_requests_cancelled_total", "");
    assert_eq!(cancelled, 3.0, "only the clients that left: {text}");
}

/// When one choice fails, the request is answered with the error and its other choices are
/// dropped: the client did not leave, so nothing counts as cancelled.
#[tokio::test]
async fn regression_a_failed_choice_does_not_count_its_siblings_as_cancelled() {
    let (app, _) = fake_app(FakeConfig {
        fail_after: Some(1),
        ..FakeConfig::default()
    });
    let body = json!({"messages": hello(), "max_tokens": 5, "n": 3});
    chat(&app, body.clone())
        .await
        .error(StatusCode::INTERNAL_SERVER_ERROR, "internal_error");
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let r = chat(&app, streamed).await;
    assert_eq!(r.sse_data().last().map(String::as_str), Some("[DONE]"));
    let text = metrics_text(&app).await;
    let cancelled = metric_sum(&text, "graft_requests_cancelled_total", "");
    assert_eq!(cancelled, 0.0, "{text}");
}

// ---------------------------------------------------------------- completions

#[tokio::test]
async fn completions_echo_with_logprobs_and_zero_max_tokens_scores_the_prompt() {
    let (app, fake) = echo_app();
    let prompt: Vec<u32> = b"abc".iter().map(|&b| u32::from(b) + BYTE_OFFSET).collect();
    let body = json!({"prompt": prompt, "max_tokens": 0, "echo": true, "logprobs": 2,
                      "temperature": 0});
    let body = send(&app, post("/v1/completions", body.to_string()))
        .await
        .ok();
    assert_eq!(body["object"], "text_completion");
    assert!(body["id"]
        .as_str()
        .is_some_and(|id| id.starts_with("cmpl-")));
    let choice = &body["choices"][0];
    assert_eq!(choice["text"], "abc");
    assert_eq!(choice["finish_reason"], "length");
    let lp = &choice["logprobs"];
    assert_eq!(lp["tokens"], json!(["a", "b", "c"]));
    assert_eq!(lp["token_logprobs"][0], Value::Null);
    assert_eq!(lp["token_logprobs"][1], f64::from(FAKE_LOGPROB));
    assert_eq!(lp["top_logprobs"][0], Value::Null);
    assert_eq!(lp["top_logprobs"][2].as_object().map(|o| o.len()), Some(2));
    assert_eq!(lp["text_offset"], json!([0, 1, 2]));
    assert_eq!(body["usage"]["completion_tokens"], 0);
    let sent = &fake.submitted()[0];
    assert_eq!(
        sent.prompt, prompt,
        "token prompts are used as sent, no BOS"
    );
    assert_eq!(sent.prompt_logprobs, Some(2));
    assert_eq!(sent.max_tokens, 0);
}

#[tokio::test]
async fn completions_accepts_string_and_list_prompts() {
    let (app, fake) = echo_app();
    let body = json!({"prompt": "hey", "max_tokens": 2, "echo": true});
    let body = send(&app, post("/v1/completions", body.to_string()))
        .await
        .json();
    assert_eq!(body["choices"][0]["text"], "heyhe");
    assert!(body["choices"][0]["logprobs"].is_null());
    assert_eq!(fake.submitted()[0].prompt[0], BOS, "text prompts get BOS");
    let body = json!({"prompt": ["ab", "cd"], "max_tokens": 1, "n": 2, "logprobs": 0});
    let body = send(&app, post("/v1/completions", body.to_string()))
        .await
        .json();
    let texts: Vec<_> = body["choices"]
        .as_array()
        .map(|c| c.iter().map(|c| c["text"].clone()).collect())
        .unwrap_or_default();
    assert_eq!(texts, [json!("a"), json!("a"), json!("c"), json!("c")]);
    assert_eq!(body["choices"][3]["logprobs"]["tokens"], json!(["c"]));
    assert_eq!(
        body["usage"]["prompt_tokens"], 6,
        "each prompt counted once"
    );
}

#[tokio::test]
async fn completions_stream_echoes_then_generates() {
    let (app, _) = echo_app();
    let body = json!({"prompt": "xy", "max_tokens": 2, "echo": true, "stream": true,
                      "stream_options": {"include_usage": true}});
    let data = send(&app, post("/v1/completions", body.to_string()))
        .await
        .sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("chunk JSON"))
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, "xyxy");
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "length"
    );
    assert_eq!(chunks[chunks.len() - 1]["usage"]["completion_tokens"], 2);
}

#[tokio::test]
async fn completions_rejects_bad_prompts_and_suffix() {
    let (app, _) = echo_app();
    for (body, code, param) in [
        (json!({"prompt": [999999]}), "invalid_value", "prompt"),
        (json!({"prompt": []}), "invalid_value", "prompt"),
        (json!({"prompt": {"a": 1}}), "invalid_value", "prompt"),
        (
            json!({"prompt": "a", "suffix": "b"}),
            "unsupported_parameter",
            "suffix",
        ),
        (
            json!({"prompt": "a", "logprobs": 50}),
            "invalid_value",
            "logprobs",
        ),
    ] {
        let r = send(&app, post("/v1/completions", body.to_string())).await;
        let e = r.error(StatusCode::BAD_REQUEST, code);
        assert_eq!(e["param"], param, "{e}");
    }
}

// ---------------------------------------------------------------- tokenize, metrics

#[tokio::test]
async fn tokenize_and_detokenize_round_trip() {
    let (app, _) = echo_app();
    let body = json!({"prompt": "hi", "return_token_strs": true});
    let body = send(&app, post("/tokenize", body.to_string())).await.json();
    let h = u32::from(b'h') + BYTE_OFFSET;
    let i = u32::from(b'i') + BYTE_OFFSET;
    assert_eq!(body["tokens"], json!([BOS, h, i]));
    assert_eq!(body["count"], 3);
    assert_eq!(body["max_model_len"], 128);
    assert_eq!(body["token_strs"], json!(["<s>", "h", "i"]));
    let body = json!({"messages": hello()});
    let body = send(&app, post("/tokenize", body.to_string())).await.json();
    assert_eq!(body["count"], 28, "the same prompt the chat route builds");
    let body = json!({"tokens": [h, i]});
    let body = send(&app, post("/detokenize", body.to_string()))
        .await
        .json();
    assert_eq!(body["prompt"], "hi");
    let r = send(
        &app,
        post("/detokenize", json!({"tokens": [4000]}).to_string()),
    )
    .await;
    assert_eq!(
        r.error(StatusCode::BAD_REQUEST, "invalid_value")["param"],
        "tokens"
    );
    let r = send(&app, post("/tokenize", json!({}).to_string())).await;
    r.error(StatusCode::BAD_REQUEST, "invalid_value");
}

#[tokio::test]
async fn metrics_export_vllm_names_and_request_counts() {
    let (app, _) = fake_app(FakeConfig {
        stats: EngineStats {
            running: 3,
            waiting: 2,
            kv_used_bytes: 50,
            kv_capacity_bytes: 100,
        },
        ..FakeConfig::default()
    });
    chat(&app, json!({"messages": hello(), "max_tokens": 2})).await;
    let r = send(&app, get("/metrics")).await;
    assert_eq!(r.status, StatusCode::OK);
    let text = String::from_utf8_lossy(&r.body).into_owned();
    for expected in [
        "vllm:num_requests_running 3",
        "vllm:num_requests_waiting 2",
        "vllm:kv_cache_usage_perc 0.5",
        "graft_requests_running 3",
        "graft_kv_cache_usage_ratio 0.5",
        "graft_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 1",
        "graft_generation_tokens_total 2",
        "graft_time_to_first_token_seconds_bucket",
        "graft_inter_token_latency_seconds_bucket",
        "graft_request_queue_time_seconds_bucket",
        "graft_request_duration_seconds_bucket",
        "graft_prompt_tokens_total 28",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in\n{text}");
    }
}

// ---------------------------------------------------------------- configuration

/// config/default.toml lists exactly the options of `ServeConfig`: set ones with their
/// default value, unset-by-default ones as `# key = example` lines.
#[test]
fn default_toml_lists_every_option_with_its_default() {
    use clap::{Args, Command};
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/default.toml");
    let text = std::fs::read_to_string(path).expect("config/default.toml");
    let active: toml::Table = toml::from_str(&text).expect("valid TOML");
    let parsed: ServeConfig = toml::from_str(&text).expect("only known options");
    assert_eq!(parsed, ServeConfig::default(), "values equal the defaults");
    let defaults = toml::Table::try_from(ServeConfig::default()).expect("serializes");
    assert_eq!(
        active, defaults,
        "every option with a default is listed, with it"
    );
    let unset: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# "))
        .filter_map(|l| l.split_once(" = "))
        .map(|(key, _)| key.to_string())
        .filter(|key| key.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .collect();
    let listed: BTreeSet<String> = active.keys().cloned().chain(unset.clone()).collect();
    let fields: BTreeSet<String> = ServeConfig::augment_args(Command::new("t"))
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .collect();
    assert_eq!(
        listed, fields,
        "the file lists exactly the struct's options"
    );
    assert!(unset.iter().all(|k| !defaults.contains_key(k)), "{unset:?}");
}

/// Flags beat GRAFT_* variables, which beat the file, which beats the defaults. The only
/// test in this binary that touches the environment.
#[test]
fn precedence_is_flags_then_env_then_file_then_defaults() {
    use clap::{CommandFactory, FromArgMatches, Parser};
    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeConfig,
    }
    std::env::set_var("GRAFT_PORT", "9200");
    std::env::set_var("GRAFT_MAX_RUNNING", "3");
    let matches = Cli::command().get_matches_from(["t", "--max-running", "2"]);
    std::env::remove_var("GRAFT_PORT");
    std::env::remove_var("GRAFT_MAX_RUNNING");
    let cli = Cli::from_arg_matches(&matches).expect("parsed");
    let file: ServeConfig =
        toml::from_str("port = 9000\nmax_running = 4\nmax_waiting = 5").expect("file");
    let config = server::config::resolve(&cli.serve, &matches, Some(file)).expect("resolve");
    assert_eq!(config.max_running, 2, "flag beats env and file");
    assert_eq!(config.port, 9200, "env beats file");
    assert_eq!(config.max_waiting, 5, "file beats default");
    assert_eq!(config.prefill_chunk, 256, "default");
}
