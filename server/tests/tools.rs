//! Tool calling over HTTP with the echo engine (which answers with its prompt): what the
//! prompt says of the tools, calls parsed from the reply into `message.tool_calls` and
//! streamed as `delta.tool_calls`, `finish_reason: "tool_calls"`, replayed calls and `tool`
//! results, and the 400s. Forced choices on the real model: tests/e2e/test_tools.py; their
//! grammars on a tiny vocabulary: `server::tools` unit tests.

use axum::http::StatusCode;
use axum::Router;
use serde_json::{json, Value};
use server::engine::fake::{FakeConfig, FakeEngine};
use server::http::{app, AppState, EngineSlot, HttpConfig};
use std::sync::Arc;

mod common;

use common::{chat, post, send};

/// An echo engine with room for the tools prompt, echoed whole (`max_tokens` defaults to the
/// rest of the context).
fn echo_app() -> Router {
    let mut config = FakeConfig::default();
    config.info.context_length = 8192;
    let fake = Arc::new(FakeEngine::new(config));
    let http = HttpConfig {
        max_tokens_default: 0,
        ..HttpConfig::default()
    };
    app(AppState::new(EngineSlot::ready(fake), http).expect("state"))
}

fn weather() -> Value {
    json!([{"type": "function", "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}
    }}])
}

/// A user message the echo engine answers with text and two calls.
fn calling_conversation() -> Value {
    json!([{"role": "user", "content":
        "Checking.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n</tool_call>"}])
}

#[tokio::test]
async fn calls_in_the_reply_become_tool_calls() {
    let app = echo_app();
    let body = json!({"messages": calling_conversation(), "tools": weather()});
    let reply = chat(&app, body).await.ok();
    let choice = &reply["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    let calls = choice["message"]["tool_calls"].as_array().expect("calls");
    assert_eq!(calls.len(), 2);
    for (call, city) in calls.iter().zip(["Oslo", "Rome"]) {
        assert_eq!(call["type"], "function");
        assert!(call["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("call_")));
        assert_eq!(call["function"]["name"], "get_weather");
        let args = format!("{{\"city\": \"{city}\"}}");
        assert_eq!(call["function"]["arguments"], args);
    }
    assert_ne!(calls[0]["id"], calls[1]["id"]);
    // The echo starts with the fallback prompt, which describes the tool.
    let content = choice["message"]["content"].as_str().expect("content");
    assert!(content.contains("# Tools") && content.contains("\"name\": \"get_weather\""));
    assert!(
        content.contains("<|user|>Checking.<|assistant|>"),
        "{content}"
    );
}

#[tokio::test]
async fn streamed_calls_add_up_to_the_same_reply() {
    let app = echo_app();
    let body = json!({"messages": calling_conversation(), "tools": weather()});
    let whole = chat(&app, body.clone()).await.ok();
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let data = chat(&app, streamed).await.sse_data();
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("chunk"))
        .collect();
    let deltas: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["delta"]).collect();
    let content: String = deltas
        .iter()
        .filter_map(|d| d["content"].as_str())
        .collect();
    let message = &whole["choices"][0]["message"];
    assert_eq!(content, message["content"].as_str().expect("content"));
    // Each call's first piece has its id, type and name; the rest add to its arguments.
    let mut calls: Vec<Value> = Vec::new();
    for piece in deltas
        .iter()
        .filter_map(|d| d["tool_calls"].as_array())
        .flatten()
    {
        let index = piece["index"].as_u64().expect("index") as usize;
        match piece.get("id") {
            Some(id) => {
                assert_eq!(index, calls.len(), "calls start in order");
                assert!(id.as_str().is_some_and(|id| id.starts_with("call_")));
                assert_eq!(piece["type"], "function");
                calls.push(piece["function"].clone());
            }
            None => {
                assert!(piece["function"].get("name").is_none());
                let arguments = piece["function"]["arguments"].as_str().expect("text");
                let call = &mut calls[index]["arguments"];
                *call = json!(format!("{}{arguments}", call.as_str().expect("text")));
            }
        }
    }
    let expected: Vec<&Value> = message["tool_calls"]
        .as_array()
        .expect("calls")
        .iter()
        .map(|c| &c["function"])
        .collect();
    assert_eq!(calls.iter().collect::<Vec<_>>(), expected);
    let pieces = deltas
        .iter()
        .filter(|d| d.get("tool_calls").is_some())
        .count();
    assert!(
        pieces > 2,
        "arguments stream in pieces, not whole: {pieces} chunks"
    );
    let last = &chunks[chunks.len() - 1]["choices"][0];
    assert_eq!(last["finish_reason"], "tool_calls");
}

#[tokio::test]
async fn without_tools_or_with_none_the_reply_is_text() {
    let app = echo_app();
    for extra in [
        json!({}),
        json!({"tools": weather(), "tool_choice": "none"}),
    ] {
        let mut body = json!({"messages": calling_conversation()});
        body.as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        let reply = chat(&app, body).await.ok();
        let choice = &reply["choices"][0];
        assert_eq!(choice["finish_reason"], "stop");
        assert!(choice["message"].get("tool_calls").is_none());
        let content = choice["message"]["content"].as_str().expect("content");
        assert!(content.contains("<tool_call>") && !content.contains("# Tools"));
    }
}

#[tokio::test]
async fn replayed_calls_and_results_are_written_into_the_prompt() {
    let app = echo_app();
    let messages = json!([
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 3}"}
    ]);
    let body = json!({"messages": messages, "tools": weather(), "tool_choice": "none"});
    let reply = chat(&app, body).await.ok();
    let message = &reply["choices"][0]["message"];
    // tool_choice none: no parsing, so the echo shows the prompt as the model saw it.
    let prompt = message["content"].as_str().expect("content");
    let call = "<|assistant|><tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>";
    assert!(prompt.contains(call), "{prompt}");
    assert!(prompt.contains("<|user|><tool_response>\n{\"temp\": 3}\n</tool_response>"));
}

#[tokio::test]
async fn replayed_arguments_that_are_not_json_are_written_as_they_were() {
    let app = echo_app();
    let messages = json!([
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}}\n</tool_"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3 C"}
    ]);
    let body = json!({"messages": messages, "tools": weather(), "tool_choice": "none"});
    let reply = chat(&app, body).await.ok();
    let prompt = reply["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    let call = "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_}";
    assert!(prompt.contains(call), "{prompt}");
}

#[tokio::test]
async fn bad_tools_are_400s_naming_the_field() {
    let app = echo_app();
    let named = |name: &str| json!({"type": "function", "function": {"name": name}});
    let cases = [
        (
            json!({"tools": weather(), "tool_choice": named("nope")}),
            "tool_choice",
        ),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (json!({"tools": [named("a b")]}), "tools[0].function.name"),
        (
            json!({"tools": [named("f"), named("f")]}),
            "tools[1].function.name",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x", "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}),
            "messages[0].tool_calls",
        ),
    ];
    for (fields, param) in cases {
        let mut body = json!({"messages": [{"role": "user", "content": "hi"}]});
        body.as_object_mut()
            .expect("object")
            .extend(fields.as_object().expect("object").clone());
        let e = chat(&app, body)
            .await
            .error(StatusCode::BAD_REQUEST, "invalid_value");
        assert_eq!(e["param"], param, "{e}");
    }
    // Forcing a call needs constrained decoding, which the echo engine lacks.
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "tools": weather(),
        "tool_choice": "required"});
    let e = chat(&app, body)
        .await
        .error(StatusCode::BAD_REQUEST, "unsupported_parameter");
    assert_eq!(e["param"], "tool_choice");
}

async fn respond(app: &Router, body: Value) -> common::Answer {
    send(app, post("/v1/responses", body.to_string())).await
}

#[tokio::test]
async fn responses_return_calls_as_items_and_take_their_outputs_back() {
    let app = echo_app();
    let tools = json!([{"type": "function", "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]);
    let input = calling_conversation()[0]["content"].clone();
    let reply = respond(&app, json!({"input": input, "tools": tools}))
        .await
        .ok();
    let output = reply["output"].as_array().expect("output");
    assert_eq!(output.len(), 3, "the message, then two calls");
    assert_eq!(output[0]["type"], "message");
    for (item, city) in output[1..].iter().zip(["Oslo", "Rome"]) {
        assert_eq!(item["type"], "function_call");
        assert_eq!(item["name"], "get_weather");
        assert_eq!(item["arguments"], format!("{{\"city\": \"{city}\"}}"));
        assert!(item["call_id"]
            .as_str()
            .is_some_and(|c| c.starts_with("call_")));
    }
    assert_eq!(reply["tools"], tools);

    let streamed = respond(
        &app,
        json!({"input": input, "tools": tools, "stream": true}),
    )
    .await
    .sse_data();
    let events: Vec<Value> = streamed
        .iter()
        .filter(|d| d.as_str() != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("event"))
        .collect();
    let done: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "response.function_call_arguments.done")
        .collect();
    assert_eq!(done.len(), 2);
    let last = &events[events.len() - 1];
    assert_eq!(last["type"], "response.completed");
    let final_output = &last["response"]["output"];
    assert_eq!(final_output[2]["arguments"], done[1]["arguments"]);
    assert_eq!(
        final_output[0]["content"][0]["text"],
        output[0]["content"][0]["text"]
    );

    // The next turn answers the first call; the echo shows the prompt the model would see.
    let call_id = &output[1]["call_id"];
    let next = json!({"previous_response_id": reply["id"], "tools": tools, "tool_choice": "none",
        "input": [{"type": "function_call_output", "call_id": call_id, "output": "3 C"}]});
    let answer = respond(&app, next).await.ok();
    let prompt = answer["output"][0]["content"][0]["text"]
        .as_str()
        .expect("text");
    let call = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n</tool_call>";
    assert!(prompt.contains(call), "{prompt}");
    assert!(
        prompt.contains("<|user|><tool_response>\n3 C\n</tool_response>"),
        "{prompt}"
    );
}
