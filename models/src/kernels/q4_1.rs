//! Q4_1 weight matmul on the CPU: `y = x · Wᵀ` for GGUF Q4_1 weights `W` of shape `(n, k)`.
//!
//! candle 0.11.1 runs Q4_1 through its generic `k_quants::matmul` with the scalar
//! `vec_dot_unopt` (no SIMD path), which made it the bottleneck of the default model
//! (SmolLM2-135M, Q4_1). [`Q4_1Matmul`] replaces `QMatMul` for such weights on the CPU. It
//! follows ggml's `ggml_vec_dot_q4_1_q8_1`: the activations are quantised to Q8_1 blocks once
//! per call (`d = max|x| / 127`, `s = d * sum(q)`), and each output is
//! `sum over blocks of d_w * d_x * sum(q_w * q_x) + m_w * s_x`. It departs from ggml in two
//! places: the weights are repacked at load time into 16-row tiles (module `pack`) so that one
//! AVX512-VNNI `vpdpbusd` serves 16 output columns (as candle's `repack_x86.rs` does for
//! Q4K/Q8_0), and the Q8_1 scales `d` and `s` are kept in f32 rather than f16.
//!
//! Work is split over output-column tiles (and, for prefill, row chunks) on candle's own CPU
//! thread pool (see `kernels::driver`). In prefill each loaded weight tile is reused across 4
//! activation rows.
//!
//! Where it sits: the model's linear layers build one [`Q4_1Matmul`] per Q4_1 weight at load
//! time when the device is the CPU, and call [`Q4_1Matmul::forward`] on the activations;
//! elsewhere they keep candle's `QMatMul`.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod pack;
mod rows;
mod scalar;
#[cfg(test)]
mod tests;

use super::acts::ActRows;
use super::driver::{SimdPath, TileJob, QK, TILE_ROWS};
use super::residual::{self, ActivationQuantization, TiledWeight};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{bail, Result, Tensor};
use pack::PackedBlock;

const NAME: &str = "q4_1 matmul";

/// A Q4_1 `(n, k)` weight repacked for the CPU kernels, applied as `x · Wᵀ`.
///
/// Built from a GGUF `QTensor` with [`Q4_1Matmul::try_new`]; the weights are copied (same
/// size: 20 bytes per 32 values), so the `QTensor` may be dropped afterwards.
pub struct Q4_1Matmul {
    /// `n.div_ceil(16) * (k / 32)` tiles, group-major.
    blocks: Vec<PackedBlock>,
    n: usize,
    k: usize,
    path: SimdPath,
}

impl std::fmt::Debug for Q4_1Matmul {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Q4_1Matmul")
            .field("n", &self.n)
            .field("k", &self.k)
            .field("path", &self.path)
            .finish()
    }
}

impl Q4_1Matmul {
    /// Repacks a Q4_1 weight of shape `(n, k)` (GGUF order: `n` output features, `k` inputs).
    ///
    /// Returns `Ok(None)` when the tensor is not for these kernels (not on the CPU, or not
    /// Q4_1): the caller should use candle's `QMatMul` then. Errors on a Q4_1 CPU tensor that
    /// is not 2-D or whose `k` is not a multiple of 32.
    pub fn try_new(w: &QTensor) -> Result<Option<Self>> {
        if !w.device().is_cpu() || w.dtype() != GgmlDType::Q4_1 {
            return Ok(None);
        }
        let (n, k) = w.shape().dims2()?;
        let blocks = pack::pack(&w.data()?, n, k)?;
        Ok(Some(Self {
            blocks,
            n,
            k,
            path: SimdPath::detect(),
        }))
    }

    /// Like [`Self::try_new`], but a tensor these kernels do not handle is an error.
    pub fn new(w: &QTensor) -> Result<Self> {
        match Self::try_new(w)? {
            Some(mm) => Ok(mm),
            None => bail!(
                "{NAME} needs a Q4_1 weight on the CPU, got {:?} on {:?}",
                w.dtype(),
                w.device().location()
            ),
        }
    }

    /// The same weights run through another path (for tests and benchmarks). Errors when this
    /// CPU lacks the path's instructions.
    pub fn with_path(mut self, path: SimdPath) -> Result<Self> {
        self.path = path.checked(NAME)?;
        Ok(self)
    }

    /// The path this matmul runs.
    pub fn path(&self) -> SimdPath {
        self.path
    }

    /// Output features.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn k(&self) -> usize {
        self.k
    }

    /// `x · Wᵀ` for f32 `x` of shape `(..., k)` on the CPU; returns `(..., n)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, ActivationQuantization::Single)
    }

    /// [`Self::forward`] with the activations quantized as `mode` says.
    pub fn forward_with(&self, x: &Tensor, mode: ActivationQuantization) -> Result<Tensor> {
        residual::forward(self, x, 0..self.n, mode)
    }

    /// `dst = x · Wᵀ` on slices: `x` is `m` rows of `k` values, `dst` `m` rows of `n`.
    pub fn matmul_f32(&self, x: &[f32], m: usize, dst: &mut [f32]) -> Result<()> {
        self.matmul_f32_with(x, m, dst, ActivationQuantization::Single)
    }

    /// [`Self::matmul_f32`] with the activations quantized as `mode` says.
    pub fn matmul_f32_with(
        &self,
        x: &[f32],
        m: usize,
        dst: &mut [f32],
        mode: ActivationQuantization,
    ) -> Result<()> {
        residual::matmul(self, x, m, dst, mode)
    }
}

/// Generates a dispatcher from runtime tile sizes to the monomorphised kernels of one path.
/// It must list every shape `TiledWeight::tile_shape` can produce, and every smaller one (edge
/// tiles).
macro_rules! tile_dispatch {
    ($name:ident, $module:ident, $(($r:literal, $c:literal)),*) => {
        /// Runs the `(r, c)` tile kernel of this path.
        ///
        /// # Safety
        /// The CPU must support the instructions of the kernel's path.
        unsafe fn $name(
            r: usize,
            c: usize,
            w: &[PackedBlock],
            nb: usize,
            x: ActRows<'_>,
            out: &mut [[f32; TILE_ROWS]],
        ) {
            match (r, c) {
                // SAFETY: forwarded from this function's contract.
                $(($r, $c) => unsafe { $module::tile::<$r, $c>(w, nb, x, out) },)*
                _ => unreachable!("no {r}x{c} tile kernel (see tile_shape)"),
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
tile_dispatch!(
    tile_avx512,
    avx512,
    (1, 1),
    (1, 2),
    (2, 1),
    (2, 2),
    (3, 1),
    (3, 2),
    (4, 1),
    (4, 2)
);
#[cfg(target_arch = "x86_64")]
tile_dispatch!(tile_avx2, avx2, (1, 1), (1, 2), (2, 1), (2, 2));

/// One `rows x groups` tile through `path`'s kernel.
fn run_tile(
    path: SimdPath,
    rows: usize,
    groups: usize,
    w: &[PackedBlock],
    nb: usize,
    x: ActRows<'_>,
    out: &mut [[f32; TILE_ROWS]],
) {
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a `Q4_1Matmul` only holds a path whose features `is_available` confirmed.
        SimdPath::Avx512Vnni => unsafe { tile_avx512(rows, groups, w, nb, x, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        SimdPath::Avx2 => unsafe { tile_avx2(rows, groups, w, nb, x, out) },
        _ => {
            for r in 0..rows {
                for c in 0..groups {
                    let out = &mut out[r * groups + c..];
                    scalar::tile::<1, 1>(&w[c * nb..], nb, x.row(r, nb), out);
                }
            }
        }
    }
}

impl TiledWeight for Q4_1Matmul {
    const NAME: &'static str = NAME;

    fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    fn path(&self) -> SimdPath {
        self.path
    }

    fn tile(&self, job: TileJob<'_>) {
        let (path, nb) = (self.path, self.k / QK);
        let w = &self.blocks[job.g0 * nb..(job.g0 + job.groups) * nb];
        run_tile(path, job.rows, job.groups, w, nb, job.x, job.out);
    }
}
