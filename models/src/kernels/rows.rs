//! Reading weight rows back out of packed 16-row tiles, so a linear layer keeps no second copy
//! of its weights for embedding lookups (the default model's tied embedding is its LM head)
//! or for trainers that want them dense.

use candle_core::{bail, Result};

use super::driver::{QK, TILE_ROWS};

/// Dequantizes `rows` of an `(n, k)` packed matrix: `rows.len() * k` values, row-major.
/// `block(tile, lane, out)` appends the 32 values of lane `lane` of tile `tile` (tiles are
/// group-major: tile `g * (k / 32) + b` holds block `b` of rows `16g..16g+16`).
pub(crate) fn dequantize_rows(
    name: &str,
    (n, k): (usize, usize),
    rows: &[u32],
    mut block: impl FnMut(usize, usize, &mut Vec<f32>),
) -> Result<Vec<f32>> {
    let nb = k / QK;
    let mut out = Vec::with_capacity(rows.len() * k);
    for &r in rows {
        let r = r as usize;
        if r >= n {
            bail!("{name}: row {r} of a matrix with {n} rows")
        }
        let (g, lane) = (r / TILE_ROWS, r % TILE_ROWS);
        for tile in g * nb..(g + 1) * nb {
            block(tile, lane, &mut out);
        }
    }
    Ok(out)
}

/// The byte holding value `j` (0..32 for 8-bit tiles; 0..16 for 4-bit tiles, whose high nibble
/// is value `j + 16`) of lane `lane` in a tile's 64-byte chunks.
pub(crate) fn lane_byte(qs: &[u8], lane: usize, j: usize) -> u8 {
    qs[64 * (j / 4) + 4 * lane + j % 4]
}

#[cfg(test)]
pub(crate) mod tests {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Result, Tensor};

    /// Checks `rows_of(w, rows)` against candle's dequantization of a 40 x 64 matrix.
    pub(crate) fn check(
        dtype: GgmlDType,
        rows_of: impl Fn(&QTensor, &[u32]) -> Result<Vec<f32>>,
    ) -> Result<()> {
        let v: Vec<f32> = (0..40 * 64)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let w = QTensor::quantize(&Tensor::from_vec(v, (40, 64), &Device::Cpu)?, dtype)?;
        let want: Vec<Vec<f32>> = w.dequantize(&Device::Cpu)?.to_vec2()?;
        let got = rows_of(&w, &[0, 17, 39])?;
        assert_eq!(&got[..64], &want[0][..]);
        assert_eq!(&got[64..128], &want[17][..]);
        assert_eq!(&got[128..], &want[39][..]);
        assert!(rows_of(&w, &[40]).is_err());
        Ok(())
    }
}
