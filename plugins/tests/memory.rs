//! Memory decoders on tiny seeded models written to disk (the real loaders; Q8_0 GGUF where
//! the tests compare bits, as the served path holds weights): mixing a model with itself
//! leaves its distribution unchanged, the mixture matches the formula computed by hand in
//! f64, rows with different memories, λ or none share one step and each equals itself alone,
//! the memory sees every token in every chunking, its cache is counted, forked and cut back
//! with the base's, and bad files and parameters are refused naming what is wrong.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor, D};
use models::loader::load_model;
use models::tiny::{tiny_config, TinyModel};
use models::{Architecture, BatchRow, Hook, HookCall, KvCache, Llama, LogitsWanted, ModelConfig};
use plugins::files::PluginFiles;
use plugins::memory::tiny::{edit_config, write_memory, Weights};
use plugins::memory::{MemoryDecoder, MemoryState};
use plugins::{BaseModel, Plugin, PluginError};
use serde_json::{json, Value};

const MAX_POS: usize = 256;
const Q8: Weights = Weights::Gguf(GgmlDType::Q8_0);

struct Fixture {
    dir: tempfile::TempDir,
    tiny: TinyModel,
    base: Llama,
    info: BaseModel,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let tiny = TinyModel::random(tiny_config(Architecture::Llama), 21).unwrap();
    let path = dir.path().join("base.gguf");
    tiny.write_gguf(&path, GgmlDType::Q8_0).unwrap();
    let base = load_model(&path, &Device::Cpu, MAX_POS).unwrap();
    let info = BaseModel {
        id: "tiny".into(),
        config: tiny.config.clone(),
        device: Device::Cpu,
        tokenizer_hash: None,
        kv_dtype: models::KvDtype::F32,
    };
    Fixture {
        dir,
        tiny,
        base,
        info,
    }
}

impl Fixture {
    fn load(&self, name: &str) -> Result<MemoryDecoder, PluginError> {
        let dir = self.dir.path().join(name);
        MemoryDecoder::load(name, &dir, &self.info, &mut PluginFiles::unconfined())
    }

    /// A memory folder `name` holding `model`, loaded.
    fn memory(&self, name: &str, model: &TinyModel, weights: Weights) -> Arc<MemoryDecoder> {
        write_memory(model, &self.dir.path().join(name), weights, 0.25).unwrap();
        Arc::new(self.load(name).unwrap())
    }

    /// A memory with other weights than the base (seed `seed`).
    fn other(&self, name: &str, seed: u64) -> Arc<MemoryDecoder> {
        let model = TinyModel::random(self.tiny.config.clone(), seed).unwrap();
        self.memory(name, &model, Q8)
    }
}

fn call(m: &Arc<MemoryDecoder>, params: Value) -> HookCall {
    let params = m.request_params(params.as_object().unwrap()).unwrap();
    HookCall::new(m.clone(), params)
}

fn tokens(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 37 + seed * 11 + 5) % 96)
        .collect()
}

fn step(
    m: &Llama,
    cache: &mut KvCache,
    toks: &[u32],
    hooks: &[HookCall],
    logits: LogitsWanted,
) -> Option<Tensor> {
    let mut b = [BatchRow {
        seq_id: 1,
        tokens: toks,
        cache,
        hooks,
        logits,
    }];
    m.forward(&mut b).unwrap().remove(0)
}

/// A prompt with logits at every position, then one decode step per token of `decode`.
fn run(m: &Llama, hooks: &[HookCall], prompt: &[u32], decode: &[u32]) -> Vec<Tensor> {
    let mut cache = m.new_cache();
    let mut out = vec![step(m, &mut cache, prompt, hooks, LogitsWanted::All).unwrap()];
    for &t in decode {
        out.push(step(m, &mut cache, &[t], hooks, LogitsWanted::Last).unwrap());
    }
    out
}

fn bits(t: &Tensor) -> Vec<u32> {
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    v.into_iter().map(f32::to_bits).collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn log_softmax(t: &Tensor) -> Tensor {
    candle_nn::ops::log_softmax(t, D::Minus1).unwrap()
}

#[test]
fn mixing_the_base_with_itself_leaves_its_distribution_unchanged_at_any_lambda() {
    let f = fixture();
    let itself = f.memory("itself", &f.tiny, Q8);
    let (prompt, decode) = (tokens(9, 1), tokens(4, 2));
    let base = run(&f.base, &[], &prompt, &decode);
    for lambda in [0.0, 0.1, 0.5, 0.9, 1.0] {
        let mixed = run(
            &f.base,
            &[call(&itself, json!({"lambda": lambda}))],
            &prompt,
            &decode,
        );
        for (i, (b, m)) in base.iter().zip(&mixed).enumerate() {
            let d = max_diff(&log_softmax(b), m);
            assert!(d < 1e-5, "lambda {lambda}, step {i}: {d}");
        }
    }
    // The memory does act: at T = 2 the same weights give another distribution.
    let hot = run(
        &f.base,
        &[call(&itself, json!({"lambda": 0.5, "temperature": 2.0}))],
        &prompt,
        &decode,
    );
    assert!(max_diff(&log_softmax(&base[0]), &hot[0]) > 1e-2);
}

#[test]
fn the_memory_holds_its_keys_and_values_as_the_base_does() {
    let mut f = fixture();
    f.info.kv_dtype = models::KvDtype::F16;
    f.base.set_kv_dtype(models::KvDtype::F16).unwrap();
    let itself = f.memory("itself-f16", &f.tiny, Q8);
    assert_eq!(itself.model().kv_dtype(), models::KvDtype::F16);
    let half = f.tiny.config.kv_bytes_per_token() / 2;
    assert_eq!(itself.model().kv_bytes_per_token(), half);
    // With both caches in f16, a memory that is the base still mixes to the base exactly.
    let (prompt, decode) = (tokens(9, 3), tokens(4, 4));
    let base = run(&f.base, &[], &prompt, &decode);
    let mixed = run(
        &f.base,
        &[call(&itself, json!({"lambda": 0.5}))],
        &prompt,
        &decode,
    );
    for (i, (b, m)) in base.iter().zip(&mixed).enumerate() {
        let d = max_diff(&log_softmax(b), m);
        assert!(d < 1e-5, "step {i}: {d}");
    }
}

/// `logaddexp(log(1 - λ) + log_softmax(base), log λ + log_softmax(memory / T))`, row by row
/// in f64.
fn reference(base: &Tensor, memory: &Tensor, lambda: f64, t: f64) -> Vec<Vec<f64>> {
    fn log_softmax(z: &[f64]) -> Vec<f64> {
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        z.iter().map(|x| x - lse).collect()
    }
    let rows = |t: &Tensor| -> Vec<Vec<f64>> {
        let v: Vec<Vec<f32>> = t.to_vec2().unwrap();
        v.into_iter()
            .map(|r| r.into_iter().map(f64::from).collect())
            .collect()
    };
    rows(base)
        .into_iter()
        .zip(rows(memory))
        .map(|(b, m)| {
            let scaled: Vec<f64> = m.iter().map(|x| x / t).collect();
            let (lb, lm) = (log_softmax(&b), log_softmax(&scaled));
            lb.iter()
                .zip(&lm)
                .map(|(b, m)| ((1.0 - lambda) * b.exp() + lambda * m.exp()).ln())
                .collect()
        })
        .collect()
}

/// Every value of `got` within f32 rounding of the f64 reference.
fn assert_close(got: &Tensor, want: &[Vec<f64>], step: usize) {
    let got: Vec<Vec<f32>> = got.to_vec2().unwrap();
    assert_eq!(got.len(), want.len());
    for (gr, wr) in got.iter().zip(want) {
        for (g, w) in gr.iter().zip(wr) {
            assert!((f64::from(*g) - w).abs() < 1e-5, "step {step}: {g} vs {w}");
        }
    }
}

#[test]
fn the_mixture_equals_the_formula_computed_by_hand() {
    let f = fixture();
    let memory = f.other("m", 22);
    let (prompt, decode) = (tokens(7, 3), tokens(3, 4));
    let base = run(&f.base, &[], &prompt, &decode);
    let alone = run(memory.model(), &[], &prompt, &decode);
    let (lambda, t) = (0.3, 1.7);
    let mixed = run(
        &f.base,
        &[call(&memory, json!({"lambda": lambda, "temperature": t}))],
        &prompt,
        &decode,
    );
    for (i, ((b, m), got)) in base.iter().zip(&alone).zip(&mixed).enumerate() {
        assert_close(got, &reference(b, m, lambda, t), i);
    }
}

/// Rows `(r, chain)`, each fed prompt `r` in one step, then one decode token per step, all in
/// one batch; each row's logits per step.
fn run_batch(m: &Llama, rows: &[(usize, Vec<HookCall>)], steps: usize) -> Vec<Vec<Tensor>> {
    let mut caches: Vec<KvCache> = rows.iter().map(|_| m.new_cache()).collect();
    let mut out = vec![Vec::new(); rows.len()];
    for s in 0..=steps {
        let feeds: Vec<Vec<u32>> = rows
            .iter()
            .map(|&(r, _)| match s {
                0 => tokens(5 + 2 * r, r as u32),
                _ => tokens(1, (10 * s + r) as u32),
            })
            .collect();
        let logits = if s == 0 {
            LogitsWanted::All
        } else {
            LogitsWanted::Last
        };
        let mut batch: Vec<BatchRow<'_>> = caches
            .iter_mut()
            .zip(rows)
            .zip(&feeds)
            .map(|((cache, (r, hooks)), toks)| BatchRow {
                seq_id: *r as u64,
                tokens: toks,
                cache,
                hooks,
                logits,
            })
            .collect();
        for (i, l) in m.forward(&mut batch).unwrap().into_iter().enumerate() {
            out[i].push(l.unwrap());
        }
    }
    out
}

#[test]
fn rows_with_different_memories_lambdas_or_none_share_a_step_and_each_equals_itself_alone() {
    let f = fixture();
    let (a, b) = (f.other("a", 22), f.other("b", 23));
    let rows = vec![
        (0, vec![]),
        (1, vec![call(&a, json!({"lambda": 0.3}))]),
        (
            2,
            vec![call(&b, json!({"lambda": 0.7, "temperature": 2.0}))],
        ),
        (3, vec![call(&a, json!({"lambda": 0.9}))]),
    ];
    let together = run_batch(&f.base, &rows, 3);
    for (i, row) in rows.iter().enumerate() {
        let alone = run_batch(&f.base, std::slice::from_ref(row), 3).remove(0);
        for (s, (t, a)) in together[i].iter().zip(&alone).enumerate() {
            assert_eq!(bits(t), bits(a), "row {i}, step {s}");
        }
    }
    // The same memory at two λ on the same tokens gives two distributions.
    let other_lambda = vec![(1, vec![call(&a, json!({"lambda": 0.9}))])];
    let other = run_batch(&f.base, &other_lambda, 3).remove(0);
    assert_ne!(bits(&together[1][3]), bits(&other[3]));
}

#[test]
fn the_memory_sees_every_token_in_every_chunking() {
    let f = fixture();
    let memory = f.other("m", 22);
    let chain = [call(&memory, json!({"lambda": 0.5}))];
    let toks = tokens(12, 5);
    let mut results = Vec::new();
    for chunks in [&[12][..], &[1; 12], &[5, 3, 4]] {
        let mut cache = f.base.new_cache();
        let mut at = 0;
        let mut last = None;
        for (i, &c) in chunks.iter().enumerate() {
            // Intermediate chunks want no logits; the memory must still see their tokens.
            let wanted = if i + 1 == chunks.len() {
                LogitsWanted::Last
            } else {
                LogitsWanted::None
            };
            last = step(&f.base, &mut cache, &toks[at..at + c], &chain, wanted);
            at += c;
        }
        let next = step(&f.base, &mut cache, &[7], &chain, LogitsWanted::Last).unwrap();
        let held = cache
            .plugins()
            .with(|s: &mut MemoryState| s.cache.len())
            .unwrap();
        assert_eq!(held, 13, "chunks {chunks:?}");
        results.push((chunks, last.unwrap(), next));
    }
    let (_, first, first_next) = &results[0];
    for (chunks, last, next) in &results[1..] {
        assert_eq!(bits(last), bits(first), "chunks {chunks:?}");
        assert_eq!(bits(next), bits(first_next), "chunks {chunks:?}");
    }
}

#[test]
fn the_memory_cache_is_counted_forked_and_truncated_with_the_base_cache() {
    let f = fixture();
    let memory = f.other("m", 22);
    let chain = [call(&memory, json!({}))];
    let prompt = tokens(10, 6);
    let (mut bare, mut own) = (f.base.new_cache(), memory.model().new_cache());
    step(&f.base, &mut bare, &prompt, &[], LogitsWanted::Last);
    step(memory.model(), &mut own, &prompt, &[], LogitsWanted::Last);
    let mut cache = f.base.new_cache();
    step(&f.base, &mut cache, &prompt, &chain, LogitsWanted::Last);
    assert_eq!(
        cache.allocated_bytes(),
        bare.allocated_bytes() + own.allocated_bytes()
    );
    assert!(own.allocated_bytes() > 0);
    assert_eq!(
        memory.state_bytes_per_token(&chain[0].params),
        memory.model().kv_bytes_per_token()
    );

    // Two forks decode different tokens: each equals a sequence that never forked.
    let mut fork = cache.fork().unwrap();
    let on_fork = step(&f.base, &mut fork, &[3, 4], &chain, LogitsWanted::All).unwrap();
    let on_parent = step(&f.base, &mut cache, &[5, 6], &chain, LogitsWanted::All).unwrap();
    for (next, got) in [([3, 4], &on_fork), ([5, 6], &on_parent)] {
        let all: Vec<u32> = prompt.iter().chain(&next).copied().collect();
        let fresh = run(&f.base, &chain, &all, &[]).remove(0);
        assert_eq!(
            bits(&fresh.narrow(0, 10, 2).unwrap()),
            bits(got),
            "{next:?}"
        );
    }

    // Cut back to the prompt, then the fork's tokens: as if the parent had fed them.
    cache.truncate(10).unwrap();
    let held = cache
        .plugins()
        .with(|s: &mut MemoryState| s.cache.len())
        .unwrap();
    assert_eq!(held, 10);
    let again = step(&f.base, &mut cache, &[3, 4], &chain, LogitsWanted::All).unwrap();
    assert_eq!(bits(&again), bits(&on_fork));
}

#[test]
fn safetensors_and_gguf_memories_load_and_mix() {
    let f = fixture();
    let (prompt, decode) = (tokens(6, 7), tokens(2, 8));
    let model = TinyModel::random(f.tiny.config.clone(), 22).unwrap();
    let st = f.memory("st", &model, Weights::Safetensors);
    let gguf = f.memory("gguf", &model, Weights::Gguf(GgmlDType::F32));
    let a = run(&f.base, &[call(&st, json!({}))], &prompt, &decode);
    let b = run(&f.base, &[call(&gguf, json!({}))], &prompt, &decode);
    for (x, y) in a.iter().zip(&b) {
        assert!(max_diff(x, y) < 1e-5);
    }
    assert_eq!(st.graft().lambda, 0.25);
    assert!(st.resident_bytes() > 0 && gguf.resident_bytes() > 0);
}

#[test]
fn a_memory_trained_with_another_tokenizer_is_refused_naming_both() {
    let mut f = fixture();
    f.info.tokenizer_hash = Some("sha256:base".into());
    let dir = f.dir.path().join("other_tokenizer");
    write_memory(&f.tiny, &dir, Q8, 0.25).unwrap();
    let record = |hash: &str| {
        edit_config(&dir, |c| c["graft"]["tokenizer_hash"] = json!(hash)).unwrap();
    };
    record("sha256:other");
    let e = refused(&f, "other_tokenizer");
    assert!(
        e.contains("tokenizer sha256:other") && e.contains("sha256:base"),
        "{e}"
    );
    // The same tokenizer, or a file that records none, loads.
    record("sha256:base");
    assert!(f.load("other_tokenizer").is_ok());
    write_memory(&f.tiny, &f.dir.path().join("no_hash"), Q8, 0.25).unwrap();
    assert!(f.load("no_hash").is_ok());
}

fn refused(f: &Fixture, name: &str) -> String {
    f.load(name).unwrap_err().to_string()
}

#[test]
fn bad_memory_files_are_refused_naming_what_is_wrong() {
    let f = fixture();
    let root = f.dir.path();
    // Another vocabulary: both sizes named.
    let small = TinyModel::random(
        ModelConfig {
            vocab_size: 64,
            ..f.tiny.config.clone()
        },
        1,
    )
    .unwrap();
    write_memory(&small, &root.join("vocab"), Q8, 0.25).unwrap();
    let e = refused(&f, "vocab");
    assert!(e.contains("64 tokens") && e.contains("has 96"), "{e}");
    // A shorter context than the base's.
    let short = TinyModel::random(
        ModelConfig {
            max_position_embeddings: 128,
            ..f.tiny.config.clone()
        },
        1,
    )
    .unwrap();
    write_memory(&short, &root.join("short"), Weights::Safetensors, 0.25).unwrap();
    let e = refused(&f, "short");
    assert!(e.contains("128 positions") && e.contains("256"), "{e}");
    // A missing tensor.
    let mut missing = TinyModel::random(f.tiny.config.clone(), 1).unwrap();
    missing
        .tensors
        .remove("model.layers.1.mlp.down_proj.weight");
    write_memory(&missing, &root.join("missing"), Weights::Safetensors, 0.25).unwrap();
    let e = refused(&f, "missing");
    assert!(
        e.contains("model.layers.1.mlp.down_proj.weight") && e.contains("model.safetensors"),
        "{e}"
    );
    // Another graft.type, no graft block, no weights, two weight files.
    write_memory(&f.tiny, &root.join("typed"), Q8, 0.25).unwrap();
    edit_config(&root.join("typed"), |c| {
        c["graft"]["type"] = json!("steering_controller")
    })
    .unwrap();
    let e = refused(&f, "typed");
    assert!(
        e.contains("graft.type is `steering_controller`, not `memory_decoder`"),
        "{e}"
    );
    write_memory(&f.tiny, &root.join("blockless"), Q8, 0.25).unwrap();
    edit_config(&root.join("blockless"), |c| {
        c.as_object_mut().unwrap().remove("graft");
    })
    .unwrap();
    assert!(refused(&f, "blockless").contains("no `graft` block"));
    write_memory(&f.tiny, &root.join("empty"), Q8, 0.25).unwrap();
    std::fs::remove_file(root.join("empty/model.gguf")).unwrap();
    assert!(refused(&f, "empty").contains("holds no memory weights"));
    write_memory(&f.tiny, &root.join("both"), Q8, 0.25).unwrap();
    write_memory(&f.tiny, &root.join("st"), Weights::Safetensors, 0.25).unwrap();
    std::fs::copy(
        root.join("st/model.safetensors"),
        root.join("both/model.safetensors"),
    )
    .unwrap();
    assert!(refused(&f, "both").contains("holds both"));
}

#[test]
fn request_parameters_are_checked_and_named() {
    let f = fixture();
    let m = f.other("m", 22);
    for (params, field) in [
        (json!({"lambda": 1.5}), "`lambda` must be within [0, 1]"),
        (json!({"lambda": "x"}), "`lambda` must be a number"),
        (
            json!({"temperature": 0}),
            "`temperature` must be greater than 0",
        ),
        (json!({"temperature": 1000}), "`temperature` must be within"),
        (json!({"lamda": 0.5}), "`lamda` is not a parameter"),
    ] {
        let e = m.request_params(params.as_object().unwrap()).unwrap_err();
        assert!(matches!(e, PluginError::BadParameter { .. }), "{e}");
        assert!(e.to_string().contains(field), "{params}: {e}");
    }
}

#[test]
fn after_a_lora_adapter_in_a_chain_the_memory_mixes_the_adapted_logits() {
    use plugins::lora::tiny::{TinyAdapter, ALL_PROJECTIONS};
    use plugins::lora::LoraAdapter;
    let f = fixture();
    let memory = f.other("m", 22);
    let dir = f.dir.path().join("lora");
    TinyAdapter::random(&f.tiny.config, 2, 4.0, &ALL_PROJECTIONS, 9)
        .unwrap()
        .write(&dir)
        .unwrap();
    let lora = LoraAdapter::load("lora", &dir, &f.info, &mut PluginFiles::unconfined()).unwrap();
    let lora = HookCall::new(Arc::new(lora), Arc::new(()));
    let (prompt, decode) = (tokens(6, 9), tokens(2, 10));
    let adapted = run(&f.base, std::slice::from_ref(&lora), &prompt, &decode);
    let alone = run(memory.model(), &[], &prompt, &decode);
    let chain = [lora, call(&memory, json!({"lambda": 0.4}))];
    let mixed = run(&f.base, &chain, &prompt, &decode);
    for (i, ((b, m), got)) in adapted.iter().zip(&alone).zip(&mixed).enumerate() {
        assert_close(got, &reference(b, m, 0.4, 1.0), i);
    }
}
