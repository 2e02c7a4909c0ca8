//! Prefill FLOPs of the language model with and without pruning: the figure LVPruning reports
//! beside measured time, counted from the model's shape.

use models::ModelConfig;

/// Multiply-adds counted as two FLOPs, of one prefill of `tokens` tokens through the decoder
/// layers (projections, MLP and attention; not the LM head, which reads the last token in both
/// cases), where `pruned`, if given, is `(layer, kept)`: after `layer`, only the `kept` offsets
/// (ascending) go on.
pub fn prefill_flops(cfg: &ModelConfig, tokens: usize, pruned: Option<(usize, &[usize])>) -> f64 {
    let (h, d) = (cfg.hidden_size as f64, cfg.head_dim as f64);
    let (q_width, kv_width) = (cfg.num_heads as f64 * d, cfg.num_kv_heads as f64 * d);
    let per_token =
        2.0 * (h * q_width * 2.0 + h * kv_width * 2.0 + 3.0 * h * cfg.intermediate_size as f64);
    let all: Vec<usize> = (0..tokens).collect();
    (0..cfg.num_layers)
        .map(|l| {
            let present = match pruned {
                Some((after, kept)) if l > after => kept,
                _ => &all,
            };
            let n = present.len() as f64;
            // Query k reads the keys up to itself: k + 1 of the present ones; QK^T and PV.
            let pairs = n * (n + 1.0) / 2.0;
            n * per_token + 4.0 * q_width * pairs
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use models::tiny::tiny_config;
    use models::Architecture;

    #[test]
    fn pruning_after_the_middle_layer_saves_the_pruned_tokens_share_of_the_later_layers() {
        let cfg = models::ModelConfig {
            num_layers: 30,
            ..tiny_config(Architecture::Llama)
        };
        let dense = prefill_flops(&cfg, 292, None);
        let none_pruned: Vec<usize> = (0..292).collect();
        assert_eq!(prefill_flops(&cfg, 292, Some((14, &none_pruned))), dense);
        // 36 text tokens and a quarter of 256 image tokens after layer 14 (the 15th of 30).
        let kept: Vec<usize> = (0..36).chain((36..292).step_by(4)).collect();
        let ratio = dense / prefill_flops(&cfg, 292, Some((14, &kept)));
        let linear_bound = 1.0 / (0.5 + 0.5 * (36.0 + 64.0) / 292.0);
        assert!(
            ratio > linear_bound * 0.95 && ratio < linear_bound * 1.2,
            "{ratio} vs {linear_bound}"
        );
    }
}
