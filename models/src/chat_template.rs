//! Chat templates: the model's Jinja template that turns a list of chat messages into the
//! prompt text the tokenizer sees.
//!
//! Request path: validation renders the request's `messages` with [`ChatTemplate::render`]
//! before tokenizing. The template is found once at start-up by [`find_template`] (config,
//! then `tokenizer_config.json`, then the GGUF metadata) and compiled once by
//! [`ChatTemplate::new`]. Rendering imitates Hugging Face `transformers`'
//! `apply_chat_template`, which these templates are written for: a Jinja2 environment with
//! `trim_blocks` and `lstrip_blocks`, loop controls, `raise_exception`, `strftime_now`, a
//! `tojson` that writes what Python's `json.dumps` writes, and Python string methods
//! (`.strip()`, `.startswith()`, `.split()`, ...) via `minijinja-contrib`'s `pycompat`, as TGI
//! and mistral.rs do. Maps keep the order their keys were given in, as Python's dicts do (a
//! tool's JSON reads as the client wrote it). Known gaps: HF's `{% generation %}` tag (used
//! only for training masks) is not supported, and `strftime_now` reads UTC where Python reads
//! local time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind, Output, State};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The name the compiled template is stored under inside its environment.
const TEMPLATE_NAME: &str = "chat_template";

/// One chat message as the template sees it (`message['role']`, `message['content']`, and for
/// templates that render tool use, `message['tool_calls']` and `message['tool_call_id']`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant message's tool calls as `transformers` passes them: `{"type": "function",
    /// "function": {"name", "arguments"}}` with `arguments` an object, not a JSON string.
    /// Absent (undefined in the template) when the message has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A `tool` message's answer to which call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message with text only.
    pub fn text(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
        }
    }
}

/// The function name [`ChatTemplate::renders_tools`] looks for in its probe rendering.
const PROBE_TOOL: &str = "graft_probe_tool_7f3a";

/// Why a chat template could not be found, compiled or rendered.
#[derive(Debug, Error)]
pub enum TemplateError {
    #[error(
        "no chat template: none configured, no `chat_template` in tokenizer_config.json and no \
         `tokenizer.chat_template` in the GGUF metadata; set `chat_template` in the config file \
         (or --chat-template) to the template text"
    )]
    Missing,
    #[error("chat template does not compile: {0}")]
    Compile(#[source] minijinja::Error),
    #[error("chat template raised an exception: {message}")]
    Raised { message: String },
    #[error("chat template failed to render: {0}")]
    Render(#[source] minijinja::Error),
    #[error("cannot read chat template source {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: `chat_template` {problem}")]
    BadConfig { path: PathBuf, problem: String },
    #[error(
        "cannot continue the final message: its text does not appear in the rendered prompt \
         (an empty message, or a template that rewrites it)"
    )]
    FinalMessageNotRendered,
}

/// What a rendering adds to the messages.
#[derive(Debug, Clone, Copy, Default)]
pub struct RenderOptions<'a> {
    /// Append the opening of the assistant's turn.
    pub add_generation_prompt: bool,
    /// End the prompt inside the final message, right after its text, so that generation
    /// continues it (`transformers`' `continue_final_message`); needs
    /// `add_generation_prompt` off.
    pub continue_final_message: bool,
    /// The request's tool list, passed through as JSON.
    pub tools: Option<&'a serde_json::Value>,
    /// More template variables (vLLM's `chat_template_kwargs`); `messages`, `tools`,
    /// `add_generation_prompt` and the special tokens are the renderer's and win.
    pub kwargs: Option<&'a serde_json::Map<String, serde_json::Value>>,
}

/// A compiled chat template with the special tokens it may refer to.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    renders_tools: bool,
}

/// The most instructions one rendering may run. Real chat templates spend a few hundred per
/// message, so a million-message conversation still fits; nested loops over large ranges (a
/// template that would run for hours) end with an error instead.
const TEMPLATE_FUEL: u64 = 50_000_000;

impl ChatTemplate {
    /// Compiles `source` once; `bos_token` / `eos_token` are the tokenizer's special tokens
    /// as text (e.g. `<s>`), left undefined in the template (so they print as nothing) when
    /// `None`, as in `transformers`.
    pub fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        // transformers' ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.set_formatter(python_formatter);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(TemplateError::Compile)?;
        let mut template = Self {
            env,
            bos_token,
            eos_token,
            renders_tools: false,
        };
        template.renders_tools = template.probe_tools();
        Ok(template)
    }

    /// Renders `messages` into prompt text. `add_generation_prompt` appends the opening of
    /// the assistant's turn; `tools` is the request's tool list, passed through as JSON.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
    ) -> Result<String, TemplateError> {
        let options = RenderOptions {
            add_generation_prompt,
            tools,
            ..RenderOptions::default()
        };
        self.render_with(messages, &options)
    }

    /// Whether the template writes the request's `tools` into the prompt. Many templates
    /// (SmolLM2's among them) ignore the variable; the server then describes the tools in a
    /// prompt of its own. Found the way llama.cpp finds it: render a user message with one
    /// probe tool and look for the tool's name (once, when the template is compiled).
    pub fn renders_tools(&self) -> bool {
        self.renders_tools
    }

    fn probe_tools(&self) -> bool {
        let tools = serde_json::json!([{"type": "function", "function": {
            "name": PROBE_TOOL,
            "description": "probe",
            "parameters": {"type": "object", "properties": {}},
        }}]);
        let options = RenderOptions {
            add_generation_prompt: true,
            tools: Some(&tools),
            ..RenderOptions::default()
        };
        self.render_context(&[ChatMessage::text("user", "hi")], &options)
            .is_ok_and(|text| text.contains(PROBE_TOOL))
    }

    /// Renders `messages` with everything [`RenderOptions`] can ask for.
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        options: &RenderOptions,
    ) -> Result<String, TemplateError> {
        let text = self.render_context(messages, options)?;
        match (options.continue_final_message, messages.last()) {
            (true, Some(last)) => cut_after_final_message(text, &last.content),
            _ => Ok(text),
        }
    }

    fn render_context(
        &self,
        messages: &[ChatMessage],
        options: &RenderOptions,
    ) -> Result<String, TemplateError> {
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        for (name, value) in options.kwargs.into_iter().flatten() {
            ctx.insert(name.as_str(), Value::from_serialize(value));
        }
        ctx.insert("messages", Value::from_serialize(messages));
        ctx.insert(
            "add_generation_prompt",
            Value::from(options.add_generation_prompt),
        );
        // Templates test `tools is not none`, so an absent list is `none`, not undefined.
        ctx.insert(
            "tools",
            options.tools.map_or(Value::from(()), Value::from_serialize),
        );
        if let Some(bos) = &self.bos_token {
            ctx.insert("bos_token", Value::from(bos.as_str()));
        }
        if let Some(eos) = &self.eos_token {
            ctx.insert("eos_token", Value::from(eos.as_str()));
        }
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(TemplateError::Render)?;
        template
            .render(ctx)
            .map_err(|err| match raised_message(&err) {
                Some(message) => TemplateError::Raised { message },
                None => TemplateError::Render(err),
            })
    }
}

/// The rendered prompt up to the end of the final message's text, as `transformers` cuts it
/// for `continue_final_message` (the last occurrence, so an earlier message with the same
/// text does not end the prompt early).
fn cut_after_final_message(mut text: String, content: &str) -> Result<String, TemplateError> {
    let trimmed = content.trim();
    if trimmed.is_empty() {
        return Err(TemplateError::FinalMessageNotRendered);
    }
    // Templates often strip the message (`| trim`): look for the text as written, then trimmed.
    let end = [content, trimmed]
        .iter()
        .find_map(|c| text.rfind(c).map(|at| at + c.len()))
        .ok_or(TemplateError::FinalMessageNotRendered)?;
    text.truncate(end);
    Ok(text)
}

/// Marks an error as the template's own `raise_exception(msg)`, so `render` can report it as
/// [`TemplateError::Raised`] (usually a client mistake, e.g. roles out of order) rather than
/// as a broken template.
#[derive(Debug, Error)]
#[error("{0}")]
struct Raised(String);

fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(
        minijinja::Error::new(ErrorKind::InvalidOperation, message.clone())
            .with_source(Raised(message)),
    )
}

fn raised_message(err: &minijinja::Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(raised) = e.downcast_ref::<Raised>() {
            return Some(raised.0.clone());
        }
        source = e.source();
    }
    None
}

/// Prints booleans and `none` as Python does (`True`, `False`, `None`); minijinja's default
/// would print `true`, `false`, `none`. Everything else uses the default formatter.
fn python_formatter(
    out: &mut Output,
    state: &State,
    value: &Value,
) -> Result<(), minijinja::Error> {
    let text = match value.kind() {
        ValueKind::Bool if value.is_true() => "True",
        ValueKind::Bool => "False",
        ValueKind::None => "None",
        _ => return minijinja::escape_formatter(out, state, value),
    };
    out.write_str(text)
        .map_err(|_| minijinja::Error::new(ErrorKind::WriteFailure, "cannot write template output"))
}

/// `strftime_now(fmt)`: the current time (UTC) formatted with Python `strftime` directives,
/// which Llama 3.x templates use for "Today Date".
fn strftime_now(format: String) -> Result<Value, minijinja::Error> {
    use std::fmt::Write;
    let mut out = String::new();
    write!(out, "{}", chrono::Utc::now().format(&format)).map_err(|_| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: unsupported format string {format:?}"),
        )
    })?;
    Ok(Value::from(out))
}

/// `tojson` as `transformers` defines it: Python's `json.dumps(x, ensure_ascii=False,
/// indent=indent)`, i.e. `", "` / `": "` separators, or newlines and `indent` spaces, and no
/// HTML escaping (minijinja's own `tojson` is compact and escapes `<`, `>`, `&`, `'`, which
/// would change the prompt the model was trained on).
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let result = match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let fmt = serde_json::ser::PrettyFormatter::with_indent(&pad);
            serde::Serialize::serialize(
                value,
                &mut serde_json::Serializer::with_formatter(&mut out, fmt),
            )
        }
        None => serde::Serialize::serialize(
            value,
            &mut serde_json::Serializer::with_formatter(&mut out, PythonJson),
        ),
    };
    result.map_err(|e| {
        minijinja::Error::new(ErrorKind::InvalidOperation, "tojson failed").with_source(e)
    })?;
    let text = String::from_utf8(out).map_err(|e| {
        minijinja::Error::new(ErrorKind::InvalidOperation, "tojson produced invalid UTF-8")
            .with_source(e)
    })?;
    Ok(Value::from_safe_string(text))
}

/// `value` as the templates' `tojson` writes it (Python's `json.dumps`: `", "` and `": "`
/// separators, keys in the order given, no HTML escaping), for prompts written outside a
/// template that must read as a template would have written them.
pub fn python_json(value: &serde_json::Value) -> String {
    let mut out = Vec::new();
    let mut writer = serde_json::Serializer::with_formatter(&mut out, PythonJson);
    // Writing a `Value` into memory cannot fail, and serde_json writes UTF-8.
    match serde::Serialize::serialize(value, &mut writer) {
        Ok(()) => String::from_utf8(out).unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// serde_json formatter for Python's default `json.dumps` separators: `", "` and `": "`.
struct PythonJson;

impl serde_json::ser::Formatter for PythonJson {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// Picks the chat template source, first found wins:
///
/// 1. `configured`: the operator's explicit template (config file or command line);
/// 2. `tokenizer_config_json`'s `chat_template`: a string, or a list of `{name, template}`
///    of which the one named `default` is used; if the file has none, a `chat_template.jinja`
///    beside it (where newer `transformers` versions save it). A path that does not exist
///    counts as absent, so callers may pass the expected location unconditionally;
/// 3. `gguf_template`: the GGUF metadata's `tokenizer.chat_template`.
///
/// None of them is [`TemplateError::Missing`], whose message says how to configure one.
pub fn find_template(
    gguf_template: Option<String>,
    tokenizer_config_json: Option<&Path>,
    configured: Option<String>,
) -> Result<String, TemplateError> {
    if let Some(source) = configured {
        return Ok(source);
    }
    if let Some(path) = tokenizer_config_json {
        if let Some(source) = from_tokenizer_config(path)? {
            return Ok(source);
        }
        if let Some(source) = read_if_exists(&path.with_file_name("chat_template.jinja"))? {
            return Ok(source);
        }
    }
    gguf_template.ok_or(TemplateError::Missing)
}

/// Reads a file, treating "not found" as `None` and any other failure as an error.
fn read_if_exists(path: &Path) -> Result<Option<String>, TemplateError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TemplateError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

fn from_tokenizer_config(path: &Path) -> Result<Option<String>, TemplateError> {
    let Some(text) = read_if_exists(path)? else {
        return Ok(None);
    };
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| TemplateError::Json {
            path: path.to_owned(),
            source,
        })?;
    let bad = |problem: String| TemplateError::BadConfig {
        path: path.to_owned(),
        problem,
    };
    match json.get("chat_template") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Array(entries)) => {
            let named =
                |e: &serde_json::Value| e.get("name").and_then(|n| n.as_str()).map(str::to_owned);
            let default = entries
                .iter()
                .find(|e| named(e).as_deref() == Some("default"));
            match default
                .and_then(|e| e.get("template"))
                .and_then(|t| t.as_str())
            {
                Some(s) => Ok(Some(s.to_owned())),
                None => {
                    let names: Vec<String> = entries.iter().filter_map(named).collect();
                    Err(bad(format!(
                        "is a list without a `default` entry holding a `template` string (names: {names:?})"
                    )))
                }
            }
        }
        Some(other) => Err(bad(format!(
            "must be a string or a list of {{name, template}}, got {other}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage::text(role, content)
    }

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    #[test]
    fn continue_final_message_ends_the_prompt_inside_the_last_message() {
        let t = ChatTemplate::new(SMOLLM2, None, Some("<|im_end|>".into())).unwrap();
        // The same text earlier in the conversation must not end the prompt there.
        let messages = [
            msg("user", "Say yes"),
            msg("assistant", "Yes"),
            msg("user", "Again"),
            msg("assistant", "Yes"),
        ];
        let options = RenderOptions {
            continue_final_message: true,
            ..RenderOptions::default()
        };
        let out = t.render_with(&messages, &options).unwrap();
        assert!(out.ends_with("<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\nYes"));
        let empty = [msg("user", "Hi"), msg("assistant", " ")];
        let err = t.render_with(&empty, &options).unwrap_err();
        assert!(
            matches!(err, TemplateError::FinalMessageNotRendered),
            "{err}"
        );
    }

    #[test]
    fn kwargs_reach_the_template_but_cannot_replace_its_own_variables() {
        let t = ChatTemplate::new(
            "{{ enable_thinking }}|{{ add_generation_prompt }}|{{ messages | length }}",
            None,
            None,
        )
        .unwrap();
        let kwargs = serde_json::json!({"enable_thinking": false, "add_generation_prompt": true,
            "messages": []});
        let options = RenderOptions {
            kwargs: kwargs.as_object(),
            ..RenderOptions::default()
        };
        let out = t.render_with(&[msg("user", "a")], &options).unwrap();
        assert_eq!(out, "False|False|1");
    }

    #[test]
    fn smollm2_template_renders_like_jinja2() {
        let t = ChatTemplate::new(SMOLLM2, None, Some("<|im_end|>".into())).unwrap();
        let out = t
            .render(&[msg("user", "What is 2+2?")], true, None)
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nWhat is 2+2?<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        let with_system = [
            msg("system", "Be brief."),
            msg("user", "Hi"),
            msg("assistant", "Hello!"),
        ];
        let out = t.render(&with_system, false, None).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        );
    }

    /// Meta-Llama-3-8B-Instruct's template, verbatim.
    const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";

    #[test]
    fn llama3_template_uses_bos_token_and_trim() {
        let t = ChatTemplate::new(
            LLAMA3,
            Some("<|begin_of_text|>".into()),
            Some("<|eot_id|>".into()),
        )
        .unwrap();
        let out = t
            .render(
                &[msg("system", "  Be brief.\n"), msg("user", "Hi ")],
                true,
                None,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn missing_bos_token_prints_nothing() {
        let t = ChatTemplate::new("[{{ bos_token }}]", None, None).unwrap();
        assert_eq!(t.render(&[], false, None).unwrap(), "[]");
    }

    /// Mistral-7B-Instruct-v0.1's template, verbatim.
    const MISTRAL: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";

    #[test]
    fn mistral_template_raises_on_bad_role_order() {
        let t = ChatTemplate::new(MISTRAL, Some("<s>".into()), Some("</s>".into())).unwrap();
        let ok = t.render(
            &[
                msg("user", "Hi"),
                msg("assistant", "Hello"),
                msg("user", "Again"),
            ],
            false,
            None,
        );
        assert_eq!(
            ok.unwrap(),
            "<s>[INST] Hi [/INST]Hello</s>[INST] Again [/INST]"
        );
        let err = t
            .render(&[msg("user", "Hi"), msg("user", "Again")], false, None)
            .unwrap_err();
        match &err {
            TemplateError::Raised { message } => {
                assert_eq!(
                    message,
                    "Conversation roles must alternate user/assistant/user/assistant/..."
                )
            }
            other => panic!("expected Raised, got {other:?}"),
        }
        assert!(err
            .to_string()
            .contains("raised an exception: Conversation roles must alternate"));
    }

    #[test]
    fn regression_a_template_that_would_loop_for_hours_ends_with_an_error() {
        let src =
            "{% for i in range(10000) %}{% for j in range(10000) %}{{ j }}{% endfor %}{% endfor %}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        let err = t.render(&[msg("user", "hi")], true, None).unwrap_err();
        assert!(err.to_string().contains("fuel"), "{err}");
        // A long real conversation stays well inside the budget.
        let long: Vec<ChatMessage> = (0..5000).map(|i| msg("user", &format!("m{i}"))).collect();
        let t = ChatTemplate::new(SMOLLM2, None, None).unwrap();
        assert!(t.render(&long, true, None).is_ok());
    }

    #[test]
    fn python_string_methods_work() {
        let src = "{% for m in messages %}{{ m.content.strip() }}|{{ m.role.startswith('us') }}|{{ m.content.split()|length }}\n{% endfor %}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        let out = t
            .render(
                &[msg("user", "  two words \n"), msg("assistant", "x")],
                false,
                None,
            )
            .unwrap();
        // Booleans and none print the Python way, as they do under jinja2.
        assert_eq!(out, "two words|True|2\nx|False|1\n");
        let t = ChatTemplate::new("{{ tools }}|{{ add_generation_prompt }}", None, None).unwrap();
        assert_eq!(t.render(&[], false, None).unwrap(), "None|False");
    }

    #[test]
    fn block_whitespace_is_trimmed_like_transformers() {
        // trim_blocks drops the newline after a tag, lstrip_blocks the indentation before it;
        // checked against jinja2 3.1 with both options on.
        let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\n<{{ m.content }}>\n    {% endif %}\n{% endfor %}\nend";
        let t = ChatTemplate::new(src, None, None).unwrap();
        assert_eq!(
            t.render(&[msg("user", "a"), msg("user", "b")], false, None)
                .unwrap(),
            "<a>\n<b>\nend"
        );
    }

    #[test]
    fn loop_controls_are_available() {
        let src = "{% for m in messages %}{% if m.role == 'stop' %}{% break %}{% endif %}{{ m.content }}{% endfor %}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        assert_eq!(
            t.render(
                &[msg("u", "a"), msg("stop", "b"), msg("u", "c")],
                false,
                None
            )
            .unwrap(),
            "a"
        );
    }

    #[test]
    fn tools_and_tojson_match_python_json_dumps() {
        let src = "{% if tools is not none %}{% for t in tools %}{{ t | tojson }}\n{{ t | tojson(indent=2) }}\n{% endfor %}{% else %}no tools{% endif %}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        let tools = serde_json::json!([{"name": "f<x>", "parameters": {"a": [1, 2.5], "b": "é"}}]);
        let out = t.render(&[], false, Some(&tools)).unwrap();
        assert_eq!(
            out,
            "{\"name\": \"f<x>\", \"parameters\": {\"a\": [1, 2.5], \"b\": \"é\"}}\n\
             {\n  \"name\": \"f<x>\",\n  \"parameters\": {\n    \"a\": [\n      1,\n      2.5\n    ],\n    \"b\": \"é\"\n  }\n}\n"
        );
        assert_eq!(t.render(&[], false, None).unwrap(), "no tools");
    }

    #[test]
    fn strftime_now_formats_the_current_date() {
        let t = ChatTemplate::new("{{ strftime_now('%Y') }}", None, None).unwrap();
        let year: i32 = t.render(&[], false, None).unwrap().parse().unwrap();
        assert!((2025..2200).contains(&year), "year {year}");
        let bad = ChatTemplate::new("{{ strftime_now('%Q') }}", None, None).unwrap();
        let err = bad.render(&[], false, None).unwrap_err();
        assert!(matches!(err, TemplateError::Render(_)));
        assert!(
            err.to_string().contains("unsupported format string"),
            "{err}"
        );
    }

    #[test]
    fn syntax_errors_fail_at_compile_time() {
        let err = ChatTemplate::new("{% for m in messages %}", None, None).unwrap_err();
        assert!(matches!(err, TemplateError::Compile(_)), "{err:?}");
        assert!(err
            .to_string()
            .starts_with("chat template does not compile"));
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn find_template_precedence() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = write(
            dir.path(),
            "tokenizer_config.json",
            r#"{"chat_template": "from-config"}"#,
        );
        let gguf = || Some("from-gguf".to_string());
        assert_eq!(
            find_template(gguf(), Some(&cfg), Some("configured".into())).unwrap(),
            "configured"
        );
        assert_eq!(
            find_template(gguf(), Some(&cfg), None).unwrap(),
            "from-config"
        );
        assert_eq!(find_template(gguf(), None, None).unwrap(), "from-gguf");
        let absent = dir.path().join("nope.json");
        assert_eq!(
            find_template(gguf(), Some(&absent), None).unwrap(),
            "from-gguf"
        );
    }

    #[test]
    fn find_template_reads_list_form_and_sibling_jinja() {
        let dir = tempfile::tempdir().unwrap();
        let list = r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#;
        let cfg = write(dir.path(), "tokenizer_config.json", list);
        assert_eq!(find_template(None, Some(&cfg), None).unwrap(), "D");
        let cfg = write(
            dir.path(),
            "tokenizer_config.json",
            r#"{"bos_token": "<s>"}"#,
        );
        assert!(matches!(
            find_template(None, Some(&cfg), None),
            Err(TemplateError::Missing)
        ));
        write(dir.path(), "chat_template.jinja", "J");
        assert_eq!(
            find_template(Some("G".into()), Some(&cfg), None).unwrap(),
            "J"
        );
    }

    #[test]
    fn find_template_rejects_malformed_config() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = write(
            dir.path(),
            "tokenizer_config.json",
            r#"{"chat_template": [{"name": "rag", "template": "R"}]}"#,
        );
        let err = find_template(None, Some(&cfg), None).unwrap_err();
        assert!(
            err.to_string().contains("without a `default` entry"),
            "{err}"
        );
        assert!(err.to_string().contains("rag"), "{err}");
        let cfg = write(
            dir.path(),
            "tokenizer_config.json",
            r#"{"chat_template": 3}"#,
        );
        assert!(matches!(
            find_template(None, Some(&cfg), None),
            Err(TemplateError::BadConfig { .. })
        ));
        let cfg = write(dir.path(), "tokenizer_config.json", "{not json");
        assert!(matches!(
            find_template(None, Some(&cfg), None),
            Err(TemplateError::Json { .. })
        ));
    }

    #[test]
    fn missing_template_says_how_to_configure_one() {
        let err = find_template(None, None, None).unwrap_err();
        assert!(matches!(err, TemplateError::Missing));
        let text = err.to_string();
        assert!(
            text.contains("chat_template") && text.contains("config"),
            "{text}"
        );
    }
}
