//! The Hermes tool-call format (NousResearch's Hermes 2 Pro, Qwen2.5 and the models tuned on
//! them; vLLM's `hermes` parser): the tools as JSON lines inside `<tools></tools>` in the
//! system prompt, each call written as
//!
//! ```text
//! <tool_call>
//! {"name": "get_weather", "arguments": {"city": "Paris"}}
//! </tool_call>
//! ```
//!
//! and results sent back in a user turn, each inside `<tool_response></tool_response>`.
//!
//! The fallback prompt (for templates that ignore `tools`, such as SmolLM2's) uses Qwen2.5's
//! template's words and layout, so a conversation reads exactly as a Hermes-format template
//! would have written it (a test renders both and compares).

use models::chat_template::{python_json, ChatMessage};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::parse::{CallSyntax, ParsedCall};
use super::wire::Tool;

pub const SYNTAX: CallSyntax = CallSyntax {
    open: "<tool_call>",
    close: "</tool_call>",
    head,
    tail: '}',
    parse_body,
};

/// `{"name": "<name>", "arguments": ` and the arguments' opening brace: the name, and where
/// the arguments start. Whitespace is free between tokens; the name is a JSON string.
fn head(text: &str) -> Option<(String, usize)> {
    let rest = text.trim_start().strip_prefix('{')?;
    let rest = rest.trim_start().strip_prefix("\"name\"")?;
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let name_len = json_string_len(rest)?;
    let name: String = serde_json::from_str(&rest[..name_len]).ok()?;
    let rest = rest[name_len..].trim_start().strip_prefix(',')?;
    let rest = rest.trim_start().strip_prefix("\"arguments\"")?;
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    rest.starts_with('{')
        .then(|| (name, text.len() - rest.len()))
}

/// The length of the JSON string literal `text` starts with, if it is whole.
fn json_string_len(text: &str) -> Option<usize> {
    let mut chars = text.char_indices();
    if chars.next()?.1 != '"' {
        return None;
    }
    let mut escaped = false;
    for (i, c) in chars {
        match (escaped, c) {
            (true, _) => escaped = false,
            (false, '\\') => escaped = true,
            (false, '"') => return Some(i + 1),
            _ => {}
        }
    }
    None
}

/// The body of one `<tool_call>` block.
#[derive(Deserialize)]
struct CallBody<'a> {
    name: String,
    #[serde(borrow)]
    arguments: &'a RawValue,
}

/// `{"name": ..., "arguments": {...}}`; the arguments are kept as written.
fn parse_body(body: &str) -> Option<ParsedCall> {
    let call: CallBody = serde_json::from_str(body).ok()?;
    let arguments = call.arguments.get();
    arguments.starts_with('{').then(|| ParsedCall {
        name: call.name,
        arguments: arguments.to_string(),
    })
}

/// What the system prompt gains when tools are offered (after the operator's or client's
/// system message, if there is one).
pub fn tools_prompt(tools: &[Tool]) -> String {
    let mut text = String::from(
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
         You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
    );
    for tool in tools {
        text.push('\n');
        text.push_str(&python_json(
            &serde_json::to_value(tool).unwrap_or_default(),
        ));
    }
    text.push_str(
        "\n</tools>\n\nFor each function call, return a json object with function name and \
         arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n\
         {\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
    );
    text
}

/// One call as the model writes it; `arguments` is the arguments object, or the text a model
/// wrote that was not JSON (replayed as it was written).
pub fn call_text(name: &str, arguments: &Value) -> String {
    let arguments = match arguments {
        Value::String(raw) => raw.clone(),
        other => python_json(other),
    };
    format!(
        "<tool_call>\n{{\"name\": {}, \"arguments\": {arguments}}}\n</tool_call>",
        python_json(&Value::from(name))
    )
}

/// The messages with tool use spelled out in this format for a template that knows nothing
/// of tools: the tools prompt joins the system message (or becomes one), an assistant's
/// calls follow its text, and consecutive `tool` messages become one user turn.
pub fn fallback_messages(messages: Vec<ChatMessage>, offered: &[Tool]) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    if !offered.is_empty() {
        let tools = tools_prompt(offered);
        match messages.first().filter(|m| m.role == "system") {
            Some(system) => out.push(ChatMessage::text(
                "system",
                format!("{}\n\n{tools}", system.content),
            )),
            None => out.push(ChatMessage::text("system", tools)),
        }
    }
    let skip = usize::from(!out.is_empty() && messages.first().is_some_and(|m| m.role == "system"));
    let mut previous_was_tool = false;
    for message in messages.into_iter().skip(skip) {
        let is_tool = message.role == "tool";
        let response = format!("<tool_response>\n{}\n</tool_response>", message.content);
        match (is_tool, previous_was_tool, out.last_mut()) {
            (true, true, Some(turn)) => {
                turn.content.push('\n');
                turn.content.push_str(&response);
            }
            (true, _, _) => out.push(ChatMessage::text("user", response)),
            (false, _, _) => out.push(with_calls_in_text(message)),
        }
        previous_was_tool = is_tool;
    }
    out
}

/// An assistant message whose calls are written after its text.
fn with_calls_in_text(message: ChatMessage) -> ChatMessage {
    let Some(calls) = message.tool_calls.filter(|c| !c.is_empty()) else {
        return ChatMessage::text(message.role, message.content);
    };
    let mut parts: Vec<String> = Vec::with_capacity(calls.len() + 1);
    if !message.content.is_empty() {
        parts.push(message.content);
    }
    for call in &calls {
        let function = call.get("function").unwrap_or(call);
        let name = function.get("name").and_then(Value::as_str).unwrap_or("");
        let arguments = function.get("arguments").unwrap_or(&Value::Null);
        parts.push(call_text(name, arguments));
    }
    ChatMessage::text(message.role, parts.join("\n"))
}

/// The calls a forced `tool_choice` allows, as an llguidance Lark grammar: each call's
/// arguments follow its function's schema (`arguments` holds the `%json` schemas, in the
/// order of `names`). `many` allows several calls, one per line; `answer`, a JSON schema the
/// reply may follow instead of calling (a `response_format` beside `tool_choice: auto`).
pub fn grammar(names: &[&str], arguments: &[Value], many: bool, answer: Option<&Value>) -> String {
    let literal = |text: &str| serde_json::to_string(text).unwrap_or_default();
    let mut lines = vec![match answer {
        Some(_) => "start: answer | calls".to_string(),
        None => "start: calls".to_string(),
    }];
    lines.push(match many {
        true => "calls: call (\"\\n\" call)*".to_string(),
        false => "calls: call".to_string(),
    });
    let alternatives: Vec<String> = (0..names.len()).map(|i| format!("call_{i}")).collect();
    lines.push(format!("call: {}", alternatives.join(" | ")));
    for (i, (name, schema)) in names.iter().zip(arguments).enumerate() {
        let head = format!("<tool_call>\n{{\"name\": \"{name}\", \"arguments\": ");
        lines.push(format!(
            "call_{i}: {} arguments_{i} {}",
            literal(&head),
            literal("}\n</tool_call>")
        ));
        lines.push(format!("arguments_{i}: %json {schema}"));
    }
    if let Some(schema) = answer {
        lines.push(format!("answer: %json {schema}"));
    }
    lines.join("\n")
}
