//! The body of POST /v1/responses as OpenAI clients send it (text in, text out), and its
//! translation into the chat request graft already serves.

use serde::Deserialize;
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

use plugins::PluginSpec;

use crate::http::error::ApiError;
use crate::http::extract::Screen;
use crate::http::wire::{ChatRequest, Role};

/// POST /v1/responses.
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResponsesRequest {
    pub model: Option<String>,
    /// A user message, or a list of messages (`{"role", "content"}`, optionally
    /// `"type": "message"`), content as a string or `input_text`/`output_text` parts.
    pub input: Input,
    /// A system message put before the conversation; not carried over to responses that
    /// continue this one through `previous_response_id`.
    pub instructions: Option<String>,
    /// Continue the conversation of a stored response (this key's own).
    pub previous_response_id: Option<String>,
    /// Keep this response so a later request can continue it (default true; kept in memory,
    /// the oldest dropped beyond the server's bound).
    pub store: Option<bool>,
    #[schema(minimum = 1)]
    pub max_output_tokens: Option<usize>,
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f32>,
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f32>,
    pub stream: Option<bool>,
    /// `{"format": {"type": "text" | "json_object" | "json_schema", ...}}`; a JSON schema is
    /// enforced as on chat's `response_format`.
    #[schema(value_type = Option<Object>)]
    pub text: Option<Map<String, Value>>,
    /// Echoed on the response.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Map<String, Value>>,
    pub user: Option<String>,
    /// Functions the model may call: `{"type": "function", "name", "description",
    /// "parameters", "strict"}` (other tool types are refused).
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Vec<Value>>,
    /// `"none"`, `"auto"`, `"required"` or `{"type": "function", "name": ...}`, as on chat.
    #[schema(value_type = Option<serde_json::Value>)]
    pub tool_choice: Option<Value>,
    /// Several calls in one response (default true).
    pub parallel_tool_calls: Option<bool>,
    /// `"disabled"` only: a conversation over the context is a 400, never truncated.
    pub truncation: Option<String>,
    /// The plug-in chain (graft's extension, as on chat).
    #[serde(default)]
    pub plugins: Vec<PluginSpec>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(untagged, expecting = "a string or a list of messages")]
pub enum Input {
    Text(String),
    Items(Vec<InputItem>),
}

#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InputItem {
    /// `"message"` (the default), `"function_call"` (a call replayed from an earlier
    /// response's output) or `"function_call_output"` (its result).
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// A message's.
    pub role: Option<Role>,
    pub content: Option<ItemContent>,
    /// Present on items replayed from an earlier response's output.
    pub id: Option<String>,
    pub status: Option<String>,
    /// A `function_call`'s or `function_call_output`'s: which call.
    pub call_id: Option<String>,
    /// A `function_call`'s function and its arguments (JSON text).
    pub name: Option<String>,
    pub arguments: Option<String>,
    /// A `function_call_output`'s result.
    pub output: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(untagged, expecting = "a string or a list of content parts")]
pub enum ItemContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
pub struct ContentPart {
    /// `input_text` or `output_text`; other parts (images, files) are refused.
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
    #[schema(value_type = Option<Vec<Object>>)]
    pub annotations: Option<Vec<Value>>,
}

/// Every field is the request's own: nothing to drop or refuse before parsing.
impl Screen for ResponsesRequest {}

impl ResponsesRequest {
    /// The messages of this request's input, as chat messages (`{"role", "content"}`, an
    /// assistant's `tool_calls`, `tool` results); consecutive function calls join the
    /// assistant message before them.
    pub fn input_messages(&self) -> Result<Vec<Value>, ApiError> {
        let items = match &self.input {
            Input::Text(text) => return Ok(vec![json!({"role": "user", "content": text})]),
            Input::Items(items) => items,
        };
        let mut messages: Vec<Value> = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            match item.kind.as_deref().unwrap_or("message") {
                "message" => messages.push(message(i, item)?),
                "function_call" => add_call(&mut messages, function_call(i, item)?),
                "function_call_output" => messages.push(json!({
                    "role": "tool",
                    "tool_call_id": required(&item.call_id, i, "call_id")?,
                    "content": required(&item.output, i, "output")?,
                })),
                _ => {
                    return Err(ApiError::unsupported(
                        format!("input[{i}].type"),
                        "only `message`, `function_call` and `function_call_output` items \
                         are supported",
                    ))
                }
            }
        }
        Ok(messages)
    }

    /// The chat request this response is served as: `instructions`, the stored conversation
    /// (`history`) and the input as messages, the sampling fields and the text format.
    pub fn as_chat(&self, history: &[Value], input: &[Value]) -> Result<ChatRequest, ApiError> {
        self.check_unsupported()?;
        if self.max_output_tokens == Some(0) {
            return Err(ApiError::invalid(
                "max_output_tokens",
                "max_output_tokens must be at least 1",
            ));
        }
        let mut messages: Vec<Value> = Vec::new();
        if let Some(instructions) = &self.instructions {
            messages.push(json!({"role": "system", "content": instructions}));
        }
        messages.extend(history.iter().cloned());
        messages.extend(input.iter().cloned());
        let mut body = json!({
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "user": self.user,
            "plugins": self.plugins,
        });
        if let Some(format) = self.text.as_ref().and_then(|t| t.get("format")) {
            body["response_format"] = response_format(format)?;
        }
        if let Some(tools) = &self.tools {
            body["tools"] = chat_tools(tools)?;
        }
        if let Some(choice) = &self.tool_choice {
            body["tool_choice"] = chat_tool_choice(choice)?;
        }
        if let Some(parallel) = self.parallel_tool_calls {
            body["parallel_tool_calls"] = json!(parallel);
        }
        serde_json::from_value(body).map_err(|e| ApiError::invalid("input", e.to_string()))
    }

    fn check_unsupported(&self) -> Result<(), ApiError> {
        if self.truncation.as_deref().is_some_and(|t| t != "disabled") {
            return Err(ApiError::unsupported(
                "truncation",
                "only `disabled`: an input over the context is a 400",
            ));
        }
        if let Some(key) = self
            .text
            .as_ref()
            .and_then(|t| t.keys().find(|k| *k != "format"))
        {
            return Err(ApiError::unsupported(
                format!("text.{key}"),
                format!("`text.{key}` is not supported"),
            ));
        }
        Ok(())
    }
}

/// A field an item of its type must have.
fn required<'a>(field: &'a Option<String>, i: usize, name: &str) -> Result<&'a str, ApiError> {
    field.as_deref().ok_or_else(|| {
        ApiError::invalid(
            format!("input[{i}].{name}"),
            format!("this item needs `{name}`"),
        )
    })
}

/// A replayed `function_call` item as a chat tool call.
fn function_call(i: usize, item: &InputItem) -> Result<Value, ApiError> {
    Ok(json!({
        "id": required(&item.call_id, i, "call_id")?,
        "type": "function",
        "function": {
            "name": required(&item.name, i, "name")?,
            "arguments": required(&item.arguments, i, "arguments")?,
        },
    }))
}

/// Adds `call` to the assistant message the conversation ends with, or to a new one.
fn add_call(messages: &mut Vec<Value>, call: Value) {
    match messages.last_mut().filter(|m| m["role"] == "assistant") {
        Some(last) => match last["tool_calls"].as_array_mut() {
            Some(calls) => calls.push(call),
            None => last["tool_calls"] = json!([call]),
        },
        None => messages.push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
    }
}

/// The Responses API's flat function tools (`{"type": "function", "name", ...}`) as chat's
/// (`{"type": "function", "function": {"name", ...}}`).
fn chat_tools(tools: &[Value]) -> Result<Value, ApiError> {
    let converted = tools.iter().enumerate().map(|(i, tool)| {
        let mut function = tool.as_object().cloned().unwrap_or_default();
        match function.remove("type") {
            Some(kind) if kind == "function" => {
                Ok(json!({"type": "function", "function": function}))
            }
            _ => Err(ApiError::unsupported(
                format!("tools[{i}].type"),
                "only `function` tools are supported",
            )),
        }
    });
    converted.collect::<Result<Vec<_>, _>>().map(Value::Array)
}

/// `{"type": "function", "name": ...}` as chat's named choice; the modes as they are.
fn chat_tool_choice(choice: &Value) -> Result<Value, ApiError> {
    match (choice.get("type"), choice.get("name")) {
        (Some(kind), Some(name)) if kind == "function" => {
            Ok(json!({"type": "function", "function": {"name": name}}))
        }
        _ if choice.is_string() => Ok(choice.clone()),
        _ => Err(ApiError::invalid(
            "tool_choice",
            "tool_choice is \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"name\": ...}",
        )),
    }
}

/// One input item as a chat message.
fn message(i: usize, item: &InputItem) -> Result<Value, ApiError> {
    let role = item
        .role
        .ok_or_else(|| ApiError::invalid(format!("input[{i}].role"), "a message needs a `role`"))?;
    let text = match item.content.as_ref() {
        None => {
            return Err(ApiError::invalid(
                format!("input[{i}].content"),
                "a message needs `content`",
            ))
        }
        Some(ItemContent::Text(text)) => text.clone(),
        Some(ItemContent::Parts(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                match (part.kind.as_str(), &part.text) {
                    ("input_text" | "output_text", Some(t)) => text.push_str(t),
                    _ => {
                        return Err(ApiError::unsupported(
                            format!("input[{i}].content[{j}]"),
                            format!(
                                "content parts of type `{}` are not supported (text only)",
                                part.kind
                            ),
                        ))
                    }
                }
            }
            text
        }
    };
    Ok(json!({"role": role.template_name(), "content": text}))
}

/// `text.format` (`{"type": "json_schema", "name", "schema", "strict"}`, flat as the Responses
/// API has it) as chat's `response_format` (`json_schema` nested).
fn response_format(format: &Value) -> Result<Value, ApiError> {
    let invalid = |m: &str| ApiError::invalid("text.format", m);
    let kind = format
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("text.format needs a `type`"))?;
    Ok(match kind {
        "text" | "json_object" => json!({"type": kind}),
        "json_schema" => {
            let mut schema = format.as_object().cloned().unwrap_or_default();
            schema.remove("type");
            json!({"type": "json_schema", "json_schema": schema})
        }
        other => return Err(invalid(&format!("unknown text.format type `{other}`"))),
    })
}
