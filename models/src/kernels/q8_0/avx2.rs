//! AVX2 micro-kernel for Q8_0 on CPUs without AVX512-VNNI: the 16-row tile is handled as two
//! halves of 8 rows; `vpmaddubsw(|w|, sign(x, w))` multiplies signed by signed bytes (pairs
//! stay within `2 * 128 * 127 < i16::MAX`), `vpmaddwd` widens once per 4-value quad.

use super::Weights;
use crate::kernels::acts::ActRows;
use crate::kernels::driver::{QK, TILE_ROWS};
use std::arch::x86_64::*;

/// AVX2 version of [`super::scalar::tile`], same results bit for bit.
/// Callers must check that the CPU supports `avx2`, `fma` and `f16c`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn tile<const R: usize, const C: usize>(
    w: Weights<'_>,
    nb: usize,
    x: ActRows<'_>,
    out: &mut [[f32; TILE_ROWS]],
) {
    assert!(w.qs.len() >= C * nb && w.d.len() >= C * nb);
    assert!(x.qs.len() >= R * nb * QK && x.ds.len() >= R * nb);
    assert!(out.len() >= R * C);
    let offset = _mm256_set1_epi8(-128);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[[_mm256_setzero_ps(); 2]; C]; R];
    let wp = w.qs.as_ptr();
    let xp = x.qs.as_ptr();
    for b in 0..nb {
        let mut isum = [[[_mm256_setzero_si256(); 2]; C]; R];
        for chunk in 0..8 {
            for c in 0..C {
                for half in 0..2 {
                    // SAFETY: `c * nb + b < w.qs.len()` (assert above); 32 bytes at offset
                    // 64 * chunk + 32 * half lie inside the 512-byte tile.
                    let raw = unsafe {
                        _mm256_loadu_si256(
                            (*wp.add(c * nb + b))
                                .qs
                                .as_ptr()
                                .add(64 * chunk + 32 * half)
                                .cast(),
                        )
                    };
                    // Back to signed: flip the sign bit.
                    let wv = _mm256_xor_si256(raw, offset);
                    let wabs = _mm256_abs_epi8(wv);
                    for (r, isum) in isum.iter_mut().enumerate() {
                        // SAFETY: 4 bytes inside block `b` of activation row `r`, in bounds
                        // by the assert above.
                        let xv = unsafe {
                            xp.add((r * nb + b) * QK + 4 * chunk)
                                .cast::<i32>()
                                .read_unaligned()
                        };
                        let xs = _mm256_sign_epi8(_mm256_set1_epi32(xv), wv);
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, xs), ones);
                        isum[c][half] = _mm256_add_epi32(isum[c][half], p);
                    }
                }
            }
        }
        for c in 0..C {
            for half in 0..2 {
                // SAFETY: 8 f16 = 16 bytes at lane 8 * half of the 16-entry scale row.
                let dw = unsafe {
                    _mm256_cvtph_ps(_mm_loadu_si128(
                        w.d[c * nb + b].as_ptr().add(8 * half).cast(),
                    ))
                };
                for r in 0..R {
                    let dd = _mm256_mul_ps(dw, _mm256_set1_ps(x.ds[r * nb + b][0]));
                    let a = &mut acc[r][c][half];
                    *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r][c][half]), dd, *a);
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
