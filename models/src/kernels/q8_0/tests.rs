//! Q8_0 matmul against the shared references (see `kernels::testutil`).

#![allow(clippy::unwrap_used)]

use super::*;
use crate::kernels::testutil::{self, random_matrix};
use candle_core::quantized::QTensor;

#[test]
fn matches_references_over_model_and_edge_shapes() {
    testutil::check_all_shapes::<Q8_0Matmul>();
}

#[test]
fn matches_references_on_vocab_sized_output() {
    testutil::check_shape::<Q8_0Matmul>(1, 576, 49152, 8);
}

#[test]
fn forward_keeps_leading_dims_and_accepts_strided_input() {
    testutil::check_forward_shapes::<Q8_0Matmul>();
}

#[test]
fn rejects_bad_input() {
    testutil::check_rejects_bad_input::<Q8_0Matmul>();
}

#[test]
fn declines_other_weight_types() {
    let q4_1 = QTensor::quantize(&random_matrix(32, 64, 5), GgmlDType::Q4_1).unwrap();
    assert!(Q8_0Matmul::try_new(&q4_1).unwrap().is_none());
    assert!(Q8_0Matmul::new(&q4_1).is_err());
}

#[test]
fn extreme_weights_do_not_saturate() {
    // Weights of -128 and 127 against activations of +-127: the AVX2 pair sums reach
    // 2 * 128 * 127, right under i16::MAX, and must stay exact on every path.
    let (n, k) = (16, 64);
    let nb = k / QK;
    let wq = |row: usize, j: usize| {
        if (row + j).is_multiple_of(2) {
            -128i32
        } else {
            127
        }
    };
    let mut raw = Vec::with_capacity(n * nb * BLOCK_BYTES);
    for row in 0..n {
        for b in 0..nb {
            raw.extend(f16::from_f32(0.5).to_le_bytes());
            raw.extend((0..QK).map(|j| wq(row, b * QK + j) as i8 as u8));
        }
    }
    let storage = candle_core::quantized::QStorage::from_data(
        std::borrow::Cow::Borrowed(&raw),
        &candle_core::Device::Cpu,
        GgmlDType::Q8_0,
    )
    .unwrap();
    let w = QTensor::new(storage, (n, k)).unwrap();
    // x = -1, +1, ...: quantised to -127, +127 with d = 1/127.
    let x: Vec<f32> = (0..k)
        .map(|j| if j.is_multiple_of(2) { -1.0 } else { 1.0 })
        .collect();
    let xq = |j: usize| if j.is_multiple_of(2) { -127 } else { 127 };
    let expected: Vec<f32> = (0..n)
        .map(|row| {
            let isum: i32 = (0..k).map(|j| wq(row, j) * xq(j)).sum();
            isum as f32 * 0.5 / 127.0
        })
        .collect();
    let mut scalar = vec![0f32; n];
    let mm = Q8_0Matmul::new(&w)
        .unwrap()
        .with_path(SimdPath::Scalar)
        .unwrap();
    mm.matmul_f32(&x, 1, &mut scalar).unwrap();
    for (a, b) in scalar.iter().zip(&expected) {
        assert!((a - b).abs() <= 1e-5 * b.abs(), "{a} vs {b}");
    }
    for path in testutil::available_paths() {
        let mm = Q8_0Matmul::new(&w).unwrap().with_path(path).unwrap();
        let mut out = vec![0f32; n];
        mm.matmul_f32(&x, 1, &mut out).unwrap();
        assert_eq!(out, scalar, "{path:?}");
    }
}

#[test]
fn rows_equal_candle_dequantization() -> Result<()> {
    crate::kernels::rows::tests::check(GgmlDType::Q8_0, |w, rows| {
        Q8_0Matmul::new(w)?.dequantize_rows(rows)
    })
}
