//! Tool calling on the chat route (and the Responses API, which is served as chat): the
//! request's tools checked into a [`ToolPlan`], the prompt written for the template or through
//! the parser's fallback prompt, the constraint of a forced `tool_choice`, and the reply parsed
//! into `message.tool_calls` or streamed as `delta.tool_calls` pieces. The formats themselves
//! live in [`crate::tools`].

use serde_json::{json, Value};

use super::error::ApiError;
use super::replies::{AssistantMessage, FunctionDelta, ToolCallDelta, TOOL_CALLS};
use super::state::HttpConfig;
use super::validate::{generation, Generation, LogprobsWanted};
use super::wire::ChatRequest;
use crate::engine::{Engine, FinishReason};
use crate::tools::wire::{new_call_id, ToolType};
use crate::tools::{CallDelta, ToolCallParser, ToolPlan};
use models::chat_template::{ChatMessage, RenderOptions};

/// The request's tools, checked, with the server's tool-call parser.
pub(super) fn tool_plan(req: &ChatRequest, config: &HttpConfig) -> Result<ToolPlan, ApiError> {
    let tools = req.tools.clone().unwrap_or_default();
    let plan = ToolPlan::new(
        tools,
        req.tool_choice.as_ref(),
        req.parallel_tool_calls,
        config.tool_call_parser,
    )?;
    Ok(plan)
}

/// The prompt text: the messages as the tool plan writes them (for the template, or through
/// the parser's fallback prompt when the template ignores tools), rendered.
pub(super) fn prompt_text(
    engine: &dyn Engine,
    messages: Vec<ChatMessage>,
    tools: &ToolPlan,
    options: RenderOptions<'_>,
) -> Result<String, ApiError> {
    let native = engine.template_renders_tools();
    let messages = tools.prompt_messages(messages, native);
    let template_tools = tools.template_tools().filter(|_| native);
    let options = RenderOptions {
        tools: template_tools.as_ref(),
        ..options
    };
    Ok(engine.render_chat(&messages, &options)?)
}

/// The request's sampling, with the constraint a forced tool choice (or `auto` beside a
/// JSON `response_format`) puts on the output in place of the format's own.
pub(super) fn tool_generation(
    req: &ChatRequest,
    tools: &ToolPlan,
    wanted: LogprobsWanted,
    engine: &dyn Engine,
) -> Result<Generation, ApiError> {
    let mut sampling = req.sampling();
    let answer = sampling.response_format.as_ref().and_then(|f| f.schema());
    let Some(grammar) = tools.grammar(answer.as_ref()) else {
        return generation(&sampling, wanted, engine);
    };
    sampling.response_format = None;
    let mut gen = generation(&sampling, wanted, engine)?;
    let grammars = engine.grammars().ok_or_else(|| {
        ApiError::unsupported(
            "tool_choice",
            "forced tool calls need constrained decoding, which the served model lacks",
        )
    })?;
    let constraint = grammars.compile_lark(&grammar).map_err(|e| {
        ApiError::invalid(
            "tools",
            format!("the tools' parameters cannot be enforced: {e}"),
        )
    })?;
    gen.constraint = Some(constraint);
    Ok(gen)
}

/// The reply's text as a message: parsed for tool calls when tools were offered (content
/// `null` when there is nothing but calls); whether it made any.
pub(super) fn assistant_message(
    text: &str,
    parser: Option<ToolCallParser>,
) -> (AssistantMessage, bool) {
    let Some(parser) = parser else {
        let message = AssistantMessage {
            role: "assistant",
            content: Some(text.to_string()),
            tool_calls: None,
        };
        return (message, false);
    };
    let (content, calls) = parser.reply(text);
    let made_calls = !calls.is_empty();
    let message = AssistantMessage {
        role: "assistant",
        content: (!made_calls || !content.is_empty()).then_some(content),
        tool_calls: made_calls.then_some(calls),
    };
    (message, made_calls)
}

/// `tool_calls` when a reply that ended by itself made calls (what clients loop on).
pub(super) fn finish_reason(reason: FinishReason, made_calls: bool) -> &'static str {
    match (reason, made_calls) {
        (FinishReason::Stop, true) => TOOL_CALLS,
        _ => reason.as_str(),
    }
}

/// A piece of a streamed call as OpenAI sends it: the first with the call's id, type and
/// name, the rest with more of its arguments.
pub(super) fn call_delta(piece: CallDelta) -> Value {
    let arguments = piece.arguments;
    let call = match piece.name {
        Some(name) => ToolCallDelta {
            index: piece.index,
            id: Some(new_call_id()),
            kind: Some(ToolType::Function),
            function: FunctionDelta {
                name: Some(name),
                arguments,
            },
        },
        None => ToolCallDelta {
            index: piece.index,
            id: None,
            kind: None,
            function: FunctionDelta {
                name: None,
                arguments,
            },
        },
    };
    json!(call)
}
