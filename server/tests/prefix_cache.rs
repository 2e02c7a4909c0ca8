//! Automatic prefix caching through the real engine, on the tiny seeded model with the served
//! 8-bit kernels: prompts that start with what an earlier or running request fed skip those
//! tokens, and every output (tokens and log-probs) is bit for bit what an engine without the
//! cache gives.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use candle_core::quantized::GgmlDType;
use models::sampling::SamplingParams;
use server::engine::testing::{plain_request, tiny_char_id, tiny_loaded_model_as, wait_until};
use server::engine::{
    Engine, EngineConfig, Event, EventReceiver, GenerateRequest, RealEngine, TokenLogprob,
    PREFIX_BLOCK_TOKENS,
};

const SEED: u64 = 17;

fn engine(dir: &Path, prefix_caching: bool, kv_budget_bytes: usize) -> RealEngine {
    let config = EngineConfig {
        max_batch_tokens: 40,
        prefill_chunk: 8,
        kv_budget_bytes,
        prefix_caching,
        ..EngineConfig::default()
    };
    let loaded = tiny_loaded_model_as(dir, SEED, GgmlDType::Q8_0).unwrap();
    RealEngine::new(loaded, config).unwrap()
}

fn ids(text: &str) -> Vec<u32> {
    text.chars().map(|c| tiny_char_id(c).unwrap()).collect()
}

/// A request sampled at temperature 0.8 with `seed`, reporting log-probs.
fn request(prompt: Vec<u32>, max_tokens: usize, seed: u64) -> GenerateRequest {
    GenerateRequest {
        sampling: SamplingParams {
            temperature: 0.8,
            logprobs: true,
            top_logprobs: 3,
            ..SamplingParams::default()
        },
        seed,
        ..plain_request(&format!("req-{seed}"), prompt, max_tokens)
    }
}

/// What one request produced, and how much of its prompt came from the cache.
#[derive(Debug, Clone, PartialEq)]
struct Output {
    tokens: Vec<u32>,
    logprobs: Vec<TokenLogprob>,
    cached: usize,
}

fn collect(mut rx: EventReceiver) -> Output {
    let mut out = Output {
        tokens: Vec::new(),
        logprobs: Vec::new(),
        cached: usize::MAX,
    };
    while let Some(event) = rx.blocking_recv() {
        match event {
            Event::Token { id, logprob, .. } => {
                out.tokens.push(id);
                out.logprobs.extend(logprob);
            }
            Event::Finished { cached_tokens, .. } => out.cached = cached_tokens,
            Event::Failed(e) => panic!("request failed: {e}"),
            Event::PromptLogprobs(_) | Event::Embedding(_) => {}
        }
    }
    out
}

fn run(engine: &RealEngine, request: GenerateRequest) -> Output {
    collect(engine.submit(request).unwrap())
}

/// The system prompt the requests share: longer than two hash blocks.
fn system() -> Vec<u32> {
    ids("you are a helpful assistant. answer briefly: ")
}

#[test]
fn shared_prefixes_and_later_turns_come_from_the_cache_with_identical_output() {
    let dir = tempfile::tempdir().unwrap();
    let (cached, plain) = (
        engine(dir.path(), true, 1 << 30),
        engine(dir.path(), false, 1 << 30),
    );
    let first = [system(), ids("what is red?")].concat();
    let second = [system(), ids("why is the sky blue?")].concat();

    let a = run(&cached, request(first.clone(), 12, 1));
    assert_eq!(
        a,
        Output {
            cached: 0,
            ..run(&plain, request(first.clone(), 12, 1))
        }
    );

    let b = run(&cached, request(second.clone(), 12, 2));
    let shared = system().len() + 2; // "wh" starts both questions
    assert_eq!(b.cached, shared);
    assert_eq!(
        b,
        Output {
            cached: shared,
            ..run(&plain, request(second, 12, 2))
        }
    );

    // The next turn resends the first exchange: everything the first request fed (its
    // prompt and all its tokens but the last sampled, which was never fed) is reused.
    let turn2 = [first.clone(), a.tokens.clone(), ids(" and green?")].concat();
    let c_len = turn2.len();
    let c = run(&cached, request(turn2.clone(), 12, 3));
    assert_eq!(c.cached, first.len() + a.tokens.len() - 1);
    assert_eq!(
        c,
        Output {
            cached: c.cached,
            ..run(&plain, request(turn2, 12, 3))
        }
    );

    // The same prompt again reuses all of it but the last token, whose logits start the
    // answer; the same seed gives the same answer.
    let again = run(&cached, request(first.clone(), 12, 1));
    assert_eq!((again.cached, &again.tokens), (first.len() - 1, &a.tokens));

    let prefix = cached.step_metrics().unwrap().prefix;
    assert!(prefix.enabled && prefix.entries > 0 && prefix.bytes > 0);
    let asked = 2 * first.len() + system().len() + ids("why is the sky blue?").len();
    assert_eq!(prefix.queries as usize, asked + c_len);
    assert_eq!(prefix.hits as usize, shared + c.cached + again.cached);
    assert!(!plain.step_metrics().unwrap().prefix.enabled);
}

#[test]
fn a_request_with_cache_prompt_false_neither_reuses_nor_leaves_a_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path(), true, 1 << 30);
    let prompt = [system(), ids("hello")].concat();
    let opted_out = |seed| GenerateRequest {
        cache_prompt: false,
        ..request(prompt.clone(), 4, seed)
    };
    assert_eq!(run(&engine, opted_out(1)).cached, 0);
    assert_eq!(
        run(&engine, request(prompt.clone(), 4, 2)).cached,
        0,
        "none was left"
    );
    assert_eq!(
        run(&engine, opted_out(3)).cached,
        0,
        "one is there, but not used"
    );
    assert_eq!(
        run(&engine, request(prompt.clone(), 4, 4)).cached,
        prompt.len() - 1
    );
}

#[test]
fn a_running_sequence_lends_the_prefix_it_has_fed() {
    let dir = tempfile::tempdir().unwrap();
    let (cached, plain) = (
        engine(dir.path(), true, 1 << 30),
        engine(dir.path(), false, 1 << 30),
    );
    let long = [system(), ids("count to a hundred")].concat();
    let mut running = cached.submit(request(long.clone(), 200, 1)).unwrap();
    // Once its first token is out, its prompt is in its cache.
    loop {
        match running.blocking_recv() {
            Some(Event::Token { .. }) => break,
            Some(Event::Failed(e)) => panic!("{e}"),
            Some(_) => {}
            None => panic!("the long request ended early"),
        }
    }
    let follower = [system(), ids("count to ten")].concat();
    let got = run(&cached, request(follower.clone(), 8, 2));
    assert_eq!(got.cached, system().len() + ids("count to ").len());
    assert_eq!(
        got,
        Output {
            cached: got.cached,
            ..run(&plain, request(follower, 8, 2))
        }
    );
    drop(running);
}

#[test]
fn kept_prefixes_stay_inside_the_kv_budget_least_recently_used_out_first() {
    let dir = tempfile::tempdir().unwrap();
    // A sequence of the tiny model holds 64 slots (its first allocation) in 2 layers of
    // 2 KV heads of 8 dims, keys and values in f32: 16 KiB; a request here claims ~14 KiB.
    // The budget keeps two prefixes beside an admission, three when nothing runs.
    let budget = 48 * 1024;
    let engine = engine(dir.path(), true, budget);
    let prompts: Vec<Vec<u32>> = ["alpha", "bravo", "charlie", "delta"]
        .iter()
        .map(|word| [ids(word), system()].concat())
        .collect();
    for (i, p) in prompts.iter().enumerate() {
        assert_eq!(run(&engine, request(p.clone(), 4, i as u64)).cached, 0);
        let held = engine.step_metrics().unwrap().prefix;
        assert!(held.bytes as usize <= budget, "{held:?}");
    }
    let held = engine.step_metrics().unwrap().prefix;
    assert!((1..4).contains(&held.entries), "{held:?}");
    // The latest is still kept, the first is gone.
    let last = prompts.last().unwrap();
    assert_eq!(
        run(&engine, request(last.clone(), 4, 9)).cached,
        last.len() - 1
    );
    assert_eq!(run(&engine, request(prompts[0].clone(), 4, 9)).cached, 0);
    wait_until("the engine is idle", || engine.stats().running == 0);
}

#[test]
fn prefixes_shorter_than_a_block_are_not_reused() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path(), true, 1 << 30);
    let short = ids("hi there");
    assert!(short.len() < PREFIX_BLOCK_TOKENS);
    run(&engine, request(short.clone(), 4, 1));
    assert_eq!(run(&engine, request(short, 4, 2)).cached, 0);
}

/// A hook that changes nothing but declares what early exit declares: only prompt positions
/// may be reused.
struct PromptOnly;

impl models::Hook for PromptOnly {
    fn name(&self) -> &str {
        "prompt-only"
    }

    fn points(&self) -> models::HookPoints {
        models::HookPoints::default()
    }

    fn prefix_reuse(&self, _params: &models::hooks::HookParams) -> models::PrefixReuse {
        models::PrefixReuse::PromptOnly(String::new())
    }
}

#[test]
fn a_prompt_only_chain_leaves_its_prompt_but_not_its_reply() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path(), true, 1 << 30);
    let hook: std::sync::Arc<dyn models::Hook> = std::sync::Arc::new(PromptOnly);
    let with_hook = |prompt: Vec<u32>, seed| GenerateRequest {
        hooks: vec![models::HookCall::bare(hook.clone())],
        ..request(prompt, 8, seed)
    };
    let first = [system(), ids("tell me a story")].concat();
    let a = run(&engine, with_hook(first.clone(), 1));
    let next = [first.clone(), a.tokens, ids(" go on")].concat();
    assert_eq!(run(&engine, with_hook(next.clone(), 2)).cached, first.len());
    assert_eq!(
        run(&engine, request(next, 8, 3)).cached,
        0,
        "not by another chain"
    );
}
