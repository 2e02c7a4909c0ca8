//! POST /v1/embeddings: the mean of a text's final hidden states (after the final norm, what
//! the LM head reads), L2-normalised, from the served model with the request's plug-ins (a
//! LoRA or a steering vector changes the hidden states; plug-ins that only act on logits do
//! not change an embedding). Each input is one prefill through the engine, batched with
//! whatever else runs; nothing is generated and no prefix cache is used (every position's
//! state is needed).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use plugins::{ChainEntry, PluginSpec};

use super::auth::Caller;
use super::completions::prompt_inputs;
use super::error::{ApiError, ErrorKind};
use super::extract::{ApiJson, Screen};
use super::generate::{collect_all, submit_all};
use super::selection::prepare_generation;
use super::state::AppState;
use super::wire::Prompt;
use super::RequestId;
use crate::engine::{Engine, GenerateRequest, OutputRules};

/// POST /v1/embeddings.
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingsRequest {
    pub model: Option<String>,
    /// A string, a list of strings, a list of token ids or a list of token-id lists.
    pub input: Prompt,
    /// `float` (default) or `base64` (little-endian f32 bytes, as OpenAI encodes them).
    pub encoding_format: Option<EncodingFormat>,
    /// Only the model's own width: embeddings are not truncated or projected.
    #[schema(minimum = 1)]
    pub dimensions: Option<usize>,
    pub user: Option<String>,
    /// The plug-in chain (graft's extension, as on chat).
    #[serde(default)]
    pub plugins: Vec<PluginSpec>,
}

impl Screen for EmbeddingsRequest {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    Float,
    Base64,
}

/// The `list` of embeddings.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EmbeddingList {
    pub object: &'static str,
    pub data: Vec<EmbeddingItem>,
    pub model: String,
    pub usage: EmbeddingUsage,
    /// The plug-in chain that ran, when one did.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<ChainEntry>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EmbeddingItem {
    pub object: &'static str,
    pub index: usize,
    pub embedding: Vector,
}

/// A list of floats, or a base64 string with `encoding_format: "base64"`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Vector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct EmbeddingUsage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

/// Create embeddings
///
/// Mean-pooled, L2-normalised final hidden states of the served model (with the request's
/// plug-ins), one per input.
#[utoipa::path(
    post,
    path = "/v1/embeddings",
    operation_id = "createEmbedding",
    tag = "generation",
    request_body = EmbeddingsRequest,
    responses((status = 200, description = "One embedding per input", body = EmbeddingList)),
)]
pub async fn embeddings(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    ApiJson(req): ApiJson<EmbeddingsRequest>,
) -> Result<Response, ApiError> {
    let deadline = state.deadline();
    let (engine, selection) =
        prepare_generation(&state, &caller, req.model.as_deref(), &req.plugins).await?;
    check_dimensions(req.dimensions, engine.info().hidden_size)?;
    let requests = plan(&req, engine.as_ref(), &request_id.0, &selection.chain.calls)?;
    let count = requests.len();
    let subs = submit_all(
        engine.as_ref(),
        requests,
        &state.metrics,
        caller.meter(),
        1,
        &selection.lora_names(),
    )?;
    let outcomes = collect_all(subs, deadline).await?;
    let mut data = Vec::with_capacity(count);
    let mut prompt_tokens = 0;
    for (index, outcome) in outcomes.into_iter().enumerate() {
        let vector = outcome.embedding.ok_or_else(|| {
            ApiError::new(ErrorKind::Internal, "the engine returned no embedding")
        })?;
        prompt_tokens += outcome.prompt_tokens;
        data.push(EmbeddingItem {
            object: "embedding",
            index,
            embedding: encode(vector, req.encoding_format.unwrap_or(EncodingFormat::Float)),
        });
    }
    let list = EmbeddingList {
        object: "list",
        data,
        model: selection.model,
        usage: EmbeddingUsage {
            prompt_tokens,
            total_tokens: prompt_tokens,
        },
        plugins: selection.chain.entries,
    };
    Ok(Json(list).into_response())
}

fn check_dimensions(dimensions: Option<usize>, hidden: usize) -> Result<(), ApiError> {
    match dimensions {
        Some(d) if d != hidden => Err(ApiError::unsupported(
            "dimensions",
            format!(
                "this model's embeddings have {hidden} dimensions and are not shortened; got {d}"
            ),
        )),
        _ => Ok(()),
    }
}

/// One embedding request per input: its tokens prefilled, nothing generated.
fn plan(
    req: &EmbeddingsRequest,
    engine: &dyn Engine,
    id: &str,
    hooks: &[models::HookCall],
) -> Result<Vec<GenerateRequest>, ApiError> {
    let context = engine.info().context_length;
    let empty_text = match &req.input {
        Prompt::Text(t) => t.is_empty(),
        Prompt::Texts(ts) => ts.iter().any(String::is_empty),
        Prompt::Tokens(_) | Prompt::TokenLists(_) => false,
    };
    if empty_text {
        return Err(ApiError::invalid("input", "an input text is empty"));
    }
    let inputs = prompt_inputs(&req.input, engine, false, true, "input")?;
    inputs
        .into_iter()
        .enumerate()
        .map(|(i, input)| {
            if input.tokens.len() > context {
                return Err(ApiError::new(
                    ErrorKind::ContextLengthExceeded,
                    format!(
                        "input[{i}] has {} tokens; the model's context is {context}",
                        input.tokens.len()
                    ),
                )
                .with_param("input"));
            }
            Ok(GenerateRequest {
                id: format!("{id}-{i}"),
                prompt: input.tokens,
                sampling: Default::default(),
                seed: 0,
                max_tokens: 0,
                stop: Vec::new(),
                stop_token_ids: Vec::new(),
                prompt_logprobs: None,
                hooks: hooks.to_vec(),
                output: OutputRules::default(),
                cache_prompt: false,
                constraint: None,
                embed: true,
            })
        })
        .collect()
}

/// A vector as OpenAI sends it: floats, or base64 of its little-endian f32 bytes.
fn encode(vector: Vec<f32>, format: EncodingFormat) -> Vector {
    match format {
        EncodingFormat::Float => Vector::Float(vector),
        EncodingFormat::Base64 => {
            let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
            Vector::Base64(base64(&bytes))
        }
    }
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        let one = json!(encode(vec![1.0], EncodingFormat::Base64));
        assert_eq!(one, json!("AACAPw=="));
    }

    #[test]
    fn only_the_models_own_width_is_accepted() {
        assert!(check_dimensions(None, 576).is_ok());
        assert!(check_dimensions(Some(576), 576).is_ok());
        let e = check_dimensions(Some(256), 576).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("dimensions"));
        assert!(e.message.contains("576"));
    }
}
