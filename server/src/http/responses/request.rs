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
    /// Tools are not supported: only an empty list.
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Vec<Value>>,
    /// `"auto"` or `"none"` (there are no tools to call).
    #[schema(value_type = Option<String>)]
    pub tool_choice: Option<Value>,
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
    /// `"message"` when given.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub role: Role,
    pub content: ItemContent,
    /// Present on items replayed from an earlier response's output.
    pub id: Option<String>,
    pub status: Option<String>,
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
    /// The messages of this request's input, as chat messages (`{"role", "content"}`).
    pub fn input_messages(&self) -> Result<Vec<Value>, ApiError> {
        match &self.input {
            Input::Text(text) => Ok(vec![json!({"role": "user", "content": text})]),
            Input::Items(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| message(i, item))
                .collect(),
        }
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
        serde_json::from_value(body).map_err(|e| ApiError::invalid("input", e.to_string()))
    }

    fn check_unsupported(&self) -> Result<(), ApiError> {
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::unsupported(
                "tools",
                "tools are not supported by this server",
            ));
        }
        let choice_ok = match &self.tool_choice {
            None | Some(Value::Null) => true,
            Some(Value::String(s)) => s == "auto" || s == "none",
            Some(_) => false,
        };
        if !choice_ok {
            return Err(ApiError::unsupported(
                "tool_choice",
                "there are no tools to call: `auto` or `none` only",
            ));
        }
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

/// One input item as a chat message.
fn message(i: usize, item: &InputItem) -> Result<Value, ApiError> {
    if item.kind.as_deref().is_some_and(|k| k != "message") {
        return Err(ApiError::unsupported(
            format!("input[{i}].type"),
            "only `message` items are supported",
        ));
    }
    let text = match &item.content {
        ItemContent::Text(text) => text.clone(),
        ItemContent::Parts(parts) => {
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
    Ok(json!({"role": item.role.template_name(), "content": text}))
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
