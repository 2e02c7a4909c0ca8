//! AVX512-VNNI micro-kernel for Q8_0: per 32-value block and 16-row group, 8 `vpdpbusd` of the
//! offset-unsigned weights against broadcast activation quads, then one integer correction
//! (`- 128 * sum(q_x)`) and one scaled accumulation. Same tiling as the Q4_1 kernel.

use super::Weights;
use crate::kernels::acts::ActRows;
use crate::kernels::driver::{QK, TILE_ROWS};
use std::arch::x86_64::*;

/// How far ahead (in 512-byte tiles) the single-row kernel prefetches weights.
const PREFETCH_TILES: usize = 4;

/// AVX512-VNNI version of [`super::scalar::tile`], same results bit for bit.
/// Callers must check that the CPU supports `avx512f`, `avx512bw` and `avx512vnni`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) fn tile<const R: usize, const C: usize>(
    w: Weights<'_>,
    nb: usize,
    x: ActRows<'_>,
    out: &mut [[f32; TILE_ROWS]],
) {
    assert!(w.qs.len() >= C * nb && w.d.len() >= C * nb);
    assert!(x.qs.len() >= R * nb * QK && x.ds.len() >= R * nb && x.sums.len() >= R * nb);
    assert!(out.len() >= R * C);
    // Small tiles have too few independent accumulator chains to hide the `vpdpbusd`
    // latency; they alternate between two accumulators.
    let split = R * C < 4;
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    let wp = w.qs.as_ptr();
    let xp = x.qs.as_ptr();
    for b in 0..nb {
        let mut isum = [[_mm512_setzero_si512(); C]; R];
        let mut isum2 = [[_mm512_setzero_si512(); C]; R];
        for chunk in 0..8 {
            for c in 0..C {
                if R == 1 && chunk % 2 == 0 {
                    // Decoding streams the weights from DRAM once: ask for them a few tiles
                    // ahead. A prefetch never faults, so running past the end is harmless
                    // (`wrapping_add` keeps the address computation itself defined).
                    let ahead = wp.wrapping_add(c * nb + b + PREFETCH_TILES).cast::<i8>();
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * chunk));
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * chunk + 64));
                }
                // SAFETY: `c * nb + b < C * nb <= w.qs.len()` (assert above); `QsTile` is
                // 64-byte aligned, so chunk `chunk` is an aligned 64 bytes inside it.
                let wv = unsafe {
                    _mm512_load_si512((*wp.add(c * nb + b)).qs.as_ptr().add(64 * chunk).cast())
                };
                for (r, (isum, isum2)) in isum.iter_mut().zip(&mut isum2).enumerate() {
                    // SAFETY: row `r`, block `b` spans x.qs[(r*nb+b)*32 ..][..32], in bounds
                    // by the assert above; offset 4*chunk reads 4 bytes inside it.
                    let xv = unsafe {
                        xp.add((r * nb + b) * QK + 4 * chunk)
                            .cast::<i32>()
                            .read_unaligned()
                    };
                    let xv = _mm512_set1_epi32(xv);
                    if split && chunk % 2 == 1 {
                        isum2[c] = _mm512_dpbusd_epi32(isum2[c], wv, xv);
                    } else {
                        isum[c] = _mm512_dpbusd_epi32(isum[c], wv, xv);
                    }
                }
            }
        }
        for c in 0..C {
            // SAFETY: a scale row is 16 f16 = 32 bytes; unaligned load.
            let dw = unsafe { _mm256_loadu_si256(w.d[c * nb + b].as_ptr().cast()) };
            let dw = _mm512_cvtph_ps(dw);
            for r in 0..R {
                let [dx, _] = x.ds[r * nb + b];
                // The exact integer sum: undo the +128 offset of the weights.
                let mut i =
                    _mm512_sub_epi32(isum[r][c], _mm512_set1_epi32(128 * x.sums[r * nb + b]));
                if split {
                    i = _mm512_add_epi32(i, isum2[r][c]);
                }
                let dd = _mm512_mul_ps(dw, _mm512_set1_ps(dx));
                acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), dd, acc[r][c]);
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
