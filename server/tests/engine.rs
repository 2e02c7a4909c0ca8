//! The real engine end to end, through its public API only: a tiny seeded model written to
//! disk for most cases (microseconds a step), and the real default model for the two
//! invariants the server's users depend on: greedy output equals the model run alone, and a
//! request's output does not depend on what it was batched with.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use models::bundle::{LoadOptions, LoadedModel};
use models::chat_template::{ChatMessage, RenderOptions};
use models::sampling::{Sampler, SamplingParams};
use models::{Llama, LogitsWanted};
use server::engine::testing::{tiny_char_id, tiny_loaded_model, TINY_EOS};
use server::engine::{
    Engine, EngineConfig, Event, EventReceiver, FinishReason, GenerateRequest, OutputRules,
    RealEngine, TokenLogprob,
};

const TINY_SEED: u64 = 11;

fn tiny(dir: &Path) -> LoadedModel {
    tiny_loaded_model(dir, TINY_SEED).unwrap()
}

fn tiny_engine(dir: &Path, config: EngineConfig) -> RealEngine {
    RealEngine::new(tiny(dir), config).unwrap()
}

fn ids(text: &str) -> Vec<u32> {
    text.chars().map(|c| tiny_char_id(c).unwrap()).collect()
}

fn request(prompt: Vec<u32>, max_tokens: usize, temperature: f32, seed: u64) -> GenerateRequest {
    GenerateRequest {
        id: format!("req-{seed}"),
        prompt,
        sampling: SamplingParams {
            temperature,
            ..SamplingParams::default()
        },
        seed,
        max_tokens,
        stop: Vec::new(),
        stop_token_ids: Vec::new(),
        prompt_logprobs: None,
        hooks: Vec::new(),
        output: OutputRules::default(),
        cache_prompt: true,
        constraint: None,
        embed: false,
    }
}

/// What one request produced.
#[derive(Debug, Clone, PartialEq)]
struct Output {
    tokens: Vec<u32>,
    text: String,
    reason: Option<FinishReason>,
    prompt_logprobs: Vec<TokenLogprob>,
}

fn collect(mut rx: EventReceiver) -> Output {
    let mut out = Output {
        tokens: Vec::new(),
        text: String::new(),
        reason: None,
        prompt_logprobs: Vec::new(),
    };
    while let Some(event) = rx.blocking_recv() {
        match event {
            Event::PromptLogprobs(lp) => out.prompt_logprobs = lp,
            Event::Embedding(_) => panic!("an embedding for a generation"),
            Event::Token { id, text, .. } => {
                out.tokens.push(id);
                out.text.push_str(&text);
            }
            Event::Finished {
                reason,
                trailing_text,
                ..
            } => {
                out.text.push_str(&trailing_text);
                out.reason = Some(reason);
            }
            Event::Failed(e) => panic!("request failed: {e}"),
        }
    }
    out
}

fn run(engine: &RealEngine, request: GenerateRequest) -> Output {
    collect(engine.submit(request).unwrap())
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The reference: the model alone, one sequence, whole prompt at once, then one token per
/// step, greedy.
fn greedy_alone(model: &Llama, prompt: &[u32], n: usize) -> Vec<u32> {
    let greedy = SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    };
    let mut sampler = Sampler::new(greedy, 0);
    let mut cache = model.new_cache();
    let mut feed = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..n {
        let logits =
            models::testing::step(model, &mut cache, &feed, &[], LogitsWanted::Last).unwrap();
        let id = sampler
            .sample(&logits.get(0).unwrap().to_vec1::<f32>().unwrap())
            .id;
        out.push(id);
        feed = vec![id];
    }
    out
}

/// A config that forces chunked prefill and decode rows sharing steps.
fn mixing_config() -> EngineConfig {
    EngineConfig {
        max_running: 16,
        max_batch_tokens: 24,
        prefill_chunk: 4,
        ..EngineConfig::default()
    }
}

/// Submits all at once, then collects each.
fn run_concurrently(engine: &RealEngine, requests: Vec<GenerateRequest>) -> Vec<Output> {
    let receivers: Vec<_> = requests
        .into_iter()
        .map(|r| engine.submit(r).unwrap())
        .collect();
    receivers.into_iter().map(collect).collect()
}

#[test]
fn greedy_generation_equals_the_model_run_alone() {
    let dir = tempfile::tempdir().unwrap();
    let reference = tiny(dir.path()).model;
    let engine = tiny_engine(dir.path(), mixing_config());
    let prompt = ids("the quick brown fox");
    let out = run(&engine, request(prompt.clone(), 40, 0.0, 1));
    assert_eq!(out.tokens, greedy_alone(&reference, &prompt, 40));
    assert_eq!(out.reason, Some(FinishReason::Length));
}

/// A temperature below 1e-5 is greedy (vLLM's rule). Below about 3e-39 the draw used to turn
/// NaN and pick id 0, the end of sequence: one token, finish `stop`, empty text.
#[test]
fn regression_a_tiny_temperature_generates_the_greedy_completion() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(dir.path(), EngineConfig::default());
    let eos_stops = |mut r: GenerateRequest| {
        r.stop_token_ids = vec![TINY_EOS];
        r
    };
    let greedy = run(&engine, eos_stops(request(ids("hello"), 12, 0.0, 1)));
    assert_eq!(greedy.reason, Some(FinishReason::Length), "{greedy:?}");
    for temperature in [1e-39, 1e-30, 9e-6] {
        for seed in [1, 2] {
            let tiny = run(
                &engine,
                eos_stops(request(ids("hello"), 12, temperature, seed)),
            );
            assert_eq!(tiny, greedy, "temperature {temperature:e}, seed {seed}");
        }
    }
}

#[test]
fn sixteen_concurrent_requests_each_equal_the_same_request_alone() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(dir.path(), mixing_config());
    let requests: Vec<_> = (0..16u64)
        .map(|i| {
            let prompt = ids(&"abcdefghijklmnopqrstuvwxyz"[..3 + i as usize]);
            request(prompt, 20 + i as usize, 1.0, 100 + i)
        })
        .collect();
    let alone: Vec<Output> = requests.iter().map(|r| run(&engine, r.clone())).collect();
    let together = run_concurrently(&engine, requests);
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a.tokens, t.tokens, "request {i}");
        assert_eq!(a.tokens.len(), 20 + i);
    }
    let distinct: std::collections::HashSet<_> = alone.iter().map(|o| &o.tokens).collect();
    assert!(distinct.len() > 1, "different seeds should differ");
}

#[test]
fn stop_strings_never_appear_in_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(dir.path(), EngineConfig::default());
    for seed in 0..8 {
        let free = run(&engine, request(ids("hello"), 60, 1.0, seed));
        // A stop string taken from the middle of the free-running text.
        let chars: Vec<char> = free.text.chars().collect();
        let stop: String = chars[20..22].iter().collect();
        let mut stopped = request(ids("hello"), 60, 1.0, seed);
        stopped.stop = vec![stop.clone()];
        let out = run(&engine, stopped);
        let cut = free.text.find(&stop).unwrap();
        assert_eq!(out.text, free.text[..cut], "seed {seed}, stop {stop:?}");
        assert!(!out.text.contains(&stop));
        assert_eq!(out.reason, Some(FinishReason::Stop));
    }
}

#[test]
fn a_stop_token_ends_generation() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(dir.path(), EngineConfig::default());
    let free = run(&engine, request(ids("hello"), 30, 1.0, 5));
    let stop_id = free.tokens[10];
    let mut stopped = request(ids("hello"), 30, 1.0, 5);
    stopped.stop_token_ids = vec![stop_id, TINY_EOS];
    let out = run(&engine, stopped);
    let first = free.tokens.iter().position(|&t| t == stop_id).unwrap();
    assert_eq!(
        out.tokens,
        free.tokens[..first],
        "the stop token is not streamed"
    );
    assert_eq!(out.reason, Some(FinishReason::Stop));
}

#[test]
fn a_cancelled_request_frees_its_kv_cache() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(dir.path(), EngineConfig::default());
    let mut rx = engine.submit(request(ids("ab"), 250, 1.0, 3)).unwrap();
    assert!(matches!(rx.blocking_recv(), Some(Event::Token { .. })));
    // The figures are published before and after each step, so the first token can arrive
    // while they still show the admitted sequence with no cache yet.
    wait_until("cache claimed", || {
        let s = engine.stats();
        s.kv_used_bytes > 0 || s.running == 0
    });
    drop(rx);
    wait_until("cache freed", || {
        let s = engine.stats();
        s.kv_used_bytes == 0 && s.running == 0
    });
    // The engine still serves.
    assert_eq!(run(&engine, request(ids("ab"), 3, 0.0, 1)).tokens.len(), 3);
}

#[test]
fn prompt_logprobs_do_not_depend_on_chunking() {
    let dir = tempfile::tempdir().unwrap();
    let chunked = tiny_engine(dir.path(), mixing_config());
    let whole = tiny_engine(dir.path(), EngineConfig::default());
    let mut req = request(ids("score every token of this prompt"), 3, 0.0, 1);
    req.prompt_logprobs = Some(2);
    let a = run(&chunked, req.clone());
    let b = run(&whole, req.clone());
    assert_eq!(a.prompt_logprobs.len(), req.prompt.len() - 1);
    for (x, y) in a.prompt_logprobs.iter().zip(&b.prompt_logprobs) {
        assert_eq!(x.id, y.id);
        assert!((x.logprob - y.logprob).abs() < 1e-4, "{x:?} vs {y:?}");
        assert_eq!(x.top.len(), 2);
    }
    assert_eq!(a.tokens, b.tokens);
}

#[test]
fn shutdown_lets_accepted_requests_finish() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(
        dir.path(),
        EngineConfig {
            max_running: 2,
            ..EngineConfig::default()
        },
    );
    let receivers: Vec<_> = (0..6)
        .map(|i| engine.submit(request(ids("ab"), 30, 1.0, i)).unwrap())
        .collect();
    engine.shutdown(Duration::from_secs(60));
    for rx in receivers {
        assert_eq!(collect(rx).reason, Some(FinishReason::Length));
    }
    let refused = engine.submit(request(ids("ab"), 3, 1.0, 0)).unwrap_err();
    assert_eq!(refused, server::engine::EngineError::ShuttingDown);
}

#[test]
fn text_helpers_use_the_model_tokenizer_and_template() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(dir.path(), EngineConfig::default());
    let hi = [ChatMessage::text("user", "hi")];
    let generation_prompt = RenderOptions {
        add_generation_prompt: true,
        ..RenderOptions::default()
    };
    assert_eq!(
        engine.render_chat(&hi, &generation_prompt).unwrap(),
        "user: hi\nassistant:"
    );
    let tokens = engine.tokenize("a b", true).unwrap();
    assert_eq!(tokens, ids("a b"));
    assert_eq!(engine.detokenize(&tokens).unwrap(), "a b");
    assert_eq!(engine.token_text(tiny_char_id(' ').unwrap()), " ");
    assert_eq!(engine.eos_token_ids(), vec![TINY_EOS]);
    let info = engine.info();
    assert_eq!((info.context_length, info.vocab_size), (256, 96));
    assert_eq!(engine.stats().kv_capacity_bytes, 1 << 30);
}

// --- The real default model -------------------------------------------------------------

fn real_model() -> Option<LoadedModel> {
    let path = models::testing::default_model_for_tests()?;
    let device = candle_core::Device::Cpu;
    Some(models::bundle::load(&path, &device, &LoadOptions::default()).unwrap())
}

fn chat_prompt(engine: &RealEngine, question: &str) -> Vec<u32> {
    let messages = [ChatMessage::text("user", question)];
    let options = RenderOptions {
        add_generation_prompt: true,
        ..RenderOptions::default()
    };
    let text = engine.render_chat(&messages, &options).unwrap();
    engine.tokenize(&text, true).unwrap()
}

#[test]
fn real_model_greedy_generation_equals_the_model_run_alone() {
    let (Some(loaded), Some(reference)) = (real_model(), real_model()) else {
        return;
    };
    // The default chunk takes the prompt whole, as the reference does: with quantized
    // weights, cutting a prompt elsewhere changes logits slightly (see `scheduler`).
    let engine = RealEngine::new(loaded, EngineConfig::default()).unwrap();
    let prompt = chat_prompt(&engine, "What is the capital of France?");
    let out = run(&engine, request(prompt.clone(), 12, 0.0, 1));
    assert_eq!(out.tokens, greedy_alone(&reference.model, &prompt, 12));
    assert!(!out.text.is_empty());
}

#[test]
fn real_model_sixteen_concurrent_requests_each_equal_the_same_request_alone() {
    let Some(loaded) = real_model() else {
        return;
    };
    let config = EngineConfig {
        prefill_chunk: 16,
        max_batch_tokens: 48,
        ..mixing_config()
    };
    let engine = RealEngine::new(loaded, config).unwrap();
    let topics = [
        "cats", "rain", "tea", "the sea", "chess", "bread", "maps", "owls",
    ];
    let requests: Vec<_> = (0..16u64)
        .map(|i| {
            let topic = topics[i as usize % topics.len()];
            let prompt = chat_prompt(&engine, &format!("Write one sentence about {topic}."));
            let mut r = request(prompt, 10, 0.8, 1000 + i);
            r.stop_token_ids = engine.eos_token_ids();
            r
        })
        .collect();
    let alone: Vec<Output> = requests.iter().map(|r| run(&engine, r.clone())).collect();
    let together = run_concurrently(&engine, requests);
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(
            a.tokens, t.tokens,
            "request {i}: {:?} vs {:?}",
            a.text, t.text
        );
    }
}
