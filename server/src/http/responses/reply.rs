//! The `response` object and the stream of events that builds it, as the Responses API defines
//! them: `response.created`, `response.in_progress`, the message item and its text part
//! opening, `response.output_text.delta`s, their closing, one `function_call` item per tool
//! call (added, `response.function_call_arguments.delta` and `.done`, done), then
//! `response.completed` (or `response.incomplete` when `max_output_tokens` cut the answer)
//! with the whole response. Output is the message (its text without the calls), then the
//! calls; streamed calls come at the end, when the answer is whole.

use plugins::ChainEntry;
use serde::Serialize;
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

use crate::engine::{FinishReason, TokenLogprob};
use crate::http::generate::{summarize, ChoiceTotals, GenToken};
use crate::http::stream::{ChunkFormat, Envelope};
use crate::tools::{ParsedCall, ToolCall, ToolCallParser, ToolCallStream};

/// What a response echoes of its request.
#[derive(Debug, Clone, Default)]
pub struct Echo {
    pub instructions: Option<String>,
    pub max_output_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub previous_response_id: Option<String>,
    pub store: bool,
    pub metadata: Map<String, Value>,
    pub text_format: Value,
    pub tools: Vec<Value>,
    pub tool_choice: Value,
    pub parallel_tool_calls: bool,
}

/// A whole answer: its text without the tool calls, and the calls.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Answer {
    pub text: String,
    pub calls: Vec<ToolCall>,
}

impl Answer {
    /// The answer as the chat message a continuing response resends.
    pub fn chat_message(&self) -> Value {
        let mut message = json!({"role": "assistant", "content": self.text});
        if !self.calls.is_empty() {
            message["tool_calls"] = json!(self.calls);
        }
        message
    }
}

/// A response (`object: "response"`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ResponseObject {
    pub id: String,
    pub object: &'static str,
    pub created_at: u64,
    /// `completed`, `incomplete` (cut by `max_output_tokens`) or, in stream events before the
    /// end, `in_progress`.
    pub status: &'static str,
    #[schema(value_type = Option<Object>)]
    pub incomplete_details: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub error: Option<Value>,
    pub model: String,
    pub output: Vec<OutputItem>,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub previous_response_id: Option<String>,
    pub store: bool,
    #[schema(value_type = Object)]
    pub metadata: Map<String, Value>,
    pub parallel_tool_calls: bool,
    /// `"none"`, `"auto"`, `"required"` or `{"type": "function", "name": ...}`.
    #[schema(value_type = serde_json::Value)]
    pub tool_choice: Value,
    #[schema(value_type = Vec<Object>)]
    pub tools: Vec<Value>,
    #[schema(value_type = Object)]
    pub text: Value,
    pub truncation: &'static str,
    pub usage: Option<ResponseUsage>,
    /// The plug-in chain that ran, when one did.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<ChainEntry>,
}

/// One entry of `output`: the message, or a tool call.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(untagged)]
pub enum OutputItem {
    Message(OutputMessage),
    FunctionCall(FunctionCallItem),
}

/// A tool call (`type: "function_call"`); a later request answers it with a
/// `function_call_output` item of the same `call_id`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FunctionCallItem {
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// `fc_` and the call id's characters.
    pub id: String,
    pub call_id: String,
    pub name: String,
    /// JSON text, as the model wrote it.
    pub arguments: String,
    pub status: &'static str,
}

impl FunctionCallItem {
    fn new(call: &ToolCall, status: &'static str) -> Self {
        Self {
            kind: "function_call",
            id: format!("fc_{}", call.id.trim_start_matches("call_")),
            call_id: call.id.clone(),
            name: call.function.name.clone(),
            arguments: call.function.arguments.clone(),
            status,
        }
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OutputMessage {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub id: String,
    pub status: &'static str,
    pub role: &'static str,
    pub content: Vec<OutputText>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OutputText {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub text: String,
    #[schema(value_type = Vec<Object>)]
    pub annotations: Vec<Value>,
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct ResponseUsage {
    pub input_tokens: usize,
    pub input_tokens_details: InputTokensDetails,
    pub output_tokens: usize,
    pub output_tokens_details: OutputTokensDetails,
    pub total_tokens: usize,
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct InputTokensDetails {
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct OutputTokensDetails {
    pub reasoning_tokens: usize,
}

/// Builds the response object at each stage, for the JSON reply and the stream alike.
#[derive(Debug, Clone)]
pub struct Builder {
    pub id: String,
    pub message_id: String,
    pub created_at: u64,
    pub model: String,
    pub echo: Echo,
    pub plugins: Vec<ChainEntry>,
    /// Parses answers for tool calls, when tools were offered.
    pub parser: Option<ToolCallParser>,
}

impl Builder {
    /// The generated text as an answer: tool calls parsed out when tools were offered.
    pub fn answer(&self, generated: &str) -> Answer {
        let Some(parser) = self.parser else {
            return Answer {
                text: generated.to_string(),
                calls: Vec::new(),
            };
        };
        let (text, calls) = parser.reply(generated);
        Answer { text, calls }
    }

    /// The response with `answer` so far; `finished` the reason and totals when the answer
    /// is whole.
    pub fn response(
        &self,
        answer: &Answer,
        finished: Option<(FinishReason, &ChoiceTotals)>,
    ) -> ResponseObject {
        let status = match finished {
            None => "in_progress",
            Some((FinishReason::Length, _)) => "incomplete",
            Some(_) => "completed",
        };
        let output = match finished {
            None => Vec::new(),
            Some(_) => {
                let message = OutputItem::Message(self.message(&answer.text, status));
                let calls = answer
                    .calls
                    .iter()
                    .map(|c| OutputItem::FunctionCall(FunctionCallItem::new(c, "completed")));
                std::iter::once(message).chain(calls).collect()
            }
        };
        let e = &self.echo;
        ResponseObject {
            id: self.id.clone(),
            object: "response",
            created_at: self.created_at,
            status,
            incomplete_details: (status == "incomplete")
                .then(|| json!({"reason": "max_output_tokens"})),
            error: None,
            model: self.model.clone(),
            output,
            instructions: e.instructions.clone(),
            max_output_tokens: e.max_output_tokens,
            temperature: e.temperature,
            top_p: e.top_p,
            previous_response_id: e.previous_response_id.clone(),
            store: e.store,
            metadata: e.metadata.clone(),
            parallel_tool_calls: e.parallel_tool_calls,
            tool_choice: e.tool_choice.clone(),
            tools: e.tools.clone(),
            text: json!({"format": e.text_format}),
            truncation: "disabled",
            usage: finished.map(|(_, totals)| usage(totals)),
            plugins: self.plugins.clone(),
        }
    }

    fn message(&self, text: &str, status: &'static str) -> OutputMessage {
        OutputMessage {
            kind: "message",
            id: self.message_id.clone(),
            status,
            role: "assistant",
            content: vec![output_text(text)],
        }
    }
}

fn output_text(text: &str) -> OutputText {
    OutputText {
        kind: "output_text",
        text: text.to_string(),
        annotations: Vec::new(),
    }
}

fn usage(totals: &ChoiceTotals) -> ResponseUsage {
    let (u, _) = summarize(std::slice::from_ref(totals), 1);
    ResponseUsage {
        input_tokens: u.prompt_tokens,
        input_tokens_details: InputTokensDetails {
            cached_tokens: u.prompt_tokens_details.cached_tokens,
        },
        output_tokens: u.completion_tokens,
        output_tokens_details: OutputTokensDetails {
            reasoning_tokens: 0,
        },
        total_tokens: u.total_tokens,
    }
}

/// What a streamed response does with its whole answer (stores it).
pub type OnDone = Box<dyn FnOnce(&Answer) + Send>;

/// The stream's events, numbered in order (`sequence_number`).
pub struct EventFormat {
    pub builder: Builder,
    /// Required by [`ChunkFormat`]; its usage chunk is off (the last event carries usage).
    pub envelope: Envelope,
    pub text: String,
    pub sequence: u64,
    /// Called with the whole answer when the response completes (to store it).
    pub on_done: Option<OnDone>,
    /// The answer parsed for tool calls as it streams, when tools were offered, and the
    /// calls it has made (given ids when the answer is whole).
    pub calls: Option<ToolCallStream>,
    pub made: Vec<ParsedCall>,
}

impl EventFormat {
    fn event(&mut self, kind: &str, mut fields: Value) -> Value {
        fields["type"] = json!(kind);
        fields["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        fields
    }

    fn part(&self, text: &str) -> Value {
        json!(output_text(text))
    }

    /// A piece of the answer: appended to the text so far, sent as a delta event.
    fn delta(&mut self, text: &str) -> Value {
        self.text.push_str(text);
        let mut delta = self.place();
        delta["delta"] = json!(text);
        delta["logprobs"] = json!([]);
        self.event("response.output_text.delta", delta)
    }

    /// The answer's text in `text` (calls kept aside in `made`); `end` flushes what the
    /// parser held back.
    fn parsed(&mut self, text: &str, end: bool) -> String {
        let Some(stream) = self.calls.as_mut() else {
            return text.to_string();
        };
        let parsed = stream.next(text, end);
        for piece in parsed.calls {
            piece.apply_to(&mut self.made);
        }
        parsed.content
    }

    /// A call's item events: added, its arguments (whole, in one delta), done.
    fn call_events(&mut self, output_index: usize, call: &ToolCall) -> Vec<Value> {
        let added = FunctionCallItem {
            arguments: String::new(),
            ..FunctionCallItem::new(call, "in_progress")
        };
        let done = FunctionCallItem::new(call, "completed");
        let place = json!({"item_id": done.id, "output_index": output_index});
        let mut delta = place.clone();
        delta["delta"] = json!(call.function.arguments);
        let mut arguments = place;
        arguments["arguments"] = json!(call.function.arguments);
        vec![
            self.event(
                "response.output_item.added",
                json!({"output_index": output_index, "item": added}),
            ),
            self.event("response.function_call_arguments.delta", delta),
            self.event("response.function_call_arguments.done", arguments),
            self.event(
                "response.output_item.done",
                json!({"output_index": output_index, "item": done}),
            ),
        ]
    }

    fn place(&self) -> Value {
        json!({"item_id": self.builder.message_id, "output_index": 0, "content_index": 0})
    }
}

impl ChunkFormat for EventFormat {
    fn opening(&mut self, _index: usize) -> Vec<Value> {
        let response = json!(self.builder.response(&Answer::default(), None));
        let item = json!({"type": "message", "id": self.builder.message_id,
                          "status": "in_progress", "role": "assistant", "content": []});
        let mut part = self.place();
        part["part"] = self.part("");
        vec![
            self.event("response.created", json!({"response": response})),
            self.event("response.in_progress", json!({"response": response})),
            self.event(
                "response.output_item.added",
                json!({"output_index": 0, "item": item}),
            ),
            self.event("response.content_part.added", part),
        ]
    }

    fn prompt_logprobs(&mut self, _: usize, _: Vec<TokenLogprob>) -> Option<Value> {
        None
    }

    fn token(&mut self, _index: usize, token: GenToken) -> Option<Value> {
        let text = self.parsed(&token.text, false);
        (!text.is_empty()).then(|| self.delta(&text))
    }

    fn finish(
        &mut self,
        _index: usize,
        reason: FinishReason,
        trailing: String,
        totals: &ChoiceTotals,
    ) -> Vec<Value> {
        let mut events = Vec::new();
        let trailing = self.parsed(&trailing, true);
        if !trailing.is_empty() {
            events.push(self.delta(&trailing));
        }
        let text = self.text.clone();
        let made = std::mem::take(&mut self.made).into_iter();
        let answer = Answer {
            text: text.clone(),
            calls: made.map(ToolCall::from).collect(),
        };
        let response = self.builder.response(&answer, Some((reason, totals)));
        let mut done = self.place();
        done["text"] = json!(text);
        done["logprobs"] = json!([]);
        events.push(self.event("response.output_text.done", done));
        let mut part = self.place();
        part["part"] = self.part(&text);
        events.push(self.event("response.content_part.done", part));
        let item = json!(response.output.first());
        events.push(self.event(
            "response.output_item.done",
            json!({"output_index": 0, "item": item}),
        ));
        for (i, call) in answer.calls.iter().enumerate() {
            events.extend(self.call_events(i + 1, call));
        }
        let last = match response.status {
            "incomplete" => "response.incomplete",
            _ => "response.completed",
        };
        events.push(self.event(last, json!({"response": response})));
        if let Some(done) = self.on_done.take() {
            done(&answer);
        }
        events
    }

    fn envelope(&self) -> &Envelope {
        &self.envelope
    }
}
