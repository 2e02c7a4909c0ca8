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
mod scalar;
#[cfg(test)]
mod tests;

use super::acts::ActRows;
use super::driver::{SimdPath, TileJob, TILE_ROWS};
use super::packed::{PackedMatmul, TileFormat};
use super::rows::lane_byte;
use candle_core::quantized::GgmlDType;
use candle_core::Result;
use pack::PackedBlock;

/// A Q4_1 `(n, k)` weight repacked for the CPU kernels, applied as `x · Wᵀ` (20 bytes per 32
/// values, as in the file).
pub type Q4_1Matmul = PackedMatmul<Q4_1Tiles>;

/// Q4_1 blocks, 16 weight rows to a tile (module `pack`).
pub struct Q4_1Tiles(Vec<PackedBlock>);

impl TileFormat for Q4_1Tiles {
    const NAME: &'static str = "q4_1 matmul";
    const DTYPE: GgmlDType = GgmlDType::Q4_1;

    fn pack(raw: &[u8], n: usize, k: usize) -> Result<Self> {
        Ok(Self(pack::pack(raw, n, k)?))
    }

    fn tile(&self, path: SimdPath, nb: usize, job: TileJob<'_>) {
        let w = &self.0[job.g0 * nb..(job.g0 + job.groups) * nb];
        run_tile(path, job.rows, job.groups, w, nb, job.x, job.out);
    }

    fn dequantize_block(&self, tile: usize, lane: usize, out: &mut Vec<f32>) {
        let block = &self.0[tile];
        let (d, m) = (block.d[lane].to_f32(), block.m[lane].to_f32());
        out.extend((0..16).map(|j| d * (lane_byte(&block.qs, lane, j) & 0x0F) as f32 + m));
        out.extend((0..16).map(|j| d * (lane_byte(&block.qs, lane, j) >> 4) as f32 + m));
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
