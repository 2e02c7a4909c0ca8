//! Invariants of the decoder on tiny seeded models written to disk (so the real loaders run):
//! prefill equals step-by-step and chunked decode and a batch equals each row alone, bit for
//! bit in the weight formats the server runs (GGUF Q8_0 and Q4_1, as the served path holds
//! them: `tests/e2e/test_agreement.py`) and within a stated tolerance in f32; loader-built
//! equals in-memory, and an empty plug-in chain equals a chain of no-op hooks bit for bit.

use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::Tensor;
use models::hooks::NoOpHook;
use models::loader::gguf::GgufSource;
use models::loader::load_model;
use models::loader::safetensors::SafetensorsSource;
use models::tiny::{tiny_config, TinyModel};
use models::{Architecture, BatchRow, HookCall, Llama, LogitsWanted};

const MAX_POS: usize = 256;

fn model(arch: Architecture) -> TinyModel {
    TinyModel::random(tiny_config(arch), 7).expect("tiny model")
}

/// Runs one row alone through a fresh cache in the given chunk sizes; returns the logits of
/// every position, `(n, vocab)`.
fn run_chunks(m: &Llama, tokens: &[u32], chunks: &[usize], hooks: &[HookCall]) -> Tensor {
    let mut cache = m.new_cache();
    let mut outs = Vec::new();
    let mut at = 0;
    for &c in chunks {
        let mut batch = [BatchRow {
            seq_id: 1,
            tokens: &tokens[at..at + c],
            cache: &mut cache,
            hooks,
            logits: LogitsWanted::All,
        }];
        outs.push(
            m.forward(&mut batch)
                .expect("forward")
                .remove(0)
                .expect("logits"),
        );
        at += c;
    }
    Tensor::cat(&outs, 0).expect("cat")
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .expect("sub")
        .abs()
        .expect("abs")
        .max_all()
        .expect("max")
        .to_scalar()
        .expect("scalar")
}

fn tokens(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 37 + seed * 11 + 5) % 96)
        .collect()
}

/// Bit for bit: `-0.0` and `0.0` differ, as every NaN from every other value.
fn same_bits(a: &Tensor, b: &Tensor) -> bool {
    let bits = |t: &Tensor| -> Vec<u32> {
        let v: Vec<f32> = t.flatten_all().expect("flat").to_vec1().expect("vec");
        v.into_iter().map(f32::to_bits).collect()
    };
    a.dims() == b.dims() && bits(a) == bits(b)
}

/// The f32 model runs candle's dense matmul (`gemm`), which blocks and vectorizes its loops
/// by the number of rows in the call: a row's logits change in the last bits with the rows
/// beside it and the chunk it came in. The served formats (GGUF Q8_0 and Q4_1 through our
/// kernels) compute each row alone in a fixed order and are held to bit equality below.
/// Observed: up to 4e-6 here (an AVX2 host); the bound leaves room for other
/// SIMD paths.
const F32_TOLERANCE: f32 = 1e-4;

/// Chunkings of a prompt of `n` tokens, beside the whole prompt in one pass: one token per
/// step, and cuts that put short and long chunks on either side of decode-sized ones.
fn chunkings(n: usize) -> Vec<Vec<usize>> {
    let mut uneven = vec![7, 1, 3];
    uneven.push(n - 11);
    vec![vec![1; n], uneven, vec![n / 2, 1, n - n / 2 - 1]]
}

/// Every chunking of [`chunkings`] against the whole prompt in one pass: `(chunks, that
/// chunking's logits, the one-pass logits)`.
fn prefill_vs_chunked(m: &Llama, toks: &[u32]) -> Vec<(Vec<usize>, Tensor, Tensor)> {
    let full = run_chunks(m, toks, &[toks.len()], &[]);
    chunkings(toks.len())
        .into_iter()
        .map(|chunks| {
            let got = run_chunks(m, toks, &chunks, &[]);
            (chunks, got, full.clone())
        })
        .collect()
}

#[test]
fn prefill_equals_step_by_step_decode() {
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let m = model(arch).build(MAX_POS).expect("build");
        for (chunks, got, full) in prefill_vs_chunked(&m, &tokens(20, 1)) {
            let d = max_diff(&got, &full);
            assert!(d < F32_TOLERANCE, "{arch:?} {chunks:?}: {d}");
        }
    }
}

/// Three sequences stepped together: a fresh prefill, a decode step after a 9-token prompt,
/// and a second prefill chunk after 5 tokens; `(batched logits, the row's logits alone)`
/// for each.
fn batch_vs_alone(m: &Llama) -> Vec<(Tensor, Tensor)> {
    let seqs = [tokens(6, 2), tokens(10, 3), tokens(12, 4)];
    let split = [0usize, 9, 5];
    let mut caches: Vec<_> = (0..3).map(|_| m.new_cache()).collect();
    for (i, cache) in caches.iter_mut().enumerate() {
        if split[i] > 0 {
            let mut b = [BatchRow {
                seq_id: i as u64,
                tokens: &seqs[i][..split[i]],
                cache,
                hooks: &[],
                logits: LogitsWanted::None,
            }];
            m.forward(&mut b).expect("prefix");
        }
    }
    let [c0, c1, c2] = &mut caches[..] else {
        panic!("three caches")
    };
    let mut batch = [
        BatchRow {
            seq_id: 0,
            tokens: &seqs[0][..],
            cache: c0,
            hooks: &[],
            logits: LogitsWanted::All,
        },
        BatchRow {
            seq_id: 1,
            tokens: &seqs[1][9..],
            cache: c1,
            hooks: &[],
            logits: LogitsWanted::Last,
        },
        BatchRow {
            seq_id: 2,
            tokens: &seqs[2][5..],
            cache: c2,
            hooks: &[],
            logits: LogitsWanted::All,
        },
    ];
    let out = m.forward(&mut batch).expect("batched");
    assert_eq!(batch[1].cache.len(), 10);
    out.into_iter()
        .enumerate()
        .map(|(i, got)| {
            let chunks = match split[i] {
                0 => vec![seqs[i].len()],
                s => vec![s, seqs[i].len() - s],
            };
            let alone = run_chunks(m, &seqs[i], &chunks, &[]);
            let got = got.expect("logits");
            let n = got.dim(0).expect("dim");
            let want = alone
                .narrow(0, alone.dim(0).expect("dim") - n, n)
                .expect("narrow");
            (got, want)
        })
        .collect()
}

#[test]
fn batch_equals_each_row_alone() {
    let m = model(Architecture::Llama).build(MAX_POS).expect("build");
    for (i, (got, want)) in batch_vs_alone(&m).iter().enumerate() {
        let d = max_diff(got, want);
        assert!(d < F32_TOLERANCE, "row {i}: {d}");
    }
}

/// The weight formats the server runs, written to GGUF and loaded by the real loader: the
/// tiny model of each architecture, and a wider one whose matmuls cross the thread pool in
/// several tiles and whose attention has 64-wide heads.
fn served_models(dir: &std::path::Path) -> Vec<(String, Llama)> {
    let mut wide = tiny_config(Architecture::Llama);
    (wide.hidden_size, wide.intermediate_size, wide.head_dim) = (256, 512, 64);
    let configs = [
        ("llama", tiny_config(Architecture::Llama)),
        ("qwen2", tiny_config(Architecture::Qwen2)),
        ("wide llama", wide),
    ];
    let mut out = Vec::new();
    for (name, cfg) in configs {
        let tiny = TinyModel::random(cfg, 7).expect("tiny");
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1] {
            let path = dir.join(format!("{name} {dtype:?}.gguf"));
            tiny.write_gguf(&path, dtype).expect("write gguf");
            let m = load_model(&path, &candle_core::Device::Cpu, MAX_POS).expect("load");
            out.push((format!("{name} {dtype:?}"), m));
        }
    }
    out
}

#[test]
fn quantized_prefill_equals_step_by_step_and_chunked_bit_for_bit() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, m) in served_models(dir.path()) {
        for (chunks, got, full) in prefill_vs_chunked(&m, &tokens(40, 1)) {
            assert!(
                same_bits(&got, &full),
                "{name} {chunks:?}: off by up to {}",
                max_diff(&got, &full)
            );
        }
    }
}

#[test]
fn quantized_batch_equals_each_row_alone_bit_for_bit() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, m) in served_models(dir.path()) {
        for (i, (got, want)) in batch_vs_alone(&m).iter().enumerate() {
            assert!(
                same_bits(got, want),
                "{name} row {i}: off by up to {}",
                max_diff(got, want)
            );
        }
    }
}

#[test]
fn loader_built_equals_in_memory() {
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let tiny = model(arch);
        let dir = tempfile::tempdir().expect("tempdir");
        tiny.write_safetensors(&dir.path().join("hf"))
            .expect("write hf");
        tiny.write_gguf(&dir.path().join("m.gguf"), GgmlDType::F32)
            .expect("write gguf");
        let toks = tokens(12, 5);
        let reference = run_chunks(&tiny.build(MAX_POS).expect("build"), &toks, &[12], &[]);
        let dev = candle_core::Device::Cpu;
        for path in [dir.path().join("hf"), dir.path().join("m.gguf")] {
            let loaded = load_model(&path, &dev, MAX_POS).expect("load");
            assert_eq!(loaded.config, tiny.config);
            let got = run_chunks(&loaded, &toks, &[12], &[]);
            assert_eq!(
                max_diff(&got, &reference),
                0.0,
                "{arch:?} {}",
                path.display()
            );
        }
        // The same files read into memory first (as plug-ins read theirs) load the same model.
        let gguf = dir.path().join("m.gguf");
        let bytes = std::fs::read(&gguf).expect("read gguf");
        let mut src = GgufSource::from_bytes(bytes, &gguf, &dev).expect("gguf bytes");
        let from_gguf = Llama::load(&mut src, MAX_POS).expect("load gguf bytes");
        let st = dir.path().join("hf/model.safetensors");
        let bytes = std::fs::read(&st).expect("read safetensors");
        let mut src = SafetensorsSource::from_bytes(tiny.config.clone(), bytes, &st, &dev)
            .expect("safetensors bytes");
        let from_st = Llama::load(&mut src, MAX_POS).expect("load safetensors bytes");
        for loaded in [from_gguf, from_st] {
            assert_eq!(loaded.config, tiny.config);
            let got = run_chunks(&loaded, &toks, &[12], &[]);
            assert_eq!(max_diff(&got, &reference), 0.0, "{arch:?} from bytes");
        }
    }
}

/// The float model with every matrix rounded through `dtype` and back: what a quantized
/// GGUF holds, computed in f32.
fn rounded(tiny: &TinyModel, dtype: GgmlDType) -> TinyModel {
    let mut out = tiny.clone();
    for t in out.tensors.values_mut() {
        if t.rank() == 2 {
            let q = candle_core::quantized::QTensor::quantize(t, dtype).expect("quantize");
            *t = q.dequantize(&candle_core::Device::Cpu).expect("dequantize");
        }
    }
    out
}

#[test]
fn quantized_gguf_matches_its_float_rounding() {
    // K-quants work on rows of 256 values, so this test needs a wider model.
    let mut cfg = tiny_config(Architecture::Llama);
    (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim) = (256, 512, 64);
    let tiny = TinyModel::random(cfg, 3).expect("tiny");
    let dir = tempfile::tempdir().expect("tempdir");
    let toks = tokens(12, 6);
    // The quantized matmul also rounds activations to 8 bits, so agreement is close, not
    // exact; a wrong q/k row order would be off by the scale of the logits themselves.
    for dtype in [
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ] {
        let reference = run_chunks(
            &rounded(&tiny, dtype).build(MAX_POS).expect("build"),
            &toks,
            &[12],
            &[],
        );
        let scale = reference
            .abs()
            .expect("abs")
            .max_all()
            .expect("max")
            .to_scalar::<f32>()
            .expect("s");
        let path = dir.path().join(format!("{dtype:?}.gguf"));
        tiny.write_gguf(&path, dtype).expect("write");
        let m = load_model(&path, &candle_core::Device::Cpu, MAX_POS).expect("load");
        let d = max_diff(&run_chunks(&m, &toks, &[12], &[]), &reference) / scale;
        assert!(d < 0.03, "{dtype:?}: relative diff {d}");
    }
}

#[test]
fn empty_chain_equals_noop_chain_bit_for_bit() {
    let m = model(Architecture::Llama).build(MAX_POS).expect("build");
    let toks = tokens(16, 7);
    let noop: Arc<NoOpHook> = Arc::new(NoOpHook);
    let chain = [HookCall::bare(noop.clone()), HookCall::bare(noop)];
    let plain = run_chunks(&m, &toks, &[10, 1, 5], &[]);
    let hooked = run_chunks(&m, &toks, &[10, 1, 5], &chain);
    assert_eq!(max_diff(&plain, &hooked), 0.0);
}

#[test]
fn missing_tensor_is_a_typed_error_naming_it() {
    let mut tiny = model(Architecture::Llama);
    tiny.tensors.remove("model.layers.1.mlp.up_proj.weight");
    let dir = tempfile::tempdir().expect("tempdir");
    tiny.write_safetensors(dir.path()).expect("write");
    let err = load_model(dir.path(), &candle_core::Device::Cpu, MAX_POS).expect_err("must fail");
    assert!(
        err.to_string()
            .contains("model.layers.1.mlp.up_proj.weight"),
        "{err}"
    );
}

#[test]
fn misshapen_tensor_is_a_typed_error_naming_it() {
    let mut tiny = model(Architecture::Llama);
    let bad =
        Tensor::zeros((3, 3), candle_core::DType::F32, &candle_core::Device::Cpu).expect("zeros");
    tiny.tensors
        .insert("model.layers.0.self_attn.k_proj.weight".into(), bad);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.gguf");
    tiny.write_gguf(&path, GgmlDType::F32).expect("write");
    let err = load_model(&path, &candle_core::Device::Cpu, MAX_POS).expect_err("must fail");
    assert!(err.to_string().contains("blk.0.attn_k.weight"), "{err}");
}

/// The single-pass mode is what llama.cpp computes: farther from float math than two passes,
/// but still batch-invariant (each row's result depends on that row alone).
#[test]
fn single_pass_activations_are_less_accurate_but_still_batch_invariant() {
    let mut cfg = tiny_config(Architecture::Llama);
    (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim) = (256, 512, 64);
    let tiny = TinyModel::random(cfg, 4).expect("tiny");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("q41.gguf");
    tiny.write_gguf(&path, GgmlDType::Q4_1).expect("write");
    let reference = rounded(&tiny, GgmlDType::Q4_1)
        .build(MAX_POS)
        .expect("build");
    let two = load_model(&path, &candle_core::Device::Cpu, MAX_POS).expect("load");
    let mut one = two.clone();
    one.set_activation_quantization(models::linear::ActivationQuantization::Single);
    let toks = tokens(12, 9);
    let want = run_chunks(&reference, &toks, &[12], &[]);
    let (err_two, err_one) = (
        max_diff(&run_chunks(&two, &toks, &[12], &[]), &want),
        max_diff(&run_chunks(&one, &toks, &[12], &[]), &want),
    );
    assert!(
        err_one > 4.0 * err_two,
        "single {err_one} vs two-pass {err_two}"
    );
    // Alone vs beside another row: bit for bit.
    let alone = run_chunks(&one, &toks, &[12], &[]);
    let (mut c1, mut c2) = (one.new_cache(), one.new_cache());
    let other = tokens(5, 3);
    let mut rows = [
        BatchRow {
            seq_id: 1,
            tokens: &other,
            cache: &mut c1,
            hooks: &[],
            logits: LogitsWanted::All,
        },
        BatchRow {
            seq_id: 2,
            tokens: &toks,
            cache: &mut c2,
            hooks: &[],
            logits: LogitsWanted::All,
        },
    ];
    let together = one
        .forward(&mut rows)
        .expect("forward")
        .remove(1)
        .expect("logits");
    assert_eq!(max_diff(&together, &alone), 0.0);
}

/// Not true today, kept as the reproducer: a Q6_K matrix (Q4_K_M files hold some) runs
/// through candle's `QMatMul`, whose x86 code takes its repacked-tile kernel for two or more
/// rows and its compact `vec_dot` for one (`candle-core` `quantized/repack_x86.rs`,
/// `Q6K => m > 1`). The two sum in different orders, so a decode row, or a one-token chunk,
/// differs from the same token in a prefill chunk by ~1e-6 (and a decode row batched with
/// others from itself alone). Q4_1 and Q8_0, the formats above, run our kernels.
#[test]
#[ignore = "candle runs Q6_K in different kernels for one row and for several"]
fn q6k_prefill_equals_step_by_step_bit_for_bit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = tiny_config(Architecture::Llama);
    (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim) = (256, 512, 64);
    let path = dir.path().join("q6k.gguf");
    TinyModel::random(cfg, 7)
        .expect("tiny")
        .write_gguf(&path, GgmlDType::Q6K)
        .expect("write");
    let m = load_model(&path, &candle_core::Device::Cpu, MAX_POS).expect("load");
    for (chunks, got, full) in prefill_vs_chunked(&m, &tokens(40, 1)) {
        assert!(
            same_bits(&got, &full),
            "{chunks:?}: off by up to {}",
            max_diff(&got, &full)
        );
    }
}
