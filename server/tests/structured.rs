//! Structured outputs through the real engine on the tiny seeded model: a constrained row gives
//! JSON that fits its schema, alone or batched, and the rows beside it give exactly what they
//! give alone.

#![allow(clippy::unwrap_used)]

use candle_core::quantized::GgmlDType;
use models::sampling::SamplingParams;
use serde_json::{json, Value};
use server::engine::testing::{plain_request, tiny_char_id, tiny_loaded_model_as, TINY_EOS};
use server::engine::{Engine, EngineConfig, Event, EventReceiver, GenerateRequest, RealEngine};
use server::structured::ResponseFormat;

fn engine(dir: &std::path::Path) -> RealEngine {
    let loaded = tiny_loaded_model_as(dir, 23, GgmlDType::Q8_0).unwrap();
    RealEngine::new(loaded, EngineConfig::default()).unwrap()
}

fn ids(text: &str) -> Vec<u32> {
    text.chars().map(|c| tiny_char_id(c).unwrap()).collect()
}

fn sampled(prompt: &str, seed: u64) -> GenerateRequest {
    GenerateRequest {
        sampling: SamplingParams {
            temperature: 1.0,
            ..SamplingParams::default()
        },
        seed,
        stop_token_ids: vec![TINY_EOS],
        ..plain_request(&format!("r{seed}"), ids(prompt), 120)
    }
}

fn constrained(engine: &RealEngine, prompt: &str, seed: u64) -> GenerateRequest {
    let format: ResponseFormat = serde_json::from_value(json!({
        "type": "json_schema",
        "json_schema": {"name": "reading", "schema": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "celsius": {"type": "integer", "minimum": -40, "maximum": 50}
            },
            "required": ["city", "celsius"],
            "additionalProperties": false
        }}
    }))
    .unwrap();
    GenerateRequest {
        constraint: engine.grammars().unwrap().compile(&format).unwrap(),
        ..sampled(prompt, seed)
    }
}

/// The text and the finish reason.
fn text(mut rx: EventReceiver) -> (String, String) {
    let (mut out, mut reason) = (String::new(), String::new());
    while let Some(event) = rx.blocking_recv() {
        match event {
            Event::Token { text, .. } => out.push_str(&text),
            Event::Finished {
                reason: r,
                trailing_text,
                ..
            } => {
                out.push_str(&trailing_text);
                reason = r.as_str().to_string();
            }
            Event::Failed(e) => panic!("request failed: {e}"),
            Event::PromptLogprobs(_) | Event::Embedding(_) => {}
        }
    }
    (out, reason)
}

fn check(reading: &str) {
    let v: Value = serde_json::from_str(reading).unwrap_or_else(|e| panic!("{reading}: {e}"));
    assert!(
        v["city"].as_str().unwrap().chars().count() <= 8,
        "{reading}"
    );
    assert!(
        (-40..=50).contains(&v["celsius"].as_i64().unwrap()),
        "{reading}"
    );
    assert_eq!(v.as_object().unwrap().len(), 2, "{reading}");
}

#[test]
fn a_constrained_row_fits_its_schema_and_leaves_its_batch_alone() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    let prompts = ["the weather in", "today it is", "report:"];
    let plain: Vec<_> = (0..3)
        .map(|i| text(engine.submit(sampled(prompts[i], i as u64)).unwrap()))
        .collect();
    let json: Vec<_> = (0..3)
        .map(|i| {
            text(
                engine
                    .submit(constrained(&engine, prompts[i], 10 + i as u64))
                    .unwrap(),
            )
        })
        .collect();
    for (reading, reason) in &json {
        assert_eq!(reason, "stop", "{reading}");
        check(reading);
    }
    // All six at once: each row gives what it gave alone.
    let receivers: Vec<_> = (0..3)
        .flat_map(|i| {
            [
                engine.submit(sampled(prompts[i], i as u64)).unwrap(),
                engine
                    .submit(constrained(&engine, prompts[i], 10 + i as u64))
                    .unwrap(),
            ]
        })
        .collect();
    let together: Vec<_> = receivers.into_iter().map(text).collect();
    for i in 0..3 {
        assert_eq!(together[2 * i], plain[i], "plain row {i}");
        assert_eq!(together[2 * i + 1], json[i], "constrained row {i}");
    }
    assert!(plain
        .iter()
        .any(|(t, _)| serde_json::from_str::<Value>(t).is_err()));
}

#[test]
fn choices_each_follow_the_schema() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    let choices: Vec<_> = (0..3)
        .map(|i| constrained(&engine, "it is", 40 + i))
        .collect();
    for rx in engine.submit_choices(choices).unwrap() {
        let (reading, reason) = text(rx);
        assert_eq!(reason, "stop");
        check(&reading);
    }
}
