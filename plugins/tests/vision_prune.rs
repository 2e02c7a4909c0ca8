//! The `vision_prune` plug-in on a tiny seeded model: keeping every image token is no plug-in
//! at all, bit for bit; a pruned prompt keeps its text and the asked fraction of its image
//! tokens in the layers after the pruning layer and all of them before it; rows with and
//! without the plug-in share a step and each gets what it gets alone; files and parameters the
//! plug-in cannot take are refused naming the fault.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use candle_core::Tensor;
use models::tiny::TinyModel;
use models::{BatchRow, HookCall, KvCache, Llama, LogitsWanted, ModelConfig};
use plugins::base::BaseIdentity;
use plugins::files::PluginFiles;
use plugins::vision_prune::{Scorer, VisionPrune, VisionPruneConfig, CONFIG_FILE};
use plugins::{BaseModel, Plugin};
use serde_json::json;

const MAX_POS: usize = 256;
const IMAGE: u32 = 77;
const LAYER: usize = 1;

fn config() -> ModelConfig {
    common::tiny_layers(4)
}

fn base(c: &ModelConfig) -> BaseModel {
    common::tiny_base(c)
}

fn prune_config(c: &ModelConfig) -> VisionPruneConfig {
    VisionPruneConfig {
        kind: "vision_prune".into(),
        base_model: BaseIdentity::of(&base(c)),
        layer: LAYER,
        image_token_id: IMAGE,
        scorer: Scorer::Random,
        keep: 0.25,
        module: None,
    }
}

fn model(c: &ModelConfig) -> Llama {
    TinyModel::random(c.clone(), 3)
        .unwrap()
        .build(MAX_POS)
        .unwrap()
}

/// The plug-in of [`prune_config`]: random scoring after [`LAYER`], a quarter kept by default.
fn random_plugin(c: &ModelConfig) -> Arc<VisionPrune> {
    Arc::new(VisionPrune::new("p", prune_config(c), None, &base(c)).unwrap())
}

/// Text, 32 image tokens, then text that asks about them.
fn prompt() -> Vec<u32> {
    let mut t = vec![1, 5, 9, 13];
    t.extend(std::iter::repeat_n(IMAGE, 32));
    t.extend([21, 34, 55, 3, 8]);
    t
}

fn chain(plugin: &Arc<VisionPrune>, params: serde_json::Value) -> Vec<HookCall> {
    let p = plugin.request_params(params.as_object().unwrap()).unwrap();
    vec![HookCall::new(plugin.clone(), p)]
}

/// Logits after the prompt and after one decode token.
fn run(m: &Llama, cache: &mut KvCache, hooks: &[HookCall]) -> Vec<Tensor> {
    let mut out = Vec::new();
    for (tokens, chain) in [(prompt(), hooks), (vec![4], hooks)] {
        let mut rows = [BatchRow {
            seq_id: 1,
            tokens: &tokens,
            cache: &mut *cache,
            hooks: chain,
            logits: LogitsWanted::Last,
        }];
        out.push(m.forward(&mut rows).unwrap().remove(0).unwrap());
    }
    out
}

fn bits(t: &Tensor) -> Vec<u32> {
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    v.into_iter().map(f32::to_bits).collect()
}

#[test]
fn keeping_every_image_token_is_no_plugin_bit_for_bit() {
    let c = config();
    let m = model(&c);
    let plugin = random_plugin(&c);
    let whole = run(
        &m,
        &mut m.new_cache(),
        &chain(&plugin, json!({"keep": 1.0})),
    );
    let none = run(&m, &mut m.new_cache(), &[]);
    for (a, b) in whole.iter().zip(&none) {
        assert_eq!(bits(a), bits(b));
    }
}

#[test]
fn a_pruned_prompt_keeps_its_text_and_the_asked_fraction_of_its_image() {
    let c = config();
    let m = model(&c);
    let plugin = random_plugin(&c);
    let mut cache = m.new_cache();
    let pruned = run(
        &m,
        &mut cache,
        &chain(&plugin, json!({"keep": 0.25, "seed": 4})),
    );
    let n = prompt().len() + 1;
    let text = n - 32;
    for l in 0..=LAYER {
        assert_eq!(cache.layer_len(l), n, "layer {l} keeps every token");
    }
    for l in LAYER + 1..c.num_layers {
        assert_eq!(
            cache.layer_len(l),
            text + 8,
            "layer {l} keeps a quarter of the image"
        );
        let kept = cache.layer_positions(l);
        for p in (0..4).chain(36..n as u32) {
            assert!(kept.contains(&p), "text position {p} kept in layer {l}");
        }
    }
    // Pruning changed the answer's logits, and the default keep is the file's (0.25).
    let none = run(&m, &mut m.new_cache(), &[]);
    assert!(common::max_abs_diff(&pruned[0], &none[0]) > 1e-4);
    let mut by_default = m.new_cache();
    run(&m, &mut by_default, &chain(&plugin, json!({"seed": 4})));
    assert_eq!(
        by_default.layer_positions(LAYER + 1),
        cache.layer_positions(LAYER + 1)
    );
}

#[test]
fn pruned_and_whole_rows_share_a_step_and_each_gets_what_it_gets_alone() {
    let c = config();
    let m = model(&c);
    let plugin = random_plugin(&c);
    let pruning = chain(&plugin, json!({"keep": 0.5}));
    let alone_pruned = run(&m, &mut m.new_cache(), &pruning);
    let alone_whole = run(&m, &mut m.new_cache(), &[]);
    let (mut a, mut b) = (m.new_cache(), m.new_cache());
    let tokens = prompt();
    let mut rows = [
        BatchRow {
            seq_id: 1,
            tokens: &tokens,
            cache: &mut a,
            hooks: &[],
            logits: LogitsWanted::Last,
        },
        BatchRow {
            seq_id: 2,
            tokens: &tokens,
            cache: &mut b,
            hooks: &pruning,
            logits: LogitsWanted::Last,
        },
    ];
    let out = m.forward(&mut rows).unwrap();
    assert!(common::max_abs_diff(out[0].as_ref().unwrap(), &alone_whole[0]) < 1e-5);
    assert!(common::max_abs_diff(out[1].as_ref().unwrap(), &alone_pruned[0]) < 1e-5);
    assert_eq!(a.layer_len(LAYER + 1), tokens.len());
    assert_eq!(b.layer_len(LAYER + 1), tokens.len() - 16);
}

#[test]
fn files_and_parameters_it_cannot_take_are_refused_naming_the_fault() {
    let c = config();
    let b = base(&c);
    let bad_configs = [
        (json!({"layer": 3}), "leaves no layer"),
        (json!({"image_token_id": 100_000}), "outside the vocabulary"),
        (json!({"keep": 0.0}), "keep"),
        (json!({"type": "lora"}), "not `vision_prune`"),
    ];
    for (change, says) in bad_configs {
        let mut v = serde_json::to_value(prune_config(&c)).unwrap();
        for (k, x) in change.as_object().unwrap() {
            v[k] = x.clone();
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CONFIG_FILE), v.to_string()).unwrap();
        let err = VisionPrune::load("p", dir.path(), &b, &mut PluginFiles::unconfined())
            .unwrap_err()
            .to_string();
        assert!(err.contains(says), "{change}: {err}");
    }
    let plugin = VisionPrune::new("p", prune_config(&c), None, &b).unwrap();
    for (params, names) in [
        (json!({"keep": 0}), "`keep`"),
        (json!({"keep": 1.5}), "`keep`"),
        (json!({"keep": "half"}), "`keep`"),
        (json!({"seed": -1}), "`seed`"),
        (json!({"ratio": 0.5}), "`ratio`"),
    ] {
        let err = plugin
            .request_params(params.as_object().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains(names), "{params}: {err}");
    }
}

/// FastV's choice: as many image tokens as random pruning keeps, the text all kept, the same
/// tokens whatever the seed (the scores decide, not the draw), and not the random draw's.
#[test]
fn attention_scoring_keeps_the_asked_count_by_score_not_by_draw() {
    let c = config();
    let m = model(&c);
    let b = base(&c);
    let fastv = VisionPruneConfig {
        scorer: Scorer::Attention,
        ..prune_config(&c)
    };
    let fastv = Arc::new(VisionPrune::new("fastv", fastv, None, &b).unwrap());
    let random = Arc::new(VisionPrune::new("random", prune_config(&c), None, &b).unwrap());
    let kept = |plugin: &Arc<VisionPrune>, seed: u64| {
        let mut cache = m.new_cache();
        run(
            &m,
            &mut cache,
            &chain(plugin, json!({"keep": 0.25, "seed": seed})),
        );
        cache.layer_positions(LAYER + 1)
    };
    let (a, b) = (kept(&fastv, 1), kept(&fastv, 2));
    assert_eq!(a, b, "the seed does not matter to attention scoring");
    assert_eq!(a.len(), prompt().len() + 1 - 32 + 8);
    assert!(
        (0..4).chain(36..42).all(|p| a.contains(&p)),
        "text kept: {a:?}"
    );
    assert_ne!(a, kept(&random, 1));
}
