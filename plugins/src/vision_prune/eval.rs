//! The pruning runs of `server eval vision`: each scorer at each kept fraction as a plug-in
//! chain beside the dense model, and per run what it kept of the dense model's answers and
//! what it saved of its prefill.

use std::sync::Arc;

use models::{HookCall, ModelConfig};

use super::{choose, flops, PruneParams, Scorer, VisionPrune, VisionPruneConfig, TYPE};
use crate::base::{BaseIdentity, BaseModel};
use crate::train::{Result, TrainError};
use crate::vision::eval::Accuracy;
use crate::vision::served::{upper_median, Verdict};

/// Every (scorer, kept fraction) configuration of an evaluation, as plug-ins.
pub struct PruningSweep {
    keep: Vec<f32>,
    layer: usize,
    image_token_id: u32,
    plugins: Vec<(Scorer, Arc<VisionPrune>)>,
}

impl PruningSweep {
    /// The built-in `scorers` (random, attention) pruning after `layer`, then `learned` (a
    /// trained plug-in, which must prune after the same layer), each at every fraction of
    /// `keep`.
    pub fn new(
        base: &BaseModel,
        image_token_id: u32,
        layer: usize,
        scorers: &[Scorer],
        learned: Option<Arc<VisionPrune>>,
        keep: Vec<f32>,
    ) -> Result<Self> {
        let mut plugins = Vec::new();
        for &scorer in scorers.iter().filter(|&&s| s != Scorer::Learned) {
            let config = VisionPruneConfig {
                kind: TYPE.into(),
                base_model: BaseIdentity::of(base),
                layer,
                image_token_id,
                scorer,
                keep: 1.0,
                module: None,
            };
            let plugin = VisionPrune::new(&scorer_name(scorer), config, None, base)?;
            plugins.push((scorer, Arc::new(plugin)));
        }
        match learned {
            Some(p) if p.config().layer != layer => {
                return Err(TrainError::BadOption(format!(
                    "the decision module prunes after layer {}, the others after {layer}",
                    p.config().layer
                )))
            }
            Some(p) => plugins.push((Scorer::Learned, p)),
            None if scorers.contains(&Scorer::Learned) => {
                return Err(TrainError::BadOption(
                    "the learned scorer needs a trained module".into(),
                ))
            }
            None => {}
        }
        Ok(Self {
            keep,
            layer,
            image_token_id,
            plugins,
        })
    }

    /// Every (scorer, kept fraction) run, in the order of [`Self::chains`] after the dense.
    pub fn runs(&self) -> Vec<(Scorer, f32)> {
        let scorers = self.plugins.iter().map(|(s, _)| *s);
        scorers
            .flat_map(|s| self.keep.iter().map(move |&k| (s, k)))
            .collect()
    }

    /// The dense chain, then one per (scorer, kept fraction).
    pub fn chains(&self) -> Vec<Vec<HookCall>> {
        let mut chains = vec![Vec::new()];
        for (_, plugin) in &self.plugins {
            for &keep in &self.keep {
                let params = Arc::new(PruneParams { keep, seed: 0 });
                chains.push(vec![HookCall::new(plugin.clone(), params)]);
            }
        }
        chains
    }

    /// Per run: accuracy, agreement with the dense model's answers `dense`, median prefill
    /// time and its speed-up over the dense model's in the same run, and the prefill FLOPs
    /// ratio for the median prompt.
    pub fn report(
        &self,
        config: &ModelConfig,
        dense: &[Verdict],
        runs: &[(Accuracy, Vec<Verdict>)],
    ) -> serde_json::Value {
        let median = |v: &[Verdict]| upper_median(v.iter().map(|v| v.answer.prefill_ms()));
        let (tokens, images) = self.median_prompt(dense);
        let dense_ms = median(dense);
        let dense_flops = flops::prefill_flops(config, tokens, None);
        let rows =
            self.runs()
                .into_iter()
                .zip(runs)
                .map(|((scorer, keep), (accuracy, verdicts))| {
                    // Any scorer keeps as many tokens; where they sit barely moves the count.
                    let kept = choose::keep_random(tokens, &images, keep, 0);
                    let flops = flops::prefill_flops(config, tokens, Some((self.layer, &kept)));
                    let ms = median(verdicts);
                    let same = verdicts
                        .iter()
                        .zip(dense)
                        .filter(|(p, d)| p.answer.text == d.answer.text)
                        .count();
                    serde_json::json!({
                        // f32 ratios as written on the command line (0.1, not 0.10000000149).
                        "keep": (keep as f64 * 1e6).round() / 1e6,
                        "layer": self.layer,
                        "scorer": scorer_name(scorer),
                        "accuracy": accuracy.fraction(),
                        "by_kind": accuracy.by_kind,
                        // The dense model's answer, word for word: what pruning should preserve.
                        "agrees_with_dense": same as f64 / dense.len().max(1) as f64,
                        "median_prefill_ms": ms,
                        "prefill_speedup": if ms > 0.0 { dense_ms / ms } else { 0.0 },
                        "prefill_flops_ratio": dense_flops / flops,
                    })
                });
        serde_json::Value::Array(rows.collect())
    }

    /// The median prompt's length and its image tokens' offsets.
    fn median_prompt(&self, dense: &[Verdict]) -> (usize, Vec<usize>) {
        let mut prompts: Vec<&[u32]> = dense.iter().map(|v| v.answer.prompt.as_slice()).collect();
        prompts.sort_by_key(|p| p.len());
        match prompts.get(prompts.len() / 2) {
            Some(p) => (p.len(), choose::image_offsets(p, self.image_token_id)),
            None => (0, Vec::new()),
        }
    }
}

/// The scorer's name as `config.json` spells it.
pub fn scorer_name(scorer: Scorer) -> String {
    serde_json::to_value(scorer)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}
