//! The seam between HTTP and compute: the [`Engine`] trait, the validated request it takes
//! and the events it streams back.
//!
//! The HTTP layer holds an `Arc<dyn Engine>`; the real implementation owns the model on a
//! dedicated thread and batches requests continuously, a scripted fake drives the HTTP tests.
//! Submitting never blocks: a full queue is an immediate [`EngineError::QueueFull`]. Dropping
//! the event receiver cancels the request (the engine notices within one step and frees the
//! sequence's KV cache).

#[cfg(test)]
mod disconnect_tests;
mod draft_policy;
#[cfg(test)]
mod plugin_state_tests;
mod prefix_cache;
mod prefix_reuse;
mod real;
mod scheduler;
mod sequence;
#[cfg(test)]
mod speculative_tests;
mod step_metrics;
mod stop;
pub mod testing;
mod worker;

pub use prefix_cache::BLOCK_TOKENS as PREFIX_BLOCK_TOKENS;
pub use real::{EngineConfig, RealEngine, StartError};
pub use step_metrics::{
    HistogramSnapshot, PrefixCacheSnapshot, SpecDecodeSnapshot, StepMetricsSnapshot,
};

use std::time::Duration;

use models::chat_template::{ChatMessage, RenderOptions};
use models::sampling::SamplingParams;
use models::HookCall;
use tokio::sync::mpsc;

use crate::structured::{Constraint, Grammars};

pub mod fake;

/// A request the HTTP layer has validated: prompt tokenized, parameters range-checked,
/// `prompt.len() + max_tokens` within the context.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// The request id (also in logs and the `x-request-id` header); `n > 1` requests submit
    /// one `GenerateRequest` per choice with ids `<id>-<index>`.
    pub id: String,
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    /// The seed the sampler uses (the request's `seed`, or one drawn by the HTTP layer).
    pub seed: u64,
    /// Tokens to generate at most (finish reason `length` when reached).
    pub max_tokens: usize,
    /// Strings that end generation; never part of the output text.
    pub stop: Vec<String>,
    /// Token ids that end generation (the model's end-of-sequence and end-of-turn tokens,
    /// unless the request asked to ignore them); not part of the output text.
    pub stop_token_ids: Vec<u32>,
    /// `Some(top_n)`: also return each prompt token's log-prob and top-`top_n` alternatives
    /// (`echo` with `logprobs` on /v1/completions).
    pub prompt_logprobs: Option<usize>,
    /// The request's resolved plug-in chain, in order (empty: the base model). The calls hold
    /// the plug-ins, so the request keeps the versions it resolved until it ends.
    pub hooks: Vec<HookCall>,
    pub output: OutputRules,
    /// Whether the prompt may start from a prefix another request left in the engine's
    /// prefix cache, and leave its own there (llama.cpp's `cache_prompt`; on by default).
    pub cache_prompt: bool,
    /// What the output must be (`response_format`), enforced token by token; `None`: text.
    pub constraint: Option<Constraint>,
    /// Embed instead of generating: the prompt's final hidden states (after the final norm),
    /// mean-pooled and L2-normalised, come back as [`Event::Embedding`]; nothing is generated.
    pub embed: bool,
}

/// When a sequence may stop and what its text includes, beyond `stop` and `stop_token_ids`
/// (vLLM's `min_tokens`, `include_stop_str_in_output` and `skip_special_tokens`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputRules {
    /// Until this many tokens are generated, the stop tokens cannot be sampled (their logits
    /// are masked) and stop strings are not looked for.
    pub min_tokens: usize,
    /// A matched stop string ends the text instead of being cut off.
    pub include_stop_str: bool,
    /// Special tokens (other than the stop tokens, never in the text) are left out.
    pub skip_special_tokens: bool,
}

impl Default for OutputRules {
    fn default() -> Self {
        Self {
            min_tokens: 0,
            include_stop_str: false,
            skip_special_tokens: true,
        }
    }
}

/// A token's log-probability and the most likely alternatives at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop string or stop token was produced.
    Stop,
    /// `max_tokens` was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// Server-side timings of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    /// From submission to the first forward step that included the request.
    pub queue: Duration,
    /// Prefill, from the first step to the first generated token.
    pub prompt: Duration,
    /// From the first generated token to the last.
    pub generation: Duration,
}

/// What the engine streams back for one request, in this order: `PromptLogprobs` (if asked),
/// `Token`s, then exactly one `Finished` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Log-probs of prompt tokens 1.. (the first token has none).
    PromptLogprobs(Vec<TokenLogprob>),
    /// An embedding request's vector (unit length), before `Finished`.
    Embedding(Vec<f32>),
    /// One generated token. `text` is the newly completed text (may be empty while a UTF-8
    /// character or a possible stop string is held back); `logprob` when asked for.
    Token {
        id: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        /// Prompt tokens whose keys and values came from the prefix cache (not prefilled).
        cached_tokens: usize,
        completion_tokens: usize,
        /// Text held back at the end (a partial stop-string prefix that did not match).
        trailing_text: String,
        timings: Timings,
    },
    /// The request failed inside the engine; other requests are unaffected.
    Failed(EngineError),
}

/// Events of one request. Drop it to cancel the request.
pub type EventReceiver = mpsc::Receiver<Event>;

/// Static facts about the served model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// The id clients put in `model` (e.g. `smollm2-135m-instruct`).
    pub id: String,
    /// Longest prompt plus completion, in tokens.
    pub context_length: usize,
    pub vocab_size: usize,
    /// Width of the hidden states, hence of embeddings.
    pub hidden_size: usize,
    /// Unix seconds when the model was loaded (`created` in /v1/models).
    pub created: u64,
}

/// Load and queue figures for metrics and admission.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub kv_used_bytes: usize,
    pub kv_capacity_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("the request queue is full ({capacity} waiting); retry later")]
    QueueFull { capacity: usize },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the model has no chat template; configure one with --chat-template")]
    NoChatTemplate,
    #[error("chat template: {0}")]
    Template(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("prompt is empty")]
    EmptyPrompt,
    #[error(
        "the model produced unusable logits for this request ({0}); a plug-in's weights or \
         parameters may overflow"
    )]
    NonFiniteLogits(String),
    #[error("a plug-in could not start for this request: {0}")]
    PluginState(String),
    #[error("engine failure: {0}")]
    Internal(String),
}

/// What the HTTP layer needs from an engine.
pub trait Engine: Send + Sync + 'static {
    fn info(&self) -> &ModelInfo;

    /// The image side of a vision-language model (`None`: the model reads text only).
    fn vision(&self) -> Option<std::sync::Arc<models::vision::VisionModel>> {
        None
    }

    /// Renders chat messages with the model's template (the generation prompt appended, or
    /// the last message left open, as `options` say).
    fn render_chat(
        &self,
        messages: &[ChatMessage],
        options: &RenderOptions,
    ) -> Result<String, EngineError>;

    /// Text to token ids, special tokens parsed, BOS added when the model wants it
    /// (`add_special`).
    fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<u32>, EngineError>;

    /// Token ids to text.
    fn detokenize(&self, ids: &[u32]) -> Result<String, EngineError>;

    /// The token's text as it appears in log-prob listings.
    fn token_text(&self, id: u32) -> String;

    /// End-of-sequence and end-of-turn ids, which stop generation by default.
    fn eos_token_ids(&self) -> Vec<u32>;

    /// Queues a request. Never blocks: a full queue is [`EngineError::QueueFull`].
    fn submit(&self, request: GenerateRequest) -> Result<EventReceiver, EngineError>;

    /// Queues the `n` choices of one prompt: requests that differ only in id, seed and
    /// length. All are accepted or none. An engine may prefill the shared prompt once and fork
    /// the sequence (cache and plug-in state) for each choice; by default each is submitted
    /// on its own.
    fn submit_choices(
        &self,
        choices: Vec<GenerateRequest>,
    ) -> Result<Vec<EventReceiver>, EngineError> {
        // On an error the receivers already made are dropped, which cancels them.
        choices.into_iter().map(|c| self.submit(c)).collect()
    }

    fn stats(&self) -> EngineStats;

    /// Whether the chat template writes the request's `tools` into the prompt itself; when it
    /// does not, the tool-call parser's fallback prompt describes them.
    fn template_renders_tools(&self) -> bool {
        false
    }

    /// The served vocabulary compiled for structured outputs (`response_format`); `None` when
    /// this engine cannot constrain its output.
    fn grammars(&self) -> Option<&Grammars> {
        None
    }

    /// Per-step histograms (forward time, sampling time, tokens per step), for engines that
    /// run steps.
    fn step_metrics(&self) -> Option<StepMetricsSnapshot> {
        None
    }
}
