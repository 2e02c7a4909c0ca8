//! A scripted [`Engine`] for HTTP tests: no model, a byte-level tokenizer, a fixed chat
//! template, and replies that are either the prompt echoed back or a fixed list of events.
//!
//! It can also refuse every request (queue full) or every request past a number accepted (a
//! queue that fills under overload), fail after some tokens, and wait between
//! events; it records every submitted request and counts requests whose receiver was dropped
//! before the last event (cancellation), so tests can check what the HTTP layer sent.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use models::chat_template::{ChatMessage, RenderOptions};
use tokio::sync::mpsc;

use super::{
    Engine, EngineError, EngineStats, Event, EventReceiver, FinishReason, GenerateRequest,
    ModelInfo, Timings, TokenLogprob,
};

/// Beginning of sequence, written `<s>`.
pub const BOS: u32 = 0;
/// End of sequence, written `</s>`; the fake's only stop token.
pub const EOS: u32 = 1;
/// Byte `b` is token `b + BYTE_OFFSET`.
pub const BYTE_OFFSET: u32 = 2;
pub const VOCAB_SIZE: usize = 256 + BYTE_OFFSET as usize;

/// The log-prob the fake gives every token it reports.
pub const FAKE_LOGPROB: f32 = -0.5;
/// Width of the fake's embeddings.
pub const FAKE_HIDDEN: usize = 8;

/// What the fake answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// The prompt's bytes (special tokens skipped) as generated tokens, up to `max_tokens`
    /// (finish `length`), else to the end of the prompt (finish `stop`).
    Echo,
    /// Exactly these events, for every request.
    Script(Vec<Event>),
}

/// How the fake behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeConfig {
    pub info: ModelInfo,
    pub reply: Reply,
    /// Refuse every request with [`EngineError::QueueFull`].
    pub queue_full: bool,
    /// Accept this many requests (choices) in all, then refuse the rest with
    /// [`EngineError::QueueFull`]; `None`: no limit.
    pub capacity: Option<usize>,
    /// With [`Reply::Echo`]: fail with [`EngineError::Internal`] after this many tokens.
    pub fail_after: Option<usize>,
    /// Wait this long before each event (events are sent from a tokio task).
    pub delay: Duration,
    pub stats: EngineStats,
    /// Whether the model has a chat template.
    pub chat_template: bool,
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            info: ModelInfo {
                id: "fake-model".into(),
                context_length: 128,
                vocab_size: VOCAB_SIZE,
                hidden_size: FAKE_HIDDEN,
                created: 1_700_000_000,
            },
            reply: Reply::Echo,
            queue_full: false,
            capacity: None,
            fail_after: None,
            delay: Duration::ZERO,
            stats: EngineStats::default(),
            chat_template: true,
        }
    }
}

/// The scripted engine.
#[derive(Debug, Default)]
pub struct FakeEngine {
    config: FakeConfig,
    submitted: Mutex<Vec<GenerateRequest>>,
    /// Requests accepted so far, against `capacity`.
    accepted: AtomicUsize,
    cancelled: Arc<AtomicUsize>,
}

impl FakeEngine {
    pub fn new(config: FakeConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }

    /// Every request submitted so far, in order.
    pub fn submitted(&self) -> Vec<GenerateRequest> {
        self.submitted.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Requests whose receiver was dropped before their last event.
    pub fn cancelled(&self) -> usize {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// The events the fake sends for `request`.
    pub fn events_for(&self, request: &GenerateRequest) -> Vec<Event> {
        match &self.config.reply {
            Reply::Script(events) => events.clone(),
            Reply::Echo => echo_events(request, self.config.fail_after),
        }
    }
}

/// A unit vector that depends on the prompt: its token ids folded into [`FAKE_HIDDEN`]
/// components (the first set to 1 for an empty fold).
pub fn fake_embedding(prompt: &[u32]) -> Vec<f32> {
    let mut v = [0f32; FAKE_HIDDEN];
    for (i, &id) in prompt.iter().enumerate() {
        v[i % FAKE_HIDDEN] += id as f32;
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    match norm > 0.0 {
        true => v.iter().map(|x| x / norm).collect(),
        false => (0..FAKE_HIDDEN).map(|i| f32::from(i == 0)).collect(),
    }
}

fn logprob(id: u32, top: usize) -> TokenLogprob {
    // The token itself first, then made-up alternatives, each less likely.
    let alternatives = (0..top as u32).map(|i| {
        let alt = if i == 0 {
            id
        } else {
            BYTE_OFFSET + u32::from(b'a') + i
        };
        (alt, FAKE_LOGPROB - i as f32)
    });
    TokenLogprob {
        id,
        logprob: FAKE_LOGPROB,
        top: alternatives.collect(),
    }
}

fn echo_events(request: &GenerateRequest, fail_after: Option<usize>) -> Vec<Event> {
    let mut events = Vec::new();
    if request.embed {
        events.push(Event::Embedding(fake_embedding(&request.prompt)));
    }
    if let Some(top) = request.prompt_logprobs {
        let lps = request.prompt.iter().skip(1).map(|&id| logprob(id, top));
        events.push(Event::PromptLogprobs(lps.collect()));
    }
    let content: Vec<u32> = request
        .prompt
        .iter()
        .copied()
        .filter(|&id| id >= BYTE_OFFSET)
        .collect();
    let sampling = &request.sampling;
    for (i, &id) in content.iter().take(request.max_tokens).enumerate() {
        if fail_after == Some(i) {
            events.push(Event::Failed(EngineError::Internal(
                "scripted failure".into(),
            )));
            return events;
        }
        events.push(Event::Token {
            id,
            text: token_text(id),
            logprob: sampling
                .logprobs
                .then(|| logprob(id, sampling.top_logprobs)),
        });
    }
    let completion_tokens = content.len().min(request.max_tokens);
    events.push(Event::Finished {
        reason: match completion_tokens == request.max_tokens {
            true => FinishReason::Length,
            false => FinishReason::Stop,
        },
        prompt_tokens: request.prompt.len(),
        cached_tokens: 0,
        completion_tokens,
        trailing_text: String::new(),
        timings: Timings {
            queue: Duration::from_millis(1),
            prompt: Duration::from_millis(2),
            generation: Duration::from_millis(3),
        },
    });
    events
}

fn token_text(id: u32) -> String {
    match id {
        BOS => "<s>".into(),
        EOS => "</s>".into(),
        _ => {
            let byte = u8::try_from(id.saturating_sub(BYTE_OFFSET)).unwrap_or(b'?');
            String::from_utf8_lossy(&[byte]).into_owned()
        }
    }
}

/// Sends `events`, waiting `delay` before each; stops (and counts a cancellation) as soon as
/// the receiver is dropped.
async fn deliver(
    tx: mpsc::Sender<Event>,
    events: Vec<Event>,
    delay: Duration,
    cancelled: Arc<AtomicUsize>,
) {
    for event in events {
        tokio::select! {
            _ = tx.closed() => {
                cancelled.fetch_add(1, Ordering::SeqCst);
                return;
            }
            _ = tokio::time::sleep(delay) => {}
        }
        if tx.send(event).await.is_err() {
            cancelled.fetch_add(1, Ordering::SeqCst);
            return;
        }
    }
}

impl Engine for FakeEngine {
    fn info(&self) -> &ModelInfo {
        &self.config.info
    }

    fn render_chat(
        &self,
        messages: &[ChatMessage],
        options: &RenderOptions,
    ) -> Result<String, EngineError> {
        if !self.config.chat_template {
            return Err(EngineError::NoChatTemplate);
        }
        let mut text: String = messages
            .iter()
            .map(|m| format!("<|{}|>{}\n", m.role, m.content))
            .collect();
        if options.continue_final_message {
            text.pop();
        }
        if options.add_generation_prompt {
            text.push_str("<|assistant|>");
        }
        Ok(text)
    }

    fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<u32>, EngineError> {
        let mut ids = Vec::with_capacity(text.len() + 1);
        if add_special {
            ids.push(BOS);
        }
        let bytes = text.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let rest = &bytes[i..];
            let (id, len) = if rest.starts_with(b"<s>") {
                (BOS, 3)
            } else if rest.starts_with(b"</s>") {
                (EOS, 4)
            } else {
                (u32::from(rest[0]) + BYTE_OFFSET, 1)
            };
            ids.push(id);
            i += len;
        }
        Ok(ids)
    }

    fn detokenize(&self, ids: &[u32]) -> Result<String, EngineError> {
        let mut bytes = Vec::with_capacity(ids.len());
        for &id in ids {
            match id {
                BOS | EOS => {}
                _ => bytes.push(
                    u8::try_from(id - BYTE_OFFSET)
                        .map_err(|_| EngineError::Tokenizer(format!("no token {id}")))?,
                ),
            }
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn token_text(&self, id: u32) -> String {
        token_text(id)
    }

    fn eos_token_ids(&self) -> Vec<u32> {
        vec![EOS]
    }

    fn submit(&self, request: GenerateRequest) -> Result<EventReceiver, EngineError> {
        if self.config.queue_full {
            return Err(EngineError::QueueFull { capacity: 1 });
        }
        if let Some(capacity) = self.config.capacity {
            self.accepted
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                    (n < capacity).then_some(n + 1)
                })
                .map_err(|_| EngineError::QueueFull { capacity })?;
        }
        let events = self.events_for(&request);
        if let Ok(mut submitted) = self.submitted.lock() {
            submitted.push(request);
        }
        let (tx, rx) = mpsc::channel(events.len().max(1));
        if self.config.delay.is_zero() {
            // Room for every event, so no task (and no runtime) is needed.
            for event in events {
                let _ = tx.try_send(event);
            }
            return Ok(rx);
        }
        let handle = tokio::runtime::Handle::try_current().map_err(|_| {
            EngineError::Internal("the fake engine's delay needs a tokio runtime".into())
        })?;
        handle.spawn(deliver(
            tx,
            events,
            self.config.delay,
            self.cancelled.clone(),
        ));
        Ok(rx)
    }

    fn stats(&self) -> EngineStats {
        self.config.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::OutputRules;
    use models::sampling::SamplingParams;

    fn request(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
        GenerateRequest {
            id: "r".into(),
            prompt,
            sampling: SamplingParams::default(),
            seed: 0,
            max_tokens,
            stop: vec![],
            stop_token_ids: vec![EOS],
            prompt_logprobs: None,
            hooks: Vec::new(),
            output: OutputRules::default(),
            cache_prompt: true,
            constraint: None,
            embed: false,
        }
    }

    #[test]
    fn tokenizer_round_trips_bytes_and_specials() {
        let fake = FakeEngine::default();
        let ids = fake.tokenize("a<s>b</s>", true).expect("tokenize");
        let a = u32::from(b'a') + BYTE_OFFSET;
        let b = u32::from(b'b') + BYTE_OFFSET;
        assert_eq!(ids, vec![BOS, a, BOS, b, EOS]);
        assert_eq!(fake.detokenize(&ids).expect("detokenize"), "ab");
        assert_eq!(fake.token_text(BOS), "<s>");
    }

    #[test]
    fn echo_stops_at_max_tokens_with_length() {
        let fake = FakeEngine::default();
        let prompt = fake.tokenize("hello", true).expect("tokenize");
        let events = fake.events_for(&request(prompt.clone(), 2));
        assert_eq!(events.len(), 3);
        assert!(matches!(
            events[2],
            Event::Finished {
                reason: FinishReason::Length,
                completion_tokens: 2,
                prompt_tokens: 6,
                ..
            }
        ));
        let events = fake.events_for(&request(prompt, 100));
        assert!(matches!(
            events.last(),
            Some(Event::Finished {
                reason: FinishReason::Stop,
                completion_tokens: 5,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn dropping_the_receiver_counts_as_cancelled() {
        let fake = FakeEngine::new(FakeConfig {
            delay: Duration::from_millis(20),
            ..FakeConfig::default()
        });
        let prompt = fake.tokenize("hello", false).expect("tokenize");
        let mut rx = fake.submit(request(prompt, 5)).expect("submit");
        assert!(rx.recv().await.is_some());
        drop(rx);
        for _ in 0..100 {
            if fake.cancelled() == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("cancellation not seen");
    }
}
