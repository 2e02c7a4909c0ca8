//! The `response` object and the stream of events that builds it, as the Responses API defines
//! them (text output only): `response.created`, `response.in_progress`, the output item and its
//! text part opening, `response.output_text.delta`s, their closing, then `response.completed`
//! (or `response.incomplete` when `max_output_tokens` cut the answer) with the whole response.

use plugins::ChainEntry;
use serde::Serialize;
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

use crate::engine::{FinishReason, TokenLogprob};
use crate::http::generate::{summarize, ChoiceTotals, GenToken};
use crate::http::stream::{ChunkFormat, Envelope};

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
    pub output: Vec<OutputMessage>,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub previous_response_id: Option<String>,
    pub store: bool,
    #[schema(value_type = Object)]
    pub metadata: Map<String, Value>,
    pub parallel_tool_calls: bool,
    pub tool_choice: &'static str,
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
}

impl Builder {
    /// The response with `text` as its answer so far; `finished` the reason and totals when
    /// the answer is whole.
    pub fn response(
        &self,
        text: &str,
        finished: Option<(FinishReason, &ChoiceTotals)>,
    ) -> ResponseObject {
        let status = match finished {
            None => "in_progress",
            Some((FinishReason::Length, _)) => "incomplete",
            Some(_) => "completed",
        };
        let output = match finished {
            None => Vec::new(),
            Some(_) => vec![self.message(text, status)],
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
            parallel_tool_calls: true,
            tool_choice: "auto",
            tools: Vec::new(),
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
pub type OnDone = Box<dyn FnOnce(&str) + Send>;

/// The stream's events, numbered in order (`sequence_number`).
pub struct EventFormat {
    pub builder: Builder,
    /// Required by [`ChunkFormat`]; its usage chunk is off (the last event carries usage).
    pub envelope: Envelope,
    pub text: String,
    pub sequence: u64,
    /// Called with the whole answer when the response completes (to store it).
    pub on_done: Option<OnDone>,
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

    fn place(&self) -> Value {
        json!({"item_id": self.builder.message_id, "output_index": 0, "content_index": 0})
    }
}

impl ChunkFormat for EventFormat {
    fn opening(&mut self, _index: usize) -> Vec<Value> {
        let response = json!(self.builder.response("", None));
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
        (!token.text.is_empty()).then(|| self.delta(&token.text))
    }

    fn finish(
        &mut self,
        _index: usize,
        reason: FinishReason,
        trailing: String,
        totals: &ChoiceTotals,
    ) -> Vec<Value> {
        let mut events = Vec::new();
        if !trailing.is_empty() {
            events.push(self.delta(&trailing));
        }
        let text = self.text.clone();
        let response = self.builder.response(&text, Some((reason, totals)));
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
        let last = match response.status {
            "incomplete" => "response.incomplete",
            _ => "response.completed",
        };
        events.push(self.event(last, json!({"response": response})));
        if let Some(done) = self.on_done.take() {
            done(&text);
        }
        events
    }

    fn envelope(&self) -> &Envelope {
        &self.envelope
    }
}
