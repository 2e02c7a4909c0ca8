//! On-the-fly quantisation of f32 activation rows to Q8_1, once per matmul call.
//!
//! Per block of 32 values: `d = max|x| / 127`, `q = round(x / d)` (ties to even) as i8, and
//! `s = d * sum(q)`, the term that multiplies the Q4_1 offset `m`. As in ggml's
//! `quantize_row_q8_1` except that `d` and `s` stay f32 instead of being rounded to f16
//! (free here, and slightly more accurate), and ties round to even so that the scalar and
//! SIMD versions give the same bytes.

use super::pack::QK;
use super::Q4_1Path;

/// The quantised activations of an `(m, k)` matrix, row-major.
pub(crate) struct Q8Rows {
    /// `m * k` quantised values.
    pub(crate) qs: Vec<i8>,
    /// `m * (k / 32)` pairs `[d, s]`, one per block.
    pub(crate) ds: Vec<[f32; 2]>,
}

/// Below this many activation values quantisation stays on the calling thread.
const PAR_MIN_VALUES: usize = 32 * 1024;

/// A pointer to the start of an output buffer that workers write disjoint parts of.
struct SyncPtr<T>(*mut T);
// SAFETY: the pointer is only dereferenced for ranges that exactly one worker owns (see the
// users), and the buffer outlives the pool call.
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// The pointer. (A method, so closures capture the `Sync` wrapper, not the raw field.)
    fn get(&self) -> *mut T {
        self.0
    }
}

/// Quantises `x` (`m` rows of `k` values, `k` a multiple of 32) with `path`'s quantiser.
pub(crate) fn quantize(path: Q4_1Path, x: &[f32], m: usize, k: usize) -> Q8Rows {
    debug_assert_eq!(x.len(), m * k);
    let nb = k / QK;
    let mut qs = vec![0i8; m * k];
    let mut ds = vec![[0f32; 2]; m * nb];
    if m * k < PAR_MIN_VALUES || m == 1 {
        quantize_rows(path, x, &mut qs, &mut ds);
    } else {
        let qs_ptr = SyncPtr(qs.as_mut_ptr());
        let ds_ptr = SyncPtr(ds.as_mut_ptr());
        candle_core::utils::barrier_pool().execute_chunked(m, |rows| {
            let len = rows.end - rows.start;
            // SAFETY: `execute_chunked` hands each row range to exactly one worker, so these
            // sub-slices of `qs` and `ds` (both sized for `m` rows above) never overlap, and
            // both vectors outlive the call.
            let (qs, ds) = unsafe {
                (
                    std::slice::from_raw_parts_mut(qs_ptr.get().add(rows.start * k), len * k),
                    std::slice::from_raw_parts_mut(ds_ptr.get().add(rows.start * nb), len * nb),
                )
            };
            quantize_rows(path, &x[rows.start * k..rows.end * k], qs, ds);
        });
    }
    Q8Rows { qs, ds }
}

/// Quantises whole blocks: `x.len() == qs.len() == 32 * ds.len()`.
fn quantize_rows(path: Q4_1Path, x: &[f32], qs: &mut [i8], ds: &mut [[f32; 2]]) {
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a `Q4_1Path` other than `Scalar` only exists once its CPU features were
        // detected (see `Q4_1Path::is_available`).
        Q4_1Path::Avx512Vnni => unsafe { avx512::quantize(x, qs, ds) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Q4_1Path::Avx2 => unsafe { quantize_avx2(x, qs, ds) },
        _ => quantize_scalar(x, qs, ds),
    }
}

/// The reference quantiser; every SIMD version must produce the same bytes.
#[inline(always)]
pub(crate) fn quantize_scalar(x: &[f32], qs: &mut [i8], ds: &mut [[f32; 2]]) {
    for ((x, q), ds) in x
        .chunks_exact(QK)
        .zip(qs.chunks_exact_mut(QK))
        .zip(ds.iter_mut())
    {
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in q.iter_mut().zip(x) {
            // |v * id| <= 127 (up to rounding), so the cast never saturates.
            let qi = (v * id).round_ties_even() as i32;
            *q = qi as i8;
            sum += qi;
        }
        *ds = [d, d * sum as f32];
    }
}

/// The scalar quantiser compiled for AVX2, which lets the compiler vectorise it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn quantize_avx2(x: &[f32], qs: &mut [i8], ds: &mut [[f32; 2]]) {
    quantize_scalar(x, qs, ds)
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::QK;
    use std::arch::x86_64::*;

    /// AVX-512 version of [`super::quantize_scalar`], same output bytes.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) fn quantize(x: &[f32], qs: &mut [i8], ds: &mut [[f32; 2]]) {
        let nb = ds.len();
        assert!(x.len() >= nb * QK && qs.len() >= nb * QK);
        for (b, ds) in ds.iter_mut().enumerate() {
            // SAFETY: block `b` covers x[32b..32b+32] and qs[32b..32b+32], in bounds by the
            // assert above; the loads and stores are unaligned.
            unsafe {
                let xp = x.as_ptr().add(b * QK);
                let v0 = _mm512_loadu_ps(xp);
                let v1 = _mm512_loadu_ps(xp.add(16));
                let amax =
                    _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
                let d = amax / 127.0;
                let id = _mm512_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
                const RNE: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
                let q0 = _mm512_cvt_roundps_epi32::<RNE>(_mm512_mul_ps(v0, id));
                let q1 = _mm512_cvt_roundps_epi32::<RNE>(_mm512_mul_ps(v1, id));
                let qp = qs.as_mut_ptr().add(b * QK);
                _mm_storeu_si128(qp.cast(), _mm512_cvtepi32_epi8(q0));
                _mm_storeu_si128(qp.add(16).cast(), _mm512_cvtepi32_epi8(q1));
                let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
                *ds = [d, d * sum as f32];
            }
        }
    }
}
