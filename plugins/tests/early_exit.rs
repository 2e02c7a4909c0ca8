//! Speculative early exit on a tiny seeded model: a token leaves at the layer its predictor
//! fires when that layer's top token is a candidate, and gets exactly what the model cut to
//! that depth gives; rows leaving at different layers share a step; the skipped layers keep
//! the token's keys and values; files round-trip and bad ones are refused naming the fault.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use models::tiny::TinyModel;
use models::{BatchRow, HookCall, KvCache, Llama, LogitsWanted, ModelConfig};
use plugins::base::BaseIdentity;
use plugins::early_exit::drafts::DraftTable;
use plugins::early_exit::predictor::Predictor;
use plugins::early_exit::train::{train, TrainOptions};
use plugins::early_exit::{EarlyExit, EarlyExitConfig, TYPE};
use plugins::files::PluginFiles;
use plugins::train::Quiet;
use plugins::{BaseModel, Plugin, PluginError};
use serde_json::json;

const MAX_POS: usize = 64;
const PROMPT: [u32; 5] = [3, 8, 13, 21, 34];
const NEXT: u32 = 55;

fn config() -> ModelConfig {
    common::tiny_layers(6)
}

fn base(c: &ModelConfig) -> BaseModel {
    common::tiny_base(c)
}

fn model(c: &ModelConfig) -> Llama {
    TinyModel::random(c.clone(), 21)
        .unwrap()
        .build(MAX_POS)
        .unwrap()
}

/// The same weights cut to the first `layers` layers.
fn cut(c: &ModelConfig, layers: usize) -> Llama {
    let mut t = TinyModel::random(c.clone(), 21).unwrap();
    t.config.num_layers = layers;
    t.build(MAX_POS).unwrap()
}

/// A predictor over 3k features that always (bias 50) or never (-50) fires.
fn constant(k: usize, bias: f32) -> Predictor {
    Predictor {
        inputs: 3 * k,
        fc1_weight: vec![0.0; 3 * k],
        fc1_bias: vec![0.0],
        fc2_weight: vec![0.0],
        fc2_bias: bias,
    }
}

/// A plug-in whose predictor fires at `fire` only, offline there, with every table row `row`.
fn exit_at(c: &ModelConfig, fire: usize, row: [u32; 2]) -> EarlyExit {
    let layers = vec![1, 2, 3];
    let predictors: HashMap<usize, Predictor> = layers
        .iter()
        .map(|&l| (l, constant(2, if l == fire { 50.0 } else { -50.0 })))
        .collect();
    let table = DraftTable::from_rows(2, (0..c.vocab_size).flat_map(|_| row).collect()).unwrap();
    let config = EarlyExitConfig {
        kind: TYPE.into(),
        base_model: BaseIdentity::of(&base(c)),
        layers,
        offline_layers: vec![fire],
        draft_tokens: 2,
        lookup_max: 1,
        hidden_units: 1,
        threshold: 0.5,
        max_batch_rows: 8,
    };
    EarlyExit::new(&format!("exit{fire}"), config, predictors, table, &base(c)).unwrap()
}

fn chain(p: EarlyExit) -> Vec<HookCall> {
    let p: Arc<dyn Plugin> = Arc::new(p);
    let params = p.request_params(&serde_json::Map::new()).unwrap();
    vec![HookCall::new(p, params)]
}

fn shared_chain(p: &Arc<EarlyExit>) -> Vec<HookCall> {
    let p: Arc<dyn Plugin> = p.clone();
    let params = p.request_params(&serde_json::Map::new()).unwrap();
    vec![HookCall::new(p, params)]
}

fn step(m: &Llama, cache: &mut KvCache, tokens: &[u32], hooks: &[HookCall]) -> Tensor {
    let mut b = [BatchRow {
        seq_id: 0,
        tokens,
        cache,
        hooks,
        logits: LogitsWanted::Last,
    }];
    m.forward(&mut b).unwrap().remove(0).unwrap()
}

/// Logits of `NEXT` fed after `PROMPT` as a decode step, the prompt prefilled first.
fn decode(m: &Llama, hooks: &[HookCall]) -> (Tensor, KvCache) {
    let mut cache = m.new_cache();
    step(m, &mut cache, &PROMPT, hooks);
    (step(m, &mut cache, &[NEXT], hooks), cache)
}

fn top(l: &Tensor) -> u32 {
    l.squeeze(0)
        .unwrap()
        .argmax(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn a_token_leaves_where_its_predictor_fires_when_the_layers_top_token_is_a_candidate() {
    let c = config();
    let m = model(&c);
    let full = decode(&m, &[]).0;
    for fire in [1, 3] {
        let early = decode(&cut(&c, fire + 1), &[]).0;
        assert!(
            common::max_abs_diff(&early, &full) > 1e-3,
            "layer {fire} must differ"
        );
        let t = top(&early);
        let other = (t + 1) % 96;
        // The layer's top token among the candidates: the token leaves with its logits.
        let plugin = Arc::new(exit_at(&c, fire, [other, t]));
        let (got, cache) = decode(&m, &shared_chain(&plugin));
        assert!(common::max_abs_diff(&got, &early) < 1e-5, "exit at {fire}");
        let counts = plugin.counts();
        assert_eq!(
            (
                counts.decode_tokens,
                counts.checks[fire],
                counts.exits[fire]
            ),
            (1, 1, 1)
        );
        // Every later layer still holds the token's keys and values.
        for l in 0..6 {
            assert_eq!(
                cache.layer_positions(l),
                vec![0, 1, 2, 3, 4, 5],
                "layer {l}"
            );
        }
        // Not among them: the check fails and the token goes the whole depth.
        let plugin = Arc::new(exit_at(&c, fire, [other, (t + 2) % 96]));
        let (got, _) = decode(&m, &shared_chain(&plugin));
        assert_eq!(common::max_abs_diff(&got, &full), 0.0, "refused at {fire}");
        let counts = plugin.counts();
        assert_eq!((counts.checks[fire], counts.exits[fire]), (1, 0));
    }
}

#[test]
fn rows_leaving_at_different_layers_share_a_step_and_get_what_they_get_alone() {
    let c = config();
    let m = model(&c);
    let tops: Vec<u32> = [1, 3]
        .iter()
        .map(|&l| top(&decode(&cut(&c, l + 1), &[]).0))
        .collect();
    let chains = [
        chain(exit_at(&c, 1, [tops[0], 0])),
        chain(exit_at(&c, 3, [tops[1], 0])),
        Vec::new(),
    ];
    let alone: Vec<Tensor> = chains.iter().map(|h| decode(&m, h).0).collect();
    let mut caches: Vec<KvCache> = chains.iter().map(|_| m.new_cache()).collect();
    for (cache, hooks) in caches.iter_mut().zip(&chains) {
        step(&m, cache, &PROMPT, hooks);
    }
    let next = [NEXT];
    let mut rows: Vec<BatchRow<'_>> = caches
        .iter_mut()
        .zip(&chains)
        .enumerate()
        .map(|(i, (cache, hooks))| BatchRow {
            seq_id: i as u64,
            tokens: &next,
            cache,
            hooks,
            logits: LogitsWanted::Last,
        })
        .collect();
    let together = m.forward(&mut rows).unwrap();
    for (i, (t, a)) in together.iter().zip(&alone).enumerate() {
        assert!(
            common::max_abs_diff(t.as_ref().unwrap(), a) < 1e-5,
            "row {i}"
        );
    }
    assert!(
        common::max_abs_diff(&alone[0], &alone[1]) > 1e-3,
        "the two rows left at different layers"
    );
}

#[test]
fn no_token_leaves_a_step_running_more_rows_than_the_file_allows() {
    let c = config();
    let m = model(&c);
    let t = top(&decode(&cut(&c, 2), &[]).0);
    let mut one = exit_at(&c, 1, [t, 0]);
    let mut config = one.config().clone();
    config.max_batch_rows = 1;
    let table = one.table().clone();
    let predictors = [1, 2, 3]
        .map(|l| (l, one.predictor(l).unwrap().clone()))
        .into();
    one = EarlyExit::new("one", config, predictors, table, &base(&c)).unwrap();
    let plugin = Arc::new(one);
    let hooks = shared_chain(&plugin);
    // Alone the token leaves at layer 1.
    let (alone, _) = decode(&m, &hooks);
    assert!(common::max_abs_diff(&alone, &decode(&cut(&c, 2), &[]).0) < 1e-5);
    // Beside a row without the plug-in the step runs two rows: it goes the whole depth.
    let mut caches = [m.new_cache(), m.new_cache()];
    for cache in caches.iter_mut() {
        step(&m, cache, &PROMPT, &hooks);
    }
    let next = [NEXT];
    let [a, b] = &mut caches;
    let mut rows = [
        BatchRow {
            seq_id: 0,
            tokens: &next,
            cache: a,
            hooks: &hooks,
            logits: LogitsWanted::Last,
        },
        BatchRow {
            seq_id: 1,
            tokens: &next,
            cache: b,
            hooks: &[],
            logits: LogitsWanted::Last,
        },
    ];
    let out = m.forward(&mut rows).unwrap();
    let full = decode(&m, &[]).0;
    assert!(common::max_abs_diff(out[0].as_ref().unwrap(), &full) < 1e-5);
    assert_eq!(
        plugin.counts().exits[1],
        1,
        "only the lone step let it leave"
    );
}

#[test]
fn files_round_trip_and_bad_ones_are_refused_naming_the_fault() {
    let c = config();
    let dir = tempfile::tempdir().unwrap();
    let plugin = exit_at(&c, 2, [4, 5]);
    plugin.save(dir.path()).unwrap();
    let load =
        |base: &BaseModel| EarlyExit::load("e", dir.path(), base, &mut PluginFiles::unconfined());
    let loaded = load(&base(&c)).unwrap();
    assert_eq!(loaded.config(), plugin.config());
    assert_eq!(loaded.table(), plugin.table());
    assert_eq!(loaded.predictor(2).unwrap().fc2_bias, 50.0);
    // Another model: the layer count and the hidden size are named.
    for other in [
        ModelConfig {
            num_layers: 8,
            ..c.clone()
        },
        ModelConfig {
            hidden_size: 64,
            ..c.clone()
        },
    ] {
        let e = load(&base(&other)).unwrap_err();
        assert!(matches!(e, PluginError::Incompatible { .. }), "{e}");
        assert!(e.to_string().contains("the base model is"), "{e}");
    }
    // A predictor of the wrong width, a missing one, a table token outside the vocabulary.
    let weights = dir.path().join("predictors.safetensors");
    let good = std::fs::read(&weights).unwrap();
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    tensors.insert(
        "layers.1.fc1.weight".into(),
        Tensor::zeros((1, 5), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let e = load(&base(&c)).unwrap_err().to_string();
    assert!(
        e.contains("`layers.1.fc1.weight` has shape [1, 5], expected [1, 6]"),
        "{e}"
    );
    tensors.remove("layers.1.fc1.weight");
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let e = load(&base(&c)).unwrap_err().to_string();
    assert!(e.contains("`layers.1.fc1.weight` is missing"), "{e}");
    std::fs::write(&weights, &good).unwrap();
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let rows: Vec<u32> = (0..96 * 2).map(|i| if i == 7 { 96 } else { 1 }).collect();
    tensors.insert(
        "draft_table".into(),
        Tensor::from_vec(rows, (96, 2), &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let e = load(&base(&c)).unwrap_err().to_string();
    assert!(e.contains("draft_table holds token 96"), "{e}");
    // A config of another type.
    std::fs::write(&weights, &good).unwrap();
    let mut config = serde_json::to_value(plugin.config()).unwrap();
    config["type"] = json!("memory_decoder");
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let e = load(&base(&c)).unwrap_err().to_string();
    assert!(e.contains("type is `memory_decoder`"), "{e}");
}

#[test]
fn request_parameters_are_checked_and_named() {
    let c = config();
    let p = exit_at(&c, 2, [4, 5]);
    let parse = |v: serde_json::Value| p.request_params(v.as_object().unwrap());
    assert!(parse(json!({"threshold": 0.9, "min_layer": 2})).is_ok());
    for (body, param) in [
        (json!({"threshold": 0}), "threshold"),
        (json!({"threshold": 1.5}), "threshold"),
        (json!({"min_layer": 0}), "min_layer"),
        (json!({"min_layer": 4}), "min_layer"),
        (json!({"verify": true}), "verify"),
    ] {
        let e = parse(body.clone()).unwrap_err().to_string();
        assert!(e.contains(&format!("`{param}`")), "{body}: {e}");
    }
}

#[test]
fn training_on_a_tiny_model_writes_a_plugin_that_loads_and_reports_its_exits() {
    let c = config();
    let m = model(&c);
    let prompts: Vec<Vec<u32>> = (0..10u32)
        .map(|i| vec![1 + i, 20 + i, 40 + 2 * i])
        .collect();
    let opts = TrainOptions {
        max_new_tokens: 12,
        batch: 4,
        draft_tokens: 4,
        lookup_max: 3,
        hidden_units: 8,
        first_layer: 1,
        epochs: 20,
        lr: 1e-2,
        threshold: 0.5,
        max_batch_rows: 1,
        seed: 7,
    };
    let (plugin, report) =
        train(&m, &base(&c), "tiny-exit", &prompts, &[], &opts, &mut Quiet).unwrap();
    assert_eq!(plugin.config().layers, vec![1, 2, 3]);
    // Five feature prompts, one held out: its 11 decode tokens (the first output token is prefill's).
    assert_eq!(report.tokens, 11);
    assert_eq!(report.layers.len(), 3);
    assert_eq!(
        report.histogram_all_layers.iter().sum::<usize>() as f64,
        (report.all_layers.exit_fraction * 11.0).round()
    );
    assert!((0.0..=1.0).contains(&report.candidate_hit_rate));
    let dir = tempfile::tempdir().unwrap();
    plugin.save(dir.path()).unwrap();
    let loaded =
        EarlyExit::load("t", dir.path(), &base(&c), &mut PluginFiles::unconfined()).unwrap();
    let f = vec![0.3f32; 12];
    for l in 1..=3 {
        assert_eq!(
            loaded.predictor(l).unwrap().probability(&f),
            plugin.predictor(l).unwrap().probability(&f)
        );
    }
    // And it runs: a decode step with it gives logits of the model's shape.
    let (logits, _) = decode(&m, &chain(loaded));
    assert_eq!(logits.dims(), &[1, 96]);
}

#[test]
fn the_evaluation_of_a_plugin_that_never_exits_finds_the_base_model() {
    let c = config();
    let m = model(&c);
    let plugin = Arc::new(exit_at(&c, 2, [4, 5]));
    let never = plugins::early_exit::eval::EvalOptions {
        max_new_tokens: 6,
        thresholds: vec![1.0],
        batches: vec![1, 3],
        repetitions: 1,
    };
    let prompts: Vec<Vec<u32>> = vec![vec![1, 2, 3], vec![9, 8], vec![40, 41, 42, 43]];
    let r =
        plugins::early_exit::eval::evaluate(&m, &plugin, &[], &prompts, &[], &never, &mut Quiet)
            .unwrap();
    let t = &r.thresholds[0];
    assert_eq!(
        (t.agreement, t.exit_fraction, t.identical_answers),
        (1.0, 0.0, 1.0)
    );
    assert_eq!(t.mean_exit_layer, 5.0);
    assert!((t.perplexity_ratio - 1.0).abs() < 1e-9);
    assert_eq!(r.base_tokens_per_s.len(), 2);
    // Threshold 1.0 never fires, so no check ran; 5 teacher-forced decode positions per prompt.
    assert_eq!(plugin.counts().checks.iter().sum::<u64>(), 0);
}

#[test]
fn only_prompt_positions_are_shared_whatever_the_parameters() {
    let c = config();
    let p: Arc<dyn Plugin> = Arc::new(exit_at(&c, 2, [5, 6]));
    for params in [json!({}), json!({"threshold": 0.9, "min_layer": 2})] {
        let params = p.request_params(params.as_object().unwrap()).unwrap();
        assert_eq!(
            p.prefix_reuse(&params),
            models::PrefixReuse::PromptOnly(String::new())
        );
    }
}
