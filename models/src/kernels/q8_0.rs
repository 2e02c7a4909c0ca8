//! Q8_0 weight matmul on the CPU: `y = x · Wᵀ` for GGUF Q8_0 weights `W` of shape `(n, k)`.
//!
//! The default model's GGUF stores the tied embedding / lm_head (49152 x 576) as Q8_0, and
//! candle 0.11.1 only sends Q8_0 to its AVX512-VNNI repacked kernels when `k` is a multiple of
//! 256; at k = 576 it falls back to the generic per-row dot products, about 10 GB/s, which
//! made the lm_head as slow as all 30 Q4_1 layers together. [`Q8_0Matmul`] is the Q4_1
//! kernel's twin ([`super::q4_1`]): activations quantised to Q8_1 once per call, weights
//! repacked at load time into 16-row tiles, the same threaded tile loop.
//!
//! Each output is `sum over blocks of d_w * d_x * sum(q_w * q_x)` (ggml's
//! `ggml_vec_dot_q8_0_q8_0`). `vpdpbusd` multiplies unsigned by signed bytes, so the packed
//! weights are stored as `q_w + 128` (as candle's `repack_x86.rs` does) and the AVX-512 kernel
//! subtracts `128 * sum(q_x)` from each block's integer sum; the AVX2 kernel instead uses the
//! `vpsignb` trick on the signed values. Both give the exact integer, so all paths agree bit
//! for bit.
//!
//! Where it sits: like [`super::Q4_1Matmul`], built once per Q8_0 weight at load time on the
//! CPU, with candle's `QMatMul` kept for other devices. The packed copy is as large as the
//! GGUF tensor (34 bytes per 32 values); a tied embedding keeps its `QTensor` for lookups.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod scalar;
#[cfg(test)]
mod tests;

use super::acts::ActRows;
use super::driver::{SimdPath, TileJob, QK, TILE_ROWS};
use super::packed::{PackedMatmul, TileFormat};
use super::rows::lane_byte;
use candle_core::quantized::GgmlDType;
use candle_core::{bail, Result};
use half::f16;

const NAME: &str = "q8_0 matmul";
/// Bytes of one GGUF Q8_0 block: `{ d: f16, qs: [i8; 32] }`.
const BLOCK_BYTES: usize = 34;

/// The quantised values of one 32-value block of 16 consecutive weight rows, offset to
/// unsigned: chunk `c` (0..8), byte `4 * row + t` = that row's `qs[4 * c + t] + 128`.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct QsTile {
    pub(crate) qs: [u8; 8 * 64],
}

/// The weights one kernel call reads: `C` groups of `nb` tiles, and their per-row scales
/// (kept apart from the 512-byte tiles so that those stay cache-line aligned).
#[derive(Clone, Copy)]
pub(crate) struct Weights<'a> {
    pub(crate) qs: &'a [QsTile],
    pub(crate) d: &'a [[f16; TILE_ROWS]],
}

/// A Q8_0 `(n, k)` weight repacked for the CPU kernels, applied as `x · Wᵀ`.
pub type Q8_0Matmul = PackedMatmul<Q8_0Tiles>;

/// Q8_0 blocks, 16 weight rows to a tile, and the matching per-row scales.
pub struct Q8_0Tiles {
    qs: Vec<QsTile>,
    d: Vec<[f16; TILE_ROWS]>,
}

impl TileFormat for Q8_0Tiles {
    const NAME: &'static str = NAME;
    const DTYPE: GgmlDType = GgmlDType::Q8_0;

    fn pack(raw: &[u8], n: usize, k: usize) -> Result<Self> {
        let (qs, d) = pack(raw, n, k)?;
        Ok(Self { qs, d })
    }

    fn tile(&self, path: SimdPath, nb: usize, job: TileJob<'_>) {
        let tiles = job.g0 * nb..(job.g0 + job.groups) * nb;
        let w = Weights {
            qs: &self.qs[tiles.clone()],
            d: &self.d[tiles],
        };
        run_tile(path, job.rows, job.groups, w, nb, job.x, job.out);
    }

    fn dequantize_block(&self, tile: usize, lane: usize, out: &mut Vec<f32>) {
        let d = self.d[tile][lane].to_f32();
        // Stored offset by +128 for vpdpbusd's unsigned operand.
        let value = |j| d * (lane_byte(&self.qs[tile].qs, lane, j) as i32 - 128) as f32;
        out.extend((0..QK).map(value));
    }
}

/// Repacks the raw GGUF bytes of an `(n, k)` Q8_0 matrix into 16-row tiles.
fn pack(raw: &[u8], n: usize, k: usize) -> Result<(Vec<QsTile>, Vec<[f16; TILE_ROWS]>)> {
    if k == 0 || !k.is_multiple_of(QK) {
        bail!("{NAME}: k = {k} is not a positive multiple of {QK}")
    }
    let nb = k / QK;
    let expected = n * nb * BLOCK_BYTES;
    if raw.len() != expected {
        bail!(
            "{NAME}: {} bytes of weights for a ({n}, {k}) Q8_0 matrix, expected {expected}",
            raw.len()
        )
    }
    let tiles = n.div_ceil(TILE_ROWS) * nb;
    // Zero weights are 128 once offset; their scale is zero anyway.
    let mut qs = vec![QsTile { qs: [128; 8 * 64] }; tiles];
    let mut d = vec![[f16::ZERO; TILE_ROWS]; tiles];
    for (row, row_bytes) in raw.chunks_exact(nb * BLOCK_BYTES).enumerate() {
        let (g, lane) = (row / TILE_ROWS, row % TILE_ROWS);
        for (b, src) in row_bytes.chunks_exact(BLOCK_BYTES).enumerate() {
            d[g * nb + b][lane] = f16::from_bits(u16::from_le_bytes([src[0], src[1]]));
            let dst = &mut qs[g * nb + b].qs;
            for (j, &q) in src[2..].iter().enumerate() {
                // i8 -> u8 bits, then flip the sign bit: q + 128.
                dst[64 * (j / 4) + 4 * lane + j % 4] = q ^ 0x80;
            }
        }
    }
    Ok((qs, d))
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
            w: Weights<'_>,
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
    w: Weights<'_>,
    nb: usize,
    x: ActRows<'_>,
    out: &mut [[f32; TILE_ROWS]],
) {
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a `Q8_0Matmul` only holds a path whose features `is_available` confirmed.
        SimdPath::Avx512Vnni => unsafe { tile_avx512(rows, groups, w, nb, x, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        SimdPath::Avx2 => unsafe { tile_avx2(rows, groups, w, nb, x, out) },
        _ => {
            for r in 0..rows {
                for c in 0..groups {
                    let group = Weights {
                        qs: &w.qs[c * nb..],
                        d: &w.d[c * nb..],
                    };
                    scalar::tile::<1, 1>(group, nb, x.row(r, nb), &mut out[r * groups + c..]);
                }
            }
        }
    }
}
