//! The steering controller on a tiny seeded model: it decides from the input layers' last-token
//! activations (checked against the MLP computed by hand), steers the last prompt token and
//! every generated token at the steered layers only (checked against a plain hook doing just
//! that), acts per request in mixed batches, and refuses files made for another model.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use models::tiny::TinyModel;
use models::{
    BatchRow, Hook, HookCall, HookGroup, HookPoints, KvCache, Llama, LogitsWanted, ModelConfig,
};
use plugins::controller::{
    BaseIdentity, ControllerConfig, ControllerParams, ControllerTensors, SteeringController, TYPE,
};
use plugins::files::PluginFiles;
use plugins::steer::train::last_token_activations;
use plugins::train::Quiet;
use plugins::{BaseModel, Plugin};
use rand::{Rng, SeedableRng};
use serde_json::json;

const MAX_POS: usize = 64;
const ALPHA: f32 = 2.5;

fn config() -> ModelConfig {
    common::tiny_layers(4)
}

fn base(c: &ModelConfig) -> BaseModel {
    common::tiny_base(c)
}

/// The tiny Llama the decay tests steer.
fn tiny_llama(c: &ModelConfig) -> Llama {
    TinyModel::random(c.clone(), 4)
        .unwrap()
        .build(MAX_POS)
        .unwrap()
}

fn controller_config(c: &ModelConfig) -> ControllerConfig {
    ControllerConfig {
        kind: TYPE.into(),
        base_model: BaseIdentity::of(&base(c)),
        input_layers: vec![0, 1],
        steered_layers: (2, 3),
        hidden_units: 8,
        alpha: ALPHA,
        decay: None,
    }
}

fn random(shape: (usize, usize), spread: f32, rng: &mut rand::rngs::StdRng) -> Tensor {
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| spread * (rng.random::<f32>() * 2.0 - 1.0))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Random weights; `fc2_bias` shifts the logits (large positive: strength and weights ~1).
fn tensors(c: &ModelConfig, fc2_bias: f32, seed: u64) -> ControllerTensors {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (h, l) = (c.hidden_size, c.num_layers);
    let directions = random((l, h), 1.0, &mut rng);
    let norms = directions
        .sqr()
        .unwrap()
        .sum_keepdim(1)
        .unwrap()
        .sqrt()
        .unwrap();
    ControllerTensors {
        fc1_weight: random((8, 2 * h), 0.3, &mut rng),
        fc1_bias: Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap(),
        fc2_weight: random((1 + l, 8), 0.3, &mut rng),
        fc2_bias: (Tensor::ones(1 + l, DType::F32, &Device::Cpu).unwrap() * fc2_bias as f64)
            .unwrap(),
        directions: directions.broadcast_div(&norms).unwrap(),
    }
}

fn load(
    c: &ModelConfig,
    t: &ControllerTensors,
    cfg: &ControllerConfig,
) -> Result<Arc<SteeringController>, plugins::PluginError> {
    let dir = tempfile::tempdir().unwrap();
    t.save(dir.path(), cfg).unwrap();
    SteeringController::load("ctl", dir.path(), &base(c), &mut PluginFiles::unconfined())
        .map(Arc::new)
}

fn call(ctl: &Arc<SteeringController>, scale: f64) -> (HookCall, Arc<ControllerParams>) {
    let params = ctl
        .request_params(json!({"scale": scale}).as_object().unwrap())
        .unwrap();
    let typed = params.clone().downcast::<ControllerParams>().unwrap();
    let hook: Arc<dyn Hook> = ctl.clone();
    (HookCall::new(hook, params), typed)
}

/// Adds `coef * d_l` at layers 2..=3 to the last entry of the row (prompt) or its token.
struct LastTokenPatch {
    directions: Tensor,
    coef: Vec<f32>,
}

impl Hook for LastTokenPatch {
    fn name(&self) -> &str {
        "patch"
    }
    fn points(&self) -> HookPoints {
        HookPoints {
            residual: true,
            ..Default::default()
        }
    }
    fn residual(
        &self,
        layer: usize,
        _g: &HookGroup<'_>,
        h: &Tensor,
    ) -> models::Result<Option<Tensor>> {
        if !(2..=3).contains(&layer) {
            return Ok(None);
        }
        let n = h.dim(0)?;
        let mut col = vec![0f32; n];
        col[n - 1] = self.coef[layer];
        let col = Tensor::from_vec(col, (n, 1), h.device())?;
        let d = self.directions.get(layer)?.unsqueeze(0)?;
        Ok(Some((h + col.broadcast_mul(&d)?)?))
    }
}

/// Feeds the prompt, then `steps` greedy-free fixed tokens; returns every step's last logits.
fn run(model: &Llama, prompt: &[u32], steps: &[u32], hooks: &[HookCall]) -> Vec<Vec<f32>> {
    let mut cache: KvCache = model.new_cache();
    let mut out = Vec::new();
    for feed in std::iter::once(prompt.to_vec()).chain(steps.iter().map(|&t| vec![t])) {
        let last = LogitsWanted::Last;
        let l = models::testing::step(model, &mut cache, &feed, hooks, last).unwrap();
        out.push(l.flatten_all().unwrap().to_vec1().unwrap());
    }
    out
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

const PROMPT: [u32; 6] = [7, 21, 3, 60, 9, 14];
const STEPS: [u32; 3] = [5, 44, 12];

#[test]
fn the_decision_is_the_mlp_of_the_input_layers_last_token_activations() {
    let c = config();
    let model = tiny_llama(&c);
    let t = tensors(&c, 0.0, 1);
    let ctl = load(&c, &t, &controller_config(&c)).unwrap();
    let (hook, params) = call(&ctl, 1.0);
    run(&model, &PROMPT, &[], &[hook]);
    let got = params.decision().expect("decided during prefill");

    let acts = &last_token_activations(&model, &[PROMPT.to_vec()], 1, &mut Quiet).unwrap()[0];
    let x: Vec<f32> = acts[0].iter().chain(&acts[1]).copied().collect();
    let x = Tensor::from_vec(x, (1, 2 * c.hidden_size), &Device::Cpu).unwrap();
    let hidden = x
        .matmul(&t.fc1_weight.t().unwrap())
        .unwrap()
        .broadcast_add(&t.fc1_bias)
        .unwrap()
        .relu()
        .unwrap();
    let logits = hidden
        .matmul(&t.fc2_weight.t().unwrap())
        .unwrap()
        .broadcast_add(&t.fc2_bias)
        .unwrap();
    let want: Vec<f32> = plugins::controller::sigmoid(&logits)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(
        (got.strength - want[0]).abs() < 1e-5,
        "{} vs {}",
        got.strength,
        want[0]
    );
    for (a, b) in got.weights.iter().zip(&want[1..]) {
        assert!((a - b).abs() < 1e-5);
    }
}

#[test]
fn it_steers_the_last_prompt_token_and_generated_tokens_at_the_steered_layers() {
    let c = config();
    let model = tiny_llama(&c);
    let t = tensors(&c, 0.0, 2);
    let ctl = load(&c, &t, &controller_config(&c)).unwrap();
    let (hook, params) = call(&ctl, 1.0);
    let got = run(&model, &PROMPT, &STEPS, &[hook]);
    let d = params.decision().unwrap();
    let coef: Vec<f32> = d.weights.iter().map(|w| d.strength * w * ALPHA).collect();
    let patch: Arc<dyn Hook> = Arc::new(LastTokenPatch {
        directions: t.directions.clone(),
        coef,
    });
    let want = run(&model, &PROMPT, &STEPS, &[HookCall::bare(patch)]);
    assert!(
        max_diff(&got, &want) < 1e-4,
        "controller vs explicit patch: {}",
        max_diff(&got, &want)
    );
    assert!(
        max_diff(&got, &run(&model, &PROMPT, &STEPS, &[])) > 1e-2,
        "it must steer"
    );

    let (off, _) = call(&ctl, 0.0);
    assert_eq!(
        max_diff(
            &run(&model, &PROMPT, &STEPS, &[off]),
            &run(&model, &PROMPT, &STEPS, &[])
        ),
        0.0
    );
}

#[test]
fn requests_in_one_batch_each_get_their_own_decision() {
    let c = config();
    let model = tiny_llama(&c);
    let ctl = load(&c, &tensors(&c, 0.0, 3), &controller_config(&c)).unwrap();
    let prompts: Vec<Vec<u32>> = (0..4u32).map(|i| vec![i + 2, 30 + i, 9, 70 - i]).collect();
    let alone: Vec<Vec<Vec<f32>>> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let hooks: Vec<HookCall> = if i == 1 {
                vec![]
            } else {
                vec![call(&ctl, 1.0 + i as f64).0]
            };
            run(&model, p, &STEPS, &hooks)
        })
        .collect();
    let chains: Vec<Vec<HookCall>> = (0..4)
        .map(|i| {
            if i == 1 {
                vec![]
            } else {
                vec![call(&ctl, 1.0 + i as f64).0]
            }
        })
        .collect();
    let mut caches: Vec<KvCache> = prompts.iter().map(|_| model.new_cache()).collect();
    let mut got: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 4];
    let feeds: Vec<Vec<Vec<u32>>> = std::iter::once(prompts.clone())
        .chain(STEPS.iter().map(|&s| vec![vec![s]; 4]))
        .collect();
    for feed in &feeds {
        let mut rows: Vec<BatchRow> = caches
            .iter_mut()
            .zip(&chains)
            .zip(feed)
            .enumerate()
            .map(|(i, ((cache, hooks), tokens))| BatchRow {
                seq_id: i as u64,
                tokens,
                cache,
                hooks,
                logits: LogitsWanted::Last,
            })
            .collect();
        for (i, l) in model.forward(&mut rows).unwrap().into_iter().enumerate() {
            got[i].push(l.unwrap().flatten_all().unwrap().to_vec1().unwrap());
        }
    }
    for i in 0..4 {
        assert!(
            max_diff(&got[i], &alone[i]) < 1e-4,
            "row {i}: {}",
            max_diff(&got[i], &alone[i])
        );
    }
}

#[test]
fn files_for_another_model_or_with_bad_layer_plans_are_refused() {
    let c = config();
    let t = tensors(&c, 0.0, 5);
    let mut other = controller_config(&c);
    other.base_model.hidden_size = 64;
    let err = load(&c, &t, &other).unwrap_err().to_string();
    assert!(err.contains("made for"), "{err}");
    let mut deep = controller_config(&c);
    deep.steered_layers = (1, 4);
    let err = load(&c, &t, &deep).unwrap_err().to_string();
    assert!(err.contains("must lie below layer 4"), "{err}");
    let mut wide = controller_config(&c);
    wide.input_layers = vec![0, 1, 2];
    wide.steered_layers = (3, 3);
    let err = load(&c, &t, &wide).unwrap_err().to_string();
    assert!(err.contains("`fc1.weight` has shape"), "{err}");
}

#[test]
fn regression_non_finite_or_absurd_weights_are_refused_at_load() {
    let c = config();
    let cfg = controller_config(&c);
    for bad in [f32::NAN, f32::INFINITY, 1e30] {
        let mut t = tensors(&c, 0.0, 5);
        let mut v = t
            .fc2_weight
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        v[3] = bad;
        t.fc2_weight = Tensor::from_vec(v, t.fc2_weight.dims(), &Device::Cpu).unwrap();
        let err = load(&c, &t, &cfg).unwrap_err();
        assert!(
            matches!(err, plugins::PluginError::BadWeights { .. })
                && err.to_string().contains("fc2.weight"),
            "{bad}: {err}"
        );
    }
}

#[test]
fn a_decaying_patch_fades_over_the_generated_tokens() {
    let c = config();
    let model = tiny_llama(&c);
    let t = tensors(&c, 0.0, 2);
    let ctl = load(&c, &t, &controller_config(&c)).unwrap();
    let with = |params: serde_json::Value| {
        let params = ctl.request_params(params.as_object().unwrap()).unwrap();
        let hook: Arc<dyn Hook> = ctl.clone();
        run(&model, &PROMPT, &STEPS, &[HookCall::new(hook, params)])
    };
    let steady = with(json!({"scale": 1.0}));
    let fading = with(json!({"scale": 1.0, "decay": 0.01}));
    // The last prompt token and the first generated token (t = 0) get the whole patch ...
    assert_eq!(steady[..2], fading[..2]);
    // ... later tokens next to none of it, so they move back towards the base model.
    let base = run(&model, &PROMPT, &STEPS, &[]);
    let gap = |a: &[Vec<f32>], i: usize| max_diff(&a[i..i + 1], &base[i..i + 1]);
    assert!(
        gap(&fading, 2) < gap(&steady, 2),
        "{} vs {}",
        gap(&fading, 2),
        gap(&steady, 2)
    );
    let e = ctl
        .request_params(json!({"decay": 0}).as_object().unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("decay"), "{e}");
}

#[test]
fn the_configs_decay_is_the_default_a_request_overrides_or_turns_off_with_null() {
    let c = config();
    let model = tiny_llama(&c);
    let t = tensors(&c, 0.0, 2);
    let steady_ctl = load(&c, &t, &controller_config(&c)).unwrap();
    let mut fading_cfg = controller_config(&c);
    fading_cfg.decay = Some(0.01);
    let fading_ctl = load(&c, &t, &fading_cfg).unwrap();
    let with = |ctl: &Arc<SteeringController>, params: serde_json::Value| {
        let params = ctl.request_params(params.as_object().unwrap()).unwrap();
        let hook: Arc<dyn Hook> = ctl.clone();
        run(&model, &PROMPT, &STEPS, &[HookCall::new(hook, params)])
    };
    let steady = with(&steady_ctl, json!({"scale": 1.0}));
    let explicit = with(&steady_ctl, json!({"scale": 1.0, "decay": 0.01}));
    assert_ne!(steady, explicit);
    assert_eq!(with(&fading_ctl, json!({"scale": 1.0})), explicit);
    assert_eq!(
        with(&fading_ctl, json!({"scale": 1.0, "decay": null})),
        steady
    );

    fading_cfg.decay = Some(-1.0);
    let err = load(&c, &t, &fading_cfg).unwrap_err().to_string();
    assert!(err.contains("decay must be positive"), "{err}");
}

#[test]
fn with_a_decay_the_controller_still_changes_only_what_its_strength_head_fires_on() {
    let c = config();
    let model = tiny_llama(&c);
    let base = run(&model, &PROMPT, &STEPS, &[]);
    // Strength logit `strength`, every layer weight's logit +10 (fully on).
    let fading = |strength: f32| {
        let mut t = tensors(&c, 10.0, 2);
        let mut bias = vec![10f32; 1 + c.num_layers];
        bias[0] = strength;
        t.fc2_bias = Tensor::new(bias.as_slice(), &Device::Cpu).unwrap();
        let ctl = load(&c, &t, &controller_config(&c)).unwrap();
        let params = ctl
            .request_params(json!({"scale": 1.0, "decay": 2.0}).as_object().unwrap())
            .unwrap();
        let hook: Arc<dyn Hook> = ctl.clone();
        run(&model, &PROMPT, &STEPS, &[HookCall::new(hook, params)])
    };
    // A strength head that does not fire (σ(-60)) leaves the output as the base model's ...
    assert_eq!(max_diff(&fading(-60.0), &base), 0.0);
    // ... one that fires steers, decay or not.
    assert!(max_diff(&fading(10.0), &base) > 1e-2);
}

#[test]
fn a_controller_request_never_shares_a_prefix() {
    let c = config();
    let ctl = load(&c, &tensors(&c, 0.0, 3), &controller_config(&c)).unwrap();
    let (call, _) = call(&ctl, 1.0);
    assert_eq!(
        call.hook.prefix_reuse(&call.params),
        models::PrefixReuse::Never
    );
}
