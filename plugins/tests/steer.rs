//! Steering vectors on a tiny seeded model: the direction lands on the output of its layer
//! (checked against the final norm and LM head applied by hand to the captured residual
//! stream), scales and layer ranges act per row in mixed batches, files that do not fit the
//! model are refused, and directions learned from two prompt sets separate held-out prompts.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{Device, Tensor, D};
use models::tiny::{tiny_config, TinyModel};
use models::{Architecture, BatchRow, Hook, HookCall, Llama, LogitsWanted};
use plugins::files::PluginFiles;
use plugins::steer::train::{direction, last_token_activations, separation, Method};
use plugins::steer::{ControlVector, SteeringVector};
use plugins::train::Quiet;
use plugins::{BaseModel, Plugin, PluginError};
use rand::{Rng, SeedableRng};
use serde_json::json;

const MAX_POS: usize = 64;

fn tiny() -> TinyModel {
    TinyModel::random(tiny_config(Architecture::Llama), 3).unwrap()
}

fn base(m: &TinyModel) -> BaseModel {
    BaseModel {
        id: "tiny".into(),
        config: m.config.clone(),
        device: Device::Cpu,
        tokenizer_hash: None,
        kv_dtype: models::KvDtype::F32,
    }
}

fn random_unit(hidden: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    plugins::steer::unit((0..hidden).map(|_| rng.random::<f32>() - 0.5).collect())
}

/// A vector with a direction on each of `layers`, loaded from a file written to disk.
fn vector(m: &TinyModel, layers: &[usize], seed: u64) -> Arc<SteeringVector> {
    let cv = ControlVector {
        model_hint: Some("llama".into()),
        directions: layers
            .iter()
            .map(|&l| (l, random_unit(m.config.hidden_size, seed + l as u64)))
            .collect(),
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.gguf");
    cv.write(&path).unwrap();
    Arc::new(SteeringVector::load("v", &path, &base(m), &mut PluginFiles::unconfined()).unwrap())
}

fn call(v: &Arc<SteeringVector>, params: serde_json::Value) -> HookCall {
    let p = v.request_params(params.as_object().unwrap()).unwrap();
    let hook: Arc<dyn Hook> = v.clone();
    HookCall::new(hook, p)
}

fn last_logits(model: &Llama, tokens: &[u32], hooks: &[HookCall]) -> Tensor {
    let last = LogitsWanted::Last;
    let logits = models::testing::step(model, &mut model.new_cache(), tokens, hooks, last);
    logits.unwrap().flatten_all().unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

const PROMPT: [u32; 7] = [4, 9, 33, 2, 71, 18, 5];

#[test]
fn a_last_layer_direction_is_added_to_that_layers_output() {
    let t = tiny();
    let model = t.build(MAX_POS).unwrap();
    let last = t.config.num_layers - 1;
    let v = vector(&t, &[last], 1);
    let scale = 3.0;
    let got = last_logits(&model, &PROMPT, &[call(&v, json!({"scale": scale}))]);

    // By hand: final RMSNorm and LM head on (captured layer output + scale * direction).
    let h =
        last_token_activations(&model, &[PROMPT.to_vec()], 1, &mut Quiet).unwrap()[0][last].clone();
    let d = random_unit(t.config.hidden_size, 1 + last as u64);
    let steered: Vec<f32> = h.iter().zip(&d).map(|(a, b)| a + scale * b).collect();
    let x = Tensor::new(steered.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let rms = (x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + t.config.rms_norm_eps as f64)
        .unwrap()
        .sqrt()
        .unwrap();
    let normed = x
        .broadcast_div(&rms)
        .unwrap()
        .broadcast_mul(&model.norm)
        .unwrap();
    let want = normed
        .matmul(&model.lm_head.dense_weight().unwrap().t().unwrap())
        .unwrap()
        .flatten_all()
        .unwrap();
    let err = max_diff(&got, &want);
    assert!(
        err < 1e-3,
        "steered logits differ from the hand computation by {err}"
    );
    assert!(max_diff(&got, &last_logits(&model, &PROMPT, &[])) > 0.1);
}

#[test]
fn scale_zero_or_a_range_without_directions_leaves_the_model_unchanged() {
    let t = tiny();
    let model = t.build(MAX_POS).unwrap();
    let v = vector(&t, &[1], 2);
    let base_logits = last_logits(&model, &PROMPT, &[]);
    assert_eq!(
        max_diff(
            &last_logits(&model, &PROMPT, &[call(&v, json!({"scale": 0.0}))]),
            &base_logits
        ),
        0.0
    );
    let err = v
        .request_params(json!({"layers": [0, 0]}).as_object().unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("selects no direction"), "{err}");
    let err = v
        .request_params(json!({"strength": 1}).as_object().unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("`strength` is not a parameter"), "{err}");
}

#[test]
fn rows_with_different_vectors_scales_and_ranges_share_a_step_and_each_gets_what_it_gets_alone() {
    let t = tiny();
    let model = t.build(MAX_POS).unwrap();
    let a = vector(&t, &[1], 3);
    let b = vector(&t, &[1], 9);
    let chains: Vec<Vec<HookCall>> = vec![
        vec![call(&a, json!({"scale": 4.0}))],
        vec![],
        vec![call(&a, json!({"scale": -2.0}))],
        vec![call(&b, json!({"scale": 1.0, "layers": [1, 1]}))],
        vec![
            call(&a, json!({"scale": 1.0})),
            call(&b, json!({"scale": 3.0})),
        ],
    ];
    let prompts: Vec<Vec<u32>> = (0..chains.len() as u32)
        .map(|i| vec![i + 1, 50 - i, 7, 3 * i % 90])
        .collect();
    let alone: Vec<Tensor> = prompts
        .iter()
        .zip(&chains)
        .map(|(p, c)| last_logits(&model, p, c))
        .collect();
    let mut caches: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
    let mut rows: Vec<BatchRow> = prompts
        .iter()
        .zip(&chains)
        .zip(caches.iter_mut())
        .enumerate()
        .map(|(i, ((p, c), cache))| BatchRow {
            seq_id: i as u64,
            tokens: p,
            cache,
            hooks: c,
            logits: LogitsWanted::Last,
        })
        .collect();
    let together = model.forward(&mut rows).unwrap();
    for (i, (t, a)) in together.into_iter().zip(&alone).enumerate() {
        let err = max_diff(&t.unwrap().flatten_all().unwrap(), a);
        assert!(err < 1e-5, "row {i}: batched vs alone {err}");
    }
    assert!(max_diff(&alone[0], &alone[2]) > 0.1, "scales act per row");
}

#[test]
fn vectors_that_do_not_fit_the_model_are_refused() {
    let t = tiny();
    let b = base(&t);
    let h = t.config.hidden_size;
    let cases = [
        (
            BTreeMap::from([(5, vec![0.0; h])]),
            "beyond the base model's 2 layers",
        ),
        (BTreeMap::from([(1, vec![0.0; h + 1])]), "hidden size is 32"),
    ];
    for (directions, needle) in cases {
        let cv = ControlVector {
            model_hint: None,
            directions,
        };
        let err = SteeringVector::from_control_vector("v", &cv, &b).unwrap_err();
        assert!(
            matches!(err, PluginError::Incompatible { .. }) && err.to_string().contains(needle),
            "{err}"
        );
    }
}

#[test]
fn directions_from_two_prompt_sets_separate_held_out_prompts() {
    let t = tiny();
    let model = t.build(MAX_POS).unwrap();
    // Contrastive pairs, as repeng builds them: the same random prompt ending on token 40
    // (positive) or on token 80 (negative).
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let prefixes: Vec<Vec<u32>> = (0..24)
        .map(|_| (0..5).map(|_| rng.random_range(1..90)).collect())
        .collect();
    let set = |last: u32| -> Vec<Vec<u32>> {
        prefixes
            .iter()
            .map(|p| p.iter().copied().chain([last]).collect())
            .collect()
    };
    let (pos, neg) = (set(40), set(80));
    let acts = |ps: &[Vec<u32>]| last_token_activations(&model, ps, 8, &mut Quiet).unwrap();
    let (pa, na) = (acts(&pos), acts(&neg));
    let layer =
        |xs: &[Vec<Vec<f32>>], l: usize| xs.iter().map(|x| x[l].clone()).collect::<Vec<_>>();
    for method in [Method::MeanDiff, Method::Pca] {
        let (p, n) = (layer(&pa, 1), layer(&na, 1));
        let d = direction(method, &p[..16], &n[..16]);
        let s = separation(&d, (&p[..16], &n[..16]), (&p[16..], &n[16..]));
        assert!(s.auroc > 0.95 && s.accuracy > 0.85, "{method:?}: {s:?}");
    }
}

#[test]
fn regression_non_finite_or_absurd_directions_are_refused_at_load() {
    let t = tiny();
    let h = t.config.hidden_size;
    let dir = tempfile::tempdir().unwrap();
    for bad in [f32::NAN, f32::NEG_INFINITY, 1e30] {
        let mut values = random_unit(h, 1);
        values[7] = bad;
        let cv = ControlVector {
            model_hint: None,
            directions: BTreeMap::from([(1, values)]),
        };
        // Through the file, as the registry loads it.
        let path = dir.path().join("bad.gguf");
        cv.write(&path).unwrap();
        let err = SteeringVector::load("v", &path, &base(&t), &mut PluginFiles::unconfined())
            .unwrap_err();
        assert!(
            matches!(err, PluginError::BadWeights { .. })
                && err.to_string().contains("direction.1"),
            "{bad}: {err}"
        );
    }
}

#[test]
fn prefixes_are_reused_only_under_the_same_parameters() {
    let m = tiny();
    let v = vector(&m, &[1], 7);
    let reuse = |params| {
        let c = call(&v, params);
        c.hook.prefix_reuse(&c.params)
    };
    let one = reuse(json!({"scale": 1.0}));
    assert!(matches!(one, models::PrefixReuse::Keyed(_)), "{one:?}");
    assert_eq!(one, reuse(json!({"scale": 1.0})));
    assert_ne!(one, reuse(json!({"scale": 2.0})));
    // The same layers spelled out are the same parameters.
    assert_eq!(one, reuse(json!({"scale": 1.0, "layers": [1, 1]})));
}
