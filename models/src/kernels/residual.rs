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

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};

use super::acts::{self, Q8Rows};
use super::driver::{self, SimdPath, TileJob};

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
    /// (activation rows, 16-row weight groups) per micro-kernel call for `m` rows.
    fn tile_shape(&self, m: usize) -> (usize, usize);
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
    let (n, k) = w.dims();
    driver::check_lens(W::NAME, (m, k, n), x, dst)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    quantized_matmul(w.path(), mode, x, (m, k, n), dst, |acts, m, dst| {
        driver::run_tiled((m, k, n), w.tile_shape(m), acts, dst, |job| w.tile(job))
    });
    Ok(())
}

/// A [`TiledWeight`] and an activation mode, as a candle op on `(..., k)` f32 inputs.
pub(crate) struct WithActivations<'a, W>(pub &'a W, pub ActivationQuantization);

impl<W: TiledWeight> CustomOp1 for WithActivations<'_, W> {
    fn name(&self) -> &'static str {
        W::NAME
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Self(w, mode) = *self;
        driver::cpu_fwd_f32(W::NAME, w.dims(), storage, layout, |x, m, dst| {
            matmul(w, x, m, dst, mode)
        })
    }
}

/// `dst (m x n) = x (m x k) · Wᵀ`, with `x` quantized as `mode` says and `kernel(acts, rows,
/// out)` (a weight format's tiled loop over `rows` quantized rows) doing the integer work.
/// Two passes run the kernel once over the `2m` stacked rows and add each row's two halves,
/// values first.
fn quantized_matmul(
    path: SimdPath,
    mode: ActivationQuantization,
    x: &[f32],
    (m, k, n): (usize, usize, usize),
    dst: &mut [f32],
    kernel: impl Fn(&Q8Rows, usize, &mut [f32]),
) {
    match mode {
        ActivationQuantization::Single => kernel(&acts::quantize(path, x, m, k), m, dst),
        ActivationQuantization::TwoPass => {
            let acts = acts::quantize_two_pass(path, x, m, k);
            // The stacked result is scratch: reusing one buffer per thread saves zeroing
            // (and often faulting in) `2mn` fresh floats at every call.
            let mut both = SCRATCH.take();
            both.resize(2 * m * n, 0.0);
            kernel(&acts, 2 * m, &mut both);
            let (values, errors) = both.split_at(m * n);
            for ((d, v), e) in dst.iter_mut().zip(values).zip(errors) {
                *d = v + e;
            }
            SCRATCH.set(both);
        }
    }
}

thread_local! {
    /// The two-pass kernel output of this thread's last call (taken while in use, so a
    /// nested call would get a fresh buffer rather than alias this one).
    static SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}
