//! Tool calling on chat completions (and the Responses API): `tools`, `tool_choice`,
//! `parallel_tool_calls`, replayed `tool_calls` and `role: "tool"` results.
//!
//! A request's tools reach the model one of two ways. A chat template that renders `tools`
//! (Qwen2.5's, Hermes', Llama 3.1's) gets them, and the conversation's calls and results, as
//! `transformers` passes them. A template that ignores them (the default model's) gets the
//! conversation rewritten by the tool-call parser's fallback prompt ([`hermes`]: the tools in
//! the system message, calls and results as text in the format the parser reads).
//!
//! The reply is parsed for calls by the parser `--tool-call-parser` names (today `hermes`),
//! token by token when streaming ([`ToolCallStream`]), into `message.tool_calls` or
//! `delta.tool_calls`. `tool_choice: "auto"` leaves the model free: it may answer or call,
//! and a call it writes badly stays text. `"required"` and a named function constrain the
//! output with a grammar (the structured-outputs machinery) to well-formed calls whose
//! arguments follow each function's `parameters` schema, so they always parse.

mod hermes;
mod parse;
pub mod wire;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use models::chat_template::ChatMessage;

pub use parse::{CallDelta, Parsed, ParsedCall, ToolCallStream};
pub use wire::{FunctionCall, Tool, ToolCall, ToolChoice, ToolMode};

/// `--tool-call-parser`: the format the served model writes tool calls in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ToolCallParser {
    /// `<tool_call>{"name": ..., "arguments": ...}</tool_call>` (Hermes 2 Pro, Qwen2.5; also
    /// the fallback prompt's format).
    #[default]
    Hermes,
}

impl ToolCallParser {
    /// A parser for one choice's reply.
    pub fn stream(self) -> ToolCallStream {
        match self {
            Self::Hermes => ToolCallStream::new(hermes::SYNTAX),
        }
    }

    /// A whole reply's content and calls.
    pub fn parse(self, text: &str) -> (String, Vec<ParsedCall>) {
        let parsed = self.stream().next(text, true);
        let mut calls = Vec::new();
        parsed
            .calls
            .into_iter()
            .for_each(|d| d.apply_to(&mut calls));
        (parsed.content, calls)
    }

    /// A whole reply's content and its calls, each with a fresh id.
    pub fn reply(self, text: &str) -> (String, Vec<ToolCall>) {
        let (content, calls) = self.parse(text);
        let calls = calls.into_iter().map(ToolCall::from).collect();
        (content, calls)
    }

    /// `messages` rewritten for a template that ignores tools, with `offered` described.
    pub fn fallback_messages(
        self,
        messages: Vec<ChatMessage>,
        offered: &[Tool],
    ) -> Vec<ChatMessage> {
        match self {
            Self::Hermes => hermes::fallback_messages(messages, offered),
        }
    }
}

/// A parsed call as the reply gives it, with a fresh id.
impl From<ParsedCall> for ToolCall {
    fn from(call: ParsedCall) -> Self {
        ToolCall::new(call.name, call.arguments)
    }
}

/// A tool field the request got wrong: a 400 on `param`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ToolError {
    pub param: String,
    pub message: String,
}

fn bad(param: impl Into<String>, message: impl Into<String>) -> ToolError {
    ToolError {
        param: param.into(),
        message: message.into(),
    }
}

/// What the model may do with the tools.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Choice {
    None,
    Auto,
    Required,
    /// `tools[i]`.
    Named(usize),
}

/// A request's tools, validated, and what it lets the model do with them.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolPlan {
    tools: Vec<Tool>,
    choice: Choice,
    parallel: bool,
    parser: ToolCallParser,
}

/// OpenAI's rule for function names.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl ToolPlan {
    /// `tool_choice` defaults to `auto` with tools and `none` without, as OpenAI's;
    /// `parallel_tool_calls` to true.
    pub fn new(
        tools: Vec<Tool>,
        choice: Option<&ToolChoice>,
        parallel: Option<bool>,
        parser: ToolCallParser,
    ) -> Result<Self, ToolError> {
        for (i, tool) in tools.iter().enumerate() {
            let name = &tool.function.name;
            if !valid_name(name) {
                return Err(bad(
                    format!("tools[{i}].function.name"),
                    format!("function names are 1 to 64 of a-z, A-Z, 0-9, _ and -; got {name:?}"),
                ));
            }
            if tools[..i].iter().any(|t| &t.function.name == name) {
                return Err(bad(
                    format!("tools[{i}].function.name"),
                    format!("two tools are named {name:?}"),
                ));
            }
        }
        let choice = match choice {
            None if tools.is_empty() => Choice::None,
            None => Choice::Auto,
            Some(ToolChoice::Mode(ToolMode::None)) => Choice::None,
            Some(ToolChoice::Mode(ToolMode::Auto)) => Choice::Auto,
            Some(ToolChoice::Mode(ToolMode::Required)) => Choice::Required,
            Some(ToolChoice::Named(named)) => {
                let name = &named.function.name;
                let at = tools.iter().position(|t| &t.function.name == name);
                Choice::Named(at.ok_or_else(|| {
                    bad(
                        "tool_choice",
                        format!("tool_choice names {name:?}, which is not in tools"),
                    )
                })?)
            }
        };
        if tools.is_empty() && choice != Choice::None && choice != Choice::Auto {
            return Err(bad(
                "tool_choice",
                "tool_choice requires tools, and none are given",
            ));
        }
        Ok(Self {
            tools,
            choice,
            parallel: parallel.unwrap_or(true),
            parser,
        })
    }

    /// No tools: the request is plain chat.
    pub fn none(parser: ToolCallParser) -> Self {
        Self {
            tools: Vec::new(),
            choice: Choice::None,
            parallel: true,
            parser,
        }
    }

    /// The tools the prompt describes: all of them unless `tool_choice` is `none`.
    pub fn offered(&self) -> &[Tool] {
        match self.choice {
            Choice::None => &[],
            _ => &self.tools,
        }
    }

    /// The parser for a reply, when the model may call tools.
    pub fn parser(&self) -> Option<ToolCallParser> {
        (!self.offered().is_empty()).then_some(self.parser)
    }

    /// The template's `tools` variable, for templates that render them.
    pub fn template_tools(&self) -> Option<Value> {
        let offered = self.offered();
        (!offered.is_empty()).then(|| json!(offered))
    }

    /// The messages as the prompt should hold them: unchanged for a template that renders
    /// tools, rewritten by the parser's fallback prompt otherwise.
    pub fn prompt_messages(&self, messages: Vec<ChatMessage>, native: bool) -> Vec<ChatMessage> {
        match native {
            true => messages,
            false => self.parser.fallback_messages(messages, self.offered()),
        }
    }

    /// The grammar the output must follow, if any: calls only, for `required` or a named
    /// function; calls or a JSON answer for `auto` beside a JSON `response_format`
    /// (`answer`, its schema). `auto` with text is unconstrained.
    pub fn grammar(&self, answer: Option<&Value>) -> Option<String> {
        if self.offered().is_empty() {
            return None;
        }
        let functions: Vec<&Tool> = match self.choice {
            Choice::None => return None,
            Choice::Auto if answer.is_none() => return None,
            Choice::Named(i) => vec![&self.tools[i]],
            Choice::Auto | Choice::Required => self.tools.iter().collect(),
        };
        let names: Vec<&str> = functions.iter().map(|t| t.function.name.as_str()).collect();
        let schemas: Vec<Value> = functions.iter().map(|t| arguments_schema(t)).collect();
        let many = self.parallel && !matches!(self.choice, Choice::Named(_));
        let answer = match self.choice {
            Choice::Auto => answer.cloned().map(crate::structured::with_layout),
            _ => None,
        };
        Some(match self.parser {
            ToolCallParser::Hermes => hermes::grammar(&names, &schemas, many, answer.as_ref()),
        })
    }
}

/// A function's `parameters`, or no arguments at all when it has none, laid out as the
/// structured outputs lay out JSON.
fn arguments_schema(tool: &Tool) -> Value {
    let schema = match &tool.function.parameters {
        Some(parameters) => Value::Object(parameters.clone()),
        None => json!({"type": "object", "properties": {}, "additionalProperties": false}),
    };
    crate::structured::with_layout(schema)
}

#[cfg(test)]
mod tests;
