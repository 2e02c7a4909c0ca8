//! Token pruning ([`models::Hook::prune`]) on a tiny quantized model written to disk: tokens a
//! hook removes after a layer leave the later layers' computation and caches, and everything
//! else stays as it was.
//!
//! The reference for what pruning means is a different mechanism already in the runtime: the
//! same tokens fed one at a time, each pruned token leaving after the same layer through an
//! early exit that writes no keys or values to the layers it skips ([`Exit::Skip`]). Both
//! leave the same cache; the logits after the prompt and after a decode step must agree.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use models::loader::load_model;
use models::tiny::{tiny_config, TinyModel};
use models::{
    Architecture, BatchRow, Exit, Hook, HookCall, HookGroup, HookPoints, KvCache, Llama,
    LogitsWanted,
};

const MAX_POS: usize = 256;
/// Pruning happens after this layer (of the tiny model's).
const LAYER: usize = 0;

fn model(dir: &std::path::Path) -> Llama {
    let mut cfg = tiny_config(Architecture::Llama);
    (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim) = (256, 512, 64);
    assert!(cfg.num_layers > LAYER + 1, "pruning needs a layer after it");
    let path = dir.join("q8_0.gguf");
    TinyModel::random(cfg, 33)
        .unwrap()
        .write_gguf(&path, GgmlDType::Q8_0)
        .unwrap();
    load_model(&path, &Device::Cpu, MAX_POS).unwrap()
}

fn prompt(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 29 + seed * 13 + 3) % 96)
        .collect()
}

/// Keeps, after [`LAYER`], the offsets of each row's tokens that are not in `drop` (every
/// token when `drop` is empty, returned as an explicit list).
struct Pruner {
    drop: Vec<usize>,
}

impl Hook for Pruner {
    fn name(&self) -> &str {
        "pruner"
    }
    fn points(&self) -> HookPoints {
        HookPoints {
            prune: true,
            ..Default::default()
        }
    }
    fn prune(
        &self,
        layer: usize,
        group: &HookGroup<'_>,
        _h: &Tensor,
        _probe: &models::AttentionProbe<'_>,
    ) -> models::Result<Option<Vec<Option<Vec<usize>>>>> {
        if layer != LAYER {
            return Ok(None);
        }
        let keep = |n: usize| (0..n).filter(|i| !self.drop.contains(i)).collect();
        Ok(Some(group.lengths.iter().map(|&n| Some(keep(n))).collect()))
    }
}

/// Skips the layers after [`LAYER`] for single tokens at the positions in `drop`.
struct Skipper {
    drop: Vec<usize>,
}

impl Hook for Skipper {
    fn name(&self) -> &str {
        "skipper"
    }
    fn points(&self) -> HookPoints {
        HookPoints {
            early_exit: true,
            ..Default::default()
        }
    }
    fn early_exit(
        &self,
        layer: usize,
        group: &HookGroup<'_>,
        _h: &Tensor,
        _head: &models::OutputHead<'_>,
    ) -> models::Result<Option<Vec<Exit>>> {
        let exit = |p: usize| match layer == LAYER && self.drop.contains(&p) {
            true => Exit::Skip,
            false => Exit::Stay,
        };
        Ok(Some(
            group.rows.iter().map(|r| exit(r.start_position)).collect(),
        ))
    }
}

fn call(hook: impl Hook + 'static) -> Vec<HookCall> {
    vec![HookCall::bare(Arc::new(hook))]
}

/// Logits of the last prompt token, then of one decode token, for one sequence fed the
/// prompt in one step.
fn prefill_then_decode(m: &Llama, toks: &[u32], hooks: &[HookCall]) -> (Tensor, Tensor) {
    let mut cache = m.new_cache();
    let first = forward(m, &mut cache, toks, hooks, LogitsWanted::Last);
    let next = forward(m, &mut cache, &[7], &[], LogitsWanted::Last);
    (first, next)
}

fn forward(
    m: &Llama,
    cache: &mut KvCache,
    toks: &[u32],
    hooks: &[HookCall],
    logits: LogitsWanted,
) -> Tensor {
    let mut rows = [BatchRow {
        seq_id: 1,
        tokens: toks,
        cache,
        hooks,
        logits,
    }];
    m.forward(&mut rows).unwrap().remove(0).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    v.into_iter().map(f32::to_bits).collect()
}

#[test]
fn pruned_tokens_leave_the_later_layers_as_if_they_had_exited_there() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let toks = prompt(12, 1);
    let drop = vec![2, 3, 4, 7, 9];
    let (pruned, pruned_next) =
        prefill_then_decode(&m, &toks, &call(Pruner { drop: drop.clone() }));

    // The reference: token by token, the dropped ones skipping the layers after LAYER.
    let skipper = call(Skipper { drop: drop.clone() });
    let mut cache = m.new_cache();
    let mut last = None;
    for &t in &toks {
        last = Some(forward(&m, &mut cache, &[t], &skipper, LogitsWanted::Last));
    }
    let reference = last.unwrap();
    let reference_next = forward(&m, &mut cache, &[7], &[], LogitsWanted::Last);
    assert!(max_diff(&pruned, &reference) < 1e-4);
    assert!(max_diff(&pruned_next, &reference_next) < 1e-4);
    assert_eq!(cache.layer_len(LAYER), 13);
    assert_eq!(cache.layer_len(LAYER + 1), 13 - drop.len());

    // And pruning changed something: the dense model's logits differ.
    let (dense, dense_next) = prefill_then_decode(&m, &toks, &[]);
    assert!(max_diff(&pruned, &dense) > 1e-3);
    assert!(max_diff(&pruned_next, &dense_next) > 1e-3);
}

#[test]
fn keeping_every_token_equals_no_hook_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let toks = prompt(10, 2);
    let (keep_all, keep_all_next) = prefill_then_decode(&m, &toks, &call(Pruner { drop: vec![] }));
    let (none, none_next) = prefill_then_decode(&m, &toks, &[]);
    assert_eq!(bits(&keep_all), bits(&none));
    assert_eq!(bits(&keep_all_next), bits(&none_next));
}

#[test]
fn a_pruned_row_in_a_batch_gives_what_it_gives_alone() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let (a, b) = (prompt(12, 3), prompt(7, 4));
    let pruner = call(Pruner {
        drop: vec![1, 5, 6],
    });
    let (alone_a, _) = prefill_then_decode(&m, &a, &pruner);
    let (alone_b, _) = prefill_then_decode(&m, &b, &[]);
    let (mut ca, mut cb) = (m.new_cache(), m.new_cache());
    let mut rows = [
        BatchRow {
            seq_id: 1,
            tokens: &b,
            cache: &mut cb,
            hooks: &[],
            logits: LogitsWanted::Last,
        },
        BatchRow {
            seq_id: 2,
            tokens: &a,
            cache: &mut ca,
            hooks: &pruner,
            logits: LogitsWanted::Last,
        },
    ];
    let out = m.forward(&mut rows).unwrap();
    let (batched_b, batched_a) = (out[0].as_ref().unwrap(), out[1].as_ref().unwrap());
    assert!(max_diff(batched_a, &alone_a) < 1e-5);
    assert!(max_diff(batched_b, &alone_b) < 1e-5);
    assert_eq!(ca.layer_len(LAYER + 1), 12 - 3);
    assert_eq!(cb.layer_len(LAYER + 1), 7);
}

#[test]
fn pruning_that_the_row_cannot_take_fails_the_step_naming_the_hook() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let toks = prompt(6, 5);
    let cases = [
        (vec![5], LogitsWanted::Last, "last token"),
        (vec![1], LogitsWanted::All, "every position"),
        ((0..6).collect(), LogitsWanted::None, "at least one"),
    ];
    for (drop, logits, says) in cases {
        let mut cache = m.new_cache();
        let hooks = call(Pruner { drop });
        let mut rows = [BatchRow {
            seq_id: 1,
            tokens: &toks,
            cache: &mut cache,
            hooks: &hooks,
            logits,
        }];
        let err = m.forward(&mut rows).unwrap_err().to_string();
        assert!(err.contains("pruner") && err.contains(says), "{err}");
        assert_eq!(cache.len(), 0, "a failed step commits nothing");
    }
}

/// Rotates `x` (one head, `d` values) to `position` as Llama's RoPE does (the two halves of the
/// head are the pairs).
fn rotate(x: &[f64], position: usize, theta: f64) -> Vec<f64> {
    let half = x.len() / 2;
    let mut out = x.to_vec();
    for i in 0..half {
        let angle = position as f64 / theta.powf(2.0 * i as f64 / x.len() as f64);
        let (s, c) = angle.sin_cos();
        out[i] = x[i] * c - x[i + half] * s;
        out[i + half] = x[i + half] * c + x[i] * s;
    }
    out
}

/// The probe against plain f64 arithmetic on the next layer's own projections: RMSNorm, q of
/// the last token and k of every token, RoPE at the given positions, a softmax per head over
/// the tokens, the mean over heads.
#[test]
fn the_attention_probe_is_the_next_layers_mean_attention_of_the_last_token() {
    let cfg = tiny_config(Architecture::Llama);
    let m = TinyModel::random(cfg.clone(), 8)
        .unwrap()
        .build(MAX_POS)
        .unwrap();
    let probe = m.attention_probe(LAYER).unwrap();
    let n = 9;
    let h = Tensor::randn(0f32, 1.0, (n, cfg.hidden_size), &Device::Cpu).unwrap();
    let positions: Vec<u32> = vec![0, 1, 2, 5, 6, 9, 10, 11, 14];
    let got: Vec<f32> = probe
        .last_token_attention(&h, &positions)
        .unwrap()
        .to_vec1()
        .unwrap();

    let layer = &m.layers[LAYER + 1];
    let normed = candle_nn::ops::rms_norm(&h, &layer.input_norm, cfg.rms_norm_eps).unwrap();
    let rows = |t: Tensor| -> Vec<Vec<f64>> {
        let v: Vec<Vec<f32>> = t.to_vec2().unwrap();
        v.into_iter()
            .map(|r| r.into_iter().map(f64::from).collect())
            .collect()
    };
    let q = rows(layer.attn.q.forward(&normed).unwrap());
    let k = rows(layer.attn.k.forward(&normed).unwrap());
    let (d, group) = (cfg.head_dim, cfg.num_heads / cfg.num_kv_heads);
    let mut want = vec![0f64; n];
    for head in 0..cfg.num_heads {
        let kv = head / group;
        let last = n - 1;
        let qh = rotate(
            &q[last][head * d..(head + 1) * d],
            positions[last] as usize,
            cfg.rope_theta as f64,
        );
        let scores: Vec<f64> = (0..n)
            .map(|j| {
                let kj = rotate(
                    &k[j][kv * d..(kv + 1) * d],
                    positions[j] as usize,
                    cfg.rope_theta as f64,
                );
                qh.iter().zip(&kj).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt()
            })
            .collect();
        let top = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - top).exp()).collect();
        let sum: f64 = e.iter().sum();
        for j in 0..n {
            want[j] += e[j] / sum / cfg.num_heads as f64;
        }
    }
    for j in 0..n {
        assert!(
            (got[j] as f64 - want[j]).abs() < 1e-5,
            "token {j}: {} vs {}",
            got[j],
            want[j]
        );
    }
    assert!((got.iter().sum::<f32>() - 1.0).abs() < 1e-5);
}
