//! The recipe `server train controller` runs, end to end: refusal directions, per-layer weight
//! targets, the MLP, and its score on held-out prompts. The binary parses the flags, shows
//! progress and writes the files; everything it reports is computed here.
//!
//! The refusal directions are behaviour directions: per layer, the mean difference of the
//! last-token activations of harmful prompts followed by the start of a refusal ("I'm sorry,
//! but I can't") and the same prompts followed by the start of an answer ("Sure, here is").
//! On the default model the harmful-minus-harmless direction of Arditi et al. does not make
//! the model refuse (it never refuses, so that direction encodes topic, not refusal); the
//! contrastive-reply direction does. Then: per-layer weight targets from refusal-score gains
//! ([`sensitivities`]), and the MLP ([`train`]).

use candle_core::{Device, Tensor};
use models::bundle::LoadedModel;

use super::train::{sensitivities, train, weight_targets, Example, TrainOptions};
use super::{ControllerConfig, ControllerNet, ControllerTensors};
use crate::steer::train::{auroc, direction, last_token_activations, Method};
use crate::train::prompts::{chat_ids_all, tokens};
use crate::train::{Progress, Result};

/// What [`fit`] needs besides the prompts.
#[derive(Debug, Clone)]
pub struct Recipe<'a> {
    /// The controller to train (layers read and steered, width, α).
    pub config: ControllerConfig,
    /// Start of a refusal and start of an answer, for the directions.
    pub replies: (&'a str, &'a str),
    /// Token ids that open a refusal (the refusal score's R).
    pub refusal_ids: &'a [u32],
    /// Patch scale used to probe each layer's refusal-score gain.
    pub probe_alpha: f32,
    /// Harmful prompts whose per-layer gains set the weight targets.
    pub sensitivity_prompts: usize,
    pub options: TrainOptions,
}

/// A trained controller and what the run measured.
pub struct Fitted {
    pub tensors: ControllerTensors,
    /// Training loss at the first and the last step.
    pub losses: (f32, f32),
    /// AUROC of the strength on held-out harmful vs harmless prompts.
    pub auroc: f64,
    /// Mean held-out strength on (harmful, harmless) prompts.
    pub mean_strength: (f32, f32),
    /// The steered layer with the largest refusal-score gain, per probed harmful prompt.
    pub best_layers: Vec<usize>,
}

/// Runs the recipe on chat-rendered `harmful` and `harmless` prompts; `progress` hears about
/// each slow phase (prompts through the model, probes, MLP steps with their losses).
pub fn fit(
    loaded: &LoadedModel,
    harmful: &[String],
    harmless: &[String],
    recipe: &Recipe<'_>,
    progress: &mut dyn Progress,
) -> Result<Fitted> {
    let config = &recipe.config;
    let steered = config.steered_layers;
    let (h_ids, b_ids) = (
        chat_ids_all(loaded, harmful)?,
        chat_ids_all(loaded, harmless)?,
    );
    progress.phase("directions (refusal vs answer replies)", 2 * h_ids.len());
    let directions = refusal_directions(loaded, &h_ids, recipe.replies, steered, progress)?;
    let k = recipe.sensitivity_prompts.min(h_ids.len());
    // Per probed prompt: one unsteered run and one per steered layer.
    progress.phase("per-layer gains", k * (steered.1 - steered.0 + 2));
    let gains = sensitivities(
        &loaded.model,
        &h_ids[..k],
        &directions,
        steered,
        recipe.probe_alpha,
        recipe.refusal_ids,
        progress,
    )?;
    progress.phase("features", h_ids.len() + b_ids.len());
    let mut examples = examples(loaded, config, (&h_ids, &b_ids), &gains, progress)?;
    // Every fifth example of each class is held out to score the classifier.
    let held = take_every(&mut examples, 5);
    let layers = loaded.model.config.num_layers;
    progress.phase("MLP steps", recipe.options.steps);
    let trained = train(&examples, layers, steered, &recipe.options, progress)?;
    let losses = (
        trained.losses.first().copied().unwrap_or(0.0),
        trained.losses.last().copied().unwrap_or(0.0),
    );
    let tensors = trained.with_directions(directions);
    let (auroc, mean_strength) = score_held_out(&tensors, config, &held)?;
    let best_layers = gains
        .iter()
        .filter_map(|g| {
            g.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i + steered.0)
        })
        .collect();
    Ok(Fitted {
        tensors,
        losses,
        auroc,
        mean_strength,
        best_layers,
    })
}

/// `(layers, hidden)` unit behaviour directions, zero outside the steered layers.
fn refusal_directions(
    loaded: &LoadedModel,
    prompts: &[Vec<u32>],
    (refusal, answer): (&str, &str),
    (first, last): (usize, usize),
    progress: &mut dyn Progress,
) -> Result<Tensor> {
    let mut with = |reply: &str| -> Result<Vec<Vec<Vec<f32>>>> {
        let r = tokens(loaded, reply, false)?;
        let ids: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| p.iter().chain(&r).copied().collect())
            .collect();
        Ok(last_token_activations(&loaded.model, &ids, 16, progress)?)
    };
    let (refuse, answer) = (with(refusal)?, with(answer)?);
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

/// The MLP's examples: input-layer features of every prompt, harmful ones first, with weight
/// targets for the harmful prompts whose gains were probed.
fn examples(
    loaded: &LoadedModel,
    config: &ControllerConfig,
    (harmful, harmless): (&[Vec<u32>], &[Vec<u32>]),
    gains: &[Vec<f32>],
    progress: &mut dyn Progress,
) -> Result<Vec<Example>> {
    let mut features = |ids: &[Vec<u32>]| -> Result<Vec<Vec<f32>>> {
        let acts = last_token_activations(&loaded.model, ids, 16, progress)?;
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
    let (hf, bf) = (features(harmful)?, features(harmless)?);
    let layers = loaded.model.config.num_layers;
    let steered = config.steered_layers;
    let full = |g: &Vec<f32>| -> Vec<f32> {
        let mut w = vec![0f32; layers];
        w[steered.0..=steered.1].copy_from_slice(&weight_targets(g));
        w
    };
    Ok(hf
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
        .collect())
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

/// The strength's AUROC on held-out examples and its mean per class, from the network as
/// the server will load it.
fn score_held_out(
    tensors: &ControllerTensors,
    config: &ControllerConfig,
    held: &[Example],
) -> Result<(f64, (f32, f32))> {
    let get = |name: &str, _shape: &[usize]| -> crate::Result<Tensor> {
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
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len().max(1) as f32;
    Ok((auroc(&pos, &neg), (mean(&pos), mean(&neg))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kth_example_is_held_out_in_order() {
        let mut all: Vec<Example> = (0..11)
            .map(|i| Example {
                features: vec![i as f32],
                harmful: i < 6,
                weights: None,
            })
            .collect();
        let held = take_every(&mut all, 5);
        let firsts = |v: &[Example]| v.iter().map(|e| e.features[0]).collect::<Vec<_>>();
        assert_eq!(firsts(&held), [4.0, 9.0]);
        assert_eq!(all.len(), 9);
    }
}
