//! Reading rows back out of the packed Q8_0 tiles: the tied embedding of the default model is
//! the LM head's Q8_0 matrix, so token lookups read the same packed copy the matmul uses.

use candle_core::{bail, Result};

use super::super::driver::{QK, TILE_ROWS};
use super::Q8_0Matmul;

impl Q8_0Matmul {
    /// Dequantizes the given weight rows: `rows.len() * k` values, row-major.
    pub fn dequantize_rows(&self, rows: &[u32]) -> Result<Vec<f32>> {
        let nb = self.k / QK;
        let mut out = Vec::with_capacity(rows.len() * self.k);
        for &r in rows {
            let r = r as usize;
            if r >= self.n {
                bail!("q8_0 rows: row {r} of a matrix with {} rows", self.n)
            }
            let (g, lane) = (r / TILE_ROWS, r % TILE_ROWS);
            for b in g * nb..(g + 1) * nb {
                let (tile, d) = (&self.qs[b], self.d[b][lane].to_f32());
                // Stored offset by +128 for vpdpbusd's unsigned operand.
                out.extend(
                    (0..QK).map(|j| {
                        d * (tile.qs[64 * (j / 4) + 4 * lane + j % 4] as i32 - 128) as f32
                    }),
                );
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    use super::*;

    #[test]
    fn rows_equal_candle_dequantization() -> Result<()> {
        let v: Vec<f32> = (0..40 * 64)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let w = QTensor::quantize(
            &Tensor::from_vec(v, (40, 64), &Device::Cpu)?,
            GgmlDType::Q8_0,
        )?;
        let want: Vec<Vec<f32>> = w.dequantize(&Device::Cpu)?.to_vec2()?;
        let mm = Q8_0Matmul::try_new(&w)?.expect("cpu q8_0");
        let got = mm.dequantize_rows(&[3, 16, 39])?;
        assert_eq!(&got[..64], &want[3][..]);
        assert_eq!(&got[64..128], &want[16][..]);
        assert_eq!(&got[128..], &want[39][..]);
        Ok(())
    }
}
