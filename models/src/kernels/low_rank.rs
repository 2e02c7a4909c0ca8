//! Low-rank deltas `B (A x)` from bf16 factors: the CPU kernel behind LoRA adapters.
//!
//! Decoding is bound by memory traffic: every step reads each selected adapter's factors once,
//! so a batch of eight rows on eight different adapters reads eight adapters' worth of weights
//! beside the base model's. bf16 halves that traffic against f32 (PEFT adapters are saved in
//! f16 or bf16 anyway) and widens to f32 with a shift, which the compiler vectorises.
//!
//! Each token's delta is computed on its own with a fixed summation order, so a row's result
//! never depends on which other rows share its group (the batch-invariance the server promises);
//! a long group (a prefill chunk) is split across threads by token.

use candle_core::Tensor;
use half::bf16;
use rayon::prelude::*;

/// Tokens per parallel task; below twice this a group runs on the calling thread.
const TOKENS_PER_TASK: usize = 8;

/// One projection's factors: `A` (`rank x in`) and `s B^T` (`rank x out`, scaling folded in).
#[derive(Debug, Clone)]
pub struct LowRankBf16 {
    rank: usize,
    inp: usize,
    out: usize,
    a: Vec<u16>,
    bt: Vec<u16>,
}

impl LowRankBf16 {
    /// `a`: `(rank, in)`; `bt`: `(rank, out)`, any float dtype.
    pub fn new(a: &Tensor, bt: &Tensor) -> candle_core::Result<Self> {
        let (rank, inp) = a.dims2()?;
        let (_, out) = bt.dims2()?;
        let narrow = |t: &Tensor| -> candle_core::Result<Vec<u16>> {
            let v = t
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            Ok(v.into_iter().map(|x| bf16::from_f32(x).to_bits()).collect())
        };
        Ok(Self {
            rank,
            inp,
            out,
            a: narrow(a)?,
            bt: narrow(bt)?,
        })
    }

    pub fn out_features(&self) -> usize {
        self.out
    }

    pub fn bytes(&self) -> usize {
        (self.a.len() + self.bt.len()) * std::mem::size_of::<u16>()
    }

    /// `x`: `n x in` row-major; `scales[t]` multiplies token `t`'s delta. Returns the deltas,
    /// `n x out` row-major: `scales[t] * (s B^T)^T (A x_t)`.
    pub fn delta(&self, x: &[f32], scales: &[f32]) -> Vec<f32> {
        let n = scales.len();
        let mut y = vec![0f32; n * self.out];
        let rows = y.chunks_mut(self.out).zip(x.chunks(self.inp)).zip(scales);
        if n < 2 * TOKENS_PER_TASK {
            rows.for_each(|((y_t, x_t), &s)| self.token(x_t, s, y_t));
        } else {
            y.par_chunks_mut(self.out * TOKENS_PER_TASK)
                .zip(x.par_chunks(self.inp * TOKENS_PER_TASK))
                .zip(scales.par_chunks(TOKENS_PER_TASK))
                .for_each(|((ys, xs), ss)| {
                    let rows = ys.chunks_mut(self.out).zip(xs.chunks(self.inp)).zip(ss);
                    rows.for_each(|((y_t, x_t), &s)| self.token(x_t, s, y_t));
                });
        }
        y
    }

    fn token(&self, x: &[f32], scale: f32, y: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { self.token_avx2(x, scale, y) };
        }
        self.token_portable(x, scale, y)
    }

    /// [`Self::token_portable`] compiled for AVX2's 8-lane registers. Same operations in the
    /// same order (no FMA contraction), so results equal the portable path's.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn token_avx2(&self, x: &[f32], scale: f32, y: &mut [f32]) {
        self.token_portable(x, scale, y)
    }

    #[inline(always)]
    fn token_portable(&self, x: &[f32], scale: f32, y: &mut [f32]) {
        for j in 0..self.rank {
            let h = scale * dot(&self.a[j * self.inp..(j + 1) * self.inp], x);
            let b = &self.bt[j * self.out..(j + 1) * self.out];
            for (y_o, &b_o) in y.iter_mut().zip(b) {
                *y_o += h * widen(b_o);
            }
        }
    }
}

#[inline(always)]
fn widen(v: u16) -> f32 {
    f32::from_bits(u32::from(v) << 16)
}

/// `a . x` with 16 independent partial sums (so the compiler can keep them in vector lanes),
/// added in a fixed order.
#[inline(always)]
fn dot(a: &[u16], x: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let (a_main, a_tail) = a.split_at(a.len() / LANES * LANES);
    let (x_main, x_tail) = x.split_at(a_main.len());
    for (ac, xc) in a_main.chunks_exact(LANES).zip(x_main.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += widen(ac[l]) * xc[l];
        }
    }
    let mut sum = acc.iter().sum::<f32>();
    for (&a_i, &x_i) in a_tail.iter().zip(x_tail) {
        sum += widen(a_i) * x_i;
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Seeded values in [-1, 1).
    fn random(rows: usize, cols: usize, seed: u64) -> Tensor {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).expect("tensor")
    }

    /// Factors already representable in bf16 (as PEFT's bf16 files are): the kernel then
    /// equals float math up to summation order.
    fn bf16_exact(rows: usize, cols: usize, seed: u64) -> Tensor {
        random(rows, cols, seed)
            .to_dtype(candle_core::DType::BF16)
            .and_then(|t| t.to_dtype(candle_core::DType::F32))
            .expect("round")
    }

    #[test]
    fn delta_matches_float_matmul_on_bf16_exact_factors() {
        let (r, inp, out, n) = (8, 70, 33, 20);
        let (a, bt, x) = (
            bf16_exact(r, inp, 1),
            bf16_exact(r, out, 2),
            random(n, inp, 3),
        );
        let f = LowRankBf16::new(&a, &bt).expect("factors");
        let scales: Vec<f32> = (0..n).map(|t| 0.5 + t as f32 * 0.1).collect();
        let xv = x.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("x");
        let got = f.delta(&xv, &scales);
        let want = x
            .matmul(&a.t().expect("t"))
            .and_then(|h| h.matmul(&bt))
            .expect("mm");
        let want = want
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("want");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let w = w * scales[i / out];
            assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{i}: {g} vs {w}");
        }
    }

    #[test]
    fn a_token_gets_the_same_delta_alone_and_in_a_long_group() {
        let (r, inp, out, n) = (4, 64, 48, 40);
        let f = LowRankBf16::new(&random(r, inp, 4), &random(r, out, 5)).expect("factors");
        let x = random(n, inp, 6)
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("x");
        let all = f.delta(&x, &vec![1.0; n]);
        for t in [0, 17, n - 1] {
            let alone = f.delta(&x[t * inp..(t + 1) * inp], &[1.0]);
            assert_eq!(alone, all[t * out..(t + 1) * out], "token {t}");
        }
    }
}
