//! Hand-written CPU compute kernels for the hot matmuls of the decoder.
//!
//! candle's own CPU path covers every GGUF type, but some of them (Q4_1 in candle 0.11.1) only
//! get a scalar dot product. The kernels here replace `QMatMul` for those weights on the CPU:
//! the model's linear layers hold a kernel object built once at load time from the GGUF
//! `QTensor` and call its `forward` on the activations; on other devices, or for other weight
//! types, they keep using candle's `QMatMul`.
//!
//! Kernels in this module
//! - [`q4_1`]: Q4_1 weights (the default model's projections) times f32 activations,
//!   quantized to Q8_1 on the fly, with AVX512-VNNI, AVX2 and portable scalar paths picked at
//!   runtime.
//! - [`q8_0`]: the same for Q8_0 weights (the default model's tied lm_head).
//! - [`low_rank`]: `B (A x)` from bf16 factors, for LoRA deltas at decode.
//! - [`swiglu`]: the MLP gate `silu(g) · u` in one vectorised pass.
//! - `exp_weights`: the vocabulary-wide max and `exp` of a sampling draw.
//!
//! Both share the activation quantiser (`acts`) and the threaded tile loop (`driver`).

// The workspace denies `unsafe_code`. This module is the one place allowed to use it: SIMD
// intrinsics are `unsafe` to call (they need the CPU features checked at runtime first), and the
// multi-threaded drivers write disjoint parts of one output buffer through a raw pointer. Every
// `unsafe` block carries a `SAFETY:` comment saying why it is sound.
#![allow(unsafe_code)]

mod acts;
pub(crate) mod attention;
mod driver;
pub(crate) mod exp_weights;
pub mod low_rank;
pub mod packed;
pub mod q4_1;
pub mod q8_0;
pub(crate) mod residual;
mod rows;
pub mod swiglu;
#[cfg(test)]
mod testutil;

pub use driver::SimdPath;
pub(crate) use driver::TILE_ROWS;
pub use low_rank::LowRankBf16;
pub use q4_1::Q4_1Matmul;
pub use q8_0::Q8_0Matmul;
