//! Sampling: turning one row of next-token logits into a token id, with the request's
//! temperature, truncation, penalties, logit bias, seed and log-probabilities.
//!
//! Sits at the end of each engine step: after the forward pass and the plug-in logits hook,
//! the engine copies each row's logits to the CPU and hands them to that sequence's
//! [`Sampler`]. Everything here works on plain `&[f32]` slices, so it is independent of
//! candle and tested with hand-written logits (as candle's `generation_tests.rs` does).
//! [`SamplingParams::validate`] is called earlier, at request validation, so range errors are
//! 400s naming the field.

mod logprobs;
mod params;
mod sampler;

pub use logprobs::{log_softmax_at, log_sum_exp, token_logprobs, TokenLogprobs};
pub use params::{SamplingError, SamplingParams, GREEDY_BELOW_TEMPERATURE, MAX_TOP_LOGPROBS};
pub use sampler::{SampledToken, Sampler};
