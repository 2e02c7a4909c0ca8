//! Hand-vectorised parts of the attention kernel: the scores `s_j = (q · k_j) * scale` for
//! `d` a multiple of 16, bit for bit the portable [`dot`]: the same 16 lanes of `mul_add`s and
//! the same reduction tree. Four keys go at a time so that their reductions share shuffles (a
//! 4x4 transpose-and-add) instead of paying a horizontal sum each. On AVX-512, packed caches
//! (f16, bf16, q8_0) are read in place, 16 values widened per load, for the scores and for the
//! value sum: the widening is exact or (q8_0) the same single rounding as
//! [`Stored::widen`], so the bits are the f32 kernel's on the widened values.

use std::arch::x86_64::*;

use half::{bf16, f16};

use super::cached::{Block, Stored};
use super::{dot, LANES};
use crate::kv_cache::{Q8_BLOCK, Q8_BLOCK_BYTES};

/// A stored element type the AVX-512 loops widen as they load.
pub(super) trait Load16: Stored {
    /// Values `c..c + 16` of a stored row of `d` values, widened to f32.
    ///
    /// # Safety
    /// AVX-512F is available, `c` is a multiple of 16 and `c + 16 <= d`.
    unsafe fn load16(row: &[Self], c: usize) -> __m512;
}

impl Load16 for f32 {
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16(row: &[Self], c: usize) -> __m512 {
        // SAFETY: the caller keeps c + 16 within the row.
        unsafe { _mm512_loadu_ps(row.as_ptr().add(c)) }
    }
}

impl Load16 for f16 {
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16(row: &[Self], c: usize) -> __m512 {
        // SAFETY: as for f32; 16 f16 values are 256 bits.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(row.as_ptr().add(c).cast())) }
    }
}

impl Load16 for bf16 {
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16(row: &[Self], c: usize) -> __m512 {
        // SAFETY: as for f16. A bf16 is the upper half of an f32.
        let x = unsafe { _mm256_loadu_si256(row.as_ptr().add(c).cast()) };
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(x)))
    }
}

/// `u8`: q8_0 blocks; values `c..c + 16` lie in block `c / 32`, after its 2-byte scale.
impl Load16 for u8 {
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16(row: &[Self], c: usize) -> __m512 {
        let block = c / Q8_BLOCK * Q8_BLOCK_BYTES;
        // The f16 scale widened in the register, in every lane (a library call per load, as
        // `f16::to_f32` makes without F16C enabled crate-wide, cost two thirds of the speed).
        let bits = i16::from_le_bytes([row[block], row[block + 1]]);
        let scale = _mm512_cvtph_ps(_mm256_set1_epi16(bits));
        // SAFETY: the 16 bytes lie inside the block: c % 32 is 0 or 16, and a block holds 32.
        let q = unsafe { _mm_loadu_si128(row.as_ptr().add(block + 2 + c % Q8_BLOCK).cast()) };
        _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), scale)
    }
}

/// [`dot`] of `q` with a stored row widened first (at most 512 values), for the keys left
/// over after the groups of four.
fn dot_stored<E: Stored>(q: &[f32], row: &[E]) -> f32 {
    let mut wide = [0f32; 512];
    let wide = &mut wide[..q.len()];
    E::widen(row, wide);
    dot(q, wide)
}

/// The scores of the first `s.len()` keys of `k` against `q`, into `s`.
#[target_feature(enable = "avx512f")]
pub(super) fn scores_avx512<E: Load16>(q: &[f32], k: Block<'_, E>, scale: f32, s: &mut [f32]) {
    let d = q.len();
    assert!(d.is_multiple_of(LANES) && d <= 512 && k.len == E::row_len(d));
    let vscale = _mm512_set1_ps(scale);
    // Lane 0 of each 128-bit quarter, where the reduction leaves each key's sum.
    let firsts = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    let mut quads = s.chunks_exact_mut(4);
    let mut j = 0;
    for out in &mut quads {
        let rows = [k.row(j), k.row(j + 1), k.row(j + 2), k.row(j + 3)];
        let mut acc = [_mm512_setzero_ps(); 4];
        for c in (0..d).step_by(LANES) {
            // SAFETY: c + 16 <= d, the length of `q` and the values of every key row.
            let qv = unsafe { _mm512_loadu_ps(q.as_ptr().add(c)) };
            for (a, row) in acc.iter_mut().zip(&rows) {
                // SAFETY: as above; AVX-512F is enabled here.
                let kv = unsafe { E::load16(row, c) };
                *a = _mm512_fmadd_ps(qv, kv, *a);
            }
        }
        let r = reduce_quad(acc, firsts, vscale);
        // SAFETY: `out` holds 4 values.
        unsafe { _mm_storeu_ps(out.as_mut_ptr(), r) };
        j += 4;
    }
    for (j, s) in (j..).zip(quads.into_remainder()) {
        *s = dot_stored(q, k.row(j)) * scale;
    }
}

/// Four keys' 16-lane sums reduced to one score each, times `vscale`, in the portable
/// [`hsum`](super::hsum)'s order.
#[target_feature(enable = "avx512f")]
fn reduce_quad(acc: [__m512; 4], firsts: __m512i, vscale: __m512) -> __m128 {
    // Lanes l + l+8 of two keys at once: [a0..8 b0..8] + [a8..16 b8..16].
    let ab = _mm512_add_ps(
        _mm512_shuffle_f32x4::<0x44>(acc[0], acc[1]),
        _mm512_shuffle_f32x4::<0xEE>(acc[0], acc[1]),
    );
    let cd = _mm512_add_ps(
        _mm512_shuffle_f32x4::<0x44>(acc[2], acc[3]),
        _mm512_shuffle_f32x4::<0xEE>(acc[2], acc[3]),
    );
    // Then l + l+4, leaving one 128-bit quarter per key: [qa qb qc qd].
    let quarters = _mm512_add_ps(
        _mm512_shuffle_f32x4::<0x88>(ab, cd),
        _mm512_shuffle_f32x4::<0xDD>(ab, cd),
    );
    // (q0 + q2) + (q1 + q3) in every lane of each quarter.
    let r = _mm512_add_ps(quarters, _mm512_permute_ps::<0x4E>(quarters));
    let r = _mm512_add_ps(r, _mm512_permute_ps::<0xB1>(r));
    let r = _mm512_mul_ps(_mm512_permutexvar_ps(firsts, r), vscale);
    _mm512_castps512_ps128(r)
}

/// [`value_sum`](super::value_sum) for a stored block of `N * 16`-value rows, widened 16
/// values per load: the same multiply-adds per lane into the same even/odd accumulators
/// (held in `2 * N` registers), so the same bits.
#[target_feature(enable = "avx512f")]
pub(super) fn value_sum_avx512<E: Load16, const N: usize>(
    p: &[f32],
    v: Block<'_, E>,
    odd_first: bool,
    even: &mut [f32],
    odd: &mut [f32],
) {
    let d = N * LANES;
    assert!(v.len == E::row_len(d) && even.len() >= d && odd.len() >= d);
    // SAFETY: r < N, so r * 16 + 16 <= d, the length of `even` and `odd`.
    let mut a0: [__m512; N] =
        std::array::from_fn(|r| unsafe { _mm512_loadu_ps(even.as_ptr().add(r * LANES)) });
    let mut a1: [__m512; N] =
        std::array::from_fn(|r| unsafe { _mm512_loadu_ps(odd.as_ptr().add(r * LANES)) });
    let (mut p, mut j) = (p, 0);
    if let (true, Some((w, rest))) = (odd_first, p.split_first()) {
        add_row(&mut a1, *w, v.row(j));
        (p, j) = (rest, j + 1);
    }
    let mut pairs = p.chunks_exact(2);
    for w in &mut pairs {
        add_row(&mut a0, w[0], v.row(j));
        add_row(&mut a1, w[1], v.row(j + 1));
        j += 2;
    }
    if let [w] = pairs.remainder() {
        add_row(&mut a0, *w, v.row(j));
    }
    for r in 0..N {
        // SAFETY: as for the loads.
        unsafe {
            _mm512_storeu_ps(even.as_mut_ptr().add(r * LANES), a0[r]);
            _mm512_storeu_ps(odd.as_mut_ptr().add(r * LANES), a1[r]);
        }
    }
}

/// `acc += w * row`, the row (`N * 16` values, as stored) widened by the loads.
#[target_feature(enable = "avx512f")]
#[inline]
fn add_row<E: Load16, const N: usize>(acc: &mut [__m512; N], w: f32, row: &[E]) {
    assert!(row.len() >= E::row_len(N * LANES));
    let w = _mm512_set1_ps(w);
    for (r, a) in acc.iter_mut().enumerate() {
        // SAFETY: r * 16 + 16 <= N * 16, the row's values.
        let x = unsafe { E::load16(row, r * LANES) };
        *a = _mm512_fmadd_ps(w, x, *a);
    }
}

#[target_feature(enable = "avx2,fma")]
pub(super) fn scores_avx2(q: &[f32], k: Block<'_>, scale: f32, s: &mut [f32]) {
    let d = q.len();
    assert!(d.is_multiple_of(LANES) && k.len == d);
    let vscale = _mm_set1_ps(scale);
    let mut quads = s.chunks_exact_mut(4);
    let mut j = 0;
    for out in &mut quads {
        let rows = [k.row(j), k.row(j + 1), k.row(j + 2), k.row(j + 3)];
        // Lanes 0..8 and 8..16 of each key's accumulator.
        let mut lo = [_mm256_setzero_ps(); 4];
        let mut hi = [_mm256_setzero_ps(); 4];
        for c in (0..d).step_by(LANES) {
            // SAFETY: c + 16 <= d, the length of `q` and of every key row.
            let (q0, q1) = unsafe {
                let p = q.as_ptr().add(c);
                (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
            };
            for r in 0..4 {
                // SAFETY: as above.
                let (k0, k1) = unsafe {
                    let p = rows[r].as_ptr().add(c);
                    (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
                };
                lo[r] = _mm256_fmadd_ps(q0, k0, lo[r]);
                hi[r] = _mm256_fmadd_ps(q1, k1, hi[r]);
            }
        }
        // Lanes l + l+8, then l + l+4 with two keys per register: [qa qb], [qc qd].
        let h: [__m256; 4] = std::array::from_fn(|r| _mm256_add_ps(lo[r], hi[r]));
        let ab = _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(h[0], h[1]),
            _mm256_permute2f128_ps::<0x31>(h[0], h[1]),
        );
        let cd = _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(h[2], h[3]),
            _mm256_permute2f128_ps::<0x31>(h[2], h[3]),
        );
        // (q0 + q2) + (q1 + q3) in every lane of each 128-bit half.
        let fold = |x: __m256| {
            let r = _mm256_add_ps(x, _mm256_permute_ps::<0x4E>(x));
            _mm256_add_ps(r, _mm256_permute_ps::<0xB1>(r))
        };
        // [a a a a b b b b], [c c c c d d d d] -> [a c a c b d b d] -> [a b c d].
        let m = _mm256_blend_ps::<0xAA>(fold(ab), fold(cd));
        let r = _mm_unpacklo_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let r = _mm_mul_ps(r, vscale);
        // SAFETY: `out` holds 4 values.
        unsafe { _mm_storeu_ps(out.as_mut_ptr(), r) };
        j += 4;
    }
    for (j, s) in (j..).zip(quads.into_remainder()) {
        *s = dot(q, k.row(j)) * scale;
    }
}
