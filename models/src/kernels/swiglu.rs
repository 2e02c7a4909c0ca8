//! The SwiGLU gate `silu(g) · u` in one pass on the CPU.
//!
//! candle computes `silu(g)` with libm's scalar `expf` into a fresh tensor and multiplies by
//! `u` in a second pass. On the serving path that ran on the engine thread alone, with the
//! other cores idle, for 3-4% of a decode step. Here `exp` is the attention kernel's
//! polynomial ([`exp_nonpositive`], relative error below 3e-7), compiled for the CPU's vector
//! width, and large inputs (prefill) are split over the thread pool.
//!
//! `silu(g) = g / (1 + e^-g)`; with `e = exp(-|g|) <= 1` that is `g / (1 + e)` for `g >= 0`
//! and `g·e / (1 + e)` for `g < 0`, so `exp` never overflows.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::attention::exp_nonpositive;
use super::driver::{SimdPath, SyncPtr};

/// Below this many values the gate stays on the calling thread.
const PAR_MIN_VALUES: usize = 64 * 1024;
/// Values per work item when split over the pool.
const CHUNK: usize = 16 * 1024;

/// `silu(gate) * up` for two f32 tensors of one shape; candle's ops off the CPU or for
/// other dtypes.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.device().is_cpu() && gate.dtype() == candle_core::DType::F32 {
        gate.contiguous()?
            .apply_op2_no_bwd(&up.contiguous()?, &SwiGlu(SimdPath::detect()))
    } else {
        candle_nn::ops::silu(gate)? * up
    }
}

struct SwiGlu(SimdPath);

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (Some((g0, g1)), Some((u0, u1))) = (gl.contiguous_offsets(), ul.contiguous_offsets())
        else {
            bail!("swiglu: inputs must be contiguous")
        };
        if gl.shape() != ul.shape() {
            bail!(
                "swiglu: gate {:?} and up {:?} differ",
                gl.shape(),
                ul.shape()
            )
        }
        let (CpuStorage::F32(g), CpuStorage::F32(u)) = (g, u) else {
            bail!("swiglu: inputs must be f32")
        };
        let (g, u) = (&g[g0..g1], &u[u0..u1]);
        let mut out = vec![0f32; g.len()];
        let path = self.0;
        if g.len() < PAR_MIN_VALUES {
            gate(path, g, u, &mut out);
        } else {
            let out_ptr = SyncPtr(out.as_mut_ptr());
            let items = g.len().div_ceil(CHUNK);
            candle_core::utils::barrier_pool().execute_chunked(items, |range| {
                let (start, end) = (range.start * CHUNK, (range.end * CHUNK).min(g.len()));
                // SAFETY: `execute_chunked` hands each item range to one worker, so these
                // sub-slices of `out` never overlap; `out` outlives the call.
                let out = unsafe {
                    std::slice::from_raw_parts_mut(out_ptr.get().add(start), end - start)
                };
                gate(path, &g[start..end], &u[start..end], out);
            });
        }
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }
}

/// Dispatches to the widest compiled version of [`gate_portable`].
fn gate(path: SimdPath, g: &[f32], u: &[f32], out: &mut [f32]) {
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a detected `SimdPath` implies its features (`Avx512Vnni` includes AVX-512F;
        // both x86 paths include FMA).
        SimdPath::Avx512Vnni => unsafe { gate_avx512(g, u, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        SimdPath::Avx2 => unsafe { gate_avx2(g, u, out) },
        _ => gate_portable(g, u, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn gate_avx512(g: &[f32], u: &[f32], out: &mut [f32]) {
    gate_portable(g, u, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gate_avx2(g: &[f32], u: &[f32], out: &mut [f32]) {
    gate_portable(g, u, out)
}

#[inline(always)]
fn gate_portable(g: &[f32], u: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
        let e = exp_nonpositive(-g.abs());
        let num = if g >= 0.0 { g } else { g * e };
        *o = num / (1.0 + e) * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candle_silu_times_up() {
        // Covers both signs, zero, large magnitudes and the threaded split.
        for n in [37, 3 * PAR_MIN_VALUES / 2] {
            let g: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % 4001) as f32 / 40.0 - 50.0)
                .collect();
            let u: Vec<f32> = (0..n)
                .map(|i| ((i * 104_729) % 997) as f32 / 300.0 - 1.6)
                .collect();
            let (gt, ut) = (
                Tensor::from_vec(g, (n,), &Device::Cpu).unwrap(),
                Tensor::from_vec(u, (n,), &Device::Cpu).unwrap(),
            );
            let ours: Vec<f32> = swiglu(&gt, &ut).unwrap().to_vec1().unwrap();
            let want: Vec<f32> = (candle_nn::ops::silu(&gt).unwrap() * &ut)
                .unwrap()
                .to_vec1()
                .unwrap();
            for (i, (a, b)) in ours.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{i}: {a} vs {b}");
            }
        }
    }
}
