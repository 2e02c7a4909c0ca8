//! Wire request to [`GenerateRequest`]s: the checks both generation routes share.
//!
//! Each function checks one thing and returns a 4xx naming the field: the model id, `n`,
//! `stop`, the sampling parameters (range checks from `models::sampling`), token ids against
//! the vocabulary, and prompt plus `max_tokens` against the context. [`fan_out`] then turns
//! one validated request into one [`GenerateRequest`] per prompt and choice.

use models::chat_template::ChatMessage;
use models::sampling::{SamplingError, SamplingParams};
use models::HookCall;

use super::error::{ApiError, ErrorKind};
use super::state::{MAX_N, MAX_STOP};
use super::wire::{Content, OutputWire, Role, SamplingWire, WireMessage};
use crate::engine::{Engine, GenerateRequest, OutputRules};
use crate::structured::{Constraint, ResponseFormat};

/// What the request asked for in log-probs, and which field to blame for a bad value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogprobsWanted {
    pub logprobs: bool,
    pub top: usize,
    /// `top_logprobs` on chat, `logprobs` on legacy completions.
    pub top_param: &'static str,
}

/// Everything about a generation except its prompt and length.
#[derive(Debug, Clone)]
pub struct Generation {
    pub sampling: SamplingParams,
    /// The request's seed or a random one; choice `i` uses `seed + i`.
    pub seed: u64,
    pub n: usize,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub output: OutputRules,
    pub cache_prompt: bool,
    /// The compiled `response_format`; each choice gets its own copy.
    pub constraint: Option<Constraint>,
}

/// Checks the shared sampling fields and fills in the defaults.
pub fn generation(
    wire: &SamplingWire,
    logprobs: LogprobsWanted,
    engine: &dyn Engine,
) -> Result<Generation, ApiError> {
    let n = wire.n.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(ApiError::invalid(
            "n",
            format!("n must be in 1..={MAX_N}, got {n}"),
        ));
    }
    let stop = stop_strings(wire)?;
    let sampling = sampling_params(wire, logprobs, engine.info().vocab_size)?;
    // A random seed still goes into the request, so a log line can reproduce it.
    let seed = wire.seed.unwrap_or_else(rand::random);
    let mut stop_token_ids = match wire.ignore_eos {
        Some(true) => Vec::new(),
        _ => engine.eos_token_ids(),
    };
    let requested = wire.output.stop_token_ids.as_deref().unwrap_or_default();
    check_token_ids(requested, engine.info().vocab_size, "stop_token_ids")?;
    for &id in requested {
        if !stop_token_ids.contains(&id) {
            stop_token_ids.push(id);
        }
    }
    Ok(Generation {
        sampling,
        seed,
        n,
        stop,
        stop_token_ids,
        output: output_rules(&wire.output)?,
        cache_prompt: wire.cache_prompt.unwrap_or(true),
        constraint: constraint(wire.response_format.as_ref(), engine)?,
    })
}

/// The response format compiled into a constraint; a schema it cannot enforce is a 400 naming
/// what it cannot (`Unimplemented keys: ["..."]`).
fn constraint(
    format: Option<&ResponseFormat>,
    engine: &dyn Engine,
) -> Result<Option<Constraint>, ApiError> {
    let Some(format) = format.filter(|f| f.schema().is_some()) else {
        return Ok(None);
    };
    let grammars = engine.grammars().ok_or_else(|| {
        ApiError::unsupported(
            "response_format",
            "structured outputs are not available for the served model",
        )
    })?;
    grammars.compile(format).map_err(|e| {
        ApiError::invalid(
            "response_format",
            format!("response_format cannot be enforced: {e}"),
        )
    })
}

fn output_rules(wire: &OutputWire) -> Result<OutputRules, ApiError> {
    let d = OutputRules::default();
    // SGLang's `no_stop_trim` and vLLM's flag say the same; a request giving both contrary
    // values asks for two things.
    let include_stop_str = match (wire.include_stop_str_in_output, wire.no_stop_trim) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::invalid(
                "no_stop_trim",
                "no_stop_trim and include_stop_str_in_output are the same setting and were \
                 given different values",
            ))
        }
        (a, b) => a.or(b).unwrap_or(d.include_stop_str),
    };
    Ok(OutputRules {
        min_tokens: wire.min_tokens.unwrap_or(d.min_tokens),
        include_stop_str,
        skip_special_tokens: wire.skip_special_tokens.unwrap_or(d.skip_special_tokens),
    })
}

fn stop_strings(wire: &SamplingWire) -> Result<Vec<String>, ApiError> {
    let stop = wire.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stop.len() > MAX_STOP {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "at most {MAX_STOP} stop sequences are allowed, got {}",
                stop.len()
            ),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "stop",
            "stop sequences must not be empty",
        ));
    }
    Ok(stop)
}

fn sampling_params(
    wire: &SamplingWire,
    logprobs: LogprobsWanted,
    vocab_size: usize,
) -> Result<SamplingParams, ApiError> {
    let d = SamplingParams::default();
    let top_k = match wire.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) => usize::try_from(k).map_err(|_| {
            ApiError::invalid("top_k", format!("top_k must be -1 (off) or >= 0, got {k}"))
        })?,
    };
    let params = SamplingParams {
        temperature: wire.temperature.unwrap_or(d.temperature),
        top_k,
        top_p: wire.top_p.unwrap_or(d.top_p),
        min_p: wire.min_p.unwrap_or(d.min_p),
        repetition_penalty: wire.repetition_penalty.unwrap_or(d.repetition_penalty),
        presence_penalty: wire.presence_penalty.unwrap_or(d.presence_penalty),
        frequency_penalty: wire.frequency_penalty.unwrap_or(d.frequency_penalty),
        logit_bias: logit_bias(wire)?,
        logprobs: logprobs.logprobs,
        top_logprobs: logprobs.top,
    };
    params
        .validate(vocab_size)
        .map_err(|e| ApiError::invalid(sampling_param(&e, logprobs.top_param), e.to_string()))?;
    Ok(params)
}

/// JSON object keys are strings; logit_bias keys must be token ids.
fn logit_bias(wire: &SamplingWire) -> Result<Vec<(u32, f32)>, ApiError> {
    let Some(map) = &wire.logit_bias else {
        return Ok(Vec::new());
    };
    let mut bias = map
        .iter()
        .map(|(key, &value)| {
            key.trim()
                .parse::<u32>()
                .map(|id| (id, value))
                .map_err(|_| {
                    ApiError::invalid(
                        "logit_bias",
                        format!("logit_bias keys must be token ids, got `{key}`"),
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // HashMap order is random; a fixed order keeps the request reproducible in logs.
    bias.sort_by_key(|&(id, _)| id);
    Ok(bias)
}

/// The request field a sampling range error concerns.
fn sampling_param(e: &SamplingError, top_param: &'static str) -> &'static str {
    match e {
        SamplingError::Temperature { .. } => "temperature",
        SamplingError::TopP { .. } => "top_p",
        SamplingError::MinP { .. } => "min_p",
        SamplingError::RepetitionPenalty { .. } => "repetition_penalty",
        SamplingError::PresencePenalty { .. } => "presence_penalty",
        SamplingError::FrequencyPenalty { .. } => "frequency_penalty",
        SamplingError::LogitBiasToken { .. } | SamplingError::LogitBiasValue { .. } => "logit_bias",
        SamplingError::TopLogprobs { .. } | SamplingError::TopLogprobsWithoutLogprobs { .. } => {
            top_param
        }
        SamplingError::TokenOutOfRange { .. } => "prompt",
    }
}

/// Token ids a client sent must exist in the vocabulary.
pub fn check_token_ids(ids: &[u32], vocab_size: usize, param: &str) -> Result<(), ApiError> {
    match ids.iter().find(|&&id| id as usize >= vocab_size) {
        Some(id) => Err(ApiError::invalid(
            param,
            format!("token id {id} is out of range: the vocabulary has {vocab_size} tokens"),
        )),
        None => Ok(()),
    }
}

/// The completion length: the requested one if prompt plus it fits the context, else a 400
/// naming both numbers; without a request, the configured default clamped to what is left.
pub fn max_tokens(
    requested: Option<(usize, &'static str)>,
    prompt_len: usize,
    context: usize,
    default: usize,
) -> Result<usize, ApiError> {
    let left = context.saturating_sub(prompt_len);
    // u128: a client's `max_tokens` may be as large as JSON allows (u64::MAX overflowed).
    let total = |max: usize| prompt_len as u128 + max as u128;
    match requested {
        Some((max, param)) if total(max) > context as u128 => Err(context_error(
            param,
            format!(
                "This model's maximum context length is {context} tokens, but {} tokens were \
                 requested ({prompt_len} in the prompt, {max} for the completion); reduce the \
                 prompt or `{param}`",
                total(max)
            ),
        )),
        Some((max, _)) => Ok(max),
        None if left == 0 => Err(context_error(
            "prompt",
            format!(
                "This model's maximum context length is {context} tokens, but the prompt \
                 alone has {prompt_len} tokens, leaving none for the completion"
            ),
        )),
        None if default == 0 => Ok(left),
        None => Ok(default.min(left)),
    }
}

fn context_error(param: &str, message: String) -> ApiError {
    ApiError::new(ErrorKind::ContextLengthExceeded, message).with_param(param)
}

/// Wire messages to template messages: text parts joined, other part types refused.
/// The request's messages for the chat template. `image_marker`: what an image part becomes in
/// its message's text, for a model that reads images (`None`: the model reads text only, and
/// an image part is a 400 naming it).
pub fn chat_messages(
    messages: &[WireMessage],
    image_marker: Option<&str>,
) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let mut message =
                ChatMessage::text(m.role.template_name(), message_text(m, i, image_marker)?);
            message.tool_calls = template_tool_calls(m, i)?;
            if m.role == Role::Tool {
                message.tool_call_id = m.tool_call_id.clone();
            }
            Ok(message)
        })
        .collect()
}

/// An assistant message's calls as chat templates take them (`transformers`' convention,
/// which vLLM follows): `arguments` as an object, not the JSON text clients send. Arguments
/// that are not JSON (a model may write such a call under `tool_choice: auto`, and clients
/// send replies back as they got them) stay their text, replayed as written.
fn template_tool_calls(
    m: &WireMessage,
    i: usize,
) -> Result<Option<Vec<serde_json::Value>>, ApiError> {
    let Some(calls) = m.tool_calls.as_ref().filter(|c| !c.is_empty()) else {
        return Ok(None);
    };
    if m.role != Role::Assistant {
        return Err(ApiError::invalid(
            format!("messages[{i}].tool_calls"),
            "only assistant messages carry tool calls",
        ));
    }
    let calls = calls.iter().map(|call| {
        let text = &call.function.arguments;
        let arguments =
            serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.clone()));
        serde_json::json!({
            "id": call.id,
            "type": "function",
            "function": {"name": call.function.name, "arguments": arguments},
        })
    });
    Ok(Some(calls.collect()))
}

fn message_text(m: &WireMessage, i: usize, image_marker: Option<&str>) -> Result<String, ApiError> {
    match m.content.as_ref() {
        None => Ok(String::new()),
        Some(Content::Text(text)) => Ok(text.clone()),
        Some(Content::Parts(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                match (part.kind.as_str(), &part.text) {
                    ("text", Some(t)) => text.push_str(t),
                    // Decoded and checked by `images::decode_all` before the prompt is built.
                    ("image_url", _) => match image_marker {
                        Some(marker) => text.push_str(marker),
                        None => {
                            return Err(ApiError::invalid(
                                format!("messages[{i}].content[{j}]"),
                                "this model reads text only: it cannot take images",
                            ))
                        }
                    },
                    ("text", None) => {
                        return Err(ApiError::invalid(
                            format!("messages[{i}].content[{j}].text"),
                            "a text content part needs `text`",
                        ))
                    }
                    (other, _) => {
                        return Err(ApiError::unsupported(
                            format!("messages[{i}].content[{j}].type"),
                            format!("content parts of type `{other}` are not supported"),
                        ))
                    }
                }
            }
            Ok(text)
        }
    }
}

/// One prompt, tokenized and with its completion length.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptPlan {
    pub tokens: Vec<u32>,
    pub max_tokens: usize,
}

/// One [`GenerateRequest`] per prompt and choice, choice-major within each prompt (index
/// `prompt * n + choice`, as OpenAI numbers them). Ids are `<id>-<index>` when there is more
/// than one, seeds `seed + index`. A `min_tokens` above a prompt's `max_tokens` is a 400.
pub fn fan_out(
    id: &str,
    prompts: &[PromptPlan],
    gen: &Generation,
    prompt_logprobs: Option<usize>,
    hooks: &[HookCall],
) -> Result<Vec<GenerateRequest>, ApiError> {
    let total = prompts.len() * gen.n;
    let mut requests = Vec::with_capacity(total);
    for prompt in prompts {
        if gen.output.min_tokens > prompt.max_tokens {
            return Err(ApiError::invalid(
                "min_tokens",
                format!(
                    "min_tokens ({}) must not exceed the completion's max_tokens ({})",
                    gen.output.min_tokens, prompt.max_tokens
                ),
            ));
        }
        for _ in 0..gen.n {
            let index = requests.len();
            let seed = gen.seed.wrapping_add(index as u64);
            requests.push(GenerateRequest {
                id: match total {
                    1 => id.to_string(),
                    _ => format!("{id}-{index}"),
                },
                prompt: prompt.tokens.clone(),
                sampling: gen.sampling.clone(),
                seed,
                max_tokens: prompt.max_tokens,
                stop: gen.stop.clone(),
                stop_token_ids: gen.stop_token_ids.clone(),
                prompt_logprobs,
                hooks: hooks.to_vec(),
                output: gen.output,
                cache_prompt: gen.cache_prompt,
                constraint: gen.constraint.clone(),
                embed: false,
            });
        }
    }
    Ok(requests)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_LOGPROBS: LogprobsWanted = LogprobsWanted {
        logprobs: false,
        top: 0,
        top_param: "top_logprobs",
    };

    #[test]
    fn max_tokens_near_usize_max_is_a_400_not_an_overflow_panic() {
        // `prompt + max_tokens` overflowed: the debug build panicked and dropped the
        // connection without a reply (found while fuzzing the API for its OpenAPI document).
        let e = max_tokens(Some((usize::MAX, "max_tokens")), 6, 128, 512).unwrap_err();
        assert_eq!(e.kind, ErrorKind::ContextLengthExceeded);
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        assert!(e.message.contains("18446744073709551621"), "{}", e.message);
    }

    #[test]
    fn max_tokens_names_both_numbers_on_overflow() {
        let e = max_tokens(Some((60, "max_tokens")), 50, 100, 512).unwrap_err();
        assert_eq!(e.kind, ErrorKind::ContextLengthExceeded);
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        assert!(e.message.contains("50 in the prompt"), "{}", e.message);
        assert!(e.message.contains("60 for the completion"), "{}", e.message);
        assert!(e.message.contains("100 tokens"), "{}", e.message);
    }

    #[test]
    fn default_max_tokens_is_clamped_to_the_context_left() {
        assert_eq!(max_tokens(None, 50, 100, 512), Ok(50));
        assert_eq!(max_tokens(None, 50, 100, 20), Ok(20));
        assert_eq!(max_tokens(None, 50, 100, 0), Ok(50));
        assert_eq!(max_tokens(Some((0, "max_tokens")), 100, 100, 20), Ok(0));
        assert!(max_tokens(None, 100, 100, 20).is_err());
    }

    #[test]
    fn sampling_errors_name_their_field() {
        let wire = SamplingWire {
            temperature: Some(3.0),
            ..SamplingWire::default()
        };
        let e = sampling_params(&wire, NO_LOGPROBS, 10).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"));
        let wire = SamplingWire {
            logit_bias: Some([("x".to_string(), 1.0)].into()),
            ..SamplingWire::default()
        };
        let e = sampling_params(&wire, NO_LOGPROBS, 10).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("logit_bias"));
        let wire = SamplingWire {
            top_k: Some(-2),
            ..SamplingWire::default()
        };
        let e = sampling_params(&wire, NO_LOGPROBS, 10).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("top_k"));
        let wanted = LogprobsWanted {
            logprobs: true,
            top: 30,
            top_param: "logprobs",
        };
        let e = sampling_params(&SamplingWire::default(), wanted, 10).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("logprobs"));
    }

    #[test]
    fn fan_out_numbers_ids_and_seeds() {
        let gen = Generation {
            sampling: SamplingParams::default(),
            seed: 7,
            n: 2,
            stop: vec![],
            stop_token_ids: vec![1],
            output: OutputRules::default(),
            cache_prompt: true,
            constraint: None,
        };
        let prompts = [
            PromptPlan {
                tokens: vec![3],
                max_tokens: 4,
            },
            PromptPlan {
                tokens: vec![5],
                max_tokens: 6,
            },
        ];
        let reqs = fan_out("r", &prompts, &gen, None, &[]).expect("valid");
        let ids: Vec<_> = reqs.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["r-0", "r-1", "r-2", "r-3"]);
        let seeds: Vec<_> = reqs.iter().map(|r| r.seed).collect();
        assert_eq!(seeds, [7, 8, 9, 10]);
        assert_eq!(reqs[2].prompt, vec![5]);
        assert_eq!(reqs[3].max_tokens, 6);
        let single = fan_out(
            "r",
            &prompts[..1],
            &Generation {
                n: 1,
                ..gen.clone()
            },
            None,
            &[],
        )
        .expect("valid");
        assert_eq!(single[0].id, "r");
        let too_many = Generation {
            output: OutputRules {
                min_tokens: 5,
                ..OutputRules::default()
            },
            ..gen
        };
        let e = fan_out("r", &prompts, &too_many, None, &[]).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("min_tokens"));
        assert!(e.message.contains("max_tokens (4)"), "{}", e.message);
    }

    #[test]
    fn output_rules_take_either_name_of_the_stop_string_flag() {
        let rules = |include, trim| {
            output_rules(&OutputWire {
                include_stop_str_in_output: include,
                no_stop_trim: trim,
                min_tokens: Some(2),
                skip_special_tokens: Some(false),
                ..OutputWire::default()
            })
        };
        for (include, trim, kept) in [
            (None, None, false),
            (Some(true), None, true),
            (None, Some(true), true),
            (Some(false), Some(false), false),
        ] {
            let r = rules(include, trim).expect("consistent");
            assert_eq!(r.include_stop_str, kept, "{include:?} {trim:?}");
            assert_eq!((r.min_tokens, r.skip_special_tokens), (2, false));
        }
        let e = rules(Some(true), Some(false)).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("no_stop_trim"));
    }

    #[test]
    fn content_parts_other_than_text_are_refused() {
        use super::super::wire::{ContentPart, Role};
        let m = WireMessage {
            role: Role::User,
            content: Some(Content::Parts(vec![ContentPart {
                kind: "input_audio".into(),
                text: None,
                image_url: None,
            }])),
            name: None,
            tool_calls: None,
            tool_call_id: None,
        };
        let e = chat_messages(&[m], None).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content[0].type"));
    }
}
