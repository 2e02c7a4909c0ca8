//! API keys, per-key permissions and limits, the request timeout and CORS, through the whole
//! router (`server::http::app`) driven with `tower::ServiceExt::oneshot` over the scripted
//! fake engine: 401/403/429 bodies and headers, the admin-only plug-in routes, the key label
//! on the request metrics, a generation cut off by `request_timeout` (and cancelled in the
//! engine), and a CORS preflight answered before authentication.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use futures::StreamExt;
use serde_json::{json, Value};
use server::engine::fake::{FakeConfig, FakeEngine};
use server::http::auth::KeyTable;
use server::http::cors::AllowedOrigins;
use server::http::{app, AppState, EngineSlot, HttpConfig};
use tower::ServiceExt;

mod common;

use common::{get, send, Answer};

const KEYS: &str = r#"
[[keys]]
name = "admin"
key = "sk-admin"
admin = true

[[keys]]
name = "alice"
key = "sk-alice"
models = ["fake-model"]
plugins = ["sql"]

[[keys]]
name = "other"
key = "sk-other"
models = ["another-model"]

[[keys]]
name = "rpm"
key = "sk-rpm"
requests_per_minute = 1

[[keys]]
name = "tpm"
key = "sk-tpm"
tokens_per_minute = 10

[[keys]]
name = "one"
key = "sk-one"
max_concurrent = 1
"#;

fn keyed_app(fake: FakeConfig, http: HttpConfig) -> (Router, Arc<FakeEngine>) {
    let fake = Arc::new(FakeEngine::new(fake));
    let http = HttpConfig {
        api_keys: KeyTable::parse(KEYS).expect("key file"),
        ..http
    };
    let state = AppState::new(EngineSlot::ready(fake.clone()), http).expect("state");
    (app(state), fake)
}

fn keyed() -> Router {
    keyed_app(FakeConfig::default(), HttpConfig::default()).0
}

fn request(method: Method, uri: &str, key: &str, body: Option<Value>) -> Request<Body> {
    let builder = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
        .header(header::CONTENT_TYPE, "application/json");
    let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
    builder.body(body).expect("request")
}

fn chat_body(extra: Value) -> Value {
    let mut body = json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2});
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    body
}

async fn chat_as(app: &Router, key: &str, extra: Value) -> Answer {
    let req = request(
        Method::POST,
        "/v1/chat/completions",
        key,
        Some(chat_body(extra)),
    );
    send(app, req).await
}

fn retry_after(answer: &Answer) -> u64 {
    answer.headers[header::RETRY_AFTER]
        .to_str()
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("Retry-After: {:?}", answer.headers))
}

// ---------------------------------------------------------------- authentication

#[tokio::test]
async fn bearer_scheme_is_matched_case_insensitively() {
    let app = keyed();
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let req = Request::get("/v1/models")
            .header(header::AUTHORIZATION, format!("{scheme} sk-admin"))
            .body(Body::empty())
            .expect("request");
        assert_eq!(send(&app, req).await.status, StatusCode::OK, "{scheme}");
    }
    let req = Request::get("/v1/models")
        .header(header::AUTHORIZATION, "Basic sk-admin")
        .body(Body::empty())
        .expect("request");
    send(&app, req)
        .await
        .error(StatusCode::UNAUTHORIZED, "invalid_api_key");
}

// ---------------------------------------------------------------- permissions

#[tokio::test]
async fn a_model_outside_the_keys_list_is_403_naming_model() {
    let app = keyed();
    let e = chat_as(&app, "sk-alice", json!({"model": "other"}))
        .await
        .error(StatusCode::FORBIDDEN, "model_not_allowed");
    assert_eq!(e["type"], "permission_error");
    assert_eq!(e["param"], "model");
    assert!(e["message"].as_str().is_some_and(|m| m.contains("`alice`")));
    let ok = chat_as(&app, "sk-alice", json!({"model": "fake-model"})).await;
    assert_eq!(ok.status, StatusCode::OK);
    // An unrestricted key asking for an unknown model still gets the 404.
    chat_as(&app, "sk-admin", json!({"model": "other"}))
        .await
        .error(StatusCode::NOT_FOUND, "model_not_found");
}

#[tokio::test]
async fn a_plugin_outside_the_keys_list_is_403_naming_the_entry() {
    let app = keyed();
    let plugins =
        json!({"plugins": [{"type": "lora", "name": "sql"}, {"type": "lora", "name": "x"}]});
    let e = chat_as(&app, "sk-alice", plugins)
        .await
        .error(StatusCode::FORBIDDEN, "plugin_not_allowed");
    assert_eq!(e["param"], "plugins[1]");
    let req = request(
        Method::POST,
        "/v1/completions",
        "sk-alice",
        Some(json!({"prompt": "a", "plugins": [{"type": "lora", "name": "x"}]})),
    );
    send(&app, req)
        .await
        .error(StatusCode::FORBIDDEN, "plugin_not_allowed");
}

#[tokio::test]
async fn models_list_shows_only_the_keys_models() {
    let app = keyed();
    let alice = send(&app, request(Method::GET, "/v1/models", "sk-alice", None))
        .await
        .ok();
    assert_eq!(alice["data"][0]["id"], "fake-model");
    let elsewhere = send(&app, request(Method::GET, "/v1/models", "sk-other", None))
        .await
        .ok();
    assert_eq!(elsewhere["data"], json!([]), "{elsewhere}");
}

#[tokio::test]
async fn only_admin_keys_load_or_unload_plugins_and_every_key_lists_them() {
    let app = keyed();
    let load = json!({"type": "lora", "name": "x", "path": "x"});
    let e = send(
        &app,
        request(Method::POST, "/v1/plugins", "sk-alice", Some(load.clone())),
    )
    .await
    .error(StatusCode::FORBIDDEN, "admin_required");
    assert_eq!(e["type"], "permission_error");
    send(
        &app,
        request(Method::DELETE, "/v1/plugins/x", "sk-alice", None),
    )
    .await
    .error(StatusCode::FORBIDDEN, "admin_required");
    // Past the admin check the fake app has no registry: 503, not 403.
    for req in [
        request(Method::POST, "/v1/plugins", "sk-admin", Some(load)),
        request(Method::DELETE, "/v1/plugins/x", "sk-admin", None),
        request(Method::GET, "/v1/plugins", "sk-alice", None),
    ] {
        send(&app, req)
            .await
            .error(StatusCode::SERVICE_UNAVAILABLE, "model_loading");
    }
}

// ---------------------------------------------------------------- limits

#[tokio::test]
async fn requests_per_minute_over_the_limit_is_429_rate_limit_exceeded() {
    let app = keyed();
    assert_eq!(
        chat_as(&app, "sk-rpm", json!({})).await.status,
        StatusCode::OK
    );
    let r = chat_as(&app, "sk-rpm", json!({})).await;
    let e = r.error(StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded");
    assert_eq!(e["type"], "rate_limit_error");
    let message = e["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("requests_per_minute limit of 1"),
        "{message}"
    );
    let wait = retry_after(&r);
    assert!((1..=60).contains(&wait), "{wait}");
    // Other keys are not affected.
    assert_eq!(
        chat_as(&app, "sk-admin", json!({})).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn tokens_per_minute_counts_prompt_and_generated_tokens() {
    let app = keyed();
    // 28 prompt tokens and 2 generated: 30 of a 10-token minute, 20 in debt.
    let body = chat_as(&app, "sk-tpm", json!({})).await.ok();
    assert_eq!(body["usage"]["total_tokens"], 30);
    let r = chat_as(&app, "sk-tpm", json!({})).await;
    let e = r.error(StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded");
    let message = e["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("tokens_per_minute limit of 10"),
        "{message}"
    );
    // 21 tokens at 1/6 per second to get back to one whole token.
    let wait = retry_after(&r);
    assert!((120..=126).contains(&wait), "{wait}");
}

#[tokio::test]
async fn max_concurrent_holds_a_slot_until_the_stream_ends() {
    let (app, _) = keyed_app(
        FakeConfig {
            delay: Duration::from_millis(20),
            ..FakeConfig::default()
        },
        HttpConfig::default(),
    );
    let first = app
        .clone()
        .oneshot(request(
            Method::POST,
            "/v1/chat/completions",
            "sk-one",
            Some(chat_body(json!({"stream": true, "max_tokens": 20}))),
        ))
        .await
        .expect("infallible");
    assert_eq!(first.status(), StatusCode::OK);
    let mut frames = first.into_body().into_data_stream();
    assert!(frames.next().await.is_some(), "the stream has begun");
    let r = chat_as(&app, "sk-one", json!({})).await;
    let e = r.error(StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded");
    assert!(e["message"]
        .as_str()
        .is_some_and(|m| m.contains("max_concurrent limit of 1")));
    assert_eq!(retry_after(&r), 1);
    drop(frames);
    assert_eq!(
        chat_as(&app, "sk-one", json!({})).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn the_overload_429_keeps_its_own_code() {
    let (app, _) = keyed_app(
        FakeConfig {
            queue_full: true,
            ..FakeConfig::default()
        },
        HttpConfig::default(),
    );
    chat_as(&app, "sk-admin", json!({}))
        .await
        .error(StatusCode::TOO_MANY_REQUESTS, "queue_full");
}

// ---------------------------------------------------------------- metrics

#[tokio::test]
async fn request_metrics_are_labelled_with_the_key_name() {
    let app = keyed();
    chat_as(&app, "sk-alice", json!({})).await.ok();
    chat_as(&app, "sk-alice", json!({"model": "other"})).await;
    chat_as(&app, "sk-nobody", json!({})).await;
    let text = String::from_utf8_lossy(&send(&app, get("/metrics")).await.body).into_owned();
    for line in [
        "graft_requests_total{route=\"/v1/chat/completions\",status=\"200\",key=\"alice\"} 1",
        "graft_requests_total{route=\"/v1/chat/completions\",status=\"403\",key=\"alice\"} 1",
        "graft_requests_total{route=\"/v1/chat/completions\",status=\"401\"} 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert!(!text.contains("sk-"), "no key in the metrics");
}

// ---------------------------------------------------------------- request timeout

fn slow_app() -> (Router, Arc<FakeEngine>) {
    let fake = Arc::new(FakeEngine::new(FakeConfig {
        delay: Duration::from_millis(50),
        ..FakeConfig::default()
    }));
    let http = HttpConfig {
        request_timeout: Some(Duration::from_millis(100)),
        ..HttpConfig::default()
    };
    let state = AppState::new(EngineSlot::ready(fake.clone()), http).expect("state");
    (app(state), fake)
}

async fn wait_for_cancellation(fake: &FakeEngine) {
    for _ in 0..2000 {
        if fake.cancelled() == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the engine never saw the cancellation");
}

#[tokio::test]
async fn a_generation_past_the_request_timeout_is_408_and_cancelled() {
    let (app, fake) = slow_app();
    let req = common::post(
        "/v1/chat/completions",
        chat_body(json!({"max_tokens": 20})).to_string(),
    );
    let e = send(&app, req)
        .await
        .error(StatusCode::REQUEST_TIMEOUT, "request_timeout");
    assert_eq!(e["type"], "timeout_error");
    assert!(e["message"]
        .as_str()
        .is_some_and(|m| m.contains("request_timeout")));
    wait_for_cancellation(&fake).await;
}

#[tokio::test]
async fn a_stream_past_the_request_timeout_ends_with_an_error_event_then_done() {
    let (app, fake) = slow_app();
    let req = common::post(
        "/v1/completions",
        json!({"prompt": "hello world", "max_tokens": 20, "stream": true}).to_string(),
    );
    let r = send(&app, req).await;
    assert_eq!(r.status, StatusCode::OK);
    let data = r.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let error: Value = serde_json::from_str(&data[data.len() - 2]).expect("error JSON");
    assert_eq!(error["error"]["code"], "request_timeout");
    wait_for_cancellation(&fake).await;
}

// ---------------------------------------------------------------- CORS

fn cors_app(origins: &[&str]) -> Router {
    let owned: Vec<String> = origins.iter().map(|o| o.to_string()).collect();
    let http = HttpConfig {
        allowed_origins: AllowedOrigins::parse(&owned).expect("origins"),
        ..HttpConfig::default()
    };
    keyed_app(FakeConfig::default(), http).0
}

fn preflight(origin: &str) -> Request<Body> {
    Request::builder()
        .method(Method::OPTIONS)
        .uri("/v1/chat/completions")
        .header(header::ORIGIN, origin)
        .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
        .header(
            header::ACCESS_CONTROL_REQUEST_HEADERS,
            "authorization,content-type,x-stainless-lang",
        )
        .body(Body::empty())
        .expect("request")
}

#[tokio::test]
async fn cors_preflight_is_answered_without_a_key() {
    let app = cors_app(&["https://app.example"]);
    let r = send(&app, preflight("https://app.example")).await;
    assert_eq!(r.status, StatusCode::OK);
    let h = |name: header::HeaderName| {
        r.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(
        h(header::ACCESS_CONTROL_ALLOW_ORIGIN),
        "https://app.example"
    );
    assert!(h(header::ACCESS_CONTROL_ALLOW_METHODS).contains("POST"));
    assert!(h(header::ACCESS_CONTROL_ALLOW_HEADERS).contains("authorization"));
    assert!(h(header::ACCESS_CONTROL_ALLOW_HEADERS).contains("x-stainless-lang"));
    // A real request from the page, 401 included, carries the header so the page can read it.
    let unauthorized = Request::get("/v1/models")
        .header(header::ORIGIN, "https://app.example")
        .body(Body::empty())
        .expect("request");
    let r = send(&app, unauthorized).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.headers[header::ACCESS_CONTROL_ALLOW_ORIGIN],
        "https://app.example"
    );
    let exposed = r.headers[header::ACCESS_CONTROL_EXPOSE_HEADERS]
        .to_str()
        .unwrap_or_default()
        .to_string();
    assert!(exposed.contains("retry-after"), "{exposed}");
}

#[tokio::test]
async fn other_origins_and_servers_without_origins_get_no_cors_headers() {
    let app = cors_app(&["https://app.example"]);
    let r = send(&app, preflight("https://evil.example")).await;
    assert!(!r.headers.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
    let app = cors_app(&[]);
    let r = send(&app, preflight("https://app.example")).await;
    assert!(!r.headers.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
    let any = cors_app(&["*"]);
    let r = send(&any, preflight("https://anyone.example")).await;
    assert_eq!(r.headers[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
}
