#![allow(clippy::unwrap_used)]

use serde_json::json;

use super::request::ResponsesRequest;

fn req(body: serde_json::Value) -> ResponsesRequest {
    serde_json::from_value(body).unwrap()
}

#[test]
fn input_instructions_and_history_become_chat_messages_in_order() {
    let r = req(json!({
        "input": [
            {"role": "user", "content": "hi"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hello", "annotations": []}]},
            {"role": "user", "content": [{"type": "input_text", "text": "and "}, {"type": "input_text", "text": "you?"}]}
        ],
        "instructions": "be brief",
        "max_output_tokens": 7,
        "temperature": 0.5
    }));
    let input = r.input_messages().unwrap();
    let history = vec![json!({"role": "user", "content": "earlier"})];
    let chat = r.as_chat(&history, &input).unwrap();
    let roles: Vec<_> = chat
        .messages
        .iter()
        .map(|m| m.role.template_name())
        .collect();
    assert_eq!(roles, ["system", "user", "user", "assistant", "user"]);
    assert_eq!(chat.max_tokens, Some(7));
    assert_eq!(chat.temperature, Some(0.5));
    assert_eq!(input[2]["content"], "and you?");
    assert_eq!(
        req(json!({"input": "x"})).input_messages().unwrap(),
        [json!({"role": "user", "content": "x"})]
    );
}

#[test]
fn text_format_becomes_the_response_format() {
    let r = req(
        json!({"input": "x", "text": {"format": {"type": "json_schema", "name": "n", "strict": true, "schema": {"type": "object"}}}}),
    );
    let chat = r.as_chat(&[], &r.input_messages().unwrap()).unwrap();
    let schema = chat.response_format.and_then(|f| f.schema()).unwrap();
    assert_eq!(schema, json!({"type": "object"}));
}

#[test]
fn what_is_not_supported_is_refused_by_name() {
    let cases = [
        (
            json!({"input": "x", "tools": [{"type": "function", "name": "f"}]}),
            "tools",
        ),
        (
            json!({"input": "x", "tool_choice": "required"}),
            "tool_choice",
        ),
        (json!({"input": "x", "truncation": "auto"}), "truncation"),
        (
            json!({"input": "x", "text": {"verbosity": "low"}}),
            "text.verbosity",
        ),
        (
            json!({"input": "x", "max_output_tokens": 0}),
            "max_output_tokens",
        ),
        (
            json!({"input": "x", "text": {"format": {"type": "yaml"}}}),
            "text.format",
        ),
    ];
    for (body, param) in cases {
        let r = req(body.clone());
        let e = r.as_chat(&[], &r.input_messages().unwrap()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some(param), "{body}");
    }
    let image = req(
        json!({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}),
    );
    let e = image.input_messages().unwrap_err();
    assert_eq!(e.param.as_deref(), Some("input[0].content[0]"));
    let call =
        req(json!({"input": [{"type": "function_call_output", "role": "user", "content": "x"}]}));
    assert_eq!(
        call.input_messages().unwrap_err().param.as_deref(),
        Some("input[0].type")
    );
    assert!(serde_json::from_value::<ResponsesRequest>(json!({"input": "x", "seed": 1})).is_err());
}
