//! LVPruning's learned scorer: the training masks do what pruning does at serving time, the
//! plug-in keeps the tokens its decision module scores highest, its files are checked, and
//! training moves the module.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use candle_core::{Device, Tensor, Var};
use models::tiny::TinyModel;
use models::{BatchRow, HookCall, Llama, LogitsWanted, ModelConfig};
use plugins::base::BaseIdentity;
use plugins::files::PluginFiles;
use plugins::train::DenseLlama;
use plugins::vision::tower::TrainableTower;
use plugins::vision_prune::choose::{image_offsets, instruction_offsets, keep_random, keep_top};
use plugins::vision_prune::module::{DecisionModule, ModuleShape, WEIGHTS_FILE};
use plugins::vision_prune::train::{
    held_out_divergence, step_loss, step_questions, train, PruneTrainOptions,
};
use plugins::vision_prune::{Scorer, VisionPrune, VisionPruneConfig};
use plugins::{BaseModel, Plugin};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;

const IMAGE: u32 = 77;
const LAYER: usize = 1;
const SHAPE: ModuleShape = ModuleShape {
    inner_size: 8,
    num_heads: 2,
};

fn config() -> ModelConfig {
    common::tiny_layers(4)
}

fn base(c: &ModelConfig) -> BaseModel {
    common::tiny_base(c)
}

fn prune_config(c: &ModelConfig, scorer: Scorer) -> VisionPruneConfig {
    VisionPruneConfig {
        kind: "vision_prune".into(),
        base_model: BaseIdentity::of(&base(c)),
        layer: LAYER,
        image_token_id: IMAGE,
        scorer,
        keep: 0.25,
        module: (scorer == Scorer::Learned).then_some(SHAPE),
    }
}

/// A seeded module that judges image tokens by what they read of the instruction alone (its
/// direct path from the image token is zero), so that the instruction decides.
fn module(c: &ModelConfig) -> DecisionModule {
    let mut weights = SHAPE.initial(c.hidden_size, 0.25, 7).unwrap();
    for (name, t) in &mut weights {
        if name == "input.weight" {
            *t = t.zeros_like().unwrap();
        }
    }
    DecisionModule::new(SHAPE, weights)
}

fn learned(c: &ModelConfig) -> Arc<VisionPrune> {
    let config = prune_config(c, Scorer::Learned);
    Arc::new(VisionPrune::new("learned", config, Some(module(c)), &base(c)).unwrap())
}

/// Text, 32 image tokens, then an instruction `question`.
fn prompt(question: &[u32]) -> Vec<u32> {
    let mut t = vec![1, 5, 9, 13];
    t.extend(std::iter::repeat_n(IMAGE, 32));
    t.extend(question);
    t
}

/// The prompt's last logits through the serving forward pass with `plugin` at `keep`, and the
/// positions the layer after the pruning layer kept.
fn serve(m: &Llama, tokens: &[u32], plugin: &Arc<VisionPrune>, keep: f32) -> (Tensor, Vec<u32>) {
    let params = json!({"keep": keep, "seed": 4});
    let params = plugin.request_params(params.as_object().unwrap()).unwrap();
    let hooks = [HookCall::new(plugin.clone(), params)];
    let mut cache = m.new_cache();
    let mut rows = [BatchRow {
        seq_id: 1,
        tokens,
        cache: &mut cache,
        hooks: &hooks,
        logits: LogitsWanted::Last,
    }];
    let logits = m.forward(&mut rows).unwrap().remove(0).unwrap();
    (logits, cache.layer_positions(LAYER + 1))
}

/// The residual stream after [`LAYER`] of `tokens` in the training forward pass: `(1, t, h)`.
fn stream(dense: &DenseLlama, tokens: &[u32]) -> Tensor {
    let ids = Tensor::new(tokens, &Device::Cpu).unwrap();
    let x = dense.embed(&ids).unwrap().unsqueeze(0).unwrap();
    dense.run_layers(&x, 0..LAYER + 1, None, None).unwrap()
}

#[test]
fn training_masks_give_what_serving_pruning_gives() {
    let c = config();
    let m = TinyModel::random(c.clone(), 3).unwrap().build(256).unwrap();
    let dense = DenseLlama::from_llama(&m, 256, &Device::Cpu).unwrap();
    let tokens = prompt(&[21, 34, 55, 3, 8]);
    let random = VisionPrune::new("r", prune_config(&c, Scorer::Random), None, &base(&c));
    let (served, _) = serve(&m, &tokens, &Arc::new(random.unwrap()), 0.25);
    let served = served.squeeze(0).unwrap();

    let images = image_offsets(&tokens, IMAGE);
    let kept = keep_random(tokens.len(), &images, 0.25, 4);
    let keep: Vec<f32> = (0..tokens.len())
        .map(|i| f32::from(u8::from(kept.contains(&i))))
        .collect();
    let keep = Tensor::new(keep, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let h = stream(&dense, &tokens);
    let last = |mask: Option<&Tensor>| {
        let out = dense.run_layers(&h, LAYER + 1..4, mask, None).unwrap();
        let out = dense.final_norm(&out).unwrap().squeeze(0).unwrap();
        let out = out.narrow(0, tokens.len() - 1, 1).unwrap();
        dense.head(&out).unwrap().squeeze(0).unwrap()
    };
    let masked = last(Some(&keep));
    let diff = common::max_abs_diff(&masked, &served);
    assert!(
        diff < 1e-4,
        "masked training and pruned serving differ by {diff}"
    );
    assert!(
        common::max_abs_diff(&last(None), &served) > 1e-3,
        "the mask did something"
    );
    let ones = Tensor::ones((1, tokens.len()), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(common::max_abs_diff(&last(Some(&ones)), &last(None)) < 1e-5);
}

#[test]
fn the_learned_scorer_keeps_what_its_module_scores_highest_for_the_instruction() {
    let c = config();
    let m = TinyModel::random(c.clone(), 3).unwrap().build(256).unwrap();
    let dense = DenseLlama::from_llama(&m, 256, &Device::Cpu).unwrap();
    let plugin = learned(&c);
    let expected = |tokens: &[u32]| {
        let h = stream(&dense, tokens).squeeze(0).unwrap();
        let images = image_offsets(tokens, IMAGE);
        let rows = |o: &[usize]| {
            let index: Vec<u32> = o.iter().map(|&i| i as u32).collect();
            h.index_select(&Tensor::new(index, &Device::Cpu).unwrap(), 0)
                .unwrap()
        };
        let instruction = instruction_offsets(tokens.len(), &images);
        let logits: Vec<f32> = module(&c)
            .logits(&rows(&images), &rows(&instruction))
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut scores = vec![f32::NEG_INFINITY; tokens.len()];
        for (&i, l) in images.iter().zip(logits) {
            scores[i] = l;
        }
        let kept = keep_top(tokens.len(), &images, 0.25, &scores);
        kept.into_iter().map(|i| i as u32).collect::<Vec<u32>>()
    };
    let asks = prompt(&[21, 34, 55, 3, 8]);
    let (_, kept) = serve(&m, &asks, &plugin, 0.25);
    assert_eq!(kept.len(), asks.len() - 32 + 8);
    assert_eq!(kept, expected(&asks));
    let other = prompt(&[90, 2, 61, 17, 40]);
    let (_, kept_other) = serve(&m, &other, &plugin, 0.25);
    assert_eq!(kept_other, expected(&other));
    let image_part = |k: &[u32]| k.iter().filter(|&&p| (4..36).contains(&p)).count();
    assert_eq!(image_part(&kept_other), 8);
    assert_ne!(
        kept, kept_other,
        "another instruction keeps other image tokens"
    );
    // Keeping everything is no plug-in at all.
    let (whole, all) = serve(&m, &asks, &plugin, 1.0);
    assert_eq!(all.len(), asks.len());
    let mut cache = m.new_cache();
    let mut rows = [BatchRow {
        seq_id: 1,
        tokens: &asks,
        cache: &mut cache,
        hooks: &[],
        logits: LogitsWanted::Last,
    }];
    let none = m.forward(&mut rows).unwrap().remove(0).unwrap();
    assert_eq!(common::max_abs_diff(&whole, &none), 0.0);
}

#[test]
fn a_saved_module_loads_back_and_broken_files_are_refused_naming_the_fault() {
    let c = config();
    let b = base(&c);
    let m = TinyModel::random(c.clone(), 3).unwrap().build(256).unwrap();
    let dir = tempfile::tempdir().unwrap();
    learned(&c).save(dir.path()).unwrap();
    let loaded = VisionPrune::load("l", dir.path(), &b, &mut PluginFiles::unconfined()).unwrap();
    // query, key, value, input: 8 x hidden each; output, fc1: 8 x 8; fc1 bias 8; fc2 8 + 1.
    let weights = 4 * 8 * c.hidden_size + 2 * 64 + 8 + 9;
    assert_eq!(loaded.resident_bytes(), 4 * weights);
    let tokens = prompt(&[21, 34, 55, 3, 8]);
    assert_eq!(
        serve(&m, &tokens, &Arc::new(loaded), 0.25).1,
        serve(&m, &tokens, &learned(&c), 0.25).1
    );

    let load = |dir: &std::path::Path| {
        VisionPrune::load("l", dir, &b, &mut PluginFiles::unconfined())
            .unwrap_err()
            .to_string()
    };
    let weights = dir.path().join(WEIGHTS_FILE);
    let good = std::fs::read(&weights).unwrap();
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    tensors.insert(
        "fc1.weight".into(),
        Tensor::zeros((8, 9), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    assert!(load(dir.path()).contains("`fc1.weight` has shape [8, 9]"));
    tensors.insert(
        "fc1.weight".into(),
        Tensor::full(f32::NAN, (8, 8), &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    assert!(load(dir.path()).contains("`fc1.weight`"));
    tensors.remove("fc1.weight");
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    assert!(load(dir.path()).contains("`fc1.weight` is missing"));
    std::fs::write(&weights, good).unwrap();

    let config = dir.path().join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("module");
    std::fs::write(&config, v.to_string()).unwrap();
    assert!(load(dir.path()).contains("needs a `module`"));
    v["scorer"] = json!("random");
    v["module"] = json!({"inner_size": 8, "num_heads": 2});
    std::fs::write(&config, v.to_string()).unwrap();
    assert!(load(dir.path()).contains("only by the learned scorer"));
    v["scorer"] = json!("learned");
    v["module"] = json!({"inner_size": 8, "num_heads": 3});
    std::fs::write(&config, v.to_string()).unwrap();
    assert!(load(dir.path()).contains("multiple of num_heads"));
}

/// The trainer's mechanics on the tiny model (whose random weights leave little to learn about
/// which tokens matter; the effect is measured on the default model, docs/BENCHMARKS.md): the
/// loss reaches every weight, the kept-fraction penalty steers the hard decisions through
/// their relaxation, and `train` returns trained weights.
#[test]
fn training_reaches_every_weight_and_steers_the_kept_fraction() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = common::tiny_bundle(dir.path());
    let dense = DenseLlama::from_llama(&loaded.model, 256, &Device::Cpu).unwrap();
    let template = common::chatml_template();
    let trainer = common::trainer(&loaded, &dense, &template);
    let hidden = loaded.model.config.hidden_size;
    let tower = TrainableTower::new(common::shape(), hidden, 5).unwrap();
    // Decisions start at a quarter kept; the penalty asks for three quarters.
    let opts = PruneTrainOptions {
        layer: 0,
        keep: 0.75,
        module: SHAPE,
        batch: 4,
        ratio_weight: 100.0,
        ..PruneTrainOptions::default()
    };
    let vars: Vec<(String, Var)> = SHAPE
        .initial(hidden, 0.25, 0)
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, Var::from_tensor(&t).unwrap()))
        .collect();
    let module = || {
        let weights = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone()));
        DecisionModule::new(SHAPE, weights.collect())
    };
    let mut optimizer = plugins::train::adamw::AdamW::new(vars.clone(), 0.0).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut kept = Vec::new();
    for step in 0..40 {
        let (samples, conversations) = step_questions(&trainer, &opts, step).unwrap();
        let features = tower
            .forward(&trainer.pixels(&samples).unwrap())
            .unwrap()
            .detach();
        let (loss, parts) = step_loss(
            &trainer,
            &module(),
            &opts,
            &conversations,
            &features,
            &mut rng,
        )
        .unwrap();
        let grads = loss.backward().unwrap();
        if step == 0 {
            for (name, var) in &vars {
                let g = grads.get(var.as_tensor());
                let size = g.map_or(0.0, |g| {
                    g.abs()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                });
                assert!(size > 0.0, "{name} gets no gradient");
            }
        }
        optimizer.step(&grads, 1e-2).unwrap();
        kept.push(parts.kept);
    }
    let first = kept[..5].iter().sum::<f32>() / 5.0;
    let last = kept[35..].iter().sum::<f32>() / 5.0;
    assert!(
        first < 0.4 && last > 0.6,
        "kept {first} at first, {last} at last"
    );

    let opts = PruneTrainOptions { steps: 3, ..opts };
    let trained = train(&trainer, &tower, &opts, &mut plugins::train::Quiet).unwrap();
    let initial = DecisionModule::new(SHAPE, SHAPE.initial(hidden, 0.75, opts.seed).unwrap());
    let moved = trained
        .weights()
        .iter()
        .zip(initial.weights())
        .any(|((_, a), (_, b))| common::max_abs_diff(a, b) > 1e-4);
    assert!(moved, "train changed no weight");
    let quiet = &mut plugins::train::Quiet;
    let kl = held_out_divergence(&trainer, &tower, &trained, &opts, 100..102, quiet).unwrap();
    for v in [kl.random, kl.learned] {
        assert!(v.is_finite() && v > 0.0, "held-out divergence {kl:?}");
    }
}

#[test]
fn the_evaluation_sweep_runs_each_scorer_at_each_fraction_after_one_layer() {
    use plugins::vision_prune::eval::PruningSweep;
    let c = config();
    let b = base(&c);
    let keep = vec![0.5, 0.25];
    let scorers = [Scorer::Random, Scorer::Attention];
    let sweep = PruningSweep::new(&b, IMAGE, LAYER, &scorers, Some(learned(&c)), keep.clone());
    let sweep = sweep.unwrap();
    let runs = sweep.runs();
    assert_eq!(
        runs,
        [
            (Scorer::Random, 0.5),
            (Scorer::Random, 0.25),
            (Scorer::Attention, 0.5),
            (Scorer::Attention, 0.25),
            (Scorer::Learned, 0.5),
            (Scorer::Learned, 0.25),
        ]
    );
    let chains = sweep.chains();
    assert_eq!(chains.len(), 1 + runs.len());
    assert!(chains[0].is_empty(), "the dense model first");
    let other_layer = PruningSweep::new(&b, IMAGE, LAYER + 1, &scorers, Some(learned(&c)), keep);
    let err = other_layer.err().unwrap().to_string();
    assert!(err.contains("prunes after layer 1"), "{err}");
    let no_module = PruningSweep::new(&b, IMAGE, LAYER, &[Scorer::Learned], None, vec![0.5]);
    assert!(no_module
        .err()
        .unwrap()
        .to_string()
        .contains("trained module"));
}
