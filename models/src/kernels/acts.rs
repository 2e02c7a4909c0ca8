//! On-the-fly quantisation of f32 activation rows to Q8_1, once per matmul call.
//!
//! Per block of 32 values: `d = max|x| / 127`, `q = round(x / d)` (ties to even) as i8, and
//! `s = d * sum(q)`, the term that multiplies the Q4_1 offset `m`. As in ggml's
//! `quantize_row_q8_1` except that `d` and `s` stay f32 instead of being rounded to f16
//! (free here, and slightly more accurate), that ties round to even so that the scalar and
//! SIMD versions give the same bytes, and that the integer `sum(q)` is kept too (the Q8_0
//! kernels use it to undo their +128 weight offset).

use super::driver::{SimdPath, SyncPtr, QK};

/// The quantised activations of an `(m, k)` matrix, row-major.
pub(crate) struct Q8Rows {
    /// `k / 32` blocks per row.
    nb: usize,
    /// `m * k` quantised values.
    pub(crate) qs: Vec<i8>,
    /// `m * (k / 32)` pairs `[d, s]`, one per block.
    pub(crate) ds: Vec<[f32; 2]>,
    /// `m * (k / 32)` integer sums of the block's `qs`.
    pub(crate) sums: Vec<i32>,
}

/// A run of consecutive activation rows of a [`Q8Rows`], as the micro-kernels read them.
#[derive(Clone, Copy)]
pub(crate) struct ActRows<'a> {
    pub(crate) qs: &'a [i8],
    pub(crate) ds: &'a [[f32; 2]],
    pub(crate) sums: &'a [i32],
}

impl Q8Rows {
    /// Rows `r0..r0 + rows`.
    pub(crate) fn rows(&self, r0: usize, rows: usize) -> ActRows<'_> {
        let nb = self.nb;
        ActRows {
            qs: &self.qs[r0 * nb * QK..(r0 + rows) * nb * QK],
            ds: &self.ds[r0 * nb..(r0 + rows) * nb],
            sums: &self.sums[r0 * nb..(r0 + rows) * nb],
        }
    }
}

impl ActRows<'_> {
    /// Row `r`, starting at block 0.
    pub(crate) fn row(&self, r: usize, nb: usize) -> Self {
        ActRows {
            qs: &self.qs[r * nb * QK..],
            ds: &self.ds[r * nb..],
            sums: &self.sums[r * nb..],
        }
    }
}

/// Below this many activation values quantisation stays on the calling thread.
const PAR_MIN_VALUES: usize = 32 * 1024;

/// Quantises `x` (`m` rows of `k` values, `k` a multiple of 32) with `path`'s quantiser.
pub(crate) fn quantize(path: SimdPath, x: &[f32], m: usize, k: usize) -> Q8Rows {
    quantize_passes(path, x, m, k, false)
}

/// The two-pass quantisation of `x` (see `kernels::residual`): `2m` rows, the first `m` as
/// [`quantize`] gives them, row `m + i` the rounding error `x_i - d·q` of row `i`, quantised
/// in turn. One walk over `x`, with no f32 copy of the stacked rows.
pub(crate) fn quantize_two_pass(path: SimdPath, x: &[f32], m: usize, k: usize) -> Q8Rows {
    quantize_passes(path, x, m, k, true)
}

fn quantize_passes(path: SimdPath, x: &[f32], m: usize, k: usize, residual: bool) -> Q8Rows {
    debug_assert_eq!(x.len(), m * k);
    let nb = k / QK;
    let out_rows = if residual { 2 * m } else { m };
    let mut qs = vec![0i8; out_rows * k];
    let mut ds = vec![[0f32; 2]; out_rows * nb];
    let mut sums = vec![0i32; out_rows * nb];
    let out = RowsPtr {
        qs: SyncPtr(qs.as_mut_ptr()),
        ds: SyncPtr(ds.as_mut_ptr()),
        sums: SyncPtr(sums.as_mut_ptr()),
        k,
    };
    let job = |rows: std::ops::Range<usize>| {
        let x = &x[rows.start * k..rows.end * k];
        // SAFETY: each call gets its own range of input rows (`execute_chunked` hands a range
        // to exactly one worker), and writes only output rows `rows` and `m + rows`, sized
        // for above; the vectors outlive the call.
        let (qs, ds, sums) = unsafe { out.rows(rows.clone()) };
        quantize_rows(path, x, qs, ds, sums);
        if residual {
            let mut error = vec![0f32; x.len()];
            for (((e, x), q), &[d, _]) in error
                .chunks_exact_mut(QK)
                .zip(x.chunks_exact(QK))
                .zip(qs.chunks_exact(QK))
                .zip(ds.iter())
            {
                for ((e, &v), &q) in e.iter_mut().zip(x).zip(q) {
                    *e = v - d * f32::from(q);
                }
            }
            // SAFETY: as above.
            let (qs, ds, sums) = unsafe { out.rows(m + rows.start..m + rows.end) };
            quantize_rows(path, &error, qs, ds, sums);
        }
    };
    if m * k < PAR_MIN_VALUES || m == 1 {
        job(0..m);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(m, job);
    }
    Q8Rows { nb, qs, ds, sums }
}

/// The output buffers of a quantisation that workers fill by disjoint row ranges.
struct RowsPtr {
    qs: SyncPtr<i8>,
    ds: SyncPtr<[f32; 2]>,
    sums: SyncPtr<i32>,
    k: usize,
}

impl RowsPtr {
    /// The values, scales and sums of output rows `rows`.
    ///
    /// # Safety
    /// The rows must lie inside the buffers, which must outlive the slices, and no other
    /// slice of the same rows may be alive.
    #[allow(clippy::mut_from_ref)]
    unsafe fn rows(
        &self,
        rows: std::ops::Range<usize>,
    ) -> (&mut [i8], &mut [[f32; 2]], &mut [i32]) {
        let (k, nb, len) = (self.k, self.k / QK, rows.end - rows.start);
        // SAFETY: forwarded from this function's contract.
        unsafe {
            (
                std::slice::from_raw_parts_mut(self.qs.get().add(rows.start * k), len * k),
                std::slice::from_raw_parts_mut(self.ds.get().add(rows.start * nb), len * nb),
                std::slice::from_raw_parts_mut(self.sums.get().add(rows.start * nb), len * nb),
            )
        }
    }
}

/// Quantises whole blocks: `x.len() == qs.len() == 32 * ds.len() == 32 * sums.len()`.
fn quantize_rows(path: SimdPath, x: &[f32], qs: &mut [i8], ds: &mut [[f32; 2]], sums: &mut [i32]) {
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a `SimdPath` other than `Scalar` only reaches here once its CPU features
        // were detected (see `SimdPath::is_available`).
        SimdPath::Avx512Vnni => unsafe { avx512::quantize(x, qs, ds, sums) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        SimdPath::Avx2 => unsafe { quantize_avx2(x, qs, ds, sums) },
        _ => quantize_scalar(x, qs, ds, sums),
    }
}

/// The reference quantiser; every SIMD version must produce the same bytes.
#[inline(always)]
fn quantize_scalar(x: &[f32], qs: &mut [i8], ds: &mut [[f32; 2]], sums: &mut [i32]) {
    for (((x, q), ds), sum) in x
        .chunks_exact(QK)
        .zip(qs.chunks_exact_mut(QK))
        .zip(ds.iter_mut())
        .zip(sums.iter_mut())
    {
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        *sum = 0;
        for (q, &v) in q.iter_mut().zip(x) {
            // |v * id| <= 127 (up to rounding), so the cast never saturates.
            let qi = (v * id).round_ties_even() as i32;
            *q = qi as i8;
            *sum += qi;
        }
        *ds = [d, d * *sum as f32];
    }
}

/// The scalar quantiser compiled for AVX2, which lets the compiler vectorise it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn quantize_avx2(x: &[f32], qs: &mut [i8], ds: &mut [[f32; 2]], sums: &mut [i32]) {
    quantize_scalar(x, qs, ds, sums)
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::QK;
    use std::arch::x86_64::*;

    /// AVX-512 version of [`super::quantize_scalar`], same output bytes.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) fn quantize(x: &[f32], qs: &mut [i8], ds: &mut [[f32; 2]], sums: &mut [i32]) {
        let nb = ds.len();
        assert!(x.len() >= nb * QK && qs.len() >= nb * QK && sums.len() >= nb);
        for (b, (ds, sum)) in ds.iter_mut().zip(sums.iter_mut()).enumerate() {
            // SAFETY: block `b` covers x[32b..32b+32] and qs[32b..32b+32], in bounds by the
            // assert above; the loads and stores are unaligned.
            let (v0, v1) = unsafe {
                let xp = x.as_ptr().add(b * QK);
                (_mm512_loadu_ps(xp), _mm512_loadu_ps(xp.add(16)))
            };
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            let d = amax / 127.0;
            let id = _mm512_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
            const RNE: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
            let q0 = _mm512_cvt_roundps_epi32::<RNE>(_mm512_mul_ps(v0, id));
            let q1 = _mm512_cvt_roundps_epi32::<RNE>(_mm512_mul_ps(v1, id));
            // SAFETY: as above.
            unsafe {
                let qp = qs.as_mut_ptr().add(b * QK);
                _mm_storeu_si128(qp.cast(), _mm512_cvtepi32_epi8(q0));
                _mm_storeu_si128(qp.add(16).cast(), _mm512_cvtepi32_epi8(q1));
            }
            *sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
            *ds = [d, d * *sum as f32];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn available_paths() -> Vec<SimdPath> {
        [SimdPath::Avx512Vnni, SimdPath::Avx2, SimdPath::Scalar]
            .into_iter()
            .filter(|p| p.is_available())
            .collect()
    }

    #[test]
    fn simd_quantisers_match_scalar() {
        let (m, k) = (5, 1536);
        let mut x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        // A zero block, exact ties at .5 after scaling, and a large outlier.
        x[32..64].fill(0.0);
        for (i, v) in x[64..96].iter_mut().enumerate() {
            *v = (i as f32 - 16.0) * 0.5;
        }
        x[95] = 127.0;
        let scalar = quantize(SimdPath::Scalar, &x, m, k);
        for path in available_paths() {
            let q = quantize(path, &x, m, k);
            assert_eq!(q.qs, scalar.qs, "{path:?}");
            assert_eq!(q.sums, scalar.sums, "{path:?}");
            let bits = |v: &[[f32; 2]]| v.iter().flatten().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&q.ds), bits(&scalar.ds), "{path:?}");
        }
        assert!(scalar.qs[32..64].iter().all(|&q| q == 0));
        assert_eq!(scalar.ds[1], [0.0, 0.0]);
        // The tie block: d = 1, values -8, -7.5, ...: ties go to even.
        assert_eq!(&scalar.qs[64..68], &[-8, -8, -7, -6]);
    }

    #[test]
    fn two_pass_rows_are_the_values_then_their_quantised_rounding_error() {
        // 64 x 576 crosses PAR_MIN_VALUES, so the threaded split is covered too.
        for (m, k) in [(1, 96), (64, 576)] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919) % 2003) as f32 / 300.0 - 3.3)
                .collect();
            for path in available_paths() {
                let one = quantize(path, &x, m, k);
                let error: Vec<f32> = x
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| v - one.ds[i / QK][0] * one.qs[i] as f32)
                    .collect();
                let second = quantize(path, &error, m, k);
                let two = quantize_two_pass(path, &x, m, k);
                assert_eq!(two.qs, [one.qs.clone(), second.qs].concat(), "{path:?}");
                assert_eq!(two.sums, [one.sums.clone(), second.sums].concat());
                assert_eq!(two.ds, [one.ds.clone(), second.ds].concat());
                // The error is at most half a step of the first pass, so its scale is tiny.
                assert!(two.ds[m * k / QK][0] <= two.ds[0][0] / 250.0);
            }
        }
    }

    #[test]
    fn quantised_values_reconstruct_within_half_a_step() {
        let (m, k) = (3, 96);
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 31) % 97) as f32 / 10.0 - 4.0)
            .collect();
        let q = quantize(SimdPath::detect(), &x, m, k);
        for (b, ([d, s], sum)) in q.ds.iter().zip(&q.sums).enumerate() {
            let block = &q.qs[b * QK..(b + 1) * QK];
            assert_eq!(*sum, block.iter().map(|&v| i32::from(v)).sum::<i32>());
            assert_eq!(*s, d * *sum as f32);
            for (&qv, &xv) in block.iter().zip(&x[b * QK..(b + 1) * QK]) {
                assert!(
                    (f32::from(qv) * d - xv).abs() <= d / 2.0 * 1.0001,
                    "{qv} {xv} {d}"
                );
            }
        }
    }
}
