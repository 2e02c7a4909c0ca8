//! Q4_1 weight matmul on the CPU: `y = x · Wᵀ` for GGUF Q4_1 weights `W` of shape `(n, k)`.
//!
//! candle 0.11.1 runs Q4_1 through its generic `k_quants::matmul` with the scalar
//! `vec_dot_unopt` (no SIMD path), which made it the bottleneck of the default model
//! (SmolLM2-135M, Q4_1). [`Q4_1Matmul`] replaces `QMatMul` for such weights on the CPU. It
//! follows ggml's `ggml_vec_dot_q4_1_q8_1`: the activations are quantised to Q8_1 blocks once
//! per call (`d = max|x| / 127`, `s = d * sum(q)`), and each output is
//! `sum over blocks of d_w * d_x * sum(q_w * q_x) + m_w * s_x`. It departs from ggml in two
//! places: the weights are repacked at load time into 16-row tiles ([`pack`]) so that one
//! AVX512-VNNI `vpdpbusd` serves 16 output columns (as candle's `repack_x86.rs` does for
//! Q4K/Q8_0), and the Q8_1 scales `d` and `s` are kept in f32 rather than f16.
//!
//! Work is split over output-column tiles (and, for prefill, row chunks) on candle's own CPU
//! thread pool ([`candle_core::utils::barrier_pool`]), the pool its quantized matmuls use, so
//! the thread count follows `CANDLE_NUM_THREADS` / `RAYON_NUM_THREADS` exactly as candle does.
//! In prefill each loaded weight tile is reused across 4 activation rows.
//!
//! Where it sits: the model's linear layers build one [`Q4_1Matmul`] per Q4_1 weight at load
//! time when the device is the CPU, and call [`Q4_1Matmul::forward`] on the activations;
//! elsewhere they keep candle's `QMatMul`.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod pack;
mod q8;
mod scalar;
#[cfg(test)]
mod tests;

use candle_core::backend::BackendStorage;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use pack::{PackedBlock, QK, TILE_ROWS};

/// Which implementation of the dot products a [`Q4_1Matmul`] runs. All give the same results
/// bit for bit; they differ only in speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Q4_1Path {
    /// AVX-512 with VNNI (`vpdpbusd`): x86-64 since Ice Lake / Zen 4.
    Avx512Vnni,
    /// AVX2 + FMA + F16C (`vpmaddubsw`): x86-64 since Haswell / Zen 1.
    Avx2,
    /// Portable Rust, for every other CPU.
    Scalar,
}

impl Q4_1Path {
    /// The fastest path this CPU supports.
    pub fn detect() -> Self {
        [Self::Avx512Vnni, Self::Avx2]
            .into_iter()
            .find(|p| p.is_available())
            .unwrap_or(Self::Scalar)
    }

    /// Whether this CPU has the instructions the path needs. Only available paths are ever
    /// stored in a [`Q4_1Matmul`], which is what makes running their kernels sound.
    pub fn is_available(self) -> bool {
        match self {
            Self::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx512Vnni => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Self::Avx512Vnni | Self::Avx2 => false,
        }
    }

    /// (activation rows, 16-row weight groups) per micro-kernel call for `m` activation rows.
    fn tile_shape(self, m: usize) -> (usize, usize) {
        match (self, m) {
            (Self::Avx512Vnni, 1) => (1, 2),
            (Self::Avx512Vnni, _) => (4, 2),
            (Self::Avx2, 1) => (1, 2),
            (Self::Avx2, _) => (2, 1),
            (Self::Scalar, _) => (1, 1),
        }
    }
}

/// A Q4_1 `(n, k)` weight repacked for the CPU kernels, applied as `x · Wᵀ`.
///
/// Built from a GGUF `QTensor` with [`Q4_1Matmul::try_new`]; the weights are copied (same
/// size: 20 bytes per 32 values), so the `QTensor` may be dropped afterwards.
pub struct Q4_1Matmul {
    /// `n.div_ceil(16) * (k / 32)` tiles, group-major.
    blocks: Vec<PackedBlock>,
    n: usize,
    k: usize,
    path: Q4_1Path,
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

/// Below this many multiply-adds a call stays on the calling thread.
const PAR_MIN_MACS: usize = 32 * 1024;
/// Activation rows per work item in prefill (a multiple of every tile height).
const ROWS_PER_ITEM: usize = 32;

/// The start of the output buffer, which workers write disjoint tiles of.
struct SyncPtr(*mut f32);
// SAFETY: only dereferenced for (row, column-group) ranges owned by exactly one work item; the
// buffer outlives the pool call.
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// The pointer. (A method, so closures capture the `Sync` wrapper, not the raw field.)
    fn get(&self) -> *mut f32 {
        self.0
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
            path: Q4_1Path::detect(),
        }))
    }

    /// Like [`Self::try_new`], but a tensor these kernels do not handle is an error.
    pub fn new(w: &QTensor) -> Result<Self> {
        match Self::try_new(w)? {
            Some(mm) => Ok(mm),
            None => bail!(
                "q4_1 matmul needs a Q4_1 weight on the CPU, got {:?} on {:?}",
                w.dtype(),
                w.device().location()
            ),
        }
    }

    /// The same weights run through another path (for tests and benchmarks). Errors when this
    /// CPU lacks the path's instructions.
    pub fn with_path(mut self, path: Q4_1Path) -> Result<Self> {
        if !path.is_available() {
            bail!("q4_1 matmul: the {path:?} path is not supported by this CPU")
        }
        self.path = path;
        Ok(self)
    }

    /// The path this matmul runs.
    pub fn path(&self) -> Q4_1Path {
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
        x.contiguous()?.apply_op1_no_bwd(self)
    }

    /// `dst = x · Wᵀ` on slices: `x` is `m` rows of `k` values, `dst` `m` rows of `n`.
    pub fn matmul_f32(&self, x: &[f32], m: usize, dst: &mut [f32]) -> Result<()> {
        let (n, k) = (self.n, self.k);
        if x.len() != m * k || dst.len() != m * n {
            bail!(
                "q4_1 matmul: {} activations and {} outputs for m = {m}, k = {k}, n = {n}",
                x.len(),
                dst.len()
            )
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        let acts = q8::quantize(self.path, x, m, k);
        self.run(&acts, m, dst);
        Ok(())
    }

    /// The tiled product of quantised activations with the packed weights.
    fn run(&self, acts: &q8::Q8Rows, m: usize, dst: &mut [f32]) {
        let (n, k, nb) = (self.n, self.k, self.k / QK);
        let groups = n.div_ceil(TILE_ROWS);
        let (tile_r, tile_c) = self.path.tile_shape(m);
        let units = groups.div_ceil(tile_c);
        let rows_per_item = if m == 1 { 1 } else { ROWS_PER_ITEM };
        let row_items = m.div_ceil(rows_per_item);
        let dst_ptr = SyncPtr(dst.as_mut_ptr());
        // Items are (column unit, row chunk) pairs, column-unit major, so a worker walking a
        // range of items keeps one weight tile hot in L1 across row chunks.
        let work = |items: std::ops::Range<usize>| {
            let mut out = [[0f32; TILE_ROWS]; MAX_TILE];
            for item in items {
                let g0 = (item / row_items) * tile_c;
                let gc = tile_c.min(groups - g0);
                let rows_start = (item % row_items) * rows_per_item;
                let rows_end = m.min(rows_start + rows_per_item);
                let w = &self.blocks[g0 * nb..(g0 + gc) * nb];
                let mut r0 = rows_start;
                while r0 < rows_end {
                    let rc = tile_r.min(rows_end - r0);
                    let xq = &acts.qs[r0 * k..(r0 + rc) * k];
                    let xd = &acts.ds[r0 * nb..(r0 + rc) * nb];
                    run_tile(self.path, rc, gc, w, nb, xq, xd, &mut out[..rc * gc]);
                    for r in 0..rc {
                        for c in 0..gc {
                            let col = (g0 + c) * TILE_ROWS;
                            let cols = TILE_ROWS.min(n - col);
                            // SAFETY: row r0 + r < m and columns col..col + cols <= n lie inside
                            // the m * n `dst`; this (row, group) pair belongs to this work item
                            // alone, so no other worker writes these elements.
                            unsafe {
                                std::ptr::copy_nonoverlapping(
                                    out[r * gc + c].as_ptr(),
                                    dst_ptr.get().add((r0 + r) * n + col),
                                    cols,
                                )
                            };
                        }
                    }
                    r0 += rc;
                }
            }
        };
        let n_items = units * row_items;
        if m * n * k < PAR_MIN_MACS || n_items == 1 {
            work(0..n_items);
        } else {
            candle_core::utils::barrier_pool().execute_chunked(n_items, work);
        }
    }
}

/// The largest `rows * groups` of any tile shape, which sizes the output scratch tile.
const MAX_TILE: usize = 8;

/// Generates a dispatcher from runtime tile sizes to the monomorphised kernels of one path.
macro_rules! tile_dispatch {
    ($name:ident, $module:ident, $(($r:literal, $c:literal)),*) => {
        /// Runs the `(r, c)` tile kernel of this path; shapes without a dedicated kernel are
        /// split into single-row, single-group calls.
        ///
        /// # Safety
        /// The CPU must support the instructions of the kernel's path.
        #[allow(clippy::too_many_arguments)]
        unsafe fn $name(
            r: usize,
            c: usize,
            w: &[PackedBlock],
            nb: usize,
            xq: &[i8],
            xd: &[[f32; 2]],
            out: &mut [[f32; TILE_ROWS]],
        ) {
            match (r, c) {
                // SAFETY: forwarded from this function's contract.
                $(($r, $c) => unsafe { $module::tile::<$r, $c>(w, nb, xq, xd, out) },)*
                _ => {
                    for ri in 0..r {
                        for ci in 0..c {
                            // SAFETY: as above.
                            unsafe {
                                $module::tile::<1, 1>(
                                    &w[ci * nb..],
                                    nb,
                                    &xq[ri * nb * QK..],
                                    &xd[ri * nb..],
                                    &mut out[ri * c + ci..],
                                )
                            }
                        }
                    }
                }
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
#[allow(clippy::too_many_arguments)]
fn run_tile(
    path: Q4_1Path,
    rows: usize,
    groups: usize,
    w: &[PackedBlock],
    nb: usize,
    xq: &[i8],
    xd: &[[f32; 2]],
    out: &mut [[f32; TILE_ROWS]],
) {
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a `Q4_1Matmul` only holds a path whose features `is_available` confirmed.
        Q4_1Path::Avx512Vnni => unsafe { tile_avx512(rows, groups, w, nb, xq, xd, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Q4_1Path::Avx2 => unsafe { tile_avx2(rows, groups, w, nb, xq, xd, out) },
        _ => {
            for r in 0..rows {
                for c in 0..groups {
                    scalar::tile::<1, 1>(
                        &w[c * nb..],
                        nb,
                        &xq[r * nb * QK..],
                        &xd[r * nb..],
                        &mut out[r * groups + c..],
                    );
                }
            }
        }
    }
}

impl CustomOp1 for Q4_1Matmul {
    fn name(&self) -> &'static str {
        "q4_1-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("q4_1 matmul: input is not contiguous {layout:?}")
        };
        let Some((&k, lead)) = layout.dims().split_last() else {
            bail!("q4_1 matmul: input is a scalar")
        };
        if k != self.k {
            bail!(
                "q4_1 matmul: input {:?} does not end in k = {}",
                layout.shape(),
                self.k
            )
        }
        let CpuStorage::F32(x) = storage else {
            bail!("q4_1 matmul: input must be f32, got {:?}", storage.dtype())
        };
        let m: usize = lead.iter().product();
        let mut dst = vec![0f32; m * self.n];
        self.matmul_f32(&x[start..end], m, &mut dst)?;
        let mut dims = lead.to_vec();
        dims.push(self.n);
        Ok((CpuStorage::F32(dst), Shape::from(dims)))
    }
}
