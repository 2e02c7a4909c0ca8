//! What every handler shares: the engine (absent while the model loads), the HTTP limits, the
//! API keys with their limiters and the metrics registry.
//!
//! The socket is bound before the model is loaded, so the engine lives in an [`EngineSlot`]
//! that starts empty: model routes answer 503 `model_loading` until the binary fills it, and
//! 503 `shutting_down` once shutdown has begun.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use plugins::Registry;

use super::auth::{Auth, KeyTable};
use super::cors::AllowedOrigins;
use super::error::{ApiError, ErrorKind};
use super::generate::Deadline;
use super::images::ImageConfig;
use super::metrics::{Metrics, MetricsError};
use super::responses::ResponseStore;
use crate::engine::Engine;
use crate::tools::ToolCallParser;

/// The largest `n` (choices per request) accepted; each choice is a full sequence in the
/// engine, so a large `n` is a cheap way to fill the queue.
pub const MAX_N: usize = 8;

/// The most stop strings per request (OpenAI allows 4).
pub const MAX_STOP: usize = 4;

/// The most sequences one /v1/completions request may start (prompts times `n`); batched
/// scoring clients (lm-evaluation-harness) send several prompts per request.
pub const MAX_CHOICES: usize = 64;

/// The HTTP layer's share of the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpConfig {
    /// Accepted API keys with their access and limits; empty means no authentication.
    pub api_keys: KeyTable,
    /// Largest request body in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// `max_tokens` when the request gives none; `0` means the rest of the context. Always
    /// clamped to the context left after the prompt.
    pub max_tokens_default: usize,
    /// Longest a generation may run before it is cancelled (408 or a stream error event).
    pub request_timeout: Option<Duration>,
    /// Origins browsers may call from (CORS); none: no CORS headers.
    pub allowed_origins: AllowedOrigins,
    /// The format the model writes tool calls in (`--tool-call-parser`).
    pub tool_call_parser: ToolCallParser,
    /// Where an image in a chat request may come from and what it may be.
    pub images: ImageConfig,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            api_keys: KeyTable::default(),
            max_body_bytes: 2 * 1024 * 1024,
            max_tokens_default: 512,
            request_timeout: None,
            allowed_origins: AllowedOrigins::None,
            tool_call_parser: ToolCallParser::default(),
            images: ImageConfig::default(),
        }
    }
}

/// The engine and the plug-in registry once loaded, and whether the server is shutting down.
/// The registry is filled before the engine, so a served request always finds it.
#[derive(Default)]
pub struct EngineSlot {
    engine: OnceLock<Arc<dyn Engine>>,
    plugins: OnceLock<Arc<Registry>>,
    shutting_down: AtomicBool,
}

impl EngineSlot {
    /// A slot that is still loading.
    pub fn loading() -> Self {
        Self::default()
    }

    /// A slot with an engine already in it (tests).
    pub fn ready(engine: Arc<dyn Engine>) -> Self {
        let slot = Self::default();
        slot.fill(engine);
        slot
    }

    /// Puts the loaded engine in; a second engine is ignored (returns `false`), the first one
    /// keeps serving.
    pub fn fill(&self, engine: Arc<dyn Engine>) -> bool {
        self.engine.set(engine).is_ok()
    }

    /// Puts the plug-in registry in; like `fill`, only the first one counts.
    pub fn fill_plugins(&self, registry: Arc<Registry>) -> bool {
        self.plugins.set(registry).is_ok()
    }

    /// The plug-in registry, once the model is loaded.
    pub fn plugins(&self) -> Option<Arc<Registry>> {
        self.plugins.get().cloned()
    }

    /// From now on model routes answer 503 `shutting_down`.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// The engine if loaded, shutting down or not (metrics keep reporting while draining).
    pub fn peek(&self) -> Option<Arc<dyn Engine>> {
        self.engine.get().cloned()
    }

    /// The engine, or why a request cannot be served now.
    pub fn get(&self) -> Result<Arc<dyn Engine>, ApiError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ApiError::new(
                ErrorKind::ShuttingDown,
                "the server is shutting down",
            ));
        }
        self.engine.get().cloned().ok_or_else(|| {
            ApiError::new(
                ErrorKind::ModelLoading,
                "the model is still loading; retry shortly",
            )
        })
    }
}

/// Shared state of the router; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub slot: Arc<EngineSlot>,
    pub config: Arc<HttpConfig>,
    pub metrics: Arc<Metrics>,
    /// The API keys' limiters, built from `config.api_keys`.
    pub auth: Arc<Auth>,
    /// Stored responses, for `previous_response_id` (POST /v1/responses).
    pub responses: Arc<ResponseStore>,
}

impl AppState {
    pub fn new(slot: EngineSlot, config: HttpConfig) -> Result<Self, MetricsError> {
        Ok(Self {
            slot: Arc::new(slot),
            auth: Arc::new(Auth::new(&config.api_keys)),
            config: Arc::new(config),
            metrics: Arc::new(Metrics::new()?),
            responses: Arc::new(ResponseStore::default()),
        })
    }

    /// When a generation starting now must end, if `request_timeout` is set.
    pub fn deadline(&self) -> Option<Deadline> {
        self.config.request_timeout.map(Deadline::after)
    }

    /// The engine, or the 503 to answer.
    pub fn engine(&self) -> Result<Arc<dyn Engine>, ApiError> {
        self.slot.get()
    }
}
