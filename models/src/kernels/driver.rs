//! What the weight formats share: the choice of SIMD path, the threaded tile loop that walks
//! the output in 16-column groups on candle's thread pool, and the `CustomOp1` plumbing.
//!
//! Every format stores its weights as tiles of 16 weight rows (one per 32-bit lane of an
//! AVX-512 register) by 32 values, and provides micro-kernels computing `R` activation rows
//! times `C` such 16-row groups over the whole `k`. [`run_tiled`] splits the `(m, n)` output
//! into work items of `C` groups by up to [`ROWS_PER_ITEM`] rows, hands them to
//! [`candle_core::utils::barrier_pool`] (the pool candle's own quantized matmuls use, so the
//! thread count follows `CANDLE_NUM_THREADS` / `RAYON_NUM_THREADS` as candle's does), and
//! copies each tile's valid columns into the output.

use std::ops::Range;

use super::acts::{ActRows, Q8Rows};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout, Result, Shape};

/// Values per quantisation block, for the weights and the Q8_1 activations alike.
pub(crate) const QK: usize = 32;
/// Weight rows per packed tile, one per 32-bit lane of a 512-bit register.
pub(crate) const TILE_ROWS: usize = 16;
/// The largest `rows * groups` of any tile shape, which sizes the output scratch tile.
pub(crate) const MAX_TILE: usize = 8;
/// Below this many multiply-adds a call stays on the calling thread.
const PAR_MIN_MACS: usize = 32 * 1024;
/// Activation rows per work item in prefill (a multiple of every tile height).
const ROWS_PER_ITEM: usize = 32;

/// Which implementation of the dot products a matmul runs. All give the same results bit for
/// bit; they differ only in speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimdPath {
    /// AVX-512 with VNNI (`vpdpbusd`): x86-64 since Ice Lake / Zen 4.
    Avx512Vnni,
    /// AVX2 + FMA + F16C (`vpmaddubsw`): x86-64 since Haswell / Zen 1.
    Avx2,
    /// Portable Rust, for every other CPU.
    Scalar,
}

impl SimdPath {
    /// The fastest path this CPU supports.
    pub fn detect() -> Self {
        [Self::Avx512Vnni, Self::Avx2]
            .into_iter()
            .find(|p| p.is_available())
            .unwrap_or(Self::Scalar)
    }

    /// Whether this CPU has the instructions the path needs. Matmuls only ever hold available
    /// paths, which is what makes running their kernels sound.
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

    /// `self` if this CPU supports it, else an error naming `what` wanted it.
    pub(crate) fn checked(self, what: &str) -> Result<Self> {
        if !self.is_available() {
            bail!("{what}: the {self:?} path is not supported by this CPU")
        }
        Ok(self)
    }
}

/// One micro-kernel call: activation rows `x` against 16-row weight groups `g0..g0 + groups`,
/// results into `out[row * groups + group]`. Public in name only: `driver` is a private
/// module, so no other crate can name or build one, nor implement or call
/// `TileFormat::tile`.
pub struct TileJob<'a> {
    pub(crate) g0: usize,
    pub(crate) groups: usize,
    pub(crate) rows: usize,
    pub(crate) x: ActRows<'a>,
    pub(crate) out: &'a mut [[f32; TILE_ROWS]],
}

/// The start of a buffer that workers write disjoint parts of.
pub(crate) struct SyncPtr<T>(pub(crate) *mut T);
// SAFETY: users only dereference it for ranges owned by exactly one work item, and keep the
// buffer alive across the pool call.
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// The pointer. (A method, so closures capture the `Sync` wrapper, not the raw field.)
    pub(crate) fn get(&self) -> *mut T {
        self.0
    }
}

/// `dst (m x cols.len()) = acts (m x k) · W[cols]ᵀ`: the output columns `cols` of the weight
/// (`cols.start` a multiple of 16, `cols.end` at most `n`), one `tile` call per (row tile,
/// column tile), with tiles of at most `tile_r` rows by `tile_c` 16-row groups.
pub(crate) fn run_tiled(
    (m, k, cols): (usize, usize, Range<usize>),
    (tile_r, tile_c): (usize, usize),
    acts: &Q8Rows,
    dst: &mut [f32],
    tile: impl Fn(TileJob<'_>) + Sync,
) {
    let width = cols.len();
    debug_assert!(tile_r * tile_c <= MAX_TILE && dst.len() == m * width);
    debug_assert!(cols.start.is_multiple_of(TILE_ROWS));
    let first_group = cols.start / TILE_ROWS;
    let groups = cols.end.div_ceil(TILE_ROWS) - first_group;
    let units = groups.div_ceil(tile_c);
    let rows_per_item = if m == 1 { 1 } else { ROWS_PER_ITEM };
    let row_items = m.div_ceil(rows_per_item);
    let dst_ptr = SyncPtr(dst.as_mut_ptr());
    // Items are (column unit, row chunk) pairs, column-unit major, so a worker walking a
    // range of items keeps one weight tile hot in L1 across row chunks.
    let work = |items: Range<usize>| {
        let mut out = [[0f32; TILE_ROWS]; MAX_TILE];
        for item in items {
            let g = (item / row_items) * tile_c;
            let gc = tile_c.min(groups - g);
            let rows_start = (item % row_items) * rows_per_item;
            let rows_end = m.min(rows_start + rows_per_item);
            let mut r0 = rows_start;
            while r0 < rows_end {
                let rc = tile_r.min(rows_end - r0);
                tile(TileJob {
                    g0: first_group + g,
                    groups: gc,
                    rows: rc,
                    x: acts.rows(r0, rc),
                    out: &mut out[..rc * gc],
                });
                for r in 0..rc {
                    for c in 0..gc {
                        let col = (g + c) * TILE_ROWS;
                        let valid = TILE_ROWS.min(width - col);
                        let dst = dst_ptr.get().wrapping_add((r0 + r) * width + col);
                        // SAFETY: row r0 + r < m and columns col..col + valid <= width lie
                        // inside the m * width `dst`; this (row, group) pair belongs to this
                        // work item alone, so no other worker writes these elements. A full
                        // tile is a fixed-size copy (two vector moves, not a `memcpy` call).
                        unsafe {
                            if valid == TILE_ROWS {
                                dst.cast::<[f32; TILE_ROWS]>()
                                    .write_unaligned(out[r * gc + c]);
                            } else {
                                std::ptr::copy_nonoverlapping(out[r * gc + c].as_ptr(), dst, valid);
                            }
                        };
                    }
                }
                r0 += rc;
            }
        }
    };
    let n_items = units * row_items;
    if m * width * k < PAR_MIN_MACS || n_items == 1 {
        work(0..n_items);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(n_items, work);
    }
}

/// The `CustomOp1::cpu_fwd` of a `(n, k)` weight: checks the f32 input `(..., k)` and runs
/// `matmul(x, m, dst)` into a fresh `(..., n)` output.
pub(crate) fn cpu_fwd_f32(
    name: &str,
    (n, k): (usize, usize),
    storage: &CpuStorage,
    layout: &Layout,
    matmul: impl FnOnce(&[f32], usize, &mut [f32]) -> Result<()>,
) -> Result<(CpuStorage, Shape)> {
    let (x, lead) = f32_rows(name, k, storage, layout)?;
    let m: usize = lead.iter().product();
    let mut dst = vec![0f32; m * n];
    matmul(x, m, &mut dst)?;
    let mut dims = lead.to_vec();
    dims.push(n);
    Ok((CpuStorage::F32(dst), Shape::from(dims)))
}

/// The values of a contiguous f32 input `(..., k)` and its leading dims, or an error naming
/// `name` and what is wrong with the input.
pub(crate) fn f32_rows<'a>(
    name: &str,
    k: usize,
    storage: &'a CpuStorage,
    layout: &'a Layout,
) -> Result<(&'a [f32], &'a [usize])> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{name}: input is not contiguous {layout:?}")
    };
    let Some((&last, lead)) = layout.dims().split_last() else {
        bail!("{name}: input is a scalar")
    };
    if last != k {
        bail!("{name}: input {:?} does not end in k = {k}", layout.shape())
    }
    let CpuStorage::F32(x) = storage else {
        bail!("{name}: input must be f32, got {:?}", storage.dtype())
    };
    Ok((&x[start..end], lead))
}
