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
            json!({"input": "x", "tools": [{"type": "web_search"}]}),
            "tools[0].type",
        ),
        (
            json!({"input": "x", "tool_choice": {"type": "mcp"}}),
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
    for (item, param) in [
        (
            json!({"type": "function_call_output", "output": "x"}),
            "input[0].call_id",
        ),
        (
            json!({"type": "function_call", "call_id": "c", "name": "f"}),
            "input[0].arguments",
        ),
        (json!({"type": "reasoning", "summary": []}), "input[0].type"),
    ] {
        let Ok(r) = serde_json::from_value::<ResponsesRequest>(json!({"input": [item]})) else {
            assert_eq!(param, "input[0].type", "{item} does not parse");
            continue;
        };
        assert_eq!(
            r.input_messages().unwrap_err().param.as_deref(),
            Some(param)
        );
    }
    assert!(serde_json::from_value::<ResponsesRequest>(json!({"input": "x", "seed": 1})).is_err());
}

#[test]
fn function_tools_calls_and_results_become_chat_fields() {
    let r = req(json!({
        "input": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather",
             "arguments": "{\"city\": \"Oslo\"}", "id": "fc_1", "status": "completed"},
            {"type": "function_call", "call_id": "call_2", "name": "now", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "3 C"},
        ],
        "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"},
                   "strict": true}],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "parallel_tool_calls": false,
    }));
    let input = r.input_messages().unwrap();
    assert_eq!(input.len(), 3, "the two calls share one assistant message");
    assert_eq!(input[1]["tool_calls"][1]["function"]["name"], "now");
    assert_eq!(
        input[2],
        json!({"role": "tool", "tool_call_id": "call_1", "content": "3 C"})
    );
    let chat = r.as_chat(&[], &input).unwrap();
    let tools = chat.tools.unwrap();
    assert_eq!(tools[0].function.name, "get_weather");
    assert_eq!(tools[0].function.strict, Some(true));
    assert!(matches!(
        chat.tool_choice,
        Some(crate::tools::ToolChoice::Named(_))
    ));
    assert_eq!(chat.parallel_tool_calls, Some(false));
    assert_eq!(chat.messages[1].tool_calls.as_ref().map(Vec::len), Some(2));
}
