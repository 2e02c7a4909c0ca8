//! POST /v1/responses: OpenAI's Responses API (text in, text out) over the chat path: the input
//! (a string or messages), `instructions` and the conversation of `previous_response_id` become
//! one chat request (same template, validation, plug-ins, structured outputs through
//! `text.format`), answered as a `response` object or streamed as Responses events.
//!
//! Responses are stored by default (`store: true`, as OpenAI does) so a later request can
//! continue one: in memory, per API key, the last [`STORED_RESPONSES`] only. A continued
//! conversation resends the earlier turns to the model, and the prefix cache makes that cheap.
//! Function tools work as on chat (the same prompt, parser and constraints): calls come back
//! as `function_call` output items, and a later request sends `function_call_output` items
//! with their results.

mod reply;
mod request;
mod store;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::json;

pub use reply::ResponseObject;
pub use request::ResponsesRequest;
pub use store::{ResponseStore, STORED_RESPONSES};

use super::auth::Caller;
use super::chat;
use super::error::{ApiError, ErrorKind};
use super::extract::ApiJson;
use super::generate::{collect_all, submit_all};
use super::replies::SseEvent;
use super::selection::prepare_generation;
use super::state::AppState;
use super::stream::{sse_response, Envelope};
use super::tool_calls;
use super::{unix_now, RequestId};
use crate::tools::ToolCallParser;
use reply::{Answer, Builder, Echo, EventFormat, OnDone};

/// Create a response
///
/// OpenAI's Responses API for text: `input` (a string or messages), `instructions`,
/// `previous_response_id`, `store`, `max_output_tokens`, `temperature`, `top_p`,
/// `text.format` (structured outputs) and graft's `plugins`. With `stream: true` the reply is
/// server-sent events: `data: <event>` with the Responses event types, ending with
/// `response.completed` (or `response.incomplete`), or an error event if generation fails.
#[utoipa::path(
    post,
    path = "/v1/responses",
    operation_id = "createResponse",
    tag = "generation",
    request_body = ResponsesRequest,
    responses((status = 200, description = "The response, or its events with `stream`", content(
        (ResponseObject = "application/json"),
        (SseEvent = "text/event-stream"),
    ))),
)]
pub async fn create_response(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    ApiJson(req): ApiJson<ResponsesRequest>,
) -> Result<Response, ApiError> {
    let deadline = state.deadline();
    let (engine, selection) =
        prepare_generation(&state, &caller, req.model.as_deref(), &req.plugins).await?;
    let owner = caller.name().map(str::to_string);
    let history = match &req.previous_response_id {
        Some(id) => state.responses.conversation(id, owner.as_deref())?,
        None => Vec::new(),
    };
    let input = req.input_messages()?;
    let chat_req = req.as_chat(&history, &input)?;
    let tools = tool_calls::tool_plan(&chat_req, &state.config)?;
    let requests = chat::plan(
        &chat_req,
        &tools,
        engine.as_ref(),
        &state.config,
        &request_id.0,
        &selection,
        // The Responses API takes text input only (an `input_image` part is a 400).
        None,
    )?;
    let subs = submit_all(
        engine.as_ref(),
        requests,
        &state.metrics,
        caller.meter(),
        1,
        &selection.lora_names(),
    )?;
    let builder = Builder {
        id: format!("resp_{}", request_id.0),
        message_id: format!("msg_{}", request_id.0),
        created_at: unix_now(),
        model: selection.model.clone(),
        echo: echo(&req),
        plugins: selection.chain.entries.clone(),
        parser: tools.parser(),
    };
    // What a later request continuing this one resends: the conversation without instructions.
    let keep = req.store.unwrap_or(true).then(|| {
        let store = state.responses.clone();
        let (id, mut conversation) = (builder.id.clone(), [history, input].concat());
        move |answer: &Answer| {
            conversation.push(answer.chat_message());
            store.keep(id, owner, conversation);
        }
    });
    if req.stream.unwrap_or(false) {
        let format = EventFormat {
            envelope: Envelope {
                id: builder.id.clone(),
                object: "response",
                created: builder.created_at,
                model: builder.model.clone(),
                include_usage: false,
                plugins: selection.chain.entries,
            },
            builder,
            text: String::new(),
            sequence: 0,
            on_done: keep.map(|k| Box::new(k) as OnDone),
            calls: tools.parser().map(ToolCallParser::stream),
            made: Vec::new(),
        };
        return Ok(sse_response(subs, format, 1, deadline));
    }
    let outcomes = collect_all(subs, deadline).await?;
    let outcome = outcomes
        .first()
        .ok_or_else(|| ApiError::new(ErrorKind::Internal, "a response without its answer"))?;
    let totals = outcome.totals(0);
    let answer = builder.answer(&outcome.text);
    let response = builder.response(&answer, Some((outcome.finish_reason, &totals)));
    if let Some(keep) = keep {
        keep(&answer);
    }
    Ok(Json(response).into_response())
}

fn echo(req: &ResponsesRequest) -> Echo {
    Echo {
        instructions: req.instructions.clone(),
        max_output_tokens: req.max_output_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        previous_response_id: req.previous_response_id.clone(),
        store: req.store.unwrap_or(true),
        metadata: req.metadata.clone().unwrap_or_default(),
        text_format: req
            .text
            .as_ref()
            .and_then(|t| t.get("format").cloned())
            .unwrap_or_else(|| json!({"type": "text"})),
        tools: req.tools.clone().unwrap_or_default(),
        tool_choice: req.tool_choice.clone().unwrap_or_else(|| json!("auto")),
        parallel_tool_calls: req.parallel_tool_calls.unwrap_or(true),
    }
}

#[cfg(test)]
mod tests;
