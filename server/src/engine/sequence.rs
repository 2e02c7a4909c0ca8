//! One request inside the engine: its tokens, KV cache, sampler, streaming detokenizer, stop
//! conditions and timings, and the channel its events go out on.
//!
//! The engine thread creates a [`Sequence`] when a submitted request arrives, the scheduler
//! moves it from waiting to running, and each step hands it its row of logits through
//! [`Sequence::after_step`], which samples, decodes, checks stop conditions and streams
//! [`Event`]s. A sequence that is done (finished, failed or abandoned by its client) is
//! removed by the engine thread in the same step, which drops its KV cache.
//!
//! Sending never blocks: the event channel holds `max_tokens` plus a few events, more than a
//! sequence ever sends, and a send that fails means the client went away, which cancels the
//! sequence.

use std::borrow::Cow;
use std::time::Instant;

use candle_core::Tensor;
use models::sampling::{token_logprobs, SampledToken, Sampler};
use models::{BatchRow, HookCall, IncrementalDecoder, KvCache, LogitsWanted, Tokenizer};
use tokio::sync::mpsc;

use super::draft_policy::DraftPolicy;
use super::prefix_cache::{common_prefix, ChainKey};
use super::scheduler::Schedulable;
use super::stop::{StopOutcome, StopStrings};
use super::{EngineError, Event, FinishReason, GenerateRequest, Timings, TokenLogprob};
use crate::structured::Constraint;

/// Events a sequence sends besides its tokens: prompt log-probs, the final event, slack.
pub(crate) const EVENT_SLACK: usize = 8;

/// When the milestones of a request happened.
#[derive(Debug, Clone, Copy)]
struct Clock {
    submitted: Instant,
    first_step: Option<Instant>,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
}

impl Clock {
    fn timings(&self, now: Instant) -> Timings {
        let first_step = self.first_step.unwrap_or(now);
        let first_token = self.first_token.unwrap_or(now);
        Timings {
            queue: first_step.saturating_duration_since(self.submitted),
            prompt: first_token.saturating_duration_since(first_step),
            generation: self.last_token.map_or_else(Default::default, |t| {
                t.saturating_duration_since(first_token)
            }),
        }
    }
}

/// A choice of an `n > 1` request waiting for its parent's prompt: at the end of the parent's
/// prefill it becomes a sequence of its own on a fork of the parent's cache.
pub(crate) struct PendingFork {
    pub request: GenerateRequest,
    pub events: mpsc::Sender<Event>,
    pub submitted: Instant,
}

/// A request being served.
pub(crate) struct Sequence {
    /// The engine's id (passed to hooks); distinct from the request id.
    id: u64,
    request_id: String,
    prompt: Vec<u32>,
    generated: Vec<u32>,
    /// The request's `max_tokens`, capped so the sequence fits the model's context.
    max_tokens: usize,
    stop_token_ids: Vec<u32>,
    /// Generated tokens before a stop token or string may end the sequence.
    min_tokens: usize,
    /// `Some(top_n)` when prompt log-probs were asked for.
    prompt_logprobs: Option<usize>,
    /// Prompt log-probs scored so far, sent once the whole prompt is scored.
    prompt_scores: Vec<TokenLogprob>,
    /// The plug-in chain every row of this sequence runs with.
    hooks: Vec<HookCall>,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stops: StopStrings,
    cache: KvCache,
    events: mpsc::Sender<Event>,
    clock: Clock,
    /// The row fed in the current step: first position and token count.
    in_flight: Option<(usize, usize)>,
    /// Tokens the chain's drafting hook proposed to follow the last sampled one.
    proposal: Vec<u32>,
    /// Decides how many of the proposal a step feeds (see `draft_policy`).
    policy: DraftPolicy,
    /// A decode row's tokens while it is in flight: the last sampled token, then the drafts
    /// fed with it.
    feed: Vec<u32>,
    /// The last step's verification: drafts fed and drafts accepted (0 fed: none).
    verified: Verified,
    /// The other choices of the same prompt, forked off when the prompt is in the cache.
    forks: Vec<PendingFork>,
    max_positions: usize,
    done: bool,
    /// Ended by an error: its cache is not kept for other requests.
    failed: bool,
    /// Under which key its prefixes may be shared (`None`: never; see `prefix_cache`).
    reuse: Option<ChainKey>,
    /// Prompt tokens that came from a kept prefix instead of being prefilled.
    cached_tokens: usize,
    /// The response format's state over the tokens generated so far.
    constraint: Option<Constraint>,
    /// An embedding request's running sum of its prompt's final hidden states.
    embedding: Option<Vec<f64>>,
}

impl Sequence {
    /// A new sequence; `max_positions` is the model's context, which caps generation.
    pub fn new(
        id: u64,
        request: GenerateRequest,
        events: mpsc::Sender<Event>,
        submitted: Instant,
        cache: KvCache,
        max_positions: usize,
    ) -> Self {
        // The last generated token is never fed back, so the context holds one more.
        let room = max_positions.saturating_sub(request.prompt.len()) + 1;
        let mut sampler = Sampler::new(request.sampling, request.seed);
        sampler.observe_prompt(&request.prompt);
        // Prompt log-probs need logits at every prompt position, which a reused prefix skips.
        // An embedding needs every prompt position's hidden state too.
        let whole = request.prompt_logprobs.is_some() || request.embed;
        let reuse = match request.cache_prompt && !whole {
            true => ChainKey::of(&request.hooks),
            false => None,
        };
        Self {
            id,
            request_id: request.id,
            prompt: request.prompt,
            generated: Vec::new(),
            max_tokens: request.max_tokens.min(room),
            stop_token_ids: request.stop_token_ids,
            min_tokens: request.output.min_tokens,
            prompt_logprobs: request.prompt_logprobs,
            prompt_scores: Vec::new(),
            hooks: request.hooks,
            sampler,
            // Continuing: the first piece keeps its leading space, which separates a plain
            // completion from its prompt; byte-level vocabularies decode the same either way.
            decoder: IncrementalDecoder::continuing(request.output.skip_special_tokens),
            stops: StopStrings::new(&request.stop, request.output.include_stop_str),
            cache,
            events,
            clock: Clock {
                submitted,
                first_step: None,
                first_token: None,
                last_token: None,
            },
            in_flight: None,
            proposal: Vec::new(),
            policy: DraftPolicy::default(),
            feed: Vec::new(),
            verified: Verified::default(),
            forks: Vec::new(),
            max_positions,
            done: false,
            failed: false,
            reuse,
            cached_tokens: 0,
            constraint: request.constraint,
            embedding: request.embed.then(Vec::new),
        }
    }

    /// Adds choices that share this sequence's prompt and chain; they start from a fork of
    /// its cache once its prompt is prefilled.
    pub fn with_forks(mut self, forks: Vec<PendingFork>) -> Self {
        self.forks = forks;
        self
    }

    /// This sequence and the choices still waiting to fork off it: what it claims of the
    /// running slots and the KV budget.
    pub fn copies(&self) -> usize {
        1 + self.forks.len()
    }

    /// Makes the plug-in state of the sequence's chain (each hook's `new_state`) before its
    /// first step, so that a plug-in that cannot start fails this request alone.
    pub fn attach_plugins(&mut self) -> Result<(), EngineError> {
        self.cache
            .plugins_mut()
            .attach(&self.hooks)
            .map_err(|e| EngineError::PluginState(e.to_string()))
    }

    /// Whether the step in flight completes the prompt of a sequence with choices to fork.
    pub fn forks_due(&self) -> bool {
        !self.forks.is_empty()
            && self.in_flight.is_some_and(|(start, fed)| {
                start < self.prompt.len() && start + fed == self.prompt.len()
            })
    }

    /// The waiting choices as sequences of their own, each on a copy of this sequence's cache
    /// and plug-in state as the step in flight left them, ready to take the same logits.
    /// `next_id` numbers them. A choice whose copy fails gets `Failed` and is left out.
    pub fn spawn_forks(&mut self, next_id: &mut u64) -> Vec<Sequence> {
        let mut children = Vec::new();
        for fork in std::mem::take(&mut self.forks) {
            let cache = match self.cache.fork() {
                Ok(cache) => cache,
                Err(e) => {
                    let error = EngineError::PluginState(format!("cannot fork the cache: {e}"));
                    let _ = fork.events.try_send(Event::Failed(error));
                    continue;
                }
            };
            *next_id += 1;
            let mut child = Sequence::new(
                *next_id,
                fork.request,
                fork.events,
                fork.submitted,
                cache,
                self.max_positions,
            );
            child.in_flight = self.in_flight;
            child.prompt_scores = self.prompt_scores.clone();
            child.clock.first_step = self.clock.first_step;
            children.push(child);
        }
        children
    }

    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// Finished, failed or cancelled; the engine removes it (and frees its cache).
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The client dropped its event receiver (and those of the choices still to fork).
    pub fn is_cancelled(&self) -> bool {
        self.events.is_closed() && self.forks.iter().all(|f| f.events.is_closed())
    }

    /// Whether the sequence has tokens to feed: prompt left, or a token sampled last step.
    pub fn can_feed(&self) -> bool {
        !self.done && (self.cache.len() < self.prompt.len() || !self.generated.is_empty())
    }

    /// The row this sequence contributes to the step: `tokens` prompt tokens from where its
    /// cache ends, or its last sampled token followed by `tokens - 1` of its drafts. Call only
    /// when [`Self::can_feed`].
    pub fn row(&mut self, tokens: usize, logits: LogitsWanted, now: Instant) -> BatchRow<'_> {
        self.clock.first_step.get_or_insert(now);
        let start = self.cache.len();
        let fed: &[u32] = if start < self.prompt.len() {
            let end = (start + tokens).min(self.prompt.len());
            &self.prompt[start..end]
        } else {
            let drafts = tokens.saturating_sub(1).min(self.proposal.len());
            self.feed.clear();
            self.feed.extend(self.generated.last());
            self.feed.extend_from_slice(&self.proposal[..drafts]);
            &self.feed
        };
        self.in_flight = Some((start, fed.len()));
        BatchRow {
            seq_id: self.id,
            tokens: fed,
            cache: &mut self.cache,
            hooks: &self.hooks,
            logits,
        }
    }

    /// Takes the step's logits for this row (`None` for an intermediate prefill chunk):
    /// scores prompt tokens, samples, streams, and finishes when a stop condition holds.
    /// Any error fails this sequence only.
    pub fn after_step(&mut self, logits: Option<Tensor>, tokenizer: &Tokenizer, now: Instant) {
        if let Err(e) = self.try_after_step(logits, tokenizer, now) {
            tracing::error!(request_id = %self.request_id, error = %e, "sequence failed");
            self.fail(e);
        }
    }

    /// Ends the sequence, and the choices still to fork off it, with `Event::Failed`; its
    /// cache (and plug-in state) is freed when the engine removes it.
    pub fn fail(&mut self, error: EngineError) {
        for fork in std::mem::take(&mut self.forks) {
            let _ = fork.events.try_send(Event::Failed(error.clone()));
        }
        if !self.done {
            let _ = self.events.try_send(Event::Failed(error));
            self.done = true;
        }
        self.failed = true;
    }

    fn try_after_step(
        &mut self,
        logits: Option<Tensor>,
        tokenizer: &Tokenizer,
        now: Instant,
    ) -> Result<(), EngineError> {
        let (start, fed) = self
            .in_flight
            .take()
            .ok_or_else(|| internal("logits for a sequence that fed nothing"))?;
        if self.cache.len() != start + fed {
            return Err(internal(format!(
                "cache holds {} positions after feeding {fed} from {start}",
                self.cache.len()
            )));
        }
        let rows = match logits {
            Some(t) => t
                .to_vec2::<f32>()
                .map_err(|e| internal(models::error::candle_message(e)))?,
            None => Vec::new(),
        };
        self.verified = Verified::default();
        let generated = self.generated.len();
        if start < self.prompt.len() {
            self.after_prefill(start, fed, &rows, tokenizer, now)?;
        } else {
            self.verify(start, fed, &rows, tokenizer, now)?;
        }
        self.policy
            .observe(&self.proposal, &self.generated[generated..]);
        self.propose_drafts();
        Ok(())
    }

    /// After a decode row `start..start + fed` (the last sampled token and `fed - 1` drafts):
    /// samples its positions in order as one-token steps would, while each sample equals the
    /// draft fed after it, then cuts the cache back to the tokens that stay.
    fn verify(
        &mut self,
        start: usize,
        fed: usize,
        rows: &[Vec<f32>],
        tokenizer: &Tokenizer,
        now: Instant,
    ) -> Result<(), EngineError> {
        let drafted = fed - 1;
        let rows = match drafted {
            0 => rows.last().map(std::slice::from_ref).unwrap_or_default(),
            _ => rows,
        };
        if rows.len() != fed {
            return Err(internal(format!(
                "{} rows of logits for a decode row of {fed}",
                rows.len()
            )));
        }
        let mut accepted = 0;
        for (i, row) in rows.iter().enumerate() {
            self.sample_and_emit(row, tokenizer, now)?;
            let agrees = self.generated.last() == self.feed.get(i + 1);
            if self.done || i == drafted || !agrees {
                break;
            }
            accepted += 1;
        }
        self.verified = Verified { drafted, accepted };
        if accepted < drafted && !self.done {
            self.cache
                .truncate(start + 1 + accepted)
                .map_err(|e| internal(e.to_string()))?;
        }
        Ok(())
    }

    /// Asks the chain's drafting hook, if any, for tokens to follow the last sampled one
    /// (never more than the request may still generate after the next sampled token); the
    /// scheduler asks [`Schedulable::drafts`] how many of them the next step feeds.
    fn propose_drafts(&mut self) {
        self.proposal.clear();
        let max = self.max_tokens.saturating_sub(self.generated.len() + 1);
        if self.done || self.generated.is_empty() || max == 0 {
            return;
        }
        let mut sequence: Option<Vec<u32>> = None;
        for call in self.hooks.iter().filter(|c| c.hook.points().draft) {
            let tokens =
                sequence.get_or_insert_with(|| [&self.prompt[..], &self.generated].concat());
            let mut proposal = call.hook.draft(&call.params, tokens, max);
            proposal.truncate(max);
            if !proposal.is_empty() {
                self.proposal = proposal;
                return;
            }
        }
    }

    /// What a new sequence looks a kept prefix up by: its chain's key, its prompt, and how
    /// many of the prompt's tokens a prefix may cover (all but the last, whose logits start
    /// the answer). `None` once it has fed anything, or when it may not reuse prefixes.
    pub fn prefix_query(&self) -> Option<(&ChainKey, &[u32], usize)> {
        let key = self.reuse.as_ref()?;
        let fresh = self.cache.is_empty() && self.in_flight.is_none() && !self.done;
        fresh.then(|| (key, &self.prompt[..], self.prompt.len().saturating_sub(1)))
    }

    /// How many of `prompt[..limit]` this sequence's cache holds under `key` (0: none), for
    /// a request arriving while it runs.
    pub fn shared_prefix(&self, key: &ChainKey, prompt: &[u32], limit: usize) -> usize {
        if self.reuse.as_ref() != Some(key) || self.failed {
            return 0;
        }
        let usable = &prompt[..limit.min(prompt.len())];
        common_prefix(self.held_tokens(), usable)
    }

    /// A copy of this sequence's first `tokens` positions, for another sequence to start from.
    pub fn copy_prefix(&self, tokens: usize) -> models::Result<KvCache> {
        self.cache.fork_prefix(tokens)
    }

    /// Starts this (not yet stepped) sequence from `cache`, which holds its first `tokens`
    /// prompt tokens; its chain's hooks that kept no state in it make theirs now.
    pub fn start_from_prefix(&mut self, cache: KvCache, tokens: usize) -> Result<(), EngineError> {
        self.cache = cache;
        self.cached_tokens = tokens;
        self.attach_plugins()
    }

    /// The tokens whose positions this sequence may leave for others, in order: all it fed,
    /// or only the prompt when a hook changes what decode steps leave.
    fn held_tokens(&self) -> impl Iterator<Item = &u32> {
        let mut len = self.cache.len();
        if self.reuse.as_ref().is_some_and(ChainKey::prompt_only) {
            len = len.min(self.prompt.len());
        }
        self.prompt.iter().chain(&self.generated).take(len)
    }

    /// What an ended sequence leaves for the prefix cache: its key, the tokens its cache
    /// holds, and the cache cut to them. `None` if it failed or may not share.
    pub fn into_kept_prefix(mut self) -> Option<(ChainKey, Vec<u32>, KvCache)> {
        if self.failed {
            return None;
        }
        let tokens: Vec<u32> = self.held_tokens().copied().collect();
        self.cache.truncate(tokens.len()).ok()?;
        Some((self.reuse?, tokens, self.cache))
    }

    /// The last step's verification, for the speculative-decoding metrics.
    pub fn verified(&self) -> Verified {
        self.verified
    }

    /// After a prompt chunk `start..start + fed`: scores its tokens if asked, and once the
    /// prompt is complete sends the scores and samples the first token.
    fn after_prefill(
        &mut self,
        start: usize,
        fed: usize,
        rows: &[Vec<f32>],
        tokenizer: &Tokenizer,
        now: Instant,
    ) -> Result<(), EngineError> {
        if let Some(top_n) = self.prompt_logprobs {
            self.score_prompt(start, fed, rows, top_n)?;
        }
        if let Some(sum) = &mut self.embedding {
            add_rows(sum, rows);
        }
        if start + fed < self.prompt.len() {
            return Ok(());
        }
        if let Some(sum) = self.embedding.take() {
            self.send(Event::Embedding(mean_unit(&sum, self.prompt.len())));
            self.finish(FinishReason::Stop, now);
            return Ok(());
        }
        if self.prompt_logprobs.is_some() {
            let scores = std::mem::take(&mut self.prompt_scores);
            self.send(Event::PromptLogprobs(scores));
        }
        if self.max_tokens == 0 {
            self.finish(FinishReason::Length, now);
            return Ok(());
        }
        let last = rows
            .last()
            .ok_or_else(|| internal("no logits after prefill"))?;
        self.sample_and_emit(last, tokenizer, now)
    }

    /// Row `i` of a chunk starting at `start` predicts prompt position `start + i + 1`; the
    /// chunk's last row predicts the next chunk's first token (or the first generated one).
    fn score_prompt(
        &mut self,
        start: usize,
        fed: usize,
        rows: &[Vec<f32>],
        top_n: usize,
    ) -> Result<(), EngineError> {
        if rows.len() != fed {
            return Err(internal(format!(
                "{} rows of logits for a prompt chunk of {fed}",
                rows.len()
            )));
        }
        for (i, row) in rows.iter().enumerate() {
            let Some(&id) = self.prompt.get(start + i + 1) else {
                break;
            };
            let scored = token_logprobs(row, id, top_n).map_err(|e| internal(e.to_string()))?;
            self.prompt_scores.push(TokenLogprob {
                id,
                logprob: scored.logprob,
                top: scored.top_logprobs,
            });
        }
        Ok(())
    }

    fn sample_and_emit(
        &mut self,
        logits: &[f32],
        tokenizer: &Tokenizer,
        now: Instant,
    ) -> Result<(), EngineError> {
        check_logits(logits)?;
        let allowed = self.allowed_logits(logits)?;
        let sampled = self.sampler.sample(&allowed);
        let id = sampled.id;
        if let Some(constraint) = &mut self.constraint {
            constraint
                .consume(id, &self.stop_token_ids)
                .map_err(|e| internal(format!("response_format constraint: {e}")))?;
        }
        self.generated.push(id);
        self.clock.first_token.get_or_insert(now);
        self.clock.last_token = Some(now);
        if self.stop_token_ids.contains(&id) {
            // Counted in completion_tokens (it was generated), never streamed as text.
            self.finish(FinishReason::Stop, now);
            return Ok(());
        }
        let piece = self
            .decoder
            .push(tokenizer, id)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?
            .unwrap_or_default();
        let (text, matched) = match self.stops.push(&piece, self.stop_strings_armed()) {
            StopOutcome::Emit(text) => (text, false),
            StopOutcome::Matched(text) => (text, true),
        };
        let logprob = self.token_logprob(sampled);
        if !self.send(Event::Token { id, text, logprob }) {
            return Ok(());
        }
        if matched {
            self.finish(FinishReason::Stop, now);
        } else if self.generated.len() >= self.max_tokens {
            self.finish(FinishReason::Length, now);
        }
        Ok(())
    }

    /// The logits to sample from: stop tokens masked until `min_tokens` are out, and tokens
    /// the response format does not allow next masked (a constrained row shares its step with
    /// others; only its own logits change).
    fn allowed_logits<'a>(&mut self, logits: &'a [f32]) -> Result<Cow<'a, [f32]>, EngineError> {
        let mut allowed = Cow::Borrowed(logits);
        if self.generated.len() < self.min_tokens {
            allowed = Cow::Owned(without_tokens(logits, &self.stop_token_ids));
        }
        if let Some(constraint) = &mut self.constraint {
            constraint
                .mask(allowed.to_mut(), &self.stop_token_ids)
                .map_err(|e| internal(format!("response_format constraint: {e}")))?;
        }
        Ok(allowed)
    }

    /// Stop strings end the text once `min_tokens` tokens are out (vLLM's rule: counted with
    /// the token that completes the string).
    fn stop_strings_armed(&self) -> bool {
        self.generated.len() >= self.min_tokens
    }

    fn token_logprob(&self, sampled: SampledToken) -> Option<TokenLogprob> {
        if !self.sampler.params().logprobs {
            return None;
        }
        sampled.logprob.map(|logprob| TokenLogprob {
            id: sampled.id,
            logprob,
            top: sampled.top_logprobs,
        })
    }

    /// Flushes held text and sends `Finished`.
    fn finish(&mut self, reason: FinishReason, now: Instant) {
        let tail = self.decoder.finish().unwrap_or_default();
        let (trailing_text, matched) = self.stops.finish(&tail, self.stop_strings_armed());
        let reason = if matched { FinishReason::Stop } else { reason };
        tracing::debug!(
            request_id = %self.request_id,
            reason = reason.as_str(),
            prompt_tokens = self.prompt.len(),
            completion_tokens = self.generated.len(),
            "sequence finished"
        );
        self.send(Event::Finished {
            reason,
            prompt_tokens: self.prompt.len(),
            cached_tokens: self.cached_tokens,
            completion_tokens: self.generated.len(),
            trailing_text,
            timings: self.clock.timings(now),
        });
        self.done = true;
    }

    /// Sends without blocking; a closed or (never expected) full channel cancels the
    /// sequence. Returns whether the event went out.
    fn send(&mut self, event: Event) -> bool {
        match self.events.try_send(event) {
            Ok(()) => true,
            Err(e) => {
                if let mpsc::error::TrySendError::Full(_) = e {
                    tracing::warn!(request_id = %self.request_id, "event channel full; cancelling");
                }
                self.done = true;
                false
            }
        }
    }
}

/// What a decode step did with its drafts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Verified {
    /// Draft tokens fed after the last sampled token.
    pub drafted: usize,
    /// How many of them the sequence's own samples agreed with, in order.
    pub accepted: usize,
}

impl Schedulable for Sequence {
    fn prompt_len(&self) -> usize {
        self.prompt.len()
    }

    fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    fn prefilled(&self) -> usize {
        self.cache.len().min(self.prompt.len())
    }

    fn kv_allocated_bytes(&self) -> usize {
        self.cache.allocated_bytes()
    }

    fn state_bytes_per_token(&self) -> usize {
        self.hooks
            .iter()
            .map(|call| call.hook.state_bytes_per_token(&call.params))
            .sum()
    }

    fn copies(&self) -> usize {
        Sequence::copies(self)
    }

    fn wants_prompt_logits(&self) -> bool {
        self.prompt_logprobs.is_some()
    }

    fn wants_prompt_hidden(&self) -> bool {
        self.embedding.is_some()
    }

    fn drafts(&self, decoding: usize) -> usize {
        self.policy.length(self.proposal.len(), decoding)
    }

    fn whole_prompt(&self) -> bool {
        self.hooks
            .iter()
            .any(|call| call.hook.whole_prompt(&call.params))
    }
}

fn internal(message: impl Into<String>) -> EngineError {
    EngineError::Internal(message.into())
}

/// Refuses a row of logits nothing sensible can be sampled from: a NaN or `+inf` anywhere
/// (an overflowing plug-in, say), or no finite value at all. The sampler would otherwise pick
/// some token (id 0, often a stop token) and the request would end "successfully" with
/// garbage; failing the sequence ends that request alone, with an error that says why.
fn check_logits(logits: &[f32]) -> Result<(), EngineError> {
    let mut any_finite = false;
    for (id, &x) in logits.iter().enumerate() {
        if x.is_nan() || x == f32::INFINITY {
            return Err(EngineError::NonFiniteLogits(format!(
                "token {id} has logit {x}"
            )));
        }
        any_finite |= x.is_finite();
    }
    match any_finite {
        true => Ok(()),
        false => Err(EngineError::NonFiniteLogits("every logit is -inf".into())),
    }
}

/// Adds hidden-state rows to a running sum (sized by the first row).
fn add_rows(sum: &mut Vec<f64>, rows: &[Vec<f32>]) {
    for row in rows {
        if sum.is_empty() {
            sum.resize(row.len(), 0.0);
        }
        for (s, &x) in sum.iter_mut().zip(row) {
            *s += f64::from(x);
        }
    }
}

/// The mean of `n` rows summed in `sum`, scaled to unit length (a zero vector stays zero).
fn mean_unit(sum: &[f64], n: usize) -> Vec<f32> {
    let mean: Vec<f64> = sum.iter().map(|s| s / n.max(1) as f64).collect();
    let norm = mean.iter().map(|x| x * x).sum::<f64>().sqrt();
    let scale = if norm > 0.0 { 1.0 / norm } else { 0.0 };
    mean.iter().map(|x| (x * scale) as f32).collect()
}

/// `logits` with `ids` made impossible: how `min_tokens` keeps the stop tokens from being
/// sampled (and how vLLM does it).
fn without_tokens(logits: &[f32], ids: &[u32]) -> Vec<f32> {
    let mut masked = logits.to_vec();
    for &id in ids {
        if let Some(l) = masked.get_mut(id as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
    // A model that can say nothing else stops anyway rather than sample from nothing.
    match masked.iter().any(|l| l.is_finite()) {
        true => masked,
        false => logits.to_vec(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::engine::testing::{tiny_char_id, tiny_tokenizer, TINY_EOS, TINY_VOCAB};
    use crate::engine::OutputRules;
    use candle_core::Device;
    use models::sampling::SamplingParams;
    use models::tiny::tiny_config;
    use models::Architecture;
    use models::KvDtype;

    fn ids(text: &str) -> Vec<u32> {
        text.chars().map(|c| tiny_char_id(c).unwrap()).collect()
    }

    fn request(prompt: &str, max_tokens: usize) -> GenerateRequest {
        GenerateRequest {
            id: "req".into(),
            prompt: ids(prompt),
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            seed: 7,
            max_tokens,
            stop: Vec::new(),
            stop_token_ids: vec![TINY_EOS],
            prompt_logprobs: None,
            hooks: Vec::new(),
            output: OutputRules::default(),
            cache_prompt: true,
            constraint: None,
            embed: false,
        }
    }

    fn start(request: GenerateRequest, max_positions: usize) -> (Sequence, mpsc::Receiver<Event>) {
        let (tx, rx) = mpsc::channel(request.max_tokens + EVENT_SLACK);
        let cache = KvCache::new(
            &tiny_config(Architecture::Llama),
            KvDtype::F32,
            &Device::Cpu,
        );
        let seq = Sequence::new(1, request, tx, Instant::now(), cache, max_positions);
        (seq, rx)
    }

    /// `rows` rows of logits, each peaked at the matching id of `peaks`.
    fn peaked(peaks: &[u32]) -> Tensor {
        let mut v = vec![0f32; peaks.len() * TINY_VOCAB];
        for (r, &id) in peaks.iter().enumerate() {
            v[r * TINY_VOCAB + id as usize] = 10.0;
        }
        Tensor::from_vec(v, (peaks.len(), TINY_VOCAB), &Device::Cpu).unwrap()
    }

    /// Feeds one row as a forward step would (committing its positions), then hands the
    /// sequence `logits`.
    fn step(seq: &mut Sequence, tokens: usize, want: LogitsWanted, logits: Option<Tensor>) {
        let row = seq.row(tokens, want, Instant::now());
        let n = row.tokens.len();
        row.cache.commit(n);
        seq.after_step(logits, &tiny_tokenizer().unwrap(), Instant::now());
    }

    /// Prefills the whole prompt in one step, then decodes one token per entry of `next`
    /// (the first comes from the prefill's logits).
    fn generate(seq: &mut Sequence, next: &str) {
        let mut next = ids(next).into_iter();
        let prompt = seq.prompt_len();
        step(
            seq,
            prompt,
            LogitsWanted::Last,
            Some(peaked(&[next.next().unwrap()])),
        );
        for id in next {
            assert!(!seq.is_done());
            step(seq, 1, LogitsWanted::Last, Some(peaked(&[id])));
        }
    }

    fn events(rx: &mut mpsc::Receiver<Event>) -> Vec<Event> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    fn texts(events: &[Event]) -> String {
        let mut out = String::new();
        for e in events {
            match e {
                Event::Token { text, .. } => out.push_str(text),
                Event::Finished { trailing_text, .. } => out.push_str(trailing_text),
                _ => {}
            }
        }
        out
    }

    fn finished(events: &[Event]) -> (FinishReason, usize) {
        match events.last() {
            Some(Event::Finished {
                reason,
                completion_tokens,
                ..
            }) => (*reason, *completion_tokens),
            other => panic!("expected Finished, got {other:?}"),
        }
    }

    #[test]
    fn tokens_stream_as_text_and_max_tokens_ends_with_length() {
        let (mut seq, mut rx) = start(request("ab", 3), 256);
        generate(&mut seq, "xyz");
        let ev = events(&mut rx);
        assert_eq!(ev.len(), 4);
        assert_eq!(texts(&ev), "xyz");
        assert_eq!(finished(&ev), (FinishReason::Length, 3));
        assert!(seq.is_done());
    }

    #[test]
    fn a_stop_token_ends_generation_without_a_token_event() {
        let (mut seq, mut rx) = start(request("ab", 10), 256);
        step(&mut seq, 2, LogitsWanted::Last, Some(peaked(&ids("x"))));
        step(&mut seq, 1, LogitsWanted::Last, Some(peaked(&[TINY_EOS])));
        let ev = events(&mut rx);
        assert_eq!(ev.len(), 2, "{ev:?}");
        assert_eq!(texts(&ev), "x");
        assert_eq!(finished(&ev), (FinishReason::Stop, 2));
    }

    #[test]
    fn a_stop_string_is_never_part_of_the_output() {
        let mut req = request("ab", 10);
        req.stop = vec!["yz".into()];
        let (mut seq, mut rx) = start(req, 256);
        generate(&mut seq, "xyz");
        let ev = events(&mut rx);
        assert_eq!(texts(&ev), "x");
        assert!(matches!(&ev[1], Event::Token { text, .. } if text.is_empty()));
        assert_eq!(finished(&ev), (FinishReason::Stop, 3));
    }

    /// Logits where the stop token is far ahead and `id` second.
    fn eos_then(id: u32) -> Tensor {
        let mut v = vec![0f32; TINY_VOCAB];
        v[TINY_EOS as usize] = 20.0;
        v[id as usize] = 10.0;
        Tensor::from_vec(v, (1, TINY_VOCAB), &Device::Cpu).unwrap()
    }

    #[test]
    fn min_tokens_masks_the_stop_token_and_defers_stop_strings() {
        let mut req = request("ab", 10);
        req.stop = vec!["x".into()];
        req.output.min_tokens = 3;
        let (mut seq, mut rx) = start(req, 256);
        let x = ids("x")[0];
        // Tokens 1 and 2: the stop token is the argmax but masked; "x" is not a stop yet.
        step(&mut seq, 2, LogitsWanted::Last, Some(eos_then(x)));
        step(&mut seq, 1, LogitsWanted::Last, Some(eos_then(x)));
        assert!(!seq.is_done());
        // Token 3 completes min_tokens: masked once more, and now "x" stops.
        step(&mut seq, 1, LogitsWanted::Last, Some(eos_then(x)));
        let ev = events(&mut rx);
        assert_eq!(texts(&ev), "xx");
        assert_eq!(finished(&ev), (FinishReason::Stop, 3));
        // Without min_tokens the stop token wins at once.
        let (mut seq, mut rx) = start(request("ab", 10), 256);
        step(&mut seq, 2, LogitsWanted::Last, Some(eos_then(x)));
        assert_eq!(finished(&events(&mut rx)), (FinishReason::Stop, 1));
    }

    #[test]
    fn include_stop_str_keeps_the_matched_stop_string() {
        let mut req = request("ab", 10);
        req.stop = vec!["yz".into()];
        req.output.include_stop_str = true;
        let (mut seq, mut rx) = start(req, 256);
        generate(&mut seq, "xyz");
        let ev = events(&mut rx);
        assert_eq!(texts(&ev), "xyz");
        assert_eq!(finished(&ev), (FinishReason::Stop, 3));
    }

    #[test]
    fn a_held_back_prefix_comes_out_as_trailing_text() {
        let mut req = request("ab", 2);
        req.stop = vec!["yq".into()];
        let (mut seq, mut rx) = start(req, 256);
        generate(&mut seq, "xy");
        let ev = events(&mut rx);
        assert!(matches!(&ev[2], Event::Finished { trailing_text, .. } if trailing_text == "y"));
        assert_eq!(finished(&ev), (FinishReason::Length, 2));
    }

    #[test]
    fn prompt_logprobs_span_chunks_and_come_before_tokens() {
        let mut req = request("abcd", 1);
        req.prompt_logprobs = Some(2);
        let (mut seq, mut rx) = start(req, 256);
        let p = ids("abcd");
        step(&mut seq, 3, LogitsWanted::All, Some(peaked(&p[1..4])));
        assert!(
            events(&mut rx).is_empty(),
            "scores wait for the whole prompt"
        );
        step(&mut seq, 1, LogitsWanted::All, Some(peaked(&ids("x"))));
        let ev = events(&mut rx);
        let Event::PromptLogprobs(scores) = &ev[0] else {
            panic!("{ev:?}");
        };
        let scored: Vec<u32> = scores.iter().map(|s| s.id).collect();
        assert_eq!(scored, p[1..].to_vec());
        assert!(scores
            .iter()
            .all(|s| s.top.len() == 2 && s.top[0].0 == s.id));
        assert_eq!(texts(&ev), "x");
    }

    #[test]
    fn max_tokens_zero_scores_the_prompt_and_generates_nothing() {
        let mut req = request("abc", 0);
        req.prompt_logprobs = Some(0);
        let (mut seq, mut rx) = start(req, 256);
        step(&mut seq, 3, LogitsWanted::All, Some(peaked(&ids("bcx"))));
        let ev = events(&mut rx);
        assert!(matches!(&ev[0], Event::PromptLogprobs(s) if s.len() == 2));
        assert_eq!(finished(&ev), (FinishReason::Length, 0));
    }

    #[test]
    fn token_logprobs_come_with_tokens_when_asked() {
        let mut req = request("ab", 1);
        req.sampling.logprobs = true;
        req.sampling.top_logprobs = 3;
        let (mut seq, mut rx) = start(req, 256);
        generate(&mut seq, "x");
        let ev = events(&mut rx);
        let Event::Token {
            logprob: Some(lp), ..
        } = &ev[0]
        else {
            panic!("{ev:?}");
        };
        assert_eq!((lp.id, lp.top.len()), (ids("x")[0], 3));
        assert!(lp.logprob < 0.0 && lp.logprob > -0.01);
    }

    #[test]
    fn a_gone_client_cancels_the_sequence() {
        let (mut seq, rx) = start(request("ab", 5), 256);
        drop(rx);
        assert!(seq.is_cancelled());
        step(&mut seq, 2, LogitsWanted::Last, Some(peaked(&ids("x"))));
        assert!(seq.is_done());
    }

    #[test]
    fn generation_is_capped_by_the_context() {
        let (seq, _rx) = start(request("abc", 10), 4);
        assert_eq!(seq.max_tokens(), 2);
    }

    #[test]
    fn logits_for_the_wrong_cache_length_fail_the_sequence_only() {
        let (mut seq, mut rx) = start(request("ab", 5), 256);
        let _ = seq.row(2, LogitsWanted::Last, Instant::now()); // not committed
        seq.after_step(
            Some(peaked(&[3])),
            &tiny_tokenizer().unwrap(),
            Instant::now(),
        );
        assert!(seq.is_done());
        assert!(matches!(
            events(&mut rx).as_slice(),
            [Event::Failed(EngineError::Internal(_))]
        ));
    }

    #[test]
    fn regression_non_finite_logits_fail_that_sequence_with_an_error() {
        let one_at = |id: usize, x: f32| {
            let mut v = vec![0f32; TINY_VOCAB];
            v[id] = x;
            Tensor::from_vec(v, (1, TINY_VOCAB), &Device::Cpu).unwrap()
        };
        for logits in [
            one_at(3, f32::NAN),
            one_at(0, f32::INFINITY),
            Tensor::full(f32::NEG_INFINITY, (1, TINY_VOCAB), &Device::Cpu).unwrap(),
        ] {
            let (mut bad, mut bad_rx) = start(request("ab", 5), 256);
            let (mut good, mut good_rx) = start(request("ab", 1), 256);
            step(&mut bad, 2, LogitsWanted::Last, Some(logits));
            generate(&mut good, "x");
            assert!(bad.is_done());
            assert!(
                matches!(
                    events(&mut bad_rx).as_slice(),
                    [Event::Failed(EngineError::NonFiniteLogits(_))]
                ),
                "the row must fail, not stop with a token"
            );
            assert_eq!(finished(&events(&mut good_rx)), (FinishReason::Length, 1));
        }
    }
}
