//! What a trained set of predictors does on held-out tokens, teacher-forced: per-layer
//! precision and recall, where tokens would leave, and how often the token that leaves is the
//! full model's. The trainer writes it as `report.json` (and a histogram plot).

use std::collections::VecDeque;

use serde::Serialize;

use super::predictor::Predictor;
use super::state;
use super::train::TokenExamples;

/// Share of the all-layers exits the offline schedule keeps.
pub const OFFLINE_SHARE: f64 = 0.8;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Held-out decode tokens.
    pub tokens: usize,
    /// Share of them whose final token is among the candidates (an upper bound on exits).
    pub candidate_hit_rate: f64,
    pub threshold: f32,
    pub layers: Vec<LayerReport>,
    /// Exits per layer with every predictor layer scheduled (index = layer).
    pub histogram_all_layers: Vec<usize>,
    pub offline_layers: Vec<usize>,
    /// With every layer scheduled, and with the shipped schedule.
    pub all_layers: Exits,
    pub scheduled: Exits,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    pub layer: usize,
    /// Share of tokens whose top token at this layer is already the final one.
    pub settled: f64,
    pub precision: f64,
    pub recall: f64,
}

/// The exits of one schedule over the held-out tokens.
#[derive(Debug, Clone, Serialize)]
pub struct Exits {
    pub exit_fraction: f64,
    /// Over every token, the last layer for those that stay.
    pub mean_exit_layer: f64,
    /// Tokens whose emitted token equals the full model's.
    pub agreement: f64,
    pub histogram: Vec<usize>,
}

/// The report over `sequences` (each a held-out sequence's tokens in order) for predictors
/// `predictors` of `layers`.
pub fn report(
    sequences: &[Vec<TokenExamples>],
    layers: &[usize],
    predictors: &[&Predictor],
    threshold: f32,
    num_layers: usize,
) -> Report {
    let tokens: Vec<&TokenExamples> = sequences.iter().flatten().collect();
    let share = |k: usize| k as f64 / tokens.len().max(1) as f64;
    let per_layer = layers
        .iter()
        .enumerate()
        .map(|(i, &layer)| {
            let (mut tp, mut fp, mut fneg) = (0usize, 0usize, 0usize);
            for t in &tokens {
                let fired = predictors[i].probability(&t.features[i]) > threshold;
                match (fired, t.label[i]) {
                    (true, true) => tp += 1,
                    (true, false) => fp += 1,
                    (false, true) => fneg += 1,
                    _ => {}
                }
            }
            let settled = tokens.iter().filter(|t| t.label[i]).count();
            LayerReport {
                layer,
                settled: share(settled),
                precision: tp as f64 / (tp + fp).max(1) as f64,
                recall: tp as f64 / (tp + fneg).max(1) as f64,
            }
        })
        .collect();
    let all = simulate(sequences, layers, predictors, threshold, None, num_layers);
    let offline = offline_layers(&all.histogram);
    let scheduled = simulate(
        sequences,
        layers,
        predictors,
        threshold,
        Some(&offline),
        num_layers,
    );
    Report {
        tokens: tokens.len(),
        candidate_hit_rate: share(tokens.iter().filter(|t| t.hit).count()),
        threshold,
        layers: per_layer,
        histogram_all_layers: all.histogram.clone(),
        offline_layers: offline,
        all_layers: all,
        scheduled,
    }
}

/// The fewest layers holding [`OFFLINE_SHARE`] of the exits (the most frequent first),
/// ascending; none when nothing exits.
pub fn offline_layers(histogram: &[usize]) -> Vec<usize> {
    let total: usize = histogram.iter().sum();
    let mut by_count: Vec<usize> = (0..histogram.len()).filter(|&l| histogram[l] > 0).collect();
    by_count.sort_by(|&a, &b| histogram[b].cmp(&histogram[a]).then(a.cmp(&b)));
    let mut chosen = Vec::new();
    let mut held = 0;
    for l in by_count {
        if held as f64 >= OFFLINE_SHARE * total as f64 {
            break;
        }
        held += histogram[l];
        chosen.push(l);
    }
    chosen.sort_unstable();
    chosen
}

/// Runs the exit rule over each sequence's tokens in order: at a scheduled layer (every
/// layer when `offline` is `None`, else offline ∪ the online neighbours of the last
/// [`state::RECENT`] exits) a token leaves when its predictor fires and the layer's top token is a
/// candidate, which is the full model's token when the layer's label says so.
pub fn simulate(
    sequences: &[Vec<TokenExamples>],
    layers: &[usize],
    predictors: &[&Predictor],
    threshold: f32,
    offline: Option<&[usize]>,
    num_layers: usize,
) -> Exits {
    let last = num_layers - 1;
    let mut histogram = vec![0usize; num_layers];
    let (mut tokens, mut exits, mut agree, mut layer_sum) = (0usize, 0usize, 0usize, 0usize);
    for seq in sequences {
        let mut recent: VecDeque<usize> = VecDeque::new();
        for t in seq {
            let scheduled = |l: usize| offline.is_none_or(|o| state::scheduled(l, o, &recent));
            let exit = layers.iter().enumerate().find(|&(i, &l)| {
                scheduled(l) && t.top_in[i] && predictors[i].probability(&t.features[i]) > threshold
            });
            let (layer, right) = match exit {
                Some((i, &l)) => (l, t.label[i]),
                None => (last, true),
            };
            tokens += 1;
            layer_sum += layer;
            agree += right as usize;
            if exit.is_some() {
                exits += 1;
                histogram[layer] += 1;
            }
            state::remember(&mut recent, layer);
        }
    }
    let share = |k: usize| k as f64 / tokens.max(1) as f64;
    Exits {
        exit_fraction: share(exits),
        mean_exit_layer: share(layer_sum),
        agreement: share(agree),
        histogram,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A predictor that fires exactly when its first feature is positive.
    fn sign() -> Predictor {
        Predictor {
            inputs: 1,
            fc1_weight: vec![100.0],
            fc1_bias: vec![0.0],
            fc2_weight: vec![1.0],
            fc2_bias: -0.5,
        }
    }

    fn token(fire: [bool; 2], label: [bool; 2], top_in: [bool; 2]) -> TokenExamples {
        TokenExamples {
            features: fire
                .iter()
                .map(|&f| vec![if f { 1.0 } else { -1.0 }])
                .collect(),
            label: label.to_vec(),
            top_in: top_in.to_vec(),
            hit: top_in[1],
        }
    }

    #[test]
    fn a_token_leaves_at_the_first_scheduled_layer_that_fires_with_its_top_among_the_candidates() {
        let p = sign();
        let preds = [&p, &p];
        let seqs = vec![vec![
            token([true, true], [true, true], [true, true]), // leaves at 3, right
            token([true, true], [false, true], [false, true]), // 3 fails the check, leaves at 5
            token([true, false], [false, false], [true, true]), // leaves at 3, wrong
            token([false, false], [true, true], [true, true]), // nothing fires: stays
        ]];
        let e = simulate(&seqs, &[3, 5], &preds, 0.5, None, 8);
        assert_eq!(e.histogram, [0, 0, 0, 2, 0, 1, 0, 0]);
        assert_eq!(e.exit_fraction, 0.75);
        assert_eq!(e.agreement, 0.75);
        assert_eq!(e.mean_exit_layer, (3 + 5 + 3 + 7) as f64 / 4.0);
        // Only layer 5 offline: the first token leaves at 5, then 3 is online (5 - 2).
        let e = simulate(&seqs, &[3, 5], &preds, 0.5, Some(&[5]), 8);
        assert_eq!(e.histogram, [0, 0, 0, 1, 0, 2, 0, 0]);
        let r = report(&seqs, &[3, 5], &preds, 0.5, 8);
        assert_eq!(r.offline_layers, vec![3, 5]);
        // Layer 3 fired on tokens 1-3 and was right on token 1 only; it missed token 4.
        assert!((r.layers[0].precision - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(r.layers[0].recall, 0.5);
    }

    #[test]
    fn the_offline_schedule_is_the_fewest_layers_holding_most_exits() {
        assert_eq!(offline_layers(&[0, 10, 0, 70, 5, 15]), vec![3, 5]);
        assert_eq!(offline_layers(&[0, 0, 0]), Vec::<usize>::new());
        assert_eq!(offline_layers(&[0, 1, 1, 1, 1, 1]), vec![1, 2, 3, 4]);
    }
}
