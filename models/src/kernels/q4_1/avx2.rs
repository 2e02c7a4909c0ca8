//! AVX2 micro-kernel for CPUs without AVX512-VNNI: the 16-row tile is handled as two halves of
//! 8 rows, `vpmaddubsw` multiplies the unsigned 4-bit weights by the signed activations into
//! i16 pairs, which are summed in i16 over the whole block (at most 16 products of
//! `15 * 127` per lane, below `i16::MAX`) and widened once per block with `vpmaddwd`.

use super::pack::PackedBlock;
use crate::kernels::acts::ActRows;
use crate::kernels::driver::{QK, TILE_ROWS};
use std::arch::x86_64::*;

/// AVX2 version of [`super::scalar::tile`], same results bit for bit.
///
/// Callers must check that the CPU supports `avx2`, `fma` and `f16c`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn tile<const R: usize, const C: usize>(
    w: &[PackedBlock],
    nb: usize,
    x: ActRows<'_>,
    out: &mut [[f32; TILE_ROWS]],
) {
    let (xq, xd) = (x.qs, x.ds);
    assert!(w.len() >= C * nb && xq.len() >= R * nb * QK && xd.len() >= R * nb);
    assert!(out.len() >= R * C);
    let low = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[[_mm256_setzero_ps(); 2]; C]; R];
    let wp = w.as_ptr();
    let xp = xq.as_ptr();
    for b in 0..nb {
        let mut psum = [[[_mm256_setzero_si256(); 2]; C]; R];
        for chunk in 0..4 {
            for c in 0..C {
                for half in 0..2 {
                    // SAFETY: `c * nb + b < w.len()` (assert above); 32 bytes at offset
                    // 64 * chunk + 32 * half lie inside the 256-byte `qs`.
                    let raw = unsafe {
                        _mm256_loadu_si256(
                            (*wp.add(c * nb + b))
                                .qs
                                .as_ptr()
                                .add(64 * chunk + 32 * half)
                                .cast(),
                        )
                    };
                    let lo = _mm256_and_si256(raw, low);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low);
                    for (r, psum) in psum.iter_mut().enumerate() {
                        // SAFETY: as in the AVX-512 kernel, 4-byte reads inside block `b` of
                        // activation row `r`, in bounds by the assert above.
                        let (xl, xh) = unsafe {
                            let x = xp.add((r * nb + b) * QK + 4 * chunk);
                            (
                                x.cast::<i32>().read_unaligned(),
                                x.add(16).cast::<i32>().read_unaligned(),
                            )
                        };
                        let p = _mm256_add_epi16(
                            _mm256_maddubs_epi16(lo, _mm256_set1_epi32(xl)),
                            _mm256_maddubs_epi16(hi, _mm256_set1_epi32(xh)),
                        );
                        psum[c][half] = _mm256_add_epi16(psum[c][half], p);
                    }
                }
            }
        }
        for c in 0..C {
            let blk = &w[c * nb + b];
            for half in 0..2 {
                // SAFETY: 8 f16 = 16 bytes at lane 8 * half of the 16-entry `d` and `m`.
                let (dw, mw) = unsafe {
                    (
                        _mm256_cvtph_ps(_mm_loadu_si128(blk.d.as_ptr().add(8 * half).cast())),
                        _mm256_cvtph_ps(_mm_loadu_si128(blk.m.as_ptr().add(8 * half).cast())),
                    )
                };
                for r in 0..R {
                    let [dx, sx] = xd[r * nb + b];
                    let isum = _mm256_madd_epi16(psum[r][c][half], ones);
                    let dd = _mm256_mul_ps(dw, _mm256_set1_ps(dx));
                    let a = &mut acc[r][c][half];
                    *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), dd, *a);
                    *a = _mm256_fmadd_ps(mw, _mm256_set1_ps(sx), *a);
                }
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            for (half, acc) in acc[r][c].iter().enumerate() {
                // SAFETY: 8 f32 at lane 8 * half of the 16-entry `out[r * C + c]`, in bounds by
                // the assert above.
                unsafe { _mm256_storeu_ps(out[r * C + c].as_mut_ptr().add(8 * half), *acc) };
            }
        }
    }
}
