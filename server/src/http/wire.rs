//! Request bodies as clients send them (OpenAI's chat and legacy completions APIs plus the
//! vLLM extras `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `min_tokens`,
//! `stop_token_ids`, `include_stop_str_in_output`, `skip_special_tokens`,
//! `add_special_tokens` and, on chat, `add_generation_prompt`, `continue_final_message`,
//! `chat_template_kwargs`; vLLM's /tokenize and /detokenize), and each type's [`Screen`]
//! policy for fields beyond its own (vLLM's and SGLang's other extensions: `extensions`).
//!
//! Everything is `deny_unknown_fields`: a field graft does not know could change the output,
//! so it is a 400 naming it rather than silently ignored. Fields known to be harmless are
//! dropped by the screen first; fields known to change the output that graft does not
//! implement (the legacy `functions`) get a message of their own.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use plugins::{PluginKind, PluginSpec};

use crate::structured::ResponseFormat;
use crate::tools::{Tool, ToolCall, ToolChoice};

use super::error::ApiError;
use super::extensions;
use super::extract::Screen;

/// Accepted anywhere and without effect on the output: bookkeeping fields clients send.
const HARMLESS: &[&str] = &["metadata", "store", "service_tier"];

/// The sampling fields both generation routes share, as sent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingWire {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// vLLM convention: `-1` or `0` turns it off.
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// Token id (as a string, JSON keys being strings) to bias in `-100..=100`.
    pub logit_bias: Option<HashMap<String, f32>>,
    pub stop: Option<Stop>,
    pub seed: Option<u64>,
    pub n: Option<usize>,
    /// vLLM extension: keep generating past end-of-sequence tokens (load tests use it).
    pub ignore_eos: Option<bool>,
    pub output: OutputWire,
    /// llama.cpp's: start from a cached prefix of the prompt and leave this one's (default
    /// true; false opts the request out of prefix caching).
    pub cache_prompt: Option<bool>,
    pub response_format: Option<ResponseFormat>,
}

/// vLLM's (and SGLang's) fields on when generation may stop and what the text includes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutputWire {
    pub min_tokens: Option<usize>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub include_stop_str_in_output: Option<bool>,
    /// SGLang's name for `include_stop_str_in_output`.
    pub no_stop_trim: Option<bool>,
    pub skip_special_tokens: Option<bool>,
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(untagged, expecting = "a string or a list of strings")]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// POST /v1/chat/completions.
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    pub model: Option<String>,
    /// The plug-in chain, in order (graft's extension; see `plugins::PluginSpec`).
    #[serde(default)]
    pub plugins: Vec<PluginSpec>,
    #[schema(min_items = 1)]
    pub messages: Vec<WireMessage>,
    #[schema(minimum = 1)]
    pub max_tokens: Option<usize>,
    /// The newer name of `max_tokens`; wins when both are given.
    #[schema(minimum = 1)]
    pub max_completion_tokens: Option<usize>,
    /// 0 is greedy.
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f32>,
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f32>,
    /// `-1` or `0` turns it off (vLLM).
    #[schema(minimum = -1)]
    pub top_k: Option<i64>,
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub min_p: Option<f32>,
    #[schema(exclusive_minimum = 0.0)]
    pub repetition_penalty: Option<f32>,
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub presence_penalty: Option<f32>,
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub frequency_penalty: Option<f32>,
    /// Token id (a string) to a bias in -100..=100.
    pub logit_bias: Option<HashMap<String, f32>>,
    /// At most 4 non-empty strings.
    pub stop: Option<Stop>,
    pub seed: Option<u64>,
    /// Choices per prompt.
    #[schema(minimum = 1, maximum = 8)]
    pub n: Option<usize>,
    pub ignore_eos: Option<bool>,
    /// llama.cpp: reuse a cached prefix of the prompt and leave this one's for later
    /// requests (default true; false opts out of prefix caching).
    pub cache_prompt: Option<bool>,
    /// What the output must be: `text` (the default), `json_object` or `json_schema`,
    /// enforced while sampling.
    pub response_format: Option<ResponseFormat>,
    /// Functions the model may call (in the prompt through the chat template, or the
    /// tool-call parser's fallback prompt when the template ignores tools).
    pub tools: Option<Vec<Tool>>,
    /// `none`, `auto` (the default with tools), `required`, or
    /// `{"type": "function", "function": {"name": ...}}`; the last two constrain the output
    /// to calls whose arguments follow the functions' `parameters` schemas.
    pub tool_choice: Option<ToolChoice>,
    /// Several calls in one reply (default true).
    pub parallel_tool_calls: Option<bool>,
    /// vLLM: tokens generated before end-of-sequence, `stop_token_ids` or a stop string may
    /// end the output (at most `max_tokens`).
    pub min_tokens: Option<usize>,
    /// vLLM: token ids that end generation besides the model's end-of-sequence tokens (not
    /// part of the text; they apply with `ignore_eos` too).
    pub stop_token_ids: Option<Vec<u32>>,
    /// vLLM: end the text with the stop string that ended it (default false).
    pub include_stop_str_in_output: Option<bool>,
    /// SGLang's name for `include_stop_str_in_output`.
    pub no_stop_trim: Option<bool>,
    /// vLLM: leave special tokens out of the text (default true).
    pub skip_special_tokens: Option<bool>,
    /// vLLM: end the prompt with the opening of the assistant's turn (default true).
    pub add_generation_prompt: Option<bool>,
    /// vLLM: the last message is the start of the reply, to be continued: the prompt ends
    /// with its text, without the template's end of turn or a generation prompt.
    pub continue_final_message: Option<bool>,
    /// vLLM: extra variables for the chat template (e.g. `{"enable_thinking": false}`); they
    /// cannot replace `messages`, `tools`, `add_generation_prompt` or the special tokens.
    #[schema(value_type = Option<Object>)]
    pub chat_template_kwargs: Option<Map<String, Value>>,
    /// Add the model's BOS token when it wants one (default true; the template may add its
    /// own).
    pub add_special_tokens: Option<bool>,
    pub logprobs: Option<bool>,
    /// Alternatives per token, with `logprobs`.
    #[schema(maximum = 20)]
    pub top_logprobs: Option<usize>,
    /// vLLM's: log-probs name tokens `token_id:<id>` rather than by their text.
    pub return_tokens_as_token_ids: Option<bool>,
    /// End-user id; logged, no effect on the output.
    pub user: Option<String>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
}

impl ChatRequest {
    pub fn sampling(&self) -> SamplingWire {
        SamplingWire {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: self.logit_bias.clone(),
            stop: self.stop.clone(),
            seed: self.seed,
            n: self.n,
            ignore_eos: self.ignore_eos,
            cache_prompt: self.cache_prompt,
            response_format: self.response_format.clone(),
            output: OutputWire {
                min_tokens: self.min_tokens,
                stop_token_ids: self.stop_token_ids.clone(),
                include_stop_str_in_output: self.include_stop_str_in_output,
                no_stop_trim: self.no_stop_trim,
                skip_special_tokens: self.skip_special_tokens,
            },
        }
    }
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
pub struct WireMessage {
    pub role: Role,
    /// May be null on an assistant message (OpenAI clients replay such messages).
    pub content: Option<Content>,
    /// Present in OpenAI's schema; templates do not use it.
    pub name: Option<String>,
    /// An assistant message's calls, as a reply's `message.tool_calls` gave them.
    pub tool_calls: Option<Vec<ToolCall>>,
    /// A `tool` message: the id of the call it answers.
    pub tool_call_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    /// OpenAI's newer name for `system`.
    Developer,
    User,
    Assistant,
    /// A tool's result, answering one of the assistant's `tool_calls`.
    Tool,
}

impl Role {
    /// The role name the chat template sees.
    pub fn template_name(self) -> &'static str {
        match self {
            Role::System | Role::Developer => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// Message content: a string or a list of typed parts.
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(
    untagged,
    expecting = "a string or an array of content parts like {\"type\": \"text\", \"text\": \"...\"}"
)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One content part: `text`, or `image_url` (see `http::images`); other types (audio, files)
/// are refused with 400 `unsupported_parameter`.
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
pub struct ContentPart {
    /// `text` or `image_url`.
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
    /// The image of an `image_url` part.
    pub image_url: Option<ImageUrl>,
}

/// An image as OpenAI's chat API sends it.
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
pub struct ImageUrl {
    /// A `data:` URL, e.g. `data:image/png;base64,...` (PNG, JPEG or WebP).
    pub url: String,
    /// `auto` (default), `low` or `high`.
    pub detail: Option<String>,
}

impl Screen for ChatRequest {
    fn screen(body: &mut Map<String, Value>) -> Result<(), ApiError> {
        drop_harmless(body);
        extensions::screen_chat(body)?;
        // The legacy function-calling fields, which `tools` replaced: accepted when they ask
        // for nothing.
        refuse_unless("functions", body, is_empty)?;
        refuse_unless("function_call", body, |v| {
            is_empty(v) || v == Some(&Value::from("none")) || v == Some(&Value::from("auto"))
        })
    }
}

/// `prompt` on /v1/completions: the forms vLLM accepts.
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(
    untagged,
    expecting = "a string, a list of strings, a list of token ids or a list of token-id lists"
)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// POST /v1/completions.
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    pub model: Option<String>,
    /// The plug-in chain, in order (graft's extension; see `plugins::PluginSpec`).
    #[serde(default)]
    pub plugins: Vec<PluginSpec>,
    pub prompt: Prompt,
    pub max_tokens: Option<usize>,
    /// 0 is greedy.
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f32>,
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f32>,
    /// `-1` or `0` turns it off (vLLM).
    #[schema(minimum = -1)]
    pub top_k: Option<i64>,
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub min_p: Option<f32>,
    #[schema(exclusive_minimum = 0.0)]
    pub repetition_penalty: Option<f32>,
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub presence_penalty: Option<f32>,
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub frequency_penalty: Option<f32>,
    /// Token id (a string) to a bias in -100..=100.
    pub logit_bias: Option<HashMap<String, f32>>,
    /// At most 4 non-empty strings.
    pub stop: Option<Stop>,
    pub seed: Option<u64>,
    /// Choices per prompt.
    #[schema(minimum = 1, maximum = 8)]
    pub n: Option<usize>,
    pub ignore_eos: Option<bool>,
    /// llama.cpp: reuse a cached prefix of the prompt and leave this one's for later
    /// requests (default true; false opts out of prefix caching).
    pub cache_prompt: Option<bool>,
    /// What the output must be: `text` (the default), `json_object` or `json_schema`,
    /// enforced while sampling.
    pub response_format: Option<ResponseFormat>,
    /// vLLM: tokens generated before end-of-sequence, `stop_token_ids` or a stop string may
    /// end the output (at most `max_tokens`).
    pub min_tokens: Option<usize>,
    /// vLLM: token ids that end generation besides the model's end-of-sequence tokens (not
    /// part of the text; they apply with `ignore_eos` too).
    pub stop_token_ids: Option<Vec<u32>>,
    /// vLLM: end the text with the stop string that ended it (default false).
    pub include_stop_str_in_output: Option<bool>,
    /// SGLang's name for `include_stop_str_in_output`.
    pub no_stop_trim: Option<bool>,
    /// vLLM: leave special tokens out of the text (default true).
    pub skip_special_tokens: Option<bool>,
    /// vLLM: add the model's BOS token when it wants one (default true).
    pub add_special_tokens: Option<bool>,
    /// Legacy: return the log-probs of each token and of its top-N alternatives.
    #[schema(maximum = 20)]
    pub logprobs: Option<usize>,
    /// Prepend the prompt to the returned text (and, with `logprobs`, its tokens' log-probs).
    pub echo: Option<bool>,
    /// vLLM's: log-probs name tokens `token_id:<id>` rather than by their text.
    pub return_tokens_as_token_ids: Option<bool>,
    pub user: Option<String>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
}

impl CompletionRequest {
    pub fn sampling(&self) -> SamplingWire {
        SamplingWire {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: self.logit_bias.clone(),
            stop: self.stop.clone(),
            seed: self.seed,
            n: self.n,
            ignore_eos: self.ignore_eos,
            cache_prompt: self.cache_prompt,
            response_format: self.response_format.clone(),
            output: OutputWire {
                min_tokens: self.min_tokens,
                stop_token_ids: self.stop_token_ids.clone(),
                include_stop_str_in_output: self.include_stop_str_in_output,
                no_stop_trim: self.no_stop_trim,
                skip_special_tokens: self.skip_special_tokens,
            },
        }
    }
}

impl Screen for CompletionRequest {
    fn screen(body: &mut Map<String, Value>) -> Result<(), ApiError> {
        drop_harmless(body);
        extensions::screen_completion(body)?;
        refuse_unless("suffix", body, |v| {
            is_empty(v) || v == Some(&Value::from(""))
        })?;
        // best_of = 1 (or = n, which is what n already does) picks nothing out.
        let n = body.get("n").cloned().unwrap_or(Value::from(1));
        refuse_unless("best_of", body, |v| {
            is_empty(v) || v == Some(&Value::from(1)) || v == Some(&n)
        })
    }
}

/// POST /tokenize: a prompt, or chat messages rendered with the template first.
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<WireMessage>>,
    /// Add BOS when the model wants it; default true, as the generation routes do.
    pub add_special_tokens: Option<bool>,
    /// With `messages`: end with the opening of the assistant's turn (default true).
    pub add_generation_prompt: Option<bool>,
    /// Also return each token's text.
    pub return_token_strs: Option<bool>,
}

impl Screen for TokenizeRequest {}

/// POST /detokenize.
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

impl Screen for DetokenizeRequest {}

fn drop_harmless(body: &mut Map<String, Value>) {
    for key in HARMLESS {
        body.remove(*key);
    }
}

/// Removes `field` when `accept` says its value has no effect, refuses the request otherwise.
fn refuse_unless(
    field: &str,
    body: &mut Map<String, Value>,
    accept: impl Fn(Option<&Value>) -> bool,
) -> Result<(), ApiError> {
    if !body.contains_key(field) {
        return Ok(());
    }
    if accept(body.get(field)) {
        body.remove(field);
        return Ok(());
    }
    Err(ApiError::unsupported(
        field,
        format!("`{field}` is not supported by this server with the value given"),
    ))
}

/// Absent, null, or an empty list/object/string.
fn is_empty(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::Array(a)) => a.is_empty(),
        Some(Value::Object(o)) => o.is_empty(),
        Some(Value::String(s)) => s.is_empty(),
        Some(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::super::error::ErrorKind;
    use super::super::extract::parse;
    use super::*;

    fn chat(body: &str) -> Result<ChatRequest, ApiError> {
        parse(body.as_bytes())
    }

    #[test]
    fn content_as_string_or_text_parts() {
        let r = chat(r#"{"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}"#)
            .expect("parts");
        assert!(matches!(r.messages[0].content, Some(Content::Parts(_))));
        let r = chat(r#"{"messages":[{"role":"developer","content":"hi"}]}"#).expect("string");
        assert_eq!(r.messages[0].role.template_name(), "system");
    }

    #[test]
    fn harmless_fields_are_dropped_and_legacy_functions_refused() {
        chat(r#"{"messages":[],"metadata":{"a":"b"},"store":false,"functions":[]}"#)
            .expect("harmless");
        let e = chat(r#"{"messages":[],"functions":[{"name":"f"}]}"#).unwrap_err();
        assert_eq!(e.kind, ErrorKind::UnsupportedParameter);
        assert_eq!(e.param.as_deref(), Some("functions"));
        chat(r#"{"messages":[],"response_format":{"type":"text"}}"#).expect("text format");
    }

    #[test]
    fn tools_choices_and_replayed_calls_parse_as_clients_send_them() {
        let r = chat(
            r#"{"messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"call_1",
            "type":"function","function":{"name":"f","arguments":"{}"}}]},
            {"role":"tool","tool_call_id":"call_1","content":"42"}],
            "tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}],
            "tool_choice":{"type":"function","function":{"name":"f"}},"parallel_tool_calls":false}"#,
        )
        .expect("tool loop");
        assert_eq!(r.messages[1].role, Role::Tool);
        assert_eq!(r.tools.map(|t| t.len()), Some(1));
        assert!(matches!(r.tool_choice, Some(ToolChoice::Named(_))));
        for bad in [
            r#""tool_choice":"sometimes""#,
            r#""tools":[{"type":"retrieval","function":{"name":"f"}}]"#,
            r#""tools":[{"type":"function","function":{"name":"f","extra":1}}]"#,
        ] {
            let body = format!(r#"{{"messages":[],{bad}}}"#);
            assert!(chat(&body).is_err(), "{bad}");
        }
    }

    #[test]
    fn response_formats_parse_as_clients_send_them() {
        let r = chat(r#"{"messages":[],"response_format":{"type":"json_object"}}"#).unwrap();
        assert_eq!(r.response_format, Some(ResponseFormat::JsonObject {}));
        let body = r#"{"messages":[],"response_format":{"type":"json_schema","json_schema":
            {"name":"x","strict":true,"schema":{"type":"object"}}}}"#;
        let r = chat(body).unwrap();
        let schema = r.response_format.and_then(|f| f.schema()).unwrap();
        assert_eq!(schema, serde_json::json!({"type": "object"}));
        for bad in [
            r#"{"type":"yaml"}"#,
            r#"{"type":"json_schema"}"#,
            r#"{"type":"json_schema","json_schema":{"schema":{}}}"#,
            r#"{"type":"json_object","schema":{}}"#,
        ] {
            let body = format!(r#"{{"messages":[],"response_format":{bad}}}"#);
            assert!(chat(&body).is_err(), "{bad}");
        }
    }

    #[test]
    fn stop_and_prompt_accept_their_forms() {
        let r = chat(r#"{"messages":[],"stop":"x"}"#).expect("one");
        assert_eq!(r.stop.map(Stop::into_vec), Some(vec!["x".to_string()]));
        let e = chat(r#"{"messages":[],"stop":3}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("stop"));
        assert!(
            e.message.contains("a string or a list of strings"),
            "{}",
            e.message
        );
        for (body, expected) in [
            (r#"{"prompt":"a"}"#, Prompt::Text("a".into())),
            (r#"{"prompt":[1,2]}"#, Prompt::Tokens(vec![1, 2])),
            (
                r#"{"prompt":[[1],[2]]}"#,
                Prompt::TokenLists(vec![vec![1], vec![2]]),
            ),
            (
                r#"{"prompt":["a","b"]}"#,
                Prompt::Texts(vec!["a".into(), "b".into()]),
            ),
        ] {
            let r: CompletionRequest = parse(body.as_bytes()).expect(body);
            assert_eq!(r.prompt, expected);
        }
    }

    #[test]
    fn return_tokens_as_token_ids_is_accepted_on_both_generation_routes() {
        let r = chat(r#"{"messages":[],"return_tokens_as_token_ids":true}"#).expect("chat");
        assert_eq!(r.return_tokens_as_token_ids, Some(true));
        let r: CompletionRequest =
            parse(br#"{"prompt":[1],"return_tokens_as_token_ids":false}"#).expect("completion");
        assert_eq!(r.return_tokens_as_token_ids, Some(false));
    }

    #[test]
    fn best_of_equal_to_n_is_accepted() {
        let ok: Result<CompletionRequest, _> = parse(br#"{"prompt":"a","n":2,"best_of":2}"#);
        assert!(ok.is_ok());
        let e = parse::<CompletionRequest>(br#"{"prompt":"a","best_of":3}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("best_of"));
    }
}

/// POST /v1/plugins: register (load) a plug-in at run time.
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoadPluginRequest {
    /// The plug-in type.
    #[serde(rename = "type")]
    pub kind: PluginKind,
    pub name: String,
    /// A folder or file under the plug-in folder; relative paths resolve against it.
    #[schema(value_type = String)]
    pub path: std::path::PathBuf,
    /// Replace a plug-in of the same name (running requests keep the old one).
    #[serde(default)]
    pub replace: bool,
}

impl Screen for LoadPluginRequest {}
