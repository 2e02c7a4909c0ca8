//! Portable reference micro-kernel for Q8_0. The SIMD kernels reproduce its arithmetic exactly
//! (same integer block sums, same f32 operations with fused multiply-adds).

use super::Weights;
use crate::kernels::acts::ActRows;
use crate::kernels::driver::{QK, TILE_ROWS};

/// `out[r * C + c][l]` = dot product of activation row `r` with weight row `16c + l` of the
/// tile, over `nb` blocks. `w` holds `C` groups of `nb` blocks, `x` the `R` activation rows.
pub(super) fn tile<const R: usize, const C: usize>(
    w: Weights<'_>,
    nb: usize,
    x: ActRows<'_>,
    out: &mut [[f32; TILE_ROWS]],
) {
    for r in 0..R {
        for c in 0..C {
            for (lane, out) in out[r * C + c].iter_mut().enumerate() {
                let mut acc = 0f32;
                for b in 0..nb {
                    let tile = &w.qs[c * nb + b].qs;
                    let xq = &x.qs[(r * nb + b) * QK..(r * nb + b + 1) * QK];
                    let isum: i32 = (0..QK)
                        .map(|j| {
                            (i32::from(tile[64 * (j / 4) + 4 * lane + j % 4]) - 128)
                                * i32::from(xq[j])
                        })
                        .sum();
                    let dd = w.d[c * nb + b][lane].to_f32() * x.ds[r * nb + b][0];
                    acc = (isum as f32).mul_add(dd, acc);
                }
                *out = acc;
            }
        }
    }
}
