//! Portable reference micro-kernel. The SIMD kernels reproduce its arithmetic exactly (same
//! integer block sums, same f32 operation order with fused multiply-adds), so tests compare
//! them bit for bit.

use super::pack::PackedBlock;
use crate::kernels::acts::ActRows;
use crate::kernels::driver::{QK, TILE_ROWS};

/// `out[r * C + c][l]` = dot product of activation row `r` with weight row `16c + l` of the
/// tile, over `nb` blocks. `w` holds `C` groups of `nb` blocks, `x` the `R` activation rows.
pub(super) fn tile<const R: usize, const C: usize>(
    w: &[PackedBlock],
    nb: usize,
    x: ActRows<'_>,
    out: &mut [[f32; TILE_ROWS]],
) {
    let (xq, xd) = (x.qs, x.ds);
    for r in 0..R {
        for c in 0..C {
            for (lane, out) in out[r * C + c].iter_mut().enumerate() {
                let mut acc = 0f32;
                for b in 0..nb {
                    let blk = &w[c * nb + b];
                    let x = &xq[(r * nb + b) * QK..(r * nb + b + 1) * QK];
                    let mut isum = 0i32;
                    for chunk in 0..4 {
                        for t in 0..4 {
                            let byte = blk.qs[64 * chunk + 4 * lane + t];
                            let j = 4 * chunk + t;
                            isum += i32::from(byte & 0x0F) * i32::from(x[j]);
                            isum += i32::from(byte >> 4) * i32::from(x[j + 16]);
                        }
                    }
                    let [dx, sx] = xd[r * nb + b];
                    let dd = blk.d[lane].to_f32() * dx;
                    acc = (isum as f32).mul_add(dd, acc);
                    acc = blk.m[lane].to_f32().mul_add(sx, acc);
                }
                *out = acc;
            }
        }
    }
}
