//! POST /tokenize and POST /detokenize, shaped like vLLM's: a prompt (or chat messages,
//! rendered exactly as /v1/chat/completions renders them) to token ids, and back.

use axum::extract::State;
use axum::Json;

use super::auth::Caller;
use super::error::ApiError;
use super::extract::ApiJson;
use super::replies::{DetokenizeResponse, TokenizeResponse};
use super::selection::select_for;
use super::state::AppState;
use super::validate::{chat_messages, check_token_ids};
use super::wire::{DetokenizeRequest, TokenizeRequest};
use models::chat_template::RenderOptions;

/// Tokenize
///
/// vLLM's /tokenize: a prompt, or chat messages rendered exactly as
/// /v1/chat/completions renders them, to token ids.
#[utoipa::path(
    post,
    path = "/tokenize",
    operation_id = "tokenize",
    tag = "tokens",
    request_body = TokenizeRequest,
    responses((status = 200, description = "The token ids", body = TokenizeResponse)),
)]
pub async fn tokenize(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let engine = state.engine()?;
    caller.check(&engine.info().id, req.model.as_deref(), &[])?;
    // The tokenizer is the base model's whatever adapter `model` names; the name is checked.
    select_for(&state, engine.info(), req.model.as_deref(), &[])?;
    let text = match (&req.prompt, &req.messages) {
        (Some(prompt), None) => prompt.clone(),
        (None, Some(messages)) => {
            let options = RenderOptions {
                add_generation_prompt: req.add_generation_prompt.unwrap_or(true),
                ..RenderOptions::default()
            };
            // Image parts need the images themselves (their tokens come with their
            // features): /tokenize counts text only, and refuses image parts by part.
            engine.render_chat(&chat_messages(messages, None)?, &options)?
        }
        _ => {
            return Err(ApiError::invalid(
                "prompt",
                "give exactly one of `prompt` and `messages`",
            ))
        }
    };
    let tokens = engine.tokenize(&text, req.add_special_tokens.unwrap_or(true))?;
    let token_strs = req
        .return_token_strs
        .unwrap_or(false)
        .then(|| tokens.iter().map(|&id| engine.token_text(id)).collect());
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        max_model_len: engine.info().context_length,
        tokens,
        token_strs,
    }))
}

/// Detokenize
///
/// vLLM's /detokenize: token ids to text.
#[utoipa::path(
    post,
    path = "/detokenize",
    operation_id = "detokenize",
    tag = "tokens",
    request_body = DetokenizeRequest,
    responses((status = 200, description = "The text", body = DetokenizeResponse)),
)]
pub async fn detokenize(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    let engine = state.engine()?;
    caller.check(&engine.info().id, req.model.as_deref(), &[])?;
    // The tokenizer is the base model's whatever adapter `model` names; the name is checked.
    select_for(&state, engine.info(), req.model.as_deref(), &[])?;
    check_token_ids(&req.tokens, engine.info().vocab_size, "tokens")?;
    let prompt = engine.detokenize(&req.tokens)?;
    Ok(Json(DetokenizeResponse { prompt }))
}
