//! Two-pass activation quantization: near-float accuracy from the 8-bit kernels.
//!
//! The integer kernels round each 32-value block of activations to 8 bits (`x ≈ d·q`), as
//! llama.cpp does; on the default model that rounding alone moves some next-token log-probs
//! by 0.2-0.4 nats away from float math. Quantizing the rounding error once more
//! (`r = x - d·q ≈ d'·q'`, with `d' ≈ d / 254`) and running both through the same kernel
//! gives `W·x` to about 2⁻¹⁴ relative error. The two passes are stacked into one call of
//! `2m` rows, so the weights are read once: decode, which is bound by reading weights, costs
//! about the same; prefill does twice the integer work.
//!
//! Each row's result depends only on that row, so batching stays bit-for-bit invariant.

use std::ops::Range;

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};

use super::acts::{self, Q8Rows};
use super::driver::{self, SimdPath, TileJob, TILE_ROWS};

/// How the 8-bit CPU kernels quantize activations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ActivationQuantization {
    /// Values and their rounding error, one stacked kernel call: agrees with float math to
    /// ~0.002 nats on the default model, and chunking a prompt does not move its logits.
    #[default]
    TwoPass,
    /// One 8-bit pass, as llama.cpp and candle do: up to ~2x less integer work where the
    /// kernels are compute-bound (prefill, large decode batches), at up to ~0.4 nats of
    /// log-prob error on some prompts. Batching still never changes a row's result.
    Single,
}

/// A weight format's side of an 8-bit matmul: its packed `(n, k)` weights and micro-kernels.
pub(crate) trait TiledWeight: Sync {
    /// Names the matmul in errors.
    const NAME: &'static str;
    /// `(n, k)`: output and input features.
    fn dims(&self) -> (usize, usize);
    fn path(&self) -> SimdPath;
    /// (activation rows, 16-row weight groups) per micro-kernel call for `m` rows: what fits
    /// the path's registers, the same for every format so far.
    fn tile_shape(&self, m: usize) -> (usize, usize) {
        match (self.path(), m) {
            (SimdPath::Avx512Vnni, 1) => (1, 2),
            (SimdPath::Avx512Vnni, _) => (4, 2),
            (SimdPath::Avx2, 1) => (1, 2),
            (SimdPath::Avx2, _) => (2, 1),
            (SimdPath::Scalar, _) => (1, 1),
        }
    }
    /// One micro-kernel call (see [`driver::run_tiled`]).
    fn tile(&self, job: TileJob<'_>);
}

/// `dst = x · Wᵀ` on slices (`x` `m` rows of `k`, `dst` `m` rows of `n`), the activations
/// quantized as `mode` says.
pub(crate) fn matmul<W: TiledWeight>(
    w: &W,
    x: &[f32],
    m: usize,
    dst: &mut [f32],
    mode: ActivationQuantization,
) -> Result<()> {
    let (n, _) = w.dims();
    matmul_columns(w, 0..n, x, m, &mut [dst], mode)
}

/// `x · W[cols]ᵀ`: the output columns `cols` of `w` (`cols.start` a multiple of 16), written
/// split into consecutive parts: `dsts[p]` gets `m` rows of the next `dsts[p].len() / m`
/// columns. One quantization of `x` and one pass over the weights serve every part, which is
/// what stacking q/k/v (or gate/up) into one weight buys.
pub(crate) fn matmul_columns<W: TiledWeight>(
    w: &W,
    cols: Range<usize>,
    x: &[f32],
    m: usize,
    dsts: &mut [&mut [f32]],
    mode: ActivationQuantization,
) -> Result<()> {
    let (n, k) = w.dims();
    let width = cols.len();
    let parts: usize = dsts.iter().map(|d| d.len()).sum();
    if cols.end > n || !cols.start.is_multiple_of(TILE_ROWS) || parts != m * width {
        bail!(
            "{}: columns {cols:?} of n = {n} into {parts} outputs for m = {m}",
            W::NAME
        )
    }
    if x.len() != m * k {
        bail!("{}: {} activations for m = {m}, k = {k}", W::NAME, x.len())
    }
    if m == 0 || width == 0 {
        return Ok(());
    }
    quantized_matmul(w.path(), mode, x, (m, k, width), dsts, |acts, m, dst| {
        driver::run_tiled((m, k, cols.clone()), w.tile_shape(m), acts, dst, |job| {
            w.tile(job)
        })
    });
    Ok(())
}

/// `x · W[cols]ᵀ` for f32 `x` of shape `(..., k)` on the CPU; returns `(..., cols.len())`.
pub(crate) fn forward<W: TiledWeight>(
    w: &W,
    x: &Tensor,
    cols: Range<usize>,
    mode: ActivationQuantization,
) -> Result<Tensor> {
    let op = WithActivations {
        weight: w,
        cols,
        mode,
    };
    x.contiguous()?.apply_op1_no_bwd(&op)
}

/// `x · W[cols]ᵀ` for f32 `x` of shape `(..., k)` on the CPU, split into consecutive column
/// parts of `widths` (summing to `cols.len()`): one tensor `(..., width)` per part.
pub(crate) fn forward_parts<W: TiledWeight>(
    w: &W,
    x: &Tensor,
    cols: Range<usize>,
    widths: &[usize],
    mode: ActivationQuantization,
) -> Result<Vec<Tensor>> {
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(storage) = &*storage else {
        bail!("{}: input must be on the CPU", W::NAME)
    };
    let (data, lead) = driver::f32_rows(W::NAME, w.dims().1, storage, layout)?;
    let m: usize = lead.iter().product();
    let mut outs: Vec<Vec<f32>> = widths.iter().map(|&wd| vec![0f32; m * wd]).collect();
    let mut dsts: Vec<&mut [f32]> = outs.iter_mut().map(Vec::as_mut_slice).collect();
    matmul_columns(w, cols, data, m, &mut dsts, mode)?;
    outs.into_iter()
        .zip(widths)
        .map(|(values, &width)| {
            let mut dims = lead.to_vec();
            dims.push(width);
            Tensor::from_vec(values, dims, x.device())
        })
        .collect()
}

/// A [`TiledWeight`], the output columns to compute and an activation mode, as a candle op on
/// `(..., k)` f32 inputs.
struct WithActivations<'a, W> {
    weight: &'a W,
    cols: Range<usize>,
    mode: ActivationQuantization,
}

impl<W: TiledWeight> CustomOp1 for WithActivations<'_, W> {
    fn name(&self) -> &'static str {
        W::NAME
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, k) = self.weight.dims();
        let width = self.cols.len();
        driver::cpu_fwd_f32(W::NAME, (width, k), storage, layout, |x, m, dst| {
            matmul_columns(self.weight, self.cols.clone(), x, m, &mut [dst], self.mode)
        })
    }
}

/// `dsts = x (m x k) · Wᵀ` (the parts of an `m x width` result, see [`matmul_columns`]), with
/// `x` quantized as `mode` says and `kernel(acts, rows, out)` (a weight format's tiled loop
/// over `rows` quantized rows into `rows x width` outputs) doing the integer work. Two passes
/// run the kernel once over the `2m` stacked rows and add each row's two halves, values first.
fn quantized_matmul(
    path: SimdPath,
    mode: ActivationQuantization,
    x: &[f32],
    (m, k, width): (usize, usize, usize),
    dsts: &mut [&mut [f32]],
    kernel: impl Fn(&Q8Rows, usize, &mut [f32]),
) {
    let rows = match mode {
        ActivationQuantization::Single => {
            let acts = acts::quantize(path, x, m, k);
            if let [dst] = dsts {
                return kernel(&acts, m, dst);
            }
            (acts, m)
        }
        ActivationQuantization::TwoPass => (acts::quantize_two_pass(path, x, m, k), 2 * m),
    };
    // The stacked or split result is scratch: reusing one buffer per thread saves zeroing
    // (and often faulting in) fresh floats at every call.
    let mut out = SCRATCH.take();
    out.resize(rows.1 * width, 0.0);
    kernel(&rows.0, rows.1, &mut out);
    let (values, errors) = out.split_at(m * width);
    let errors = (mode == ActivationQuantization::TwoPass).then_some(errors);
    split_columns(values, errors, width, dsts);
    SCRATCH.set(out);
}

/// Copies the `m x width` `values` (plus `errors`, element by element, when given) into the
/// consecutive column parts `dsts` (`m >= 1` rows each).
fn split_columns(values: &[f32], errors: Option<&[f32]>, width: usize, dsts: &mut [&mut [f32]]) {
    let m = values.len() / width;
    let mut col = 0;
    for dst in dsts.iter_mut().filter(|d| !d.is_empty()) {
        let part = dst.len() / m;
        for (r, out) in dst.chunks_exact_mut(part).enumerate() {
            let at = r * width + col;
            let v = &values[at..at + part];
            match errors {
                Some(e) => {
                    for ((d, v), e) in out.iter_mut().zip(v).zip(&e[at..at + part]) {
                        *d = v + e;
                    }
                }
                None => out.copy_from_slice(v),
            }
        }
        col += part;
    }
}

thread_local! {
    /// The kernel output of this thread's last two-pass or split call (taken while in use, so
    /// a nested call would get a fresh buffer rather than alias this one).
    static SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}
