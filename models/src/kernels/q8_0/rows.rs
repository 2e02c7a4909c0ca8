//! Row lookups on the packed Q8_0 tiles (see `kernels::rows`).

use candle_core::Result;

use super::super::driver::QK;
use super::super::rows::{dequantize_rows, lane_byte};
use super::{Q8_0Matmul, NAME};

impl Q8_0Matmul {
    /// Dequantizes the given weight rows: `rows.len() * k` values, row-major.
    pub fn dequantize_rows(&self, rows: &[u32]) -> Result<Vec<f32>> {
        dequantize_rows(NAME, (self.n, self.k), rows, |tile, lane, out| {
            let d = self.d[tile][lane].to_f32();
            // Stored offset by +128 for vpdpbusd's unsigned operand.
            out.extend(
                (0..QK).map(|j| d * (lane_byte(&self.qs[tile].qs, lane, j) as i32 - 128) as f32),
            );
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::GgmlDType;

    use super::*;

    #[test]
    fn rows_equal_candle_dequantization() -> Result<()> {
        super::super::super::rows::tests::check(GgmlDType::Q8_0, |w, rows| {
            Q8_0Matmul::new(w)?.dequantize_rows(rows)
        })
    }
}
