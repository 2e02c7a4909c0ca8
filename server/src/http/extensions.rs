//! The extension fields of vLLM's and SGLang's OpenAI servers that graft accepts only at the
//! value that leaves the output unchanged.
//!
//! Routers written for those servers (vllm-router, SGLang's router) rewrite every request
//! with their extension fields filled in at their defaults, so refusing the fields outright
//! would refuse every routed request. A field here is dropped when its value is the one
//! that does nothing and refused, naming it, otherwise: a non-default value asks for
//! something graft does not do, and ignoring it would answer a different question. The
//! extension fields that change the output and are implemented (`min_tokens`,
//! `stop_token_ids`, `include_stop_str_in_output`, `no_stop_trim`, `skip_special_tokens`,
//! `add_special_tokens`, and on chat `add_generation_prompt`, `continue_final_message`,
//! `chat_template_kwargs`) are typed fields of the requests instead.

use serde_json::{Map, Value};

use super::error::ApiError;

/// The value of an extension field that changes nothing.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Inert {
    /// `null`, or an empty list, object or string.
    Empty,
    Bool(bool),
    Number(f64),
    /// Any boolean: the field concerns something the served models do not have.
    AnyBool,
    /// Any value: bookkeeping that never reaches the model (ids, labels).
    Any,
}

/// On both generation routes.
const SHARED: &[(&str, Inert)] = &[
    // vLLM sampling and output extras.
    ("spaces_between_special_tokens", Inert::Bool(true)),
    ("truncate_prompt_tokens", Inert::Empty),
    ("prompt_logprobs", Inert::Empty),
    ("allowed_token_ids", Inert::Empty),
    ("bad_words", Inert::Empty),
    ("use_beam_search", Inert::Bool(false)),
    ("length_penalty", Inert::Number(1.0)),
    ("priority", Inert::Number(0.0)),
    ("request_id", Inert::Any),
    ("cache_salt", Inert::Empty),
    ("kv_transfer_params", Inert::Empty),
    ("vllm_xargs", Inert::Empty),
    ("return_token_ids", Inert::Bool(false)),
    ("guided_json", Inert::Empty),
    ("guided_regex", Inert::Empty),
    ("guided_choice", Inert::Empty),
    ("guided_grammar", Inert::Empty),
    ("guided_decoding_backend", Inert::Empty),
    ("guided_whitespace_pattern", Inert::Empty),
    ("structured_outputs", Inert::Empty),
    ("mm_processor_kwargs", Inert::Empty),
    // SGLang's, as its router and vllm-router send them.
    ("return_hidden_states", Inert::Bool(false)),
    ("lora_path", Inert::Empty),
    ("session_params", Inert::Empty),
    ("rid", Inert::Any),
];

/// On /v1/chat/completions only.
const CHAT: &[(&str, Inert)] = &[
    ("echo", Inert::Bool(false)),
    ("documents", Inert::Empty),
    ("chat_template", Inert::Empty),
    // Reasoning output is split out only by a reasoning parser, and no served model has one.
    ("separate_reasoning", Inert::AnyBool),
    ("stream_reasoning", Inert::AnyBool),
    ("include_reasoning", Inert::AnyBool),
];

/// Drops the chat route's inert extension fields; refuses one set to anything else.
pub fn screen_chat(body: &mut Map<String, Value>) -> Result<(), ApiError> {
    screen(body, SHARED)?;
    screen(body, CHAT)
}

/// Drops the completions route's inert extension fields; refuses one set to anything else.
pub fn screen_completion(body: &mut Map<String, Value>) -> Result<(), ApiError> {
    screen(body, SHARED)
}

fn screen(body: &mut Map<String, Value>, fields: &[(&str, Inert)]) -> Result<(), ApiError> {
    for &(field, inert) in fields {
        let Some(value) = body.get(field) else {
            continue;
        };
        if !is_inert(value, inert) {
            return Err(ApiError::unsupported(
                field,
                format!(
                    "`{field}` is accepted only at {}, which leaves the output unchanged: this \
                     server does not implement other values",
                    describe(inert)
                ),
            ));
        }
        body.remove(field);
    }
    Ok(())
}

fn is_inert(value: &Value, inert: Inert) -> bool {
    match inert {
        Inert::Empty => match value {
            Value::Null => true,
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            Value::String(s) => s.is_empty(),
            _ => false,
        },
        Inert::Bool(b) => value == &Value::Bool(b),
        Inert::Number(x) => value.as_f64() == Some(x),
        Inert::AnyBool => value.is_boolean(),
        Inert::Any => true,
    }
}

fn describe(inert: Inert) -> String {
    match inert {
        Inert::Empty => "null (or empty)".into(),
        Inert::Bool(b) => b.to_string(),
        Inert::Number(x) => x.to_string(),
        Inert::AnyBool => "a boolean".into(),
        Inert::Any => "any value".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(o) => o,
            _ => Map::new(),
        }
    }

    #[test]
    fn what_vllm_router_adds_to_a_chat_request_is_dropped() {
        // The fields vllm-router 0.1.17 adds to every chat request, as it sends them.
        let mut body = object(json!({
            "no_stop_trim": false, "ignore_eos": false, "continue_final_message": false,
            "skip_special_tokens": true, "separate_reasoning": true, "stream_reasoning": true,
            "return_hidden_states": false, "include_reasoning": true, "logprobs": false,
        }));
        screen_chat(&mut body).expect("router defaults");
        let mut left: Vec<&str> = body.keys().map(String::as_str).collect();
        left.sort_unstable();
        // The typed fields stay for the request to read.
        assert_eq!(
            left,
            [
                "continue_final_message",
                "ignore_eos",
                "logprobs",
                "no_stop_trim",
                "skip_special_tokens"
            ]
        );
    }

    #[test]
    fn a_value_that_would_change_the_output_is_refused_by_name() {
        for (field, value) in [
            ("use_beam_search", json!(true)),
            ("guided_json", json!({"type": "object"})),
            ("length_penalty", json!(0.5)),
            ("return_hidden_states", json!(true)),
            ("prompt_logprobs", json!(1)),
        ] {
            let mut body = object(json!({ field: value }));
            let e = screen_completion(&mut body).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(field));
            assert!(e.message.contains("accepted only at"), "{}", e.message);
        }
        let mut body = object(json!({"separate_reasoning": "yes"}));
        assert!(screen_chat(&mut body).is_err());
    }

    #[test]
    fn chat_only_fields_are_not_accepted_on_completions() {
        let mut body = object(json!({"separate_reasoning": true}));
        screen_completion(&mut body).expect("left for typed parsing");
        assert!(body.contains_key("separate_reasoning"));
        let mut body = object(json!({"priority": 0, "request_id": "abc"}));
        screen_completion(&mut body).expect("inert");
        assert!(body.is_empty());
    }
}
