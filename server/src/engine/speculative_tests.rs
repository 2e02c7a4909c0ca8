//! Speculative decoding through the real engine on the tiny model (Q8_0, whose kernels give a
//! multi-token row the bits of one-token steps): drafts change how many steps a request takes,
//! never what it returns. Drafts come from the built-in prompt-lookup plug-in and from test
//! drafters that know the answer (all accepted), know it with one wrong token (partly
//! accepted, the cache cut back) or always guess wrong.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use models::hooks::HookParams;
use models::sampling::SamplingParams;
use models::{Hook, HookCall, HookPoints};
use plugins::plugin::Plugin;
use plugins::speculative::Speculative;

use super::real::{EngineConfig, RealEngine};
use super::testing::{collect_events as collect, tiny_char_id, tiny_loaded_model_as, TINY_VOCAB};
use super::{Engine, Event, FinishReason, GenerateRequest, OutputRules, TokenLogprob};

/// Drafts from a known sequence (prompt then the output the request gives without drafts,
/// possibly with some tokens changed): while the tokens so far are its prefix, the next 4 of
/// it (at most `max`).
struct Oracle {
    known: Vec<u32>,
}

impl Hook for Oracle {
    fn name(&self) -> &str {
        "oracle"
    }
    fn points(&self) -> HookPoints {
        HookPoints {
            draft: true,
            ..HookPoints::default()
        }
    }
    fn draft(&self, _params: &HookParams, tokens: &[u32], max: usize) -> Vec<u32> {
        if !self.known.starts_with(tokens) {
            return Vec::new();
        }
        let next = &self.known[tokens.len()..];
        next.iter().take(max.min(4)).copied().collect()
    }
}

/// Always proposes `max` copies of one token.
struct Stubborn(u32);

impl Hook for Stubborn {
    fn name(&self) -> &str {
        "stubborn"
    }
    fn points(&self) -> HookPoints {
        HookPoints {
            draft: true,
            ..HookPoints::default()
        }
    }
    fn draft(&self, _params: &HookParams, _tokens: &[u32], max: usize) -> Vec<u32> {
        vec![self.0; max]
    }
}

struct Fixture {
    engine: RealEngine,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let loaded = tiny_loaded_model_as(dir.path(), 5, GgmlDType::Q8_0).unwrap();
    Fixture {
        engine: RealEngine::new(loaded, EngineConfig::default()).unwrap(),
        _dir: dir,
    }
}

fn ids(text: &str) -> Vec<u32> {
    text.chars().map(|c| tiny_char_id(c).unwrap()).collect()
}

fn request(
    prompt: &str,
    max_tokens: usize,
    temperature: f32,
    hooks: Vec<HookCall>,
) -> GenerateRequest {
    GenerateRequest {
        id: prompt.to_string(),
        prompt: ids(prompt),
        sampling: SamplingParams {
            temperature,
            logprobs: true,
            top_logprobs: 2,
            ..SamplingParams::default()
        },
        seed: 7,
        max_tokens,
        stop: Vec::new(),
        stop_token_ids: Vec::new(),
        prompt_logprobs: None,
        hooks,
        output: OutputRules::default(),
        cache_prompt: true,
        constraint: None,
        embed: false,
    }
}

/// What a client sees: every token with its text and log-probs, then how it ended.
#[derive(Debug, Clone, PartialEq)]
struct Outcome {
    tokens: Vec<(u32, String, Option<TokenLogprob>)>,
    end: Option<(FinishReason, usize, String)>,
}

fn run(f: &Fixture, request: GenerateRequest) -> Outcome {
    let events = collect(f.engine.submit(request).unwrap());
    let mut outcome = Outcome {
        tokens: Vec::new(),
        end: None,
    };
    for e in events {
        match e {
            Event::Token { id, text, logprob } => outcome.tokens.push((id, text, logprob)),
            Event::Finished {
                reason,
                completion_tokens,
                trailing_text,
                ..
            } => outcome.end = Some((reason, completion_tokens, trailing_text)),
            other => panic!("unexpected event {other:?}"),
        }
    }
    outcome
}

fn output_ids(o: &Outcome) -> Vec<u32> {
    o.tokens.iter().map(|t| t.0).collect()
}

/// An oracle for `base`'s output, wrong at every `wrong_every`-th output token if given.
fn oracle(prompt: &str, base: &Outcome, wrong_every: Option<usize>) -> HookCall {
    let mut output = output_ids(base);
    if let Some(n) = wrong_every {
        for token in output.iter_mut().skip(n - 1).step_by(n) {
            *token = (*token + 1) % TINY_VOCAB as u32;
        }
    }
    let known = [ids(prompt), output].concat();
    HookCall::bare(Arc::new(Oracle { known }))
}

fn ngram(params: serde_json::Value) -> HookCall {
    let plugin = Speculative;
    let params = plugin.request_params(params.as_object().unwrap()).unwrap();
    HookCall::new(Arc::new(Speculative), params)
}

/// A change to a request, applied alike with and without drafts.
type Change = dyn Fn(&mut GenerateRequest);

const PROMPTS: [&str; 4] = [
    "abcabcabc",
    "the cat sat on the mat",
    "q",
    "0123456789 0123",
];

#[test]
fn drafts_leave_greedy_and_seeded_outputs_unchanged_token_for_token() {
    let f = fixture();
    // Per drafter, over every prompt and temperature: draft tokens fed and accepted.
    let mut fed: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for temperature in [0.0, 1.0] {
        for prompt in PROMPTS {
            let base = run(&f, request(prompt, 40, temperature, vec![]));
            assert_eq!(base.tokens.len(), 40, "{prompt}");
            let chains = [
                ("oracle", oracle(prompt, &base, None)),
                ("oracle wrong every 5th", oracle(prompt, &base, Some(5))),
                ("oracle wrong every 2nd", oracle(prompt, &base, Some(2))),
                ("stubborn", HookCall::bare(Arc::new(Stubborn(3)))),
                (
                    "ngram",
                    ngram(serde_json::json!({"prompt_lookup_min": 1, "prompt_lookup_max": 3})),
                ),
            ];
            for (name, call) in chains {
                let before = f.engine.step_metrics().unwrap().spec;
                let drafted = run(&f, request(prompt, 40, temperature, vec![call]));
                assert_eq!(
                    drafted, base,
                    "{name}, {prompt:?}, temperature {temperature}"
                );
                let after = f.engine.step_metrics().unwrap().spec;
                let entry = fed.entry(name).or_default();
                entry.0 += after.draft_tokens - before.draft_tokens;
                entry.1 += after.accepted_tokens - before.accepted_tokens;
            }
        }
    }
    let (drafted, accepted) = fed["oracle"];
    assert!(drafted > 0 && accepted == drafted, "{fed:?}");
    // Which wrong drafts the policy feeds depends on its estimate; together these feed some.
    let (drafted, accepted) = ["oracle wrong every 5th", "oracle wrong every 2nd", "ngram"]
        .iter()
        .map(|name| fed[name])
        .fold((0, 0), |t, x| (t.0 + x.0, t.1 + x.1));
    assert!(
        accepted > 0 && drafted > accepted,
        "rejected drafts were cut back: {fed:?}"
    );
    assert_eq!(
        fed["stubborn"],
        (0, 0),
        "never right, so never fed: {fed:?}"
    );
}

#[test]
fn accepted_drafts_take_fewer_steps_and_are_counted() {
    let f = fixture();
    let prompt = "the cat sat on the mat";
    let base = run(&f, request(prompt, 40, 0.0, vec![]));
    let before = f.engine.step_metrics().unwrap();
    let drafted = run(
        &f,
        request(prompt, 40, 0.0, vec![oracle(prompt, &base, None)]),
    );
    assert_eq!(drafted, base);
    let after = f.engine.step_metrics().unwrap();
    let steps = after.tokens.count - before.tokens.count;
    let spec = after.spec.clone();
    // One prefill step (which samples the first token); every decode step emits its accepted
    // drafts and one sampled token. The policy feeds drafts once the proposals have proved
    // right (a step or two), then more as they keep being right, up to the oracle's four.
    assert_eq!((steps - 1) + spec.accepted_tokens, 39, "{after:?}");
    assert_eq!(spec.accepted_tokens, spec.draft_tokens, "{spec:?}");
    assert!(
        steps - 1 - spec.drafts <= 2,
        "{steps} steps, {} with drafts",
        spec.drafts
    );
    let per_position = &spec.accepted_per_position;
    assert!(
        per_position[0] > per_position[3] && per_position[3] > 0,
        "{spec:?}"
    );
    assert!(steps <= 1 + 39 / 3, "{steps} steps for 40 tokens");
}

#[test]
fn stop_strings_stop_tokens_and_max_tokens_inside_an_accepted_run_end_it_as_without_drafts() {
    let f = fixture();
    let prompt = "abcabcabc";
    let base = run(&f, request(prompt, 40, 0.0, vec![]));
    let text: String = base.tokens.iter().map(|t| t.1.as_str()).collect();
    // A stop string from the middle of the output, a stop token that occurs in it, a short
    // max_tokens: each must end the drafted run exactly where the plain run ends.
    let stop: String = text.chars().skip(9).take(3).collect();
    let stop_token = base.tokens[6].0;
    let cases: Vec<Box<Change>> = vec![
        Box::new(move |r| r.stop = vec![stop.clone()]),
        Box::new(move |r| r.stop_token_ids = vec![stop_token]),
        Box::new(|r| r.max_tokens = 7),
    ];
    for (i, change) in cases.iter().enumerate() {
        let mut plain = request(prompt, 40, 0.0, vec![]);
        change(&mut plain);
        let want = run(&f, plain);
        let mut drafted = request(prompt, 40, 0.0, vec![oracle(prompt, &base, None)]);
        change(&mut drafted);
        assert_eq!(run(&f, drafted), want, "case {i}");
        assert!(want.tokens.len() < 40, "case {i} ends early");
    }
}

#[test]
fn past_the_batch_limit_drafts_are_not_fed_and_outputs_stay_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = tiny_loaded_model_as(dir.path(), 5, GgmlDType::Q8_0).unwrap();
    let config = EngineConfig {
        speculation_max_batch: 0,
        ..EngineConfig::default()
    };
    let f = Fixture {
        engine: RealEngine::new(loaded, config).unwrap(),
        _dir: dir,
    };
    let prompt = "the cat sat on the mat";
    let base = run(&f, request(prompt, 20, 0.0, vec![]));
    let drafted = run(
        &f,
        request(prompt, 20, 0.0, vec![oracle(prompt, &base, None)]),
    );
    assert_eq!(drafted, base);
    assert_eq!(f.engine.step_metrics().unwrap().spec.drafts, 0);
}
