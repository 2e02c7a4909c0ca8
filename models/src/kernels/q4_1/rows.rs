//! Row lookups on the packed Q4_1 tiles (see `kernels::rows`).

use candle_core::Result;

use super::super::rows::{dequantize_rows, lane_byte};
use super::{Q4_1Matmul, NAME};

impl Q4_1Matmul {
    /// Dequantizes the given weight rows: `rows.len() * k` values, row-major.
    pub fn dequantize_rows(&self, rows: &[u32]) -> Result<Vec<f32>> {
        dequantize_rows(NAME, (self.n, self.k), rows, |tile, lane, out| {
            let block = &self.blocks[tile];
            let (d, m) = (block.d[lane].to_f32(), block.m[lane].to_f32());
            out.extend((0..16).map(|j| d * (lane_byte(&block.qs, lane, j) & 0x0F) as f32 + m));
            out.extend((0..16).map(|j| d * (lane_byte(&block.qs, lane, j) >> 4) as f32 + m));
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::GgmlDType;

    use super::*;

    #[test]
    fn rows_equal_candle_dequantization() -> Result<()> {
        super::super::super::rows::tests::check(GgmlDType::Q4_1, |w, rows| {
            Q4_1Matmul::new(w)?.dequantize_rows(rows)
        })
    }
}
