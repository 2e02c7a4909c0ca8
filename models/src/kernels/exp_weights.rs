//! The vocabulary-wide loops of sampling: the row maximum and `exp((s - max) / T)` for every
//! token, compiled for the CPU's vector width.
//!
//! A temperature draw over the whole vocabulary (49,152 tokens on the default model) ran libm's
//! scalar `expf` per token: about 0.3 ms per row and step, on the engine thread, between
//! forward passes. The attention kernel's polynomial [`exp_nonpositive`] (relative error
//! below 3e-7) vectorises, and `(s - max) / T <= 0` is always in its domain.

use super::attention::exp_nonpositive;
use super::driver::SimdPath;

/// Lanes of the independent maxima, so the loop compiles to vector compares.
const LANES: usize = 16;

/// The largest value of `x`, NaN ignored; `-inf` for an empty or all-NaN row.
pub fn row_max(x: &[f32]) -> f32 {
    match SimdPath::detect() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a detected `Avx512Vnni` implies AVX-512F.
        SimdPath::Avx512Vnni => unsafe { row_max_avx512(x) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a detected `Avx2` implies AVX2.
        SimdPath::Avx2 => unsafe { row_max_avx2(x) },
        _ => row_max_portable(x),
    }
}

/// `out = [exp((s - max) * inv_t) for s in scores]`, for `max >= every score` and `inv_t > 0`.
pub fn exp_weights_into(scores: &[f32], max: f32, inv_t: f32, out: &mut Vec<f32>) {
    out.clear();
    out.resize(scores.len(), 0.0);
    match SimdPath::detect() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a detected `Avx512Vnni` implies AVX-512F and FMA.
        SimdPath::Avx512Vnni => unsafe { exp_avx512(scores, max, inv_t, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a detected `Avx2` implies AVX2 and FMA.
        SimdPath::Avx2 => unsafe { exp_avx2(scores, max, inv_t, out) },
        _ => exp_portable(scores, max, inv_t, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn row_max_avx512(x: &[f32]) -> f32 {
    row_max_portable(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn row_max_avx2(x: &[f32]) -> f32 {
    row_max_portable(x)
}

#[inline(always)]
fn row_max_portable(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let tail = chunks.remainder().iter();
    tail.chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn exp_avx512(scores: &[f32], max: f32, inv_t: f32, out: &mut [f32]) {
    exp_portable(scores, max, inv_t, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp_avx2(scores: &[f32], max: f32, inv_t: f32, out: &mut [f32]) {
    exp_portable(scores, max, inv_t, out)
}

#[inline(always)]
fn exp_portable(scores: &[f32], max: f32, inv_t: f32, out: &mut [f32]) {
    for (o, &s) in out.iter_mut().zip(scores) {
        *o = exp_nonpositive((s - max) * inv_t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_ignores_nan_and_matches_a_fold() {
        let mut x: Vec<f32> = (0..1003).map(|i| ((i * 37) % 101) as f32 - 50.0).collect();
        x[500] = f32::NAN;
        x[777] = 73.5;
        assert_eq!(row_max(&x), 73.5);
        assert_eq!(row_max(&[]), f32::NEG_INFINITY);
        assert_eq!(row_max(&[f32::NAN, f32::NAN]), f32::NEG_INFINITY);
        assert_eq!(
            row_max(&x[..5]),
            x[..5].iter().copied().fold(f32::MIN, f32::max)
        );
    }

    #[test]
    fn weights_match_libm_exp() {
        let scores: Vec<f32> = (0..999).map(|i| -(i as f32) * 0.07).collect();
        let (mut out, inv_t) = (Vec::new(), 1.0 / 0.7);
        exp_weights_into(&scores, 0.5, inv_t, &mut out);
        for (w, s) in out.iter().zip(&scores) {
            let want = ((s - 0.5) * inv_t).exp();
            assert!((w - want).abs() <= 1e-6 * want.max(1e-30), "{w} vs {want}");
        }
        exp_weights_into(&[f32::NEG_INFINITY], 0.0, 1.0, &mut out);
        assert_eq!(out, [0.0]);
    }
}
