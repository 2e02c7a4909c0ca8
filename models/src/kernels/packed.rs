//! What every 8-bit weight format's matmul shares: a GGUF weight repacked into 16-row tiles at
//! load time, the SIMD path it runs, and the public surface (construction, `x · Wᵀ` on tensors
//! and slices, row lookups). A format ([`TileFormat`]) only says how it packs its blocks, how
//! one micro-kernel call runs and how one block reads back.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{bail, Result, Tensor};

use super::driver::{SimdPath, TileJob, QK};
use super::residual::{self, ActivationQuantization, TiledWeight};
use super::rows;

/// One GGUF weight format's packed tiles and kernels.
pub trait TileFormat: Sized + Send + Sync {
    /// Names the matmul in errors.
    const NAME: &'static str;
    /// The GGUF type these tiles hold.
    const DTYPE: GgmlDType;
    /// Repacks the raw GGUF bytes of an `(n, k)` matrix.
    fn pack(raw: &[u8], n: usize, k: usize) -> Result<Self>;
    /// One micro-kernel call through `path` (see `driver::run_tiled`); `nb` blocks per row.
    fn tile(&self, path: SimdPath, nb: usize, job: TileJob<'_>);
    /// Appends the 32 dequantized values of lane `lane` of tile `tile`.
    fn dequantize_block(&self, tile: usize, lane: usize, out: &mut Vec<f32>);
}

/// An `(n, k)` weight of format `F` repacked for the CPU kernels, applied as `x · Wᵀ`.
///
/// Built from a GGUF `QTensor` with [`PackedMatmul::try_new`]; the weights are copied (the
/// formats keep the file's bytes per value), so the `QTensor` may be dropped afterwards.
pub struct PackedMatmul<F> {
    /// `n.div_ceil(16) * (k / 32)` tiles, group-major; rows past `n` are zero.
    tiles: F,
    n: usize,
    k: usize,
    path: SimdPath,
}

impl<F: TileFormat> std::fmt::Debug for PackedMatmul<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct(F::NAME)
            .field("n", &self.n)
            .field("k", &self.k)
            .field("path", &self.path)
            .finish()
    }
}

impl<F: TileFormat> PackedMatmul<F> {
    /// Repacks a weight of shape `(n, k)` (GGUF order: `n` output features, `k` inputs).
    ///
    /// Returns `Ok(None)` when the tensor is not for these kernels (not on the CPU, or not of
    /// this format): the caller should use candle's `QMatMul` then. Errors on such a CPU
    /// tensor that is not 2-D or whose `k` is not a multiple of 32.
    pub fn try_new(w: &QTensor) -> Result<Option<Self>> {
        if !w.device().is_cpu() || w.dtype() != F::DTYPE {
            return Ok(None);
        }
        let (n, k) = w.shape().dims2()?;
        Ok(Some(Self {
            tiles: F::pack(&w.data()?, n, k)?,
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
                "{} needs a {:?} weight on the CPU, got {:?} on {:?}",
                F::NAME,
                F::DTYPE,
                w.dtype(),
                w.device().location()
            ),
        }
    }

    /// The same weights run through another path (for tests and benchmarks). Errors when this
    /// CPU lacks the path's instructions.
    pub fn with_path(mut self, path: SimdPath) -> Result<Self> {
        self.path = path.checked(F::NAME)?;
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

    /// The packed tiles (tests look inside them).
    #[cfg(test)]
    pub(crate) fn tiles(&self) -> &F {
        &self.tiles
    }

    /// Dequantizes the given weight rows: `rows.len() * k` values, row-major.
    pub fn dequantize_rows(&self, rows: &[u32]) -> Result<Vec<f32>> {
        rows::dequantize_rows(F::NAME, (self.n, self.k), rows, |tile, lane, out| {
            self.tiles.dequantize_block(tile, lane, out)
        })
    }
}

impl<F: TileFormat> TiledWeight for PackedMatmul<F> {
    const NAME: &'static str = F::NAME;

    fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    fn path(&self) -> SimdPath {
        self.path
    }

    fn tile(&self, job: TileJob<'_>) {
        self.tiles.tile(self.path, self.k / QK, job)
    }
}
