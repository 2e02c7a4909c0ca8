//! POST /v1/chat/completions: messages rendered with the model's chat template, tokenized,
//! validated into one [`GenerateRequest`](crate::engine::GenerateRequest) per choice, then
//! answered as one `chat.completion` or streamed as `chat.completion.chunk`s.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Value};

use super::auth::Caller;
use super::error::ApiError;
use super::extract::ApiJson;
use super::generate::{collect_all, submit_all, summarize, ChoiceTotals, GenToken, Outcome};
use super::images::{decode_all, first_image_part, text_only, VisionPrompt, IMAGE_MARKER};
use super::logprobs::{chat_entry, TokenNames};
use super::replies::{ChatChoice, ChatCompletion, ChatLogprobs, SseEvent};
use super::selection::{prepare_generation, Selection};
use super::state::{AppState, HttpConfig};
use super::stream::{sse_response, ChunkFormat, Envelope};
use super::tool_calls::{
    assistant_message, call_delta, finish_reason, prompt_text, tool_generation, tool_plan,
};
use super::validate::{chat_messages, fan_out, max_tokens, LogprobsWanted, PromptPlan};
use super::wire::ChatRequest;
use super::{unix_now, RequestId};
use crate::engine::{Engine, EngineError, FinishReason, GenerateRequest, TokenLogprob};
use crate::tools::{ToolCallParser, ToolCallStream, ToolPlan};
use models::chat_template::RenderOptions;

/// Create a chat completion
///
/// OpenAI's chat completions with vLLM's sampling extras and graft's `plugins` chain. With
/// `stream: true` the reply is server-sent events: `data: <ChatCompletionChunk>` events
/// (schema in components), a `data: <ErrorBody>` event if generation fails half-way, then
/// `data: [DONE]`.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    operation_id = "createChatCompletion",
    tag = "generation",
    request_body = ChatRequest,
    responses((status = 200, description = "The completion, or its chunks with `stream`", content(
        (ChatCompletion = "application/json"),
        (SseEvent = "text/event-stream"),
    ))),
)]
pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    ApiJson(req): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let deadline = state.deadline();
    let (engine, selection) =
        prepare_generation(&state, &caller, req.model.as_deref(), &req.plugins).await?;
    // A text-only model refuses images before any is fetched or decoded; for a vision model
    // every image is decoded and checked first, so a bad one gets its own error.
    if let (None, Some(part)) = (engine.vision(), first_image_part(&req.messages)) {
        return Err(text_only(engine.as_ref(), part));
    }
    let images = decode_all(&req.messages, &state.config.images).await?;
    let vision = VisionPrompt::new(engine.as_ref(), images)?;
    let tools = tool_plan(&req, &state.config)?;
    let mut requests = plan(
        &req,
        &tools,
        engine.as_ref(),
        &state.config,
        &request_id.0,
        &selection,
        vision.as_ref(),
    )?;
    // The vision tower runs only for a request that passed every cheap check.
    if let Some(v) = vision {
        v.encode(&mut requests).await?;
    }
    let parser = tools.parser();
    let n = req.n.unwrap_or(1);
    let logprobs = req.logprobs.unwrap_or(false);
    let names = TokenNames::from_flag(req.return_tokens_as_token_ids);
    let subs = submit_all(
        engine.as_ref(),
        requests,
        &state.metrics,
        caller.meter(),
        n,
        &selection.lora_names(),
    )?;
    let stream = req.stream.unwrap_or(false);
    let envelope = Envelope {
        id: format!("chatcmpl-{}", request_id.0),
        object: if stream {
            "chat.completion.chunk"
        } else {
            "chat.completion"
        },
        created: unix_now(),
        model: selection.model,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
        plugins: selection.chain.entries,
    };
    if stream {
        let format = ChatFormat {
            envelope,
            engine,
            logprobs,
            names,
            calls: parser.map(|p| (0..n).map(|_| p.stream()).collect()),
        };
        return Ok(sse_response(subs, format, n, deadline));
    }
    let outcomes = collect_all(subs, deadline).await?;
    let logprobs = logprobs.then_some(names);
    let reply = response(&envelope, engine.as_ref(), &outcomes, n, logprobs, parser);
    Ok(Json(reply).into_response())
}

/// Validates the request into one generate request per choice.
pub(super) fn plan(
    req: &ChatRequest,
    tools: &ToolPlan,
    engine: &dyn Engine,
    config: &HttpConfig,
    id: &str,
    selection: &Selection,
    vision: Option<&VisionPrompt>,
) -> Result<Vec<GenerateRequest>, ApiError> {
    let info = engine.info();
    let marker = engine.vision().map(|_| IMAGE_MARKER);
    let messages = chat_messages(&req.messages, marker)?;
    let wanted = LogprobsWanted {
        logprobs: req.logprobs.unwrap_or(false),
        top: req.top_logprobs.unwrap_or(0),
        top_param: "top_logprobs",
    };
    let gen = tool_generation(req, tools, wanted, engine)?;
    let mut text = prompt_text(engine, messages, tools, render_options(req)?)?;
    if let Some(v) = vision {
        text = v.expand(&text)?;
    }
    let tokens = engine.tokenize(&text, req.add_special_tokens.unwrap_or(true))?;
    if tokens.is_empty() {
        return Err(EngineError::EmptyPrompt.into());
    }
    let requested = match (req.max_completion_tokens, req.max_tokens) {
        (Some(m), _) => Some((m, "max_completion_tokens")),
        (None, Some(m)) => Some((m, "max_tokens")),
        (None, None) => None,
    };
    if let Some((0, param)) = requested {
        return Err(ApiError::invalid(
            param,
            format!("{param} must be at least 1"),
        ));
    }
    let max = max_tokens(
        requested,
        tokens.len(),
        info.context_length,
        config.max_tokens_default,
    )?;
    let prompt = PromptPlan {
        tokens,
        max_tokens: max,
    };
    fan_out(id, &[prompt], &gen, None, &selection.chain.calls)
}

/// The template variables a request may not set through `chat_template_kwargs`: the
/// renderer's own, which would silently win.
const RESERVED_TEMPLATE_VARIABLES: &[&str] = &[
    "messages",
    "tools",
    "add_generation_prompt",
    "bos_token",
    "eos_token",
];

/// vLLM's rendering fields: `add_generation_prompt` (default true), `continue_final_message`
/// (which leaves the last message open, so takes no generation prompt),
/// `chat_template_kwargs`.
fn render_options(req: &ChatRequest) -> Result<RenderOptions<'_>, ApiError> {
    let continue_final_message = req.continue_final_message.unwrap_or(false);
    if continue_final_message && req.add_generation_prompt == Some(true) {
        return Err(ApiError::invalid(
            "continue_final_message",
            "continue_final_message continues the last message, so it cannot be combined with \
             add_generation_prompt: true (set add_generation_prompt to false)",
        ));
    }
    let kwargs = req.chat_template_kwargs.as_ref();
    if let Some(name) = kwargs.and_then(|k| {
        RESERVED_TEMPLATE_VARIABLES
            .iter()
            .find(|name| k.contains_key(**name))
    }) {
        return Err(ApiError::invalid(
            "chat_template_kwargs",
            format!("chat_template_kwargs cannot set `{name}`, which the server sets"),
        ));
    }
    Ok(RenderOptions {
        add_generation_prompt: !continue_final_message && req.add_generation_prompt.unwrap_or(true),
        continue_final_message,
        tools: None,
        kwargs,
    })
}

fn logprobs_of(engine: &dyn Engine, names: TokenNames, tokens: &[GenToken]) -> ChatLogprobs {
    let content = tokens
        .iter()
        .filter_map(|t| t.logprob.as_ref())
        .map(|lp| chat_entry(engine, names, lp))
        .collect();
    ChatLogprobs { content }
}

/// The non-streaming `chat.completion` body; `logprobs` says how to name their tokens, when
/// they were asked for.
fn response(
    envelope: &Envelope,
    engine: &dyn Engine,
    outcomes: &[Outcome],
    n: usize,
    logprobs: Option<TokenNames>,
    parser: Option<ToolCallParser>,
) -> ChatCompletion {
    let choices = outcomes
        .iter()
        .enumerate()
        .map(|(index, o)| {
            let (message, made_calls) = assistant_message(&o.text, parser);
            ChatChoice {
                index,
                message,
                logprobs: logprobs.map(|names| logprobs_of(engine, names, &o.tokens)),
                finish_reason: finish_reason(o.finish_reason, made_calls),
            }
        })
        .collect();
    let totals: Vec<_> = outcomes
        .iter()
        .enumerate()
        .map(|(i, o)| o.totals(i))
        .collect();
    let (usage, timings) = summarize(&totals, n);
    ChatCompletion {
        id: envelope.id.clone(),
        object: envelope.object,
        created: envelope.created,
        model: envelope.model.clone(),
        choices,
        usage,
        timings,
        plugins: envelope.plugins.clone(),
    }
}

/// `chat.completion.chunk`s: a role chunk per choice first, content deltas, a final chunk
/// with the finish reason.
struct ChatFormat {
    envelope: Envelope,
    engine: Arc<dyn Engine>,
    logprobs: bool,
    names: TokenNames,
    /// Each choice's reply parsed for tool calls, when tools were offered.
    calls: Option<Vec<ToolCallStream>>,
}

impl ChatFormat {
    /// The delta of `text` added to choice `index`'s reply: content, and the calls it
    /// completed; `None` when it adds nothing yet.
    fn delta(&mut self, index: usize, text: &str, end: bool) -> Option<Value> {
        let Some(stream) = self.calls.as_mut().and_then(|c| c.get_mut(index)) else {
            return (!text.is_empty()).then(|| json!({ "content": text }));
        };
        let parsed = stream.next(text, end);
        let mut delta = serde_json::Map::new();
        if !parsed.content.is_empty() {
            delta.insert("content".into(), json!(parsed.content));
        }
        if !parsed.calls.is_empty() {
            let calls: Vec<Value> = parsed.calls.into_iter().map(call_delta).collect();
            delta.insert("tool_calls".into(), json!(calls));
        }
        (!delta.is_empty()).then_some(Value::Object(delta))
    }

    fn made_calls(&self, index: usize) -> bool {
        let stream = self.calls.as_ref().and_then(|c| c.get(index));
        stream.is_some_and(|s| s.calls() > 0)
    }

    fn choice(&self, index: usize, delta: Value, lp: Option<&TokenLogprob>) -> Value {
        let logprobs = match (self.logprobs, lp) {
            (true, Some(lp)) => {
                json!({"content": [chat_entry(self.engine.as_ref(), self.names, lp)]})
            }
            _ => Value::Null,
        };
        let choice = json!({
            "index": index,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": Value::Null,
        });
        self.envelope.chunk(vec![choice])
    }
}

impl ChunkFormat for ChatFormat {
    fn opening(&mut self, index: usize) -> Vec<Value> {
        vec![self.choice(index, json!({"role": "assistant", "content": ""}), None)]
    }

    fn prompt_logprobs(&mut self, _: usize, _: Vec<TokenLogprob>) -> Option<Value> {
        None
    }

    fn token(&mut self, index: usize, token: GenToken) -> Option<Value> {
        let delta = match self.delta(index, &token.text, false) {
            Some(delta) => delta,
            // A token whose text is held back (or empty) still reports its log-prob.
            None if self.logprobs && token.logprob.is_some() => json!({ "content": "" }),
            None => return None,
        };
        Some(self.choice(index, delta, token.logprob.as_ref()))
    }

    fn finish(
        &mut self,
        index: usize,
        reason: FinishReason,
        trailing: String,
        _: &ChoiceTotals,
    ) -> Vec<Value> {
        let delta = self.delta(index, &trailing, true).unwrap_or(json!({}));
        let reason = finish_reason(reason, self.made_calls(index));
        let mut chunk = self.choice(index, delta, None);
        chunk["choices"][0]["finish_reason"] = json!(reason);
        vec![chunk]
    }

    fn envelope(&self) -> &Envelope {
        &self.envelope
    }
}
