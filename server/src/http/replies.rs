//! Response bodies as clients receive them: the typed counterpart of [`wire`](super::wire).
//!
//! Handlers build these structs and serialize them, so the OpenAPI document (`/openapi.json`,
//! see [`openapi`](super::openapi)) derives its response schemas from the very types that go
//! on the wire. Fields are declared in OpenAI's documentation order (`id`, `object`,
//! `created`, `model`, `choices`, `usage`). Streamed chunks are built as JSON values by
//! [`stream`](super::stream); their types here describe them for the document, and the
//! end-to-end tests check the streamed chunks against these schemas.

use plugins::{ChainEntry, PluginInfo, PluginKind};
use serde::Serialize;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::ToSchema;

use super::generate::{TimingsOut, Usage};
use super::logprobs::LegacyLogprobs;
use crate::tools::wire::ToolType;
use crate::tools::ToolCall;

/// The finish reason of a chat choice that ended in tool calls.
pub const TOOL_CALLS: &str = "tool_calls";

const DESCRIBED_REASONS: &str = "`stop`: a stop string or token was produced; `length`: \
    `max_tokens` was reached; `tool_calls` (chat): the reply ends with tool calls";

/// `finish_reason`'s schema: `names`, or also `null` while the choice is still generating
/// (stream chunks).
fn reason_schema(names: &[&'static str], nullable: bool) -> Schema {
    let mut values: Vec<Option<&str>> = names.iter().map(|n| Some(*n)).collect();
    let mut types = vec![Type::String];
    if nullable {
        values.push(None);
        types.push(Type::Null);
    }
    ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::SchemaType::from_iter(types))
        .enum_values(Some(values))
        .description(Some(match nullable {
            true => "`null` until the choice's final chunk",
            false => DESCRIBED_REASONS,
        }))
        .build()
        .into()
}

const COMPLETION_REASONS: [&str; 2] = ["stop", "length"];
const CHAT_REASONS: [&str; 3] = ["stop", "length", TOOL_CALLS];

fn finish_reason_schema() -> Schema {
    reason_schema(&COMPLETION_REASONS, false)
}

fn finish_reason_or_null_schema() -> Schema {
    reason_schema(&COMPLETION_REASONS, true)
}

fn chat_finish_reason_schema() -> Schema {
    reason_schema(&CHAT_REASONS, false)
}

fn chat_finish_reason_or_null_schema() -> Schema {
    reason_schema(&CHAT_REASONS, true)
}

/// A string that is always `value` (`object`, `role`, `owned_by`).
fn constant(value: &str) -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some([value]))
        .build()
        .into()
}

/// Named schemas for [`constant`]s (`schema_with` takes a function's path).
macro_rules! constants {
    ($($name:ident = $value:literal),* $(,)?) => {
        $(fn $name() -> Schema { constant($value) })*
    };
}

constants! {
    chat_completion = "chat.completion",
    chat_completion_chunk = "chat.completion.chunk",
    text_completion = "text_completion",
    list = "list",
    model = "model",
    graft = "graft",
    assistant = "assistant",
    ok = "ok",
    alive = "alive",
}

/// POST /v1/chat/completions without `stream`.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChatCompletion {
    /// `chatcmpl-` and the request id (the `x-request-id` header).
    pub id: String,
    #[schema(schema_with = chat_completion)]
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The model (or adapter) that answered.
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    pub timings: TimingsOut,
    /// The plug-in chain that ran, when one did.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<ChainEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    /// With `logprobs: true`; `null` otherwise.
    pub logprobs: Option<ChatLogprobs>,
    #[schema(schema_with = chat_finish_reason_schema)]
    pub finish_reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct AssistantMessage {
    #[schema(schema_with = assistant)]
    pub role: &'static str,
    /// `null` when the reply is tool calls only.
    pub content: Option<String>,
    /// The calls the reply makes, when tools were offered and it made some.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

/// Chat log-probs: one entry per generated token.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<ChatLogprob>,
}

/// One generated token, its log-prob and its `top_logprobs` most likely alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChatLogprob {
    pub token: String,
    /// Natural log; an impossible token is -9999 (JSON has no -infinity).
    pub logprob: f64,
    /// The token text's UTF-8 bytes.
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f64,
    pub bytes: Vec<u8>,
}

/// POST /v1/completions without `stream`.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct TextCompletion {
    /// `cmpl-` and the request id (the `x-request-id` header).
    pub id: String,
    #[schema(schema_with = text_completion)]
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    /// `n` choices per prompt, prompt by prompt.
    pub choices: Vec<TextChoice>,
    pub usage: Usage,
    pub timings: TimingsOut,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<ChainEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct TextChoice {
    pub index: usize,
    /// The completion, after the prompt's text with `echo`.
    pub text: String,
    /// With `logprobs`; `null` otherwise.
    pub logprobs: Option<LegacyLogprobs>,
    #[schema(schema_with = finish_reason_schema)]
    pub finish_reason: &'static str,
}

/// One `data:` event of a streamed chat completion (documentation of the SSE body).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    #[schema(schema_with = chat_completion_chunk)]
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    /// One choice per chunk; empty in the usage chunk.
    pub choices: Vec<ChatChunkChoice>,
    /// With `stream_options.include_usage`: `null` on every chunk but the last, which has no
    /// choices and carries the totals.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
    /// On a choice's final chunk (that choice's) and on the usage chunk (all choices').
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timings: Option<TimingsOut>,
    /// The plug-in chain that ran, on the stream's first chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugins: Option<Vec<ChainEntry>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    #[schema(schema_with = chat_finish_reason_or_null_schema)]
    pub finish_reason: Option<&'static str>,
}

/// What a chunk adds to the message: the role once, then content and tool calls.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = assistant)]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

/// A piece of a streamed tool call: the first piece of each call has its `id`, `type` and
/// `function.name`; later pieces carry more of `function.arguments` (`index` counts the
/// choice's calls).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<ToolType>,
    pub function: FunctionDelta,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct FunctionDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}

/// One `data:` event of a streamed legacy completion (documentation of the SSE body).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct TextCompletionChunk {
    pub id: String,
    #[schema(schema_with = text_completion)]
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<TextChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timings: Option<TimingsOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugins: Option<Vec<ChainEntry>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct TextChunkChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<LegacyLogprobs>,
    #[schema(schema_with = finish_reason_or_null_schema)]
    pub finish_reason: Option<&'static str>,
}

/// GET /v1/models: the served model and its LoRA adapters the caller may use.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ModelList {
    #[schema(schema_with = list)]
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ModelCard {
    /// What `model` takes in a request.
    pub id: String,
    #[schema(schema_with = model)]
    pub object: &'static str,
    pub created: u64,
    #[schema(schema_with = graft)]
    pub owned_by: &'static str,
    /// The base model's id, or an adapter's path.
    pub root: String,
    /// The base model for an adapter; `null` for the base model.
    pub parent: Option<String>,
    /// The context length (vLLM's field).
    pub max_model_len: usize,
}

/// GET /v1/plugins.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct PluginList {
    #[schema(schema_with = list)]
    pub object: &'static str,
    pub data: Vec<PluginInfo>,
    pub memory: PluginMemory,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, ToSchema)]
pub struct PluginMemory {
    /// Bytes of plug-in tensors in memory now.
    pub resident_bytes: usize,
    /// The most the registry holds before it evicts idle plug-ins.
    pub budget_bytes: usize,
}

/// DELETE /v1/plugins/{name}.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct PluginDeleted {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: PluginKind,
    pub deleted: bool,
}

/// POST /tokenize.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    /// Each token's text, with `return_token_strs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_strs: Option<Vec<String>>,
}

/// POST /detokenize.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

/// GET /health once the model is loaded.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Health {
    #[schema(schema_with = ok)]
    pub status: &'static str,
}

/// GET /live, always.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Live {
    #[schema(schema_with = alive)]
    pub status: &'static str,
}

/// One server-sent event of a streamed reply, as the `text/event-stream` content is parsed
/// into events: `data` holds a JSON chunk (`ChatCompletionChunk` or `TextCompletionChunk`), an
/// `ErrorBody` if generation fails half-way, or `[DONE]` last. Only documented: the stream is
/// written as text.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct SseEvent {
    pub data: String,
    /// Absent: the default `message`.
    pub event: Option<String>,
}

/// Every error reply, and the error event of a stream that fails half-way.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorObject,
}

/// OpenAI's error object; `type` and `code` come from one table (`ErrorKind::spec`).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ErrorObject {
    /// For people; may change between versions.
    pub message: String,
    /// OpenAI's error class, e.g. `invalid_request_error`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The request field the error concerns (`messages[0].content`), if any.
    pub param: Option<String>,
    /// For programs: stable, e.g. `context_length_exceeded`.
    pub code: &'static str,
}
