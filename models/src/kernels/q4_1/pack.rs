//! Load-time repacking of GGUF Q4_1 blocks into 16-row tiles.
//!
//! ggml stores a Q4_1 weight row by row, each row a run of 20-byte blocks
//! `{ d: f16, m: f16, qs: [u8; 16] }` where value `j` of the block is `qs[j] & 0xF` for
//! `j < 16` and `qs[j - 16] >> 4` for `j >= 16`, and dequantises to `d * q + m`.
//!
//! [`PackedBlock`] holds the same block for 16 consecutive weight rows, transposed so that one
//! 64-byte load gives, for each of the 16 rows, the 4 bytes covering the same 4 `k` positions:
//! chunk `c` (0..4), byte `4 * row + t` is row's `qs[4 * c + t]`. Its low nibbles are values
//! `4c..4c+4` of the block and its high nibbles values `16+4c..16+4c+4`, so after masking one
//! `vpdpbusd` against the broadcast 4 activation bytes updates 16 output columns at once (the
//! layout of candle's `repack_x86.rs` tiles, and of ggml's `q4_0x8` repacks). The scales stay
//! f16, so the packed weights take exactly the 20 bytes per 32 values of the GGUF file.

use crate::kernels::driver::{QK, TILE_ROWS};
use candle_core::{bail, Result};
use half::f16;
/// Bytes of one GGUF Q4_1 block.
const BLOCK_BYTES: usize = 20;

/// One 32-value block of 16 consecutive weight rows. Rows past the end of the matrix are
/// zero (d = m = 0), so they contribute nothing and are never written out.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct PackedBlock {
    /// 4 chunks of 64 bytes; chunk `c`, byte `4 * row + t` = that row's `qs[4 * c + t]`.
    pub(crate) qs: [u8; 4 * 64],
    /// Per-row scale `d`.
    pub(crate) d: [f16; TILE_ROWS],
    /// Per-row offset `m`.
    pub(crate) m: [f16; TILE_ROWS],
}

const _: () = assert!(std::mem::size_of::<PackedBlock>() == TILE_ROWS * BLOCK_BYTES);

const ZERO_BLOCK: PackedBlock = PackedBlock {
    qs: [0; 4 * 64],
    d: [f16::ZERO; TILE_ROWS],
    m: [f16::ZERO; TILE_ROWS],
};

/// Repacks the raw GGUF bytes of an `(n, k)` Q4_1 matrix into `n.div_ceil(16) * (k / 32)`
/// tiles, tile `g * (k / 32) + b` holding block `b` of rows `16g..16g+16`.
pub(crate) fn pack(raw: &[u8], n: usize, k: usize) -> Result<Vec<PackedBlock>> {
    if k == 0 || !k.is_multiple_of(QK) {
        bail!("q4_1 matmul: k = {k} is not a positive multiple of {QK}")
    }
    let nb = k / QK;
    let expected = n * nb * BLOCK_BYTES;
    if raw.len() != expected {
        bail!(
            "q4_1 matmul: {} bytes of weights for a ({n}, {k}) Q4_1 matrix, expected {expected}",
            raw.len()
        )
    }
    let groups = n.div_ceil(TILE_ROWS);
    let mut out = vec![ZERO_BLOCK; groups * nb];
    for (row, row_bytes) in raw.chunks_exact(nb * BLOCK_BYTES).enumerate() {
        let (g, lane) = (row / TILE_ROWS, row % TILE_ROWS);
        for (b, src) in row_bytes.chunks_exact(BLOCK_BYTES).enumerate() {
            let dst = &mut out[g * nb + b];
            dst.d[lane] = f16::from_bits(u16::from_le_bytes([src[0], src[1]]));
            dst.m[lane] = f16::from_bits(u16::from_le_bytes([src[2], src[3]]));
            for c in 0..4 {
                let at = 64 * c + 4 * lane;
                dst.qs[at..at + 4].copy_from_slice(&src[4 + 4 * c..8 + 4 * c]);
            }
        }
    }
    Ok(out)
}
