//! Q4_1 matmul against the shared references (see `kernels::testutil`).

#![allow(clippy::unwrap_used)]

use super::*;
use crate::kernels::testutil::{self, random_matrix};
use candle_core::quantized::QTensor;

#[test]
fn matches_references_over_model_and_edge_shapes() {
    testutil::check_all_shapes::<Q4_1Matmul>();
}

#[test]
fn matches_references_on_vocab_sized_output() {
    testutil::check_shape::<Q4_1Matmul>(1, 576, 49152, 7);
}

#[test]
fn forward_keeps_leading_dims_and_accepts_strided_input() {
    testutil::check_forward_shapes::<Q4_1Matmul>();
}

#[test]
fn rejects_bad_input() {
    testutil::check_rejects_bad_input::<Q4_1Matmul>();
}

#[test]
fn declines_other_weight_types() {
    let q8_0 = QTensor::quantize(&random_matrix(32, 64, 5), GgmlDType::Q8_0).unwrap();
    assert!(Q4_1Matmul::try_new(&q8_0).unwrap().is_none());
    assert!(Q4_1Matmul::new(&q8_0).is_err());
}

#[test]
fn packing_transposes_rows_into_lanes() {
    // Row r of a (20, 64) matrix: block 1 of row 17 lands in group 1, lane 1.
    let w = testutil::quantized::<Q4_1Matmul>(20, 64, 11);
    let raw = w.data().unwrap();
    let mm = Q4_1Matmul::new(&w).unwrap();
    let (row, b, nb) = (17, 1, 2);
    let src = &raw[(row * nb + b) * 20..(row * nb + b + 1) * 20];
    let tile = &mm.tiles().0[nb + b];
    assert_eq!(tile.d[1].to_bits(), u16::from_le_bytes([src[0], src[1]]));
    assert_eq!(tile.m[1].to_bits(), u16::from_le_bytes([src[2], src[3]]));
    for j in 0..16 {
        assert_eq!(tile.qs[64 * (j / 4) + 4 + j % 4], src[4 + j]);
    }
    // Lanes past n = 20 are zero.
    assert!(mm.tiles().0[nb].d[4..].iter().all(|d| d.to_bits() == 0));
}

#[test]
fn rows_equal_candle_dequantization() -> Result<()> {
    crate::kernels::rows::tests::check(GgmlDType::Q4_1, |w, rows| {
        Q4_1Matmul::new(w)?.dequantize_rows(rows)
    })
}
