//! Tool definitions and tool choices as clients send them on chat completions (OpenAI's
//! `tools`, `tool_choice`, and an assistant message's replayed `tool_calls`).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// `type` of a tool, a named choice or a call: only functions exist.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ToolType {
    #[default]
    Function,
}

/// One entry of `tools`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: ToolType,
    pub function: FunctionDef,
}

/// A function the model may call.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FunctionDef {
    /// `^[a-zA-Z0-9_-]{1,64}$`, unique within `tools`.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON schema of the arguments object; omitted: the function takes no arguments.
    #[schema(value_type = Option<Object>)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Map<String, Value>>,
    /// Accepted for compatibility: arguments are enforced against `parameters` whenever the
    /// call is forced (`tool_choice` `required` or a named function), never under `auto`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// `tool_choice`: a mode, or one function by name.
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(
    untagged,
    expecting = "\"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}"
)]
pub enum ToolChoice {
    Mode(ToolMode),
    Named(NamedToolChoice),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ToolMode {
    /// Never call a tool (the tools are left out of the prompt).
    None,
    /// Answer in text or call tools, as the model decides.
    Auto,
    /// Call at least one tool (one with `parallel_tool_calls: false`).
    Required,
}

#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NamedToolChoice {
    #[serde(rename = "type")]
    pub kind: ToolType,
    pub function: FunctionName,
}

#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FunctionName {
    pub name: String,
}

/// A tool call as it appears in a reply's `message.tool_calls` and in an assistant message a
/// client sends back.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct ToolCall {
    /// `call_` and 24 random characters when graft made the call.
    pub id: String,
    #[serde(rename = "type", default)]
    pub kind: ToolType,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments object as JSON text, as the model wrote it.
    pub arguments: String,
}

impl ToolCall {
    /// A call graft parsed from the model's output, with a fresh id.
    pub fn new(name: String, arguments: String) -> Self {
        Self {
            id: new_call_id(),
            kind: ToolType::Function,
            function: FunctionCall { name, arguments },
        }
    }
}

/// `call_` and 24 alphanumeric characters, as OpenAI's ids look.
pub fn new_call_id() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    format!("call_{}", Alphanumeric.sample_string(&mut rand::rng(), 24))
}
