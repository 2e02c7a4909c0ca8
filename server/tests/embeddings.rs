//! Embeddings: through the real engine on the tiny seeded model, the vector is the normalised
//! mean of the model's own final hidden states (computed here without the engine), whatever
//! the chunking and whatever runs beside it; over HTTP (fake engine) the OpenAI shapes,
//! base64, and the 400s.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use axum::http::StatusCode;
use candle_core::quantized::GgmlDType;
use common::{post, send};
use models::LogitsWanted;
use serde_json::{json, Value};
use server::engine::fake::{FakeConfig, FakeEngine};
use server::engine::testing::{plain_request, tiny_char_id, tiny_loaded_model_as};
use server::engine::{Engine, EngineConfig, Event, GenerateRequest, RealEngine};
use server::http::{app, AppState, EngineSlot, HttpConfig};

fn ids(text: &str) -> Vec<u32> {
    text.chars().map(|c| tiny_char_id(c).unwrap()).collect()
}

fn embedding(engine: &RealEngine, prompt: Vec<u32>) -> Vec<f32> {
    let request = GenerateRequest {
        embed: true,
        max_tokens: 0,
        ..plain_request("e", prompt, 0)
    };
    let mut rx = engine.submit(request).unwrap();
    let mut found = None;
    while let Some(event) = rx.blocking_recv() {
        match event {
            Event::Embedding(v) => found = Some(v),
            Event::Token { .. } => panic!("an embedding request generated"),
            Event::Failed(e) => panic!("{e}"),
            _ => {}
        }
    }
    found.unwrap()
}

#[test]
fn an_embedding_is_the_normalised_mean_of_the_final_hidden_states() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = tiny_loaded_model_as(dir.path(), 29, GgmlDType::Q8_0).unwrap();
    let prompt = ids("the quick brown fox jumps");
    // The reference: one forward pass of the whole prompt, hidden states pooled here.
    let mut cache = loaded.model.new_cache();
    let hidden = models::testing::step(
        &loaded.model,
        &mut cache,
        &prompt,
        &[],
        LogitsWanted::Hidden,
    )
    .and_then(|h| Ok(h.to_vec2::<f32>()?))
    .unwrap();
    let mut mean = vec![0f64; hidden[0].len()];
    for row in &hidden {
        for (m, &x) in mean.iter_mut().zip(row) {
            *m += f64::from(x) / hidden.len() as f64;
        }
    }
    let norm = mean.iter().map(|x| x * x).sum::<f64>().sqrt();
    let want: Vec<f32> = mean.iter().map(|x| (x / norm) as f32).collect();

    // The engine prefills in chunks of 4, beside a generating request.
    let config = EngineConfig {
        prefill_chunk: 4,
        max_batch_tokens: 24,
        ..EngineConfig::default()
    };
    let engine = RealEngine::new(loaded, config).unwrap();
    let busy = engine.submit(plain_request("g", ids("hello"), 40)).unwrap();
    let got = embedding(&engine, prompt.clone());
    drop(busy);
    assert_eq!(got.len(), want.len());
    let diff = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-5, "max difference {diff}");
    let length = got.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((length - 1.0).abs() < 1e-5, "{length}");
    assert_ne!(got, embedding(&engine, ids("a different text")));
}

fn fake_app() -> axum::Router {
    let fake = Arc::new(FakeEngine::new(FakeConfig::default()));
    app(AppState::new(EngineSlot::ready(fake), HttpConfig::default()).unwrap())
}

async fn embed(app: &axum::Router, body: Value) -> common::Answer {
    send(app, post("/v1/embeddings", body.to_string())).await
}

fn from_base64(text: &str) -> Vec<f32> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            _ => 63,
        }
    };
    let mut bytes = Vec::new();
    for quad in text.as_bytes().chunks(4) {
        let pad = quad.iter().filter(|&&c| c == b'=').count();
        let n = quad.iter().fold(0u32, |n, &c| {
            (n << 6) | if c == b'=' { 0 } else { value(c) }
        });
        bytes.extend(&[(n >> 16) as u8, (n >> 8) as u8, n as u8][..3 - pad]);
    }
    bytes
        .chunks(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[tokio::test]
async fn embeddings_come_back_in_openais_shape_as_floats_or_base64() {
    let app = fake_app();
    let body = embed(&app, json!({"input": ["one text", "another"]}))
        .await
        .ok();
    assert_eq!(body["object"], "list");
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(
        (data[1]["object"].as_str(), data[1]["index"].as_u64()),
        (Some("embedding"), Some(1))
    );
    let floats: Vec<f32> = serde_json::from_value(data[0]["embedding"].clone()).unwrap();
    assert_eq!(floats.len(), server::engine::fake::FAKE_HIDDEN);
    assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    let b64 = embed(
        &app,
        json!({"input": "one text", "encoding_format": "base64"}),
    )
    .await
    .ok();
    assert_eq!(
        from_base64(b64["data"][0]["embedding"].as_str().unwrap()),
        floats
    );
}

#[tokio::test]
async fn bad_embedding_requests_are_400s_naming_the_field() {
    let app = fake_app();
    for (body, param) in [
        (json!({"input": "x", "dimensions": 3}), "dimensions"),
        (json!({"input": ""}), "input"),
        (json!({"input": []}), "input"),
        (json!({"input": [999999]}), "input"),
    ] {
        let r = embed(&app, body.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        assert!(r.json()["error"]["message"].is_string(), "{body}");
        assert_eq!(r.json()["error"]["param"], param, "{body}");
    }
    let r = embed(&app, json!({"input": "x", "encoding_format": "int8"})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}
