//! POST /v1/completions (the legacy text API): one or more prompts, as text or token ids,
//! each generated `n` times, answered as one `text_completion` or streamed.
//!
//! This is the route scoring harnesses use: `echo=true, max_tokens=0, logprobs=N` returns
//! the prompt with each prompt token's log-prob and top-N alternatives. Token-id prompts are
//! used exactly as sent (no BOS added), so a client's token positions match ours.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Value};

use super::auth::Caller;
use super::error::ApiError;
use super::extract::ApiJson;
use super::generate::{collect_all, submit_all, summarize, ChoiceTotals, GenToken, Outcome};
use super::logprobs::{LegacyLogprobs, TokenNames};
use super::replies::{SseEvent, TextChoice, TextCompletion};
use super::selection::{prepare_generation, Selection};
use super::state::{AppState, HttpConfig, MAX_CHOICES};
use super::stream::{sse_response, ChunkFormat, Envelope};
use super::validate::{
    check_token_ids, fan_out, generation, max_tokens, LogprobsWanted, PromptPlan,
};
use super::wire::{CompletionRequest, Prompt};
use super::{unix_now, RequestId};
use crate::engine::{Engine, FinishReason, GenerateRequest, TokenLogprob};

/// One prompt: its tokens and, for `echo`, its text.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct PromptInput {
    pub tokens: Vec<u32>,
    pub text: String,
}

/// What the response needs to know besides the engine's events.
pub(super) struct Shape {
    prompts: Vec<PromptInput>,
    n: usize,
    echo: bool,
    logprobs: bool,
    names: TokenNames,
}

/// Create a (legacy) completion
///
/// OpenAI's legacy completions: one or more prompts as text or token ids, `echo` and
/// `logprobs` for scoring. With `stream: true` the reply is server-sent events:
/// `data: <TextCompletionChunk>` events (schema in components), a `data: <ErrorBody>` event
/// if generation fails half-way, then `data: [DONE]`.
#[utoipa::path(
    post,
    path = "/v1/completions",
    operation_id = "createCompletion",
    tag = "generation",
    request_body = CompletionRequest,
    responses((status = 200, description = "The completion, or its chunks with `stream`", content(
        (TextCompletion = "application/json"),
        (SseEvent = "text/event-stream"),
    ))),
)]
pub async fn completions(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let deadline = state.deadline();
    let (engine, selection) =
        prepare_generation(&state, &caller, req.model.as_deref(), &req.plugins).await?;
    let (requests, shape) = plan(
        &req,
        engine.as_ref(),
        &state.config,
        &request_id.0,
        &selection,
    )?;
    let subs = submit_all(
        engine.as_ref(),
        requests,
        &state.metrics,
        caller.meter(),
        shape.n,
        &selection.lora_names(),
    )?;
    let envelope = Envelope {
        id: format!("cmpl-{}", request_id.0),
        object: "text_completion",
        created: unix_now(),
        model: selection.model,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
        plugins: selection.chain.entries,
    };
    if req.stream.unwrap_or(false) {
        let n = shape.n;
        let offsets = vec![0; subs.len()];
        let format = CompletionFormat {
            envelope,
            engine,
            shape,
            offsets,
        };
        return Ok(sse_response(subs, format, n, deadline));
    }
    let outcomes = collect_all(subs, deadline).await?;
    Ok(Json(response(&envelope, engine.as_ref(), &shape, &outcomes)).into_response())
}

pub(super) fn plan(
    req: &CompletionRequest,
    engine: &dyn Engine,
    config: &HttpConfig,
    id: &str,
    selection: &Selection,
) -> Result<(Vec<GenerateRequest>, Shape), ApiError> {
    let info = engine.info();
    let wanted = LogprobsWanted {
        logprobs: req.logprobs.is_some(),
        top: req.logprobs.unwrap_or(0),
        top_param: "logprobs",
    };
    let gen = generation(&req.sampling(), wanted, engine)?;
    let echo = req.echo.unwrap_or(false);
    let add_special = req.add_special_tokens.unwrap_or(true);
    let prompts = prompt_inputs(&req.prompt, engine, echo, add_special, "prompt")?;
    if prompts.len() * gen.n > MAX_CHOICES {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "{} prompts times n = {} is more than {MAX_CHOICES} sequences per request",
                prompts.len(),
                gen.n
            ),
        ));
    }
    let requested = req.max_tokens.map(|m| (m, "max_tokens"));
    let plans = prompts
        .iter()
        .map(|p| {
            let max = max_tokens(
                requested,
                p.tokens.len(),
                info.context_length,
                config.max_tokens_default,
            )?;
            Ok(PromptPlan {
                tokens: p.tokens.clone(),
                max_tokens: max,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let prompt_logprobs = (echo && wanted.logprobs).then_some(wanted.top);
    let requests = fan_out(id, &plans, &gen, prompt_logprobs, &selection.chain.calls)?;
    let shape = Shape {
        prompts,
        n: gen.n,
        echo,
        logprobs: wanted.logprobs,
        names: TokenNames::from_flag(req.return_tokens_as_token_ids),
    };
    Ok((requests, shape))
}

/// Tokenizes text prompts (BOS as the model wants, with `add_special`) and checks token-id
/// prompts; errors name `param`, the field the prompts came in (`prompt`, `input`).
pub(super) fn prompt_inputs(
    prompt: &Prompt,
    engine: &dyn Engine,
    echo: bool,
    add_special: bool,
    param: &str,
) -> Result<Vec<PromptInput>, ApiError> {
    let from_text = |text: &String| -> Result<PromptInput, ApiError> {
        Ok(PromptInput {
            tokens: engine.tokenize(text, add_special)?,
            text: text.clone(),
        })
    };
    let from_ids = |ids: &Vec<u32>| -> Result<PromptInput, ApiError> {
        check_token_ids(ids, engine.info().vocab_size, param)?;
        let text = match echo {
            true => engine.detokenize(ids)?,
            false => String::new(),
        };
        Ok(PromptInput {
            tokens: ids.clone(),
            text,
        })
    };
    let inputs = match prompt {
        Prompt::Text(text) => vec![from_text(text)?],
        Prompt::Texts(texts) => texts.iter().map(from_text).collect::<Result<_, _>>()?,
        Prompt::Tokens(ids) => vec![from_ids(ids)?],
        Prompt::TokenLists(lists) => lists.iter().map(from_ids).collect::<Result<_, _>>()?,
    };
    if inputs.is_empty() || inputs.iter().any(|p| p.tokens.is_empty()) {
        return Err(ApiError::invalid(
            param,
            format!("{param} must not be empty"),
        ));
    }
    Ok(inputs)
}

/// The non-streaming `text_completion` body.
fn response(
    envelope: &Envelope,
    engine: &dyn Engine,
    shape: &Shape,
    outcomes: &[Outcome],
) -> TextCompletion {
    let choices = outcomes
        .iter()
        .enumerate()
        .map(|(index, o)| choice(engine, shape, index, o))
        .collect();
    let totals: Vec<_> = outcomes
        .iter()
        .enumerate()
        .map(|(i, o)| o.totals(i))
        .collect();
    let (usage, timings) = summarize(&totals, shape.n);
    TextCompletion {
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

fn choice(engine: &dyn Engine, shape: &Shape, index: usize, o: &Outcome) -> TextChoice {
    let mut text = String::new();
    let mut lps = LegacyLogprobs::default();
    // Offsets count token texts (as vLLM's do), continuing from the echoed prompt's.
    let mut offset = 0;
    if let (true, Some(prompt)) = (shape.echo, shape.prompts.get(index / shape.n.max(1))) {
        text.push_str(&prompt.text);
        if shape.logprobs {
            let prompt_lps = o.prompt_logprobs.as_deref().unwrap_or_default();
            lps = LegacyLogprobs::prompt(
                engine,
                shape.names,
                &prompt.tokens,
                prompt_lps,
                &mut offset,
            );
        }
    }
    if shape.logprobs {
        for t in &o.tokens {
            lps.push(engine, shape.names, t.id, t.logprob.as_ref(), &mut offset);
        }
    }
    text.push_str(&o.text);
    TextChoice {
        index,
        text,
        logprobs: shape.logprobs.then_some(lps),
        finish_reason: o.finish_reason.as_str(),
    }
}

/// Streamed `text_completion` chunks; with `echo`, the prompt (and its log-probs) first.
struct CompletionFormat {
    envelope: Envelope,
    engine: Arc<dyn Engine>,
    shape: Shape,
    /// Per choice: the running `text_offset` (characters of the token texts sent so far).
    offsets: Vec<usize>,
}

impl CompletionFormat {
    fn chunk(
        &self,
        index: usize,
        text: &str,
        logprobs: Value,
        finish: Option<FinishReason>,
    ) -> Value {
        let choice = json!({
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": finish.map(FinishReason::as_str),
        });
        self.envelope.chunk(vec![choice])
    }

    fn prompt(&self, index: usize) -> Option<&PromptInput> {
        self.shape.prompts.get(index / self.shape.n.max(1))
    }
}

impl ChunkFormat for CompletionFormat {
    fn opening(&mut self, index: usize) -> Vec<Value> {
        // With prompt log-probs the echo waits for them, so text and log-probs share a chunk.
        if !self.shape.echo || self.shape.logprobs {
            return Vec::new();
        }
        let Some(text) = self.prompt(index).map(|p| p.text.clone()) else {
            return Vec::new();
        };
        vec![self.chunk(index, &text, Value::Null, None)]
    }

    fn prompt_logprobs(&mut self, index: usize, lps: Vec<TokenLogprob>) -> Option<Value> {
        if !self.shape.echo {
            return None;
        }
        let prompt = self.prompt(index)?.clone();
        let offset = self.offsets.get_mut(index)?;
        let names = self.shape.names;
        let legacy =
            LegacyLogprobs::prompt(self.engine.as_ref(), names, &prompt.tokens, &lps, offset);
        Some(self.chunk(index, &prompt.text, json!(legacy), None))
    }

    fn token(&mut self, index: usize, token: GenToken) -> Option<Value> {
        if !self.shape.logprobs {
            return (!token.text.is_empty())
                .then(|| self.chunk(index, &token.text, Value::Null, None));
        }
        let mut lps = LegacyLogprobs::default();
        let offset = self.offsets.get_mut(index)?;
        lps.push(
            self.engine.as_ref(),
            self.shape.names,
            token.id,
            token.logprob.as_ref(),
            offset,
        );
        Some(self.chunk(index, &token.text, json!(lps), None))
    }

    fn finish(
        &mut self,
        index: usize,
        reason: FinishReason,
        trailing: String,
        _: &ChoiceTotals,
    ) -> Vec<Value> {
        vec![self.chunk(index, &trailing, Value::Null, Some(reason))]
    }

    fn envelope(&self) -> &Envelope {
        &self.envelope
    }
}
