//! AVX512-VNNI micro-kernel: one `vpdpbusd` multiplies 4 unsigned 4-bit weights of each of 16
//! rows by the same 4 signed Q8_1 activations, so a 32-value block of one activation row
//! against one 16-row tile is 8 instructions into a single integer accumulator, scaled into
//! an f32 accumulator once per block. A tile of `R` activation rows by `C` 16-row groups
//! reuses each unpacked weight register `R` times and keeps `R * C` independent chains in
//! flight.

use super::pack::PackedBlock;
use crate::kernels::acts::ActRows;
use crate::kernels::driver::{QK, TILE_ROWS};
use std::arch::x86_64::*;

/// How far ahead (in 320-byte tiles) the single-row kernel prefetches weights.
const PREFETCH_BLOCKS: usize = 8;

/// AVX512-VNNI version of [`super::scalar::tile`], same results bit for bit.
///
/// Callers must check that the CPU supports `avx512f`, `avx512bw` and `avx512vnni`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) fn tile<const R: usize, const C: usize>(
    w: &[PackedBlock],
    nb: usize,
    x: ActRows<'_>,
    out: &mut [[f32; TILE_ROWS]],
) {
    let (xq, xd) = (x.qs, x.ds);
    assert!(w.len() >= C * nb && xq.len() >= R * nb * QK && xd.len() >= R * nb);
    assert!(out.len() >= R * C);
    let split = R * C < 4;
    let low = _mm512_set1_epi8(0x0F);
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    let wp = w.as_ptr();
    let xp = xq.as_ptr();
    for b in 0..nb {
        let mut isum = [[_mm512_setzero_si512(); C]; R];
        // Small tiles have too few independent accumulator chains to hide the `vpdpbusd`
        // latency; they accumulate the high nibbles separately and add once per block.
        let mut isum_hi = [[_mm512_setzero_si512(); C]; R];
        for chunk in 0..4 {
            for c in 0..C {
                if R == 1 && chunk == 0 {
                    // Decoding streams the weights from DRAM once: ask for them a few blocks
                    // ahead. A prefetch never faults, so running past the end is harmless
                    // (`wrapping_add` keeps the address computation itself defined).
                    let ahead = wp.wrapping_add(c * nb + b + PREFETCH_BLOCKS).cast::<i8>();
                    for line in 0..5 {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line));
                    }
                }
                // SAFETY: `c * nb + b < C * nb <= w.len()` (assert above); `PackedBlock` is
                // 64-byte aligned and `qs` starts it, so chunk `chunk` is an aligned 64 bytes.
                let raw = unsafe {
                    _mm512_load_si512((*wp.add(c * nb + b)).qs.as_ptr().add(64 * chunk).cast())
                };
                let lo = _mm512_and_si512(raw, low);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low);
                for (r, (isum, isum_hi)) in isum.iter_mut().zip(&mut isum_hi).enumerate() {
                    // SAFETY: row `r`, block `b` spans xq[(r*nb+b)*32 ..][..32], in bounds by
                    // the assert above; offsets 4*chunk and 16+4*chunk read 4 bytes inside it.
                    let (xl, xh) = unsafe {
                        let x = xp.add((r * nb + b) * QK + 4 * chunk);
                        (
                            x.cast::<i32>().read_unaligned(),
                            x.add(16).cast::<i32>().read_unaligned(),
                        )
                    };
                    isum[c] = _mm512_dpbusd_epi32(isum[c], lo, _mm512_set1_epi32(xl));
                    if split {
                        isum_hi[c] = _mm512_dpbusd_epi32(isum_hi[c], hi, _mm512_set1_epi32(xh));
                    } else {
                        isum[c] = _mm512_dpbusd_epi32(isum[c], hi, _mm512_set1_epi32(xh));
                    }
                }
            }
        }
        if split {
            for (isum, isum_hi) in isum.iter_mut().zip(&isum_hi) {
                for (a, b) in isum.iter_mut().zip(isum_hi) {
                    *a = _mm512_add_epi32(*a, *b);
                }
            }
        }
        for c in 0..C {
            let blk = &w[c * nb + b];
            // SAFETY: `d` and `m` are 16 f16 = 32 bytes each; unaligned loads.
            let (dw, mw) = unsafe {
                (
                    _mm512_cvtph_ps(_mm256_loadu_si256(blk.d.as_ptr().cast())),
                    _mm512_cvtph_ps(_mm256_loadu_si256(blk.m.as_ptr().cast())),
                )
            };
            for r in 0..R {
                let [dx, sx] = xd[r * nb + b];
                let dd = _mm512_mul_ps(dw, _mm512_set1_ps(dx));
                acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[r][c]), dd, acc[r][c]);
                acc[r][c] = _mm512_fmadd_ps(mw, _mm512_set1_ps(sx), acc[r][c]);
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            // SAFETY: `out[r * C + c]` is 16 f32, in bounds by the assert above.
            unsafe { _mm512_storeu_ps(out[r * C + c].as_mut_ptr(), acc[r][c]) };
        }
    }
}
