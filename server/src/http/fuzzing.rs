//! Entry points for the fuzz targets in `fuzz/` (and for tests that want the same path): a
//! generation route's request body, from raw bytes to the [`GenerateRequest`]s it would submit,
//! without a socket, a router or a real engine.
//!
//! Each runs exactly what the route runs before submitting: [`extract::parse`] (JSON, the
//! screen of accepted and refused fields, typed deserialization), then the route's own
//! validation (`chat::plan` / `completions::plan`: messages, sampling, template, tokens,
//! `max_tokens`) against the given engine's model info, with no plug-ins selected. Plug-in
//! selection and authentication need the server's state and are not covered here.

use plugins::Chain;

use super::error::ApiError;
use super::extract;
use super::selection::Selection;
use super::state::HttpConfig;
use super::wire::{ChatRequest, CompletionRequest};
use crate::engine::{Engine, GenerateRequest};

/// The body of a POST /v1/chat/completions, parsed and validated.
pub fn chat_request(
    body: &[u8],
    engine: &dyn Engine,
    config: &HttpConfig,
) -> Result<Vec<GenerateRequest>, ApiError> {
    let req: ChatRequest = extract::parse(body)?;
    let tools = super::tool_calls::tool_plan(&req, config)?;
    super::chat::plan(
        &req,
        &tools,
        engine,
        config,
        "fuzz",
        &base_selection(engine),
        None,
    )
}

/// The body of a POST /v1/completions, parsed and validated.
pub fn completion_request(
    body: &[u8],
    engine: &dyn Engine,
    config: &HttpConfig,
) -> Result<Vec<GenerateRequest>, ApiError> {
    let req: CompletionRequest = extract::parse(body)?;
    let (requests, _shape) =
        super::completions::plan(&req, engine, config, "fuzz", &base_selection(engine))?;
    Ok(requests)
}

fn base_selection(engine: &dyn Engine) -> Selection {
    Selection {
        chain: Chain::default(),
        model: engine.info().id.clone(),
    }
}
