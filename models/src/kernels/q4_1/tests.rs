//! Q4_1 matmul against dequantise-then-f32-matmul, against candle's `QMatMul`, against an
//! exact f64 product of the same quantised operands, and every SIMD path against the scalar
//! one bit for bit.

#![allow(clippy::unwrap_used)]

use super::*;
use candle_core::quantized::QMatMul;
use candle_core::{Device, Module, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;

/// Uniform values in [-1, 1] with a per-row scale in [0.1, 2] and a per-row offset, so the
/// Q4_1 offsets `m` and row magnitudes vary as in trained weights.
fn random_matrix(rows: usize, cols: usize, seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v = Vec::with_capacity(rows * cols);
    for _ in 0..rows {
        let scale = rng.random_range(0.1f32..2.0);
        let offset = rng.random_range(-0.3f32..0.3);
        v.extend((0..cols).map(|_| scale * rng.random_range(-1f32..1.0) + offset));
    }
    Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
}

fn quantized(n: usize, k: usize, seed: u64) -> Arc<QTensor> {
    Arc::new(QTensor::quantize(&random_matrix(n, k, seed), GgmlDType::Q4_1).unwrap())
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Asserts `|ours - reference| <= bound` elementwise.
fn assert_within(ours: &[f32], reference: &[f32], bound: &[f32], what: &str) {
    assert_eq!(ours.len(), reference.len());
    for (i, ((a, b), e)) in ours.iter().zip(reference).zip(bound).enumerate() {
        assert!(
            (a - b).abs() <= *e,
            "{what}: element {i}: {a} vs {b}, allowed {e}"
        );
    }
}

fn available_paths() -> Vec<SimdPath> {
    [SimdPath::Avx512Vnni, SimdPath::Avx2, SimdPath::Scalar]
        .into_iter()
        .filter(|p| p.is_available())
        .collect()
}

/// Exact (f64) product of the Q8_1 activations our quantiser produces with the dequantised
/// weights, so only f32 accumulation rounding separates it from the kernels.
fn exact_reference(mm: &Q4_1Matmul, w: &QTensor, x: &[f32], m: usize) -> Vec<f32> {
    let (n, k) = (mm.n(), mm.k());
    let nb = k / QK;
    let acts = acts::quantize(SimdPath::Scalar, x, m, k);
    let raw = w.data().unwrap();
    let mut out = vec![0f32; m * n];
    for j in 0..n {
        for i in 0..m {
            let mut acc = 0f64;
            for b in 0..nb {
                let blk = &raw[(j * nb + b) * 20..(j * nb + b + 1) * 20];
                let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f64();
                let mw = half::f16::from_le_bytes([blk[2], blk[3]]).to_f64();
                let [dx, sx] = acts.ds[i * nb + b];
                let xq = &acts.qs[(i * nb + b) * QK..(i * nb + b + 1) * QK];
                let mut isum = 0i64;
                for t in 0..16 {
                    isum += i64::from(blk[4 + t] & 0xF) * i64::from(xq[t]);
                    isum += i64::from(blk[4 + t] >> 4) * i64::from(xq[t + 16]);
                }
                acc += d * f64::from(dx) * isum as f64 + mw * f64::from(sx);
            }
            out[i * n + j] = acc as f32;
        }
    }
    out
}

fn check_shape(m: usize, k: usize, n: usize, seed: u64) {
    let w = quantized(n, k, seed);
    let mm = Q4_1Matmul::new(&w).unwrap();
    let x = random_matrix(m, k, seed + 1);
    let ours = to_vec(&mm.forward(&x).unwrap());
    let x_vec = to_vec(&x);
    let w_f32 = w.dequantize(&Device::Cpu).unwrap();

    // sum_k |w_jk x_ik|: the scale against which f32 rounding and f16 scale rounding count.
    let abs_prod = to_vec(
        &x.abs()
            .unwrap()
            .matmul(&w_f32.abs().unwrap().t().unwrap())
            .unwrap(),
    );
    let scaled = |c: f32| abs_prod.iter().map(|v| c * v + 1e-6).collect::<Vec<_>>();

    // The plain f32 reference: dequantised weights times unquantised activations. The only
    // approximation is the Q8_1 rounding of the activations, at most d_x / 2 per value, so
    // |error| <= sum over blocks of d_x / 2 * sum_{k in block} |w_jk|.
    let reference = to_vec(&x.matmul(&w_f32.t().unwrap()).unwrap());
    let nb = k / QK;
    let acts = acts::quantize(SimdPath::Scalar, &x_vec, m, k);
    let half_d: Vec<f32> = acts.ds.iter().map(|[d, _]| d / 2.0).collect();
    let half_d = Tensor::from_vec(half_d, (m, nb), &Device::Cpu).unwrap();
    let w_block_abs = w_f32
        .abs()
        .unwrap()
        .reshape((n, nb, QK))
        .unwrap()
        .sum(2)
        .unwrap();
    let q_bound = to_vec(&half_d.matmul(&w_block_abs.t().unwrap()).unwrap());
    let bound: Vec<f32> = q_bound
        .iter()
        .zip(scaled(1e-5))
        .map(|(q, s)| q + s)
        .collect();
    assert_within(
        &ours,
        &reference,
        &bound,
        &format!("m={m} k={k} n={n} vs f32 matmul"),
    );

    // candle's QMatMul uses the same Q8_1 scheme but rounds d and s to f16 (relative error
    // up to 2^-11 each). Its debug build asserts an even number of blocks.
    if nb.is_multiple_of(2) {
        let theirs = to_vec(&QMatMul::from_arc(w.clone()).unwrap().forward(&x).unwrap());
        let what = format!("m={m} k={k} n={n} vs candle QMatMul");
        assert_within(&ours, &theirs, &scaled(2e-3), &what);
    }

    // Same quantised operands, exact arithmetic: only f32 rounding left.
    let exact = exact_reference(&mm, &w, &x_vec, m);
    let what = format!("m={m} k={k} n={n} vs exact product of the quantised operands");
    assert_within(&ours, &exact, &scaled(1e-5), &what);

    // Every path gives the scalar path's bits.
    let run = |path: SimdPath| {
        let mm = Q4_1Matmul::new(&w).unwrap().with_path(path).unwrap();
        let mut out = vec![0f32; m * n];
        mm.matmul_f32(&x_vec, m, &mut out).unwrap();
        out
    };
    let scalar = run(SimdPath::Scalar);
    for path in available_paths() {
        let out = run(path);
        let same = out
            .iter()
            .zip(&scalar)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same,
            "m={m} k={k} n={n}: {path:?} differs from the scalar path"
        );
    }
}

#[test]
fn matches_references_over_model_shapes() {
    let mut seed = 0;
    for &m in &[1, 3, 4, 5, 17, 64] {
        for &k in &[64, 576, 1536] {
            for &n in &[16, 576, 1536] {
                seed += 10;
                check_shape(m, k, n, seed);
            }
        }
    }
}

#[test]
fn matches_references_on_odd_shapes() {
    // n not a multiple of the 16-row tile, k an odd number of blocks, tiny and single-block k.
    for (i, &(m, k, n)) in [
        (1, 32, 1),
        (2, 96, 40),
        (7, 160, 8),
        (9, 576, 200),
        (33, 64, 24),
    ]
    .iter()
    .enumerate()
    {
        check_shape(m, k, n, 1000 + i as u64);
    }
}

#[test]
fn matches_references_on_vocab_sized_output() {
    check_shape(1, 576, 49152, 7);
}

#[test]
fn large_prefill_uses_parallel_quantisation_and_matches() {
    // m * k above the parallel quantisation threshold, m not a multiple of the row chunk.
    check_shape(70, 576, 192, 4242);
}

#[test]
fn forward_keeps_leading_dims_and_accepts_strided_input() {
    let w = quantized(48, 64, 3);
    let mm = Q4_1Matmul::new(&w).unwrap();
    let x = random_matrix(6, 64, 4);
    let flat = to_vec(&mm.forward(&x).unwrap());

    let x3 = x.reshape((2, 3, 64)).unwrap();
    let y3 = mm.forward(&x3).unwrap();
    assert_eq!(y3.dims(), &[2, 3, 48]);
    assert_eq!(to_vec(&y3), flat);

    // A transposed (non-contiguous) view of the same values.
    let xt = x.t().unwrap().contiguous().unwrap().t().unwrap();
    assert!(!xt.is_contiguous());
    assert_eq!(to_vec(&mm.forward(&xt).unwrap()), flat);

    let x1 = x.get(2).unwrap();
    let y1 = mm.forward(&x1).unwrap();
    assert_eq!(y1.dims(), &[48]);
    assert_eq!(to_vec(&y1), flat[2 * 48..3 * 48]);
}

#[test]
fn rejects_what_it_does_not_handle() {
    let t = random_matrix(32, 64, 5);
    let q8_0 = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
    assert!(Q4_1Matmul::try_new(&q8_0).unwrap().is_none());
    assert!(Q4_1Matmul::new(&q8_0).is_err());

    let mm = Q4_1Matmul::new(&quantized(32, 64, 6)).unwrap();
    assert!(mm.forward(&random_matrix(2, 96, 7)).is_err(), "wrong k");
    let x16 = random_matrix(2, 64, 8)
        .to_dtype(candle_core::DType::F16)
        .unwrap();
    assert!(mm.forward(&x16).is_err(), "f16 input");
    let mut dst = vec![0f32; 3];
    assert!(mm.matmul_f32(&[0.0; 64], 1, &mut dst).is_err(), "dst size");
}

#[test]
fn zero_rows_and_zero_activations() {
    let mm = Q4_1Matmul::new(&quantized(32, 64, 9)).unwrap();
    let y = mm.forward(&Tensor::zeros((0, 64), candle_core::DType::F32, &Device::Cpu).unwrap());
    assert_eq!(y.unwrap().dims(), &[0, 32]);
    let y = mm.forward(&Tensor::zeros((2, 64), candle_core::DType::F32, &Device::Cpu).unwrap());
    assert!(to_vec(&y.unwrap()).iter().all(|&v| v == 0.0));
}
