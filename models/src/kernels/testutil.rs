//! The test harness both weight formats share: random weights, the three references (f32
//! matmul of the dequantised weights, candle's `QMatMul`, an exact f64 product of the same
//! quantised operands) and the bit-for-bit comparison of every SIMD path with the scalar one.

#![allow(clippy::unwrap_used)]

use super::acts;
use super::driver::{SimdPath, QK};
use super::{Q4_1Matmul, Q8_0Matmul};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Result, Tensor};
use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;

/// What the harness needs of a matmul type.
pub(crate) trait TestKernel: Sized {
    const DTYPE: GgmlDType;
    /// Bytes of one GGUF block of 32 values.
    const BLOCK_BYTES: usize;
    fn build(w: &QTensor) -> Result<Self>;
    fn with(self, path: SimdPath) -> Result<Self>;
    fn run(&self, x: &Tensor) -> Result<Tensor>;
    fn run_f32(&self, x: &[f32], m: usize, dst: &mut [f32]) -> Result<()>;
    /// Exact value of one GGUF block (raw bytes) dotted with one Q8_1 activation block.
    fn exact_block(raw: &[u8], xq: &[i8], dx: f32, sx: f32) -> f64;
}

fn f16_at(raw: &[u8], at: usize) -> f64 {
    f16::from_le_bytes([raw[at], raw[at + 1]]).to_f64()
}

impl TestKernel for Q4_1Matmul {
    const DTYPE: GgmlDType = GgmlDType::Q4_1;
    const BLOCK_BYTES: usize = 20;
    fn build(w: &QTensor) -> Result<Self> {
        Self::new(w)
    }
    fn with(self, path: SimdPath) -> Result<Self> {
        self.with_path(path)
    }
    fn run(&self, x: &Tensor) -> Result<Tensor> {
        self.forward(x)
    }
    fn run_f32(&self, x: &[f32], m: usize, dst: &mut [f32]) -> Result<()> {
        self.matmul_f32(x, m, dst)
    }
    fn exact_block(raw: &[u8], xq: &[i8], dx: f32, sx: f32) -> f64 {
        let mut isum = 0i64;
        for t in 0..16 {
            isum += i64::from(raw[4 + t] & 0xF) * i64::from(xq[t]);
            isum += i64::from(raw[4 + t] >> 4) * i64::from(xq[t + 16]);
        }
        f16_at(raw, 0) * f64::from(dx) * isum as f64 + f16_at(raw, 2) * f64::from(sx)
    }
}

impl TestKernel for Q8_0Matmul {
    const DTYPE: GgmlDType = GgmlDType::Q8_0;
    const BLOCK_BYTES: usize = 34;
    fn build(w: &QTensor) -> Result<Self> {
        Self::new(w)
    }
    fn with(self, path: SimdPath) -> Result<Self> {
        self.with_path(path)
    }
    fn run(&self, x: &Tensor) -> Result<Tensor> {
        self.forward(x)
    }
    fn run_f32(&self, x: &[f32], m: usize, dst: &mut [f32]) -> Result<()> {
        self.matmul_f32(x, m, dst)
    }
    fn exact_block(raw: &[u8], xq: &[i8], dx: f32, _sx: f32) -> f64 {
        let isum: i64 = (0..QK)
            .map(|t| i64::from(raw[2 + t] as i8) * i64::from(xq[t]))
            .sum();
        f16_at(raw, 0) * f64::from(dx) * isum as f64
    }
}

/// Uniform values in [-1, 1] with a per-row scale in [0.1, 2] and a per-row offset, so the
/// block scales, Q4_1 offsets and row magnitudes vary as in trained weights.
pub(crate) fn random_matrix(rows: usize, cols: usize, seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v = Vec::with_capacity(rows * cols);
    for _ in 0..rows {
        let scale = rng.random_range(0.1f32..2.0);
        let offset = rng.random_range(-0.3f32..0.3);
        v.extend((0..cols).map(|_| scale * rng.random_range(-1f32..1.0) + offset));
    }
    Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
}

pub(crate) fn quantized<K: TestKernel>(n: usize, k: usize, seed: u64) -> Arc<QTensor> {
    Arc::new(QTensor::quantize(&random_matrix(n, k, seed), K::DTYPE).unwrap())
}

pub(crate) fn to_vec(t: &Tensor) -> Vec<f32> {
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

pub(crate) fn available_paths() -> Vec<SimdPath> {
    [SimdPath::Avx512Vnni, SimdPath::Avx2, SimdPath::Scalar]
        .into_iter()
        .filter(|p| p.is_available())
        .collect()
}

/// Exact (f64) product of the Q8_1 activations our quantiser produces with the GGUF blocks,
/// so only f32 accumulation rounding separates it from the kernels.
fn exact_reference<K: TestKernel>(w: &QTensor, x: &[f32], m: usize) -> Vec<f32> {
    let (n, k) = w.shape().dims2().unwrap();
    let nb = k / QK;
    let acts = acts::quantize(SimdPath::Scalar, x, m, k);
    let raw = w.data().unwrap();
    let mut out = vec![0f32; m * n];
    for j in 0..n {
        for i in 0..m {
            let mut acc = 0f64;
            for b in 0..nb {
                let at = (j * nb + b) * K::BLOCK_BYTES;
                let [dx, sx] = acts.ds[i * nb + b];
                let xq = &acts.qs[(i * nb + b) * QK..(i * nb + b + 1) * QK];
                acc += K::exact_block(&raw[at..at + K::BLOCK_BYTES], xq, dx, sx);
            }
            out[i * n + j] = acc as f32;
        }
    }
    out
}

/// Checks an `(m, k) x (n, k)ᵀ` product against every reference, on every path.
pub(crate) fn check_shape<K: TestKernel>(m: usize, k: usize, n: usize, seed: u64) {
    let w = quantized::<K>(n, k, seed);
    let mm = K::build(&w).unwrap();
    let x = random_matrix(m, k, seed + 1);
    let ours = to_vec(&mm.run(&x).unwrap());
    let x_vec = to_vec(&x);
    let w_f32 = w.dequantize(&Device::Cpu).unwrap();
    let what = |against: &str| format!("{:?} m={m} k={k} n={n} vs {against}", K::DTYPE);

    // sum_k |w_jk x_ik|: the scale against which f32 rounding and f16 scale rounding count.
    let abs_prod = x.abs().unwrap().matmul(&w_f32.abs().unwrap().t().unwrap());
    let abs_prod = to_vec(&abs_prod.unwrap());
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
    assert_within(&ours, &reference, &bound, &what("f32 matmul"));

    // candle's QMatMul quantises the activations the same way but rounds their scales to
    // f16 (relative error up to 2^-11). Its debug build asserts an even number of blocks.
    if nb.is_multiple_of(2) {
        let theirs = to_vec(&QMatMul::from_arc(w.clone()).unwrap().forward(&x).unwrap());
        assert_within(&ours, &theirs, &scaled(2e-3), &what("candle QMatMul"));
    }

    // Same quantised operands, exact arithmetic: only f32 rounding left.
    let exact = exact_reference::<K>(&w, &x_vec, m);
    assert_within(&ours, &exact, &scaled(1e-5), &what("exact product"));

    // Every path gives the scalar path's bits.
    let run = |path: SimdPath| {
        let mm = K::build(&w).unwrap().with(path).unwrap();
        let mut out = vec![0f32; m * n];
        mm.run_f32(&x_vec, m, &mut out).unwrap();
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
            "{}: {path:?} differs from the scalar path",
            what("scalar")
        );
    }
}

/// The default model's shapes and the edge cases, for one format.
pub(crate) fn check_all_shapes<K: TestKernel>() {
    let mut seed = 0;
    for &m in &[1, 3, 4, 5, 17, 64] {
        for &k in &[64, 576, 1536] {
            for &n in &[16, 576, 1536] {
                seed += 10;
                check_shape::<K>(m, k, n, seed);
            }
        }
    }
    // n not a multiple of the 16-row tile, k an odd number of blocks, tiny and single-block
    // k, and m * k above the parallel quantisation threshold with m not a multiple of the row
    // chunk.
    for (i, &(m, k, n)) in [
        (1, 32, 1),
        (2, 96, 40),
        (7, 160, 8),
        (9, 576, 200),
        (33, 64, 24),
        (70, 576, 192),
    ]
    .iter()
    .enumerate()
    {
        check_shape::<K>(m, k, n, 1000 + i as u64);
    }
}

/// Leading dimensions, strided input, 1-D input.
pub(crate) fn check_forward_shapes<K: TestKernel>() {
    let w = quantized::<K>(48, 64, 3);
    let mm = K::build(&w).unwrap();
    let x = random_matrix(6, 64, 4);
    let flat = to_vec(&mm.run(&x).unwrap());

    let y3 = mm.run(&x.reshape((2, 3, 64)).unwrap()).unwrap();
    assert_eq!(y3.dims(), &[2, 3, 48]);
    assert_eq!(to_vec(&y3), flat);

    // A transposed (non-contiguous) view of the same values.
    let xt = x.t().unwrap().contiguous().unwrap().t().unwrap();
    assert!(!xt.is_contiguous());
    assert_eq!(to_vec(&mm.run(&xt).unwrap()), flat);

    let y1 = mm.run(&x.get(2).unwrap()).unwrap();
    assert_eq!(y1.dims(), &[48]);
    assert_eq!(to_vec(&y1), flat[2 * 48..3 * 48]);

    // No rows, and all-zero rows.
    let zeros = |m| Tensor::zeros((m, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert_eq!(mm.run(&zeros(0)).unwrap().dims(), &[0, 48]);
    assert!(to_vec(&mm.run(&zeros(2)).unwrap())
        .iter()
        .all(|&v| v == 0.0));
}

/// Wrong `k`, f16 input, wrong slice lengths.
pub(crate) fn check_rejects_bad_input<K: TestKernel>() {
    let mm = K::build(&quantized::<K>(32, 64, 6)).unwrap();
    assert!(mm.run(&random_matrix(2, 96, 7)).is_err(), "wrong k");
    let x16 = random_matrix(2, 64, 8)
        .to_dtype(candle_core::DType::F16)
        .unwrap();
    assert!(mm.run(&x16).is_err(), "f16 input");
    let mut dst = vec![0f32; 3];
    assert!(mm.run_f32(&[0.0; 64], 1, &mut dst).is_err(), "dst size");
}
