//! Reading rows back out of the packed Q4_1 tiles, so a linear layer needs no second copy of
//! its weights for embedding lookups or for trainers that want them dense.

use candle_core::{bail, Result};

use super::super::driver::{QK, TILE_ROWS};
use super::Q4_1Matmul;

impl Q4_1Matmul {
    /// Dequantizes the given weight rows: `rows.len() * k` values, row-major.
    pub fn dequantize_rows(&self, rows: &[u32]) -> Result<Vec<f32>> {
        let nb = self.k / QK;
        let mut out = Vec::with_capacity(rows.len() * self.k);
        for &r in rows {
            let r = r as usize;
            if r >= self.n {
                bail!("q4_1 rows: row {r} of a matrix with {} rows", self.n)
            }
            let (g, lane) = (r / TILE_ROWS, r % TILE_ROWS);
            for block in &self.blocks[g * nb..(g + 1) * nb] {
                let (d, m) = (block.d[lane].to_f32(), block.m[lane].to_f32());
                let byte = |j: usize| block.qs[64 * (j / 4) + 4 * lane + j % 4];
                out.extend((0..16).map(|j| d * (byte(j) & 0x0F) as f32 + m));
                out.extend((0..16).map(|j| d * (byte(j) >> 4) as f32 + m));
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
            GgmlDType::Q4_1,
        )?;
        let want: Vec<Vec<f32>> = w.dequantize(&Device::Cpu)?.to_vec2()?;
        let mm = Q4_1Matmul::new(&w)?;
        let got = mm.dequantize_rows(&[0, 17, 39])?;
        assert_eq!(&got[..64], &want[0][..]);
        assert_eq!(&got[64..128], &want[17][..]);
        assert_eq!(&got[128..], &want[39][..]);
        assert!(mm.dequantize_rows(&[40]).is_err());
        Ok(())
    }
}
