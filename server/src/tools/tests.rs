#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use models::chat_template::ChatTemplate;
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::*;
use crate::engine::testing::{tiny_tokenizer_with_newline, TINY_EOS, TINY_VOCAB};
use crate::structured::{Constraint, Grammars};

const QWEN2_5: &str = include_str!("fixtures/qwen2_5.jinja");
const SMOLLM2: &str = include_str!("fixtures/smollm2.jinja");

fn tools() -> Vec<Tool> {
    serde_json::from_value(json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 8},
                    "unit": {"enum": ["c", "f"]}
                },
                "required": ["city", "unit"],
                "additionalProperties": false
            }
        }},
        {"type": "function", "function": {"name": "now"}}
    ]))
    .unwrap()
}

fn plan(choice: serde_json::Value, parallel: Option<bool>) -> Result<ToolPlan, ToolError> {
    let choice: ToolChoice = serde_json::from_value(choice).unwrap();
    ToolPlan::new(tools(), Some(&choice), parallel, ToolCallParser::Hermes)
}

#[test]
fn choices_default_as_openai_and_bad_ones_name_the_field() {
    let auto = ToolPlan::new(tools(), None, None, ToolCallParser::Hermes).unwrap();
    assert_eq!(auto.offered().len(), 2);
    assert_eq!(auto.grammar(None), None, "auto with text is unconstrained");
    let none = plan(json!("none"), None).unwrap();
    assert!(none.offered().is_empty() && none.parser().is_none());
    let e = plan(
        json!({"type": "function", "function": {"name": "nope"}}),
        None,
    )
    .unwrap_err();
    assert_eq!(e.param, "tool_choice");
    let e = ToolPlan::new(
        Vec::new(),
        Some(&ToolChoice::Mode(ToolMode::Required)),
        None,
        ToolCallParser::Hermes,
    )
    .unwrap_err();
    assert_eq!(e.param, "tool_choice");
    let mut twice = tools();
    twice.push(twice[0].clone());
    let e = ToolPlan::new(twice, None, None, ToolCallParser::Hermes).unwrap_err();
    assert_eq!(e.param, "tools[2].function.name");
    let mut spaced = tools();
    spaced[1].function.name = "what time".into();
    let e = ToolPlan::new(spaced, None, None, ToolCallParser::Hermes).unwrap_err();
    assert_eq!(e.param, "tools[1].function.name");
}

/// A conversation with every kind of tool message: a call with text, parallel calls without
/// (`content: null` arrives as ""), two results in a row.
fn conversation() -> Vec<ChatMessage> {
    let call = |name: &str, arguments: serde_json::Value| json!({"id": "call_1", "type": "function", "function": {"name": name, "arguments": arguments}});
    let mut calling = ChatMessage::text("assistant", "Let me check.");
    calling.tool_calls = Some(vec![call(
        "get_weather",
        json!({"city": "Paris", "unit": "c"}),
    )]);
    let mut parallel = ChatMessage::text("assistant", "");
    parallel.tool_calls = Some(vec![
        call("now", json!({})),
        call("get_weather", json!({"city": "Oslo", "unit": "c"})),
    ]);
    let result = |content: &str| {
        let mut m = ChatMessage::text("tool", content);
        m.tool_call_id = Some("call_1".into());
        m
    };
    vec![
        ChatMessage::text("system", "You are terse."),
        ChatMessage::text("user", "Weather in Paris?"),
        calling,
        result("{\"temp\": 21}"),
        ChatMessage::text("assistant", "21 C."),
        ChatMessage::text("user", "And Oslo, and the time?"),
        parallel,
        result("12:00"),
        result("{\"temp\": 3}"),
    ]
}

#[test]
fn the_fallback_prompt_reads_as_a_hermes_template_writes_it() {
    let qwen = ChatTemplate::new(QWEN2_5, None, None).unwrap();
    let smollm = ChatTemplate::new(SMOLLM2, None, None).unwrap();
    assert!(qwen.renders_tools());
    assert!(!smollm.renders_tools());
    let plan = ToolPlan::new(tools(), None, None, ToolCallParser::Hermes).unwrap();
    let tools = plan.template_tools();
    let native = qwen.render(&conversation(), true, tools.as_ref()).unwrap();
    let fallback = smollm
        .render(&plan.prompt_messages(conversation(), false), true, None)
        .unwrap();
    assert_eq!(fallback, native);
    assert!(fallback
        .contains("<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\""));
    // With tool_choice none the tools are not described, but the history still is.
    let none = ToolPlan::new(
        super::tests::tools(),
        Some(&ToolChoice::Mode(ToolMode::None)),
        None,
        ToolCallParser::Hermes,
    )
    .unwrap();
    let text = smollm
        .render(&none.prompt_messages(conversation(), false), true, None)
        .unwrap();
    assert!(!text.contains("<tools>") && text.contains("<tool_response>\n12:00\n</tool_response>"));
    assert!(
        text.contains("<|im_start|>assistant\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}")
    );
}

#[test]
fn hermes_bodies_keep_the_arguments_as_written() {
    let text = concat!(
        "<tool_call>\n{\"arguments\": {\"city\":  \"Nice\"}, \"name\": \"get_weather\"}\n</tool_call>\n",
        "<tool_call>\n{\"name\": \"now\", \"arguments\": \"x\"}\n</tool_call>\n",
        "<tool_call>{\"name\":\"a\\\"b\" , \"arguments\" :{\"k\": [1, {}]} }</tool_call>",
    );
    let (content, calls) = ToolCallParser::Hermes.parse(text);
    let call = |name: &str, arguments: &str| ParsedCall {
        name: name.into(),
        arguments: arguments.into(),
    };
    let expected = [
        call("get_weather", "{\"city\":  \"Nice\"}"),
        call("a\"b", "{\"k\": [1, {}]}"),
    ];
    assert_eq!(calls, expected);
    assert!(
        content.contains("\"arguments\": \"x\""),
        "not an object: stays text"
    );
}

#[test]
fn hermes_arguments_stream_holding_back_only_the_wrapper() {
    let mut s = ToolCallParser::Hermes.stream();
    let pieces = [
        "<tool_call>\n{\"name\": \"f\", ",
        "\"arguments\": {\"a\"",
        ": {\"b\": 1}",
        "}",
        "}\n</tool",
        "_call>",
    ];
    let sent: Vec<Vec<CallDelta>> = pieces.iter().map(|p| s.feed(p).calls).collect();
    let text = |d: &[CallDelta]| d.iter().map(|d| d.arguments.clone()).collect::<String>();
    assert!(sent[0].is_empty());
    assert_eq!(sent[1][0].name.as_deref(), Some("f"));
    let streamed: Vec<String> = sent.iter().map(|d| text(d)).collect();
    assert_eq!(streamed, ["", "{\"a\"", ": {\"b\": 1", "}", "}", ""]);
}

/// Samples the best allowed token of seeded random logits until the end token.
fn generate(constraint: &mut Constraint, seed: u64) -> String {
    let tokenizer = tiny_tokenizer_with_newline().unwrap();
    let vocab = TINY_VOCAB + 1;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut ids = Vec::new();
    for _ in 0..400 {
        let mut logits: Vec<f32> = (0..vocab).map(|_| rng.random::<f32>() * 4.0).collect();
        // Favour the end token, so that `many` grammars stop after a few calls.
        logits[TINY_EOS as usize] += 2.0;
        constraint.mask(&mut logits, &[TINY_EOS]).unwrap();
        let id = (0..vocab)
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .unwrap() as u32;
        if id == TINY_EOS {
            return tokenizer.decode(&ids, true).unwrap();
        }
        constraint.consume(id, &[TINY_EOS]).unwrap();
        ids.push(id);
    }
    panic!("no end in 400 tokens: {:?}", tokenizer.decode(&ids, true));
}

fn calls_of(text: &str) -> (String, Vec<ParsedCall>) {
    ToolCallParser::Hermes.parse(text)
}

#[test]
fn forced_choices_always_give_calls_that_parse_and_validate() {
    let tokenizer = Arc::new(tiny_tokenizer_with_newline().unwrap());
    let grammars = Grammars::new(tokenizer, TINY_VOCAB + 1).unwrap();
    let cases = [
        (json!("required"), Some(false), 1..=1),
        (json!("required"), None, 1..=usize::MAX),
        (
            json!({"type": "function", "function": {"name": "get_weather"}}),
            None,
            1..=1,
        ),
    ];
    for (choice, parallel, count) in cases {
        let grammar = plan(choice.clone(), parallel)
            .unwrap()
            .grammar(None)
            .unwrap();
        let mut several = false;
        for seed in 0..12 {
            let text = generate(&mut grammars.compile_lark(&grammar).unwrap(), seed);
            let (content, calls) = calls_of(&text);
            assert!(content.is_empty(), "{choice}: {text:?}");
            assert!(count.contains(&calls.len()), "{choice}: {text:?}");
            several |= calls.len() > 1;
            for call in &calls {
                let args: serde_json::Value = serde_json::from_str(&call.arguments).unwrap();
                match call.name.as_str() {
                    "get_weather" => {
                        assert!(
                            args["city"].as_str().unwrap().chars().count() <= 8,
                            "{text}"
                        );
                        assert!(args["unit"] == "c" || args["unit"] == "f", "{text}");
                    }
                    "now" => assert_eq!(args, json!({}), "{text}"),
                    other => panic!("called {other}"),
                }
                if choice.is_object() {
                    assert_eq!(call.name, "get_weather");
                }
            }
        }
        if *count.end() > 1 {
            assert!(
                several,
                "parallel calls never sampled: the grammar may forbid them"
            );
        }
    }
}

#[test]
fn auto_beside_a_json_format_answers_or_calls() {
    let tokenizer = Arc::new(tiny_tokenizer_with_newline().unwrap());
    let grammars = Grammars::new(tokenizer, TINY_VOCAB + 1).unwrap();
    let answer = json!({"type": "object", "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"], "additionalProperties": false});
    let grammar = plan(json!("auto"), None)
        .unwrap()
        .grammar(Some(&answer))
        .unwrap();
    let (mut answers, mut called) = (0, 0);
    for seed in 0..16 {
        let text = generate(&mut grammars.compile_lark(&grammar).unwrap(), seed);
        let (content, calls) = calls_of(&text);
        match calls.is_empty() {
            true => {
                let v: serde_json::Value = serde_json::from_str(&content).unwrap();
                assert!(v["ok"].is_boolean(), "{text}");
                answers += 1;
            }
            false => called += 1,
        }
    }
    assert!(
        answers > 0 && called > 0,
        "answers {answers}, calls {called}"
    );
}
