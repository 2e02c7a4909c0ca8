//! `server train controller`: trains the steering controller (plugins::controller) from
//! harmful and harmless instructions and writes `config.json` + `model.safetensors`.
//!
//! The refusal directions are behaviour directions: per layer, the mean difference of the
//! last-token activations of harmful prompts followed by the start of a refusal ("I'm sorry,
//! but I can't") and the same prompts followed by the start of an answer ("Sure, here is").
//! On the default model the harmful-minus-harmless direction of Arditi et al. does not make
//! the model refuse (it never refuses, so that direction encodes topic, not refusal); the
//! contrastive-reply direction does. Then: per-layer weight targets from refusal-score gains
//! (plugins::controller::train::sensitivities), and the MLP.

use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use clap::Args;
use models::bundle::LoadedModel;
use plugins::controller::train::{sensitivities, train, weight_targets, Example, TrainOptions};
use plugins::controller::{BaseIdentity, ControllerConfig, ControllerNet, TYPE};
use plugins::steer::train::{auroc, direction, last_token_activations, Method};
use plugins::BaseModel;

use super::prompts::{chat_ids_all, load_model, model_path, parse_range, read_prompts};

#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// Base model [default: the default model]
    #[arg(long)]
    model: Option<PathBuf>,
    /// Harmful instructions (shared/data/refusal/harmful_train.json)
    #[arg(long)]
    harmful: PathBuf,
    /// Harmless instructions (shared/data/refusal/harmless_train.json)
    #[arg(long)]
    harmless: PathBuf,
    /// Folder to write config.json and model.safetensors into
    #[arg(long)]
    out: PathBuf,
    /// Prompts used from each file
    #[arg(long, default_value_t = 256)]
    limit: usize,
    /// Layers the controller reads, comma-separated ascending
    #[arg(long, default_value = "6,8,10,12")]
    input_layers: String,
    /// Layers it steers, FIRST-LAST
    #[arg(long, default_value = "1-20")]
    steered_layers: String,
    /// Patch scale α the served controller uses (written to config.json)
    #[arg(long, default_value_t = 16.0)]
    alpha: f32,
    /// Patch scale used to probe each layer's refusal-score gain (small enough that the gains
    /// stay roughly linear)
    #[arg(long, default_value_t = 4.0)]
    probe_alpha: f32,
    /// Width of the controller's hidden layer
    #[arg(long, default_value_t = 128)]
    units: usize,
    #[arg(long, default_value_t = 600)]
    steps: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Harmful prompts whose per-layer refusal-score gains set the weight targets
    #[arg(long, default_value_t = 48)]
    sensitivity_prompts: usize,
    /// Start of a refusal, for the directions
    #[arg(long, default_value = "I'm sorry, but I can't")]
    refusal_reply: String,
    /// Start of an answer, for the directions
    #[arg(long, default_value = "Sure, here is")]
    answer_reply: String,
    /// Words whose first token opens a refusal (the refusal score's R)
    #[arg(long, default_value = "I,As,Sorry")]
    refusal_tokens: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(args: ControllerArgs) -> anyhow::Result<()> {
    let input_layers: Vec<usize> = args
        .input_layers
        .split(',')
        .map(|s| s.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .context("--input-layers must be comma-separated layer numbers")?;
    let steered = parse_range(&args.steered_layers)?;
    let path = model_path(&args.model)?;
    let loaded = load_model(&path, 1024)?;
    let base = BaseModel {
        id: String::new(),
        config: loaded.model.config.clone(),
        device: Device::Cpu,
    };
    let config = ControllerConfig {
        kind: TYPE.into(),
        base_model: BaseIdentity::of(&base),
        input_layers,
        steered_layers: steered,
        hidden_units: args.units,
        alpha: args.alpha,
    };
    config.check("controller", &base)?;
    let harmful = read_prompts(&args.harmful, args.limit, args.seed)?;
    let harmless = read_prompts(&args.harmless, args.limit, args.seed)?;
    let (h_ids, b_ids) = (
        chat_ids_all(&loaded, &harmful)?,
        chat_ids_all(&loaded, &harmless)?,
    );
    eprintln!(
        "directions from {} harmful prompts with a refusal vs an answer reply ...",
        h_ids.len()
    );
    let directions = refusal_directions(&loaded, &h_ids, &args, steered)?;
    let refusal_ids = first_tokens(&loaded, &args.refusal_tokens)?;
    let k = args.sensitivity_prompts.min(h_ids.len());
    eprintln!("per-layer refusal-score gains on {k} harmful prompts ...");
    let gains = sensitivities(
        &loaded.model,
        &h_ids[..k],
        &directions,
        steered,
        args.probe_alpha,
        &refusal_ids,
        32,
    )?;
    eprintln!("features of {} + {} prompts ...", h_ids.len(), b_ids.len());
    let features = |ids: &[Vec<u32>]| -> anyhow::Result<Vec<Vec<f32>>> {
        let acts = last_token_activations(&loaded.model, ids, 16)?;
        Ok(acts
            .iter()
            .map(|a| {
                config
                    .input_layers
                    .iter()
                    .flat_map(|&l| a[l].clone())
                    .collect()
            })
            .collect())
    };
    let (hf, bf) = (features(&h_ids)?, features(&b_ids)?);
    let layers = loaded.model.config.num_layers;
    let full = |g: &Vec<f32>| -> Vec<f32> {
        let mut w = vec![0f32; layers];
        w[steered.0..=steered.1].copy_from_slice(&weight_targets(g));
        w
    };
    let mut examples: Vec<Example> = hf
        .iter()
        .enumerate()
        .map(|(i, f)| Example {
            features: f.clone(),
            harmful: true,
            weights: gains.get(i).map(full),
        })
        .chain(bf.iter().map(|f| Example {
            features: f.clone(),
            harmful: false,
            weights: None,
        }))
        .collect();
    // Every fifth example of each class is held out to score the classifier.
    let held: Vec<Example> = take_every(&mut examples, 5);
    let options = TrainOptions {
        units: args.units,
        steps: args.steps,
        lr: args.lr,
        weight_loss: 1.0,
        batch: 32,
        seed: args.seed,
    };
    let trained = train(&examples, layers, steered, &options)?;
    let (l0, l1) = (
        trained.losses.first().copied().unwrap_or(0.0),
        trained.losses.last().copied().unwrap_or(0.0),
    );
    let tensors = trained.with_directions(directions);
    tensors.save(&args.out, &config)?;
    report(&args, &config, &tensors, &held, (l0, l1), &gains)
}

/// `(layers, hidden)` unit behaviour directions, zero outside the steered layers.
fn refusal_directions(
    loaded: &LoadedModel,
    prompts: &[Vec<u32>],
    args: &ControllerArgs,
    (first, last): (usize, usize),
) -> anyhow::Result<Tensor> {
    let with = |reply: &str| -> anyhow::Result<Vec<Vec<Vec<f32>>>> {
        let r = loaded.tokenizer.encode(reply, false)?;
        let ids: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| p.iter().chain(&r).copied().collect())
            .collect();
        Ok(last_token_activations(&loaded.model, &ids, 16)?)
    };
    let (refuse, answer) = (with(&args.refusal_reply)?, with(&args.answer_reply)?);
    let (layers, hidden) = (
        loaded.model.config.num_layers,
        loaded.model.config.hidden_size,
    );
    let mut rows = vec![0f32; layers * hidden];
    for l in first..=last {
        let at = |xs: &[Vec<Vec<f32>>]| xs.iter().map(|x| x[l].clone()).collect::<Vec<_>>();
        let d = direction(Method::MeanDiff, &at(&refuse), &at(&answer));
        rows[l * hidden..(l + 1) * hidden].copy_from_slice(&d);
    }
    Ok(Tensor::from_vec(rows, (layers, hidden), &Device::Cpu)?)
}

/// The first token id of each comma-separated word.
fn first_tokens(loaded: &LoadedModel, words: &str) -> anyhow::Result<Vec<u32>> {
    let mut ids = Vec::new();
    for w in words.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        let t = loaded.tokenizer.encode(w, false)?;
        ids.push(*t.first().with_context(|| format!("`{w}` has no tokens"))?);
    }
    if ids.is_empty() {
        bail!("--refusal-tokens lists no words");
    }
    Ok(ids)
}

/// Removes and returns every `k`-th example.
fn take_every(examples: &mut Vec<Example>, k: usize) -> Vec<Example> {
    let all = std::mem::take(examples);
    let (mut held, mut kept) = (Vec::new(), Vec::new());
    for (i, e) in all.into_iter().enumerate() {
        if i % k == k - 1 {
            held.push(e)
        } else {
            kept.push(e)
        }
    }
    *examples = kept;
    held
}

fn report(
    args: &ControllerArgs,
    config: &ControllerConfig,
    tensors: &plugins::controller::ControllerTensors,
    held: &[Example],
    (l0, l1): (f32, f32),
    gains: &[Vec<f32>],
) -> anyhow::Result<()> {
    let get = |name: &str, _shape: &[usize]| -> plugins::Result<Tensor> {
        Ok(match name {
            "fc1.weight" => tensors.fc1_weight.clone(),
            "fc1.bias" => tensors.fc1_bias.clone(),
            "fc2.weight" => tensors.fc2_weight.clone(),
            _ => tensors.fc2_bias.clone(),
        })
    };
    let inputs = tensors.fc1_weight.dim(1)?;
    let net = ControllerNet::from_tensors(
        &get,
        inputs,
        config.hidden_units,
        tensors.fc2_bias.dim(0)? - 1,
    )?;
    let mut scored: Vec<(f32, bool)> = Vec::new();
    for e in held {
        let x = Tensor::from_vec(e.features.clone(), (1, inputs), &Device::Cpu)?;
        scored.push((net.decide(&x)?.strength, e.harmful));
    }
    let (pos, neg): (Vec<f32>, Vec<f32>) = (
        scored.iter().filter(|s| s.1).map(|s| s.0).collect(),
        scored.iter().filter(|s| !s.1).map(|s| s.0).collect(),
    );
    let auroc = auroc(&pos, &neg);
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len().max(1) as f32;
    let best: Vec<usize> = gains
        .iter()
        .filter_map(|g| {
            g.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i + config.steered_layers.0)
        })
        .collect();
    println!("loss {l0:.3} -> {l1:.3}; held-out: AUROC {auroc:.3}, mean strength harmful {:.2} / harmless {:.2}", mean(&pos), mean(&neg));
    println!(
        "most effective layer per harmful prompt (first 10): {:?}",
        &best[..best.len().min(10)]
    );
    println!("controller written to {}", args.out.display());
    Ok(())
}
