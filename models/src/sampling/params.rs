//! Per-request sampling parameters and their range checks.
//!
//! The server's validation step turns the wire request's `temperature`, `top_p`, `logit_bias`
//! and friends into one [`SamplingParams`] and calls [`SamplingParams::validate`] before the
//! request is admitted, so a bad value is a 400 naming the field instead of a surprise inside
//! the engine thread. Semantics follow the OpenAI API where it defines a parameter and vLLM
//! where it does not (`top_k`, `min_p`, `repetition_penalty`).

use thiserror::Error;

/// The largest `top_logprobs` the OpenAI API accepts.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Temperatures below this sample greedily, as in vLLM (`_SAMPLING_EPS`): below about 3e-39
/// `1 / temperature` overflows `f32` and the draw's weights turn to NaN, and well before that
/// the draw is an argmax in all but name.
pub const GREEDY_BELOW_TEMPERATURE: f32 = 1e-5;

/// How one request wants its next token chosen.
///
/// Every field's "off" value is its [`Default`], so `SamplingParams::default()` with only
/// `temperature` set is plain temperature sampling.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature in `0..=2`; `0`, or anything below [`GREEDY_BELOW_TEMPERATURE`],
    /// means greedy (argmax), which ignores the truncations.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` turns it off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose mass reaches `top_p`, in `(0, 1]`;
    /// `1` turns it off.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the top token's, in `[0, 1]`;
    /// `0` turns it off.
    pub min_p: f32,
    /// Hugging Face repetition penalty over prompt and generated tokens, `> 0`; `1` turns it
    /// off. A positive logit is divided by it, a negative one multiplied.
    pub repetition_penalty: f32,
    /// OpenAI presence penalty in `-2..=2`, subtracted once from every token generated so far.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty in `-2..=2`, subtracted once per earlier generation of a token.
    pub frequency_penalty: f32,
    /// OpenAI logit bias: `(token id, bias in -100..=100)` added to the raw logits.
    pub logit_bias: Vec<(u32, f32)>,
    /// Return the sampled token's log-probability.
    pub logprobs: bool,
    /// How many of the most likely alternatives to return with it, `0..=20`; needs `logprobs`.
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            logprobs: false,
            top_logprobs: 0,
        }
    }
}

/// A sampling parameter outside its allowed range; each message names the field, the range
/// and the value received, so the server can return it verbatim as a 400.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SamplingError {
    #[error("temperature must be in 0..=2 (0 = greedy), got {value}")]
    Temperature { value: f32 },
    #[error("top_p must be in (0, 1] (1 = off), got {value}")]
    TopP { value: f32 },
    #[error("min_p must be in [0, 1] (0 = off), got {value}")]
    MinP { value: f32 },
    #[error("repetition_penalty must be a finite number > 0 (1 = off), got {value}")]
    RepetitionPenalty { value: f32 },
    #[error("presence_penalty must be in -2..=2, got {value}")]
    PresencePenalty { value: f32 },
    #[error("frequency_penalty must be in -2..=2, got {value}")]
    FrequencyPenalty { value: f32 },
    #[error("logit_bias token id {id} is out of range: the vocabulary has {vocab_size} tokens")]
    LogitBiasToken { id: u32, vocab_size: usize },
    #[error("logit_bias value for token {id} must be in -100..=100, got {value}")]
    LogitBiasValue { id: u32, value: f32 },
    #[error("top_logprobs must be in 0..={max}, got {value}", max = MAX_TOP_LOGPROBS)]
    TopLogprobs { value: usize },
    #[error("top_logprobs = {value} needs logprobs = true")]
    TopLogprobsWithoutLogprobs { value: usize },
    #[error("token id {id} is out of range: the vocabulary has {vocab_size} tokens")]
    TokenOutOfRange { id: u32, vocab_size: usize },
}

impl SamplingParams {
    /// Checks every field against its documented range for a model with `vocab_size` tokens.
    ///
    /// Returns the first problem found, in field order.
    pub fn validate(&self, vocab_size: usize) -> Result<(), SamplingError> {
        // `contains` is false for NaN, so NaN is rejected along with out-of-range values.
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err(SamplingError::Temperature {
                value: self.temperature,
            });
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP { value: self.top_p });
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(SamplingError::MinP { value: self.min_p });
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(SamplingError::RepetitionPenalty {
                value: self.repetition_penalty,
            });
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(SamplingError::PresencePenalty {
                value: self.presence_penalty,
            });
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(SamplingError::FrequencyPenalty {
                value: self.frequency_penalty,
            });
        }
        self.validate_logit_bias(vocab_size)?;
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return Err(SamplingError::TopLogprobs {
                value: self.top_logprobs,
            });
        }
        if self.top_logprobs > 0 && !self.logprobs {
            // vLLM and OpenAI both reject this rather than silently returning nothing.
            return Err(SamplingError::TopLogprobsWithoutLogprobs {
                value: self.top_logprobs,
            });
        }
        Ok(())
    }

    fn validate_logit_bias(&self, vocab_size: usize) -> Result<(), SamplingError> {
        for &(id, value) in &self.logit_bias {
            if id as usize >= vocab_size {
                return Err(SamplingError::LogitBiasToken { id, vocab_size });
            }
            if !(-100.0..=100.0).contains(&value) {
                return Err(SamplingError::LogitBiasValue { id, value });
            }
        }
        Ok(())
    }

    /// Whether the next token is the argmax rather than a draw: a temperature of 0 or below
    /// [`GREEDY_BELOW_TEMPERATURE`].
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_BELOW_TEMPERATURE
    }

    /// True when no step would change the logits before the argmax or draw: no bias, no
    /// penalties. The sampler then reads the model's logits in place without copying them.
    pub(crate) fn leaves_logits_unchanged(&self) -> bool {
        self.logit_bias.is_empty()
            && self.repetition_penalty == 1.0
            && self.presence_penalty == 0.0
            && self.frequency_penalty == 0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VOCAB: usize = 10;

    fn err_of(params: SamplingParams) -> String {
        match params.validate(VOCAB) {
            Ok(()) => panic!("expected {params:?} to be rejected"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn defaults_are_valid_and_off() {
        let p = SamplingParams::default();
        assert_eq!(p.validate(VOCAB), Ok(()));
        assert!(p.leaves_logits_unchanged());
    }

    #[test]
    fn boundaries_are_accepted() {
        let p = SamplingParams {
            temperature: 2.0,
            top_p: 1.0,
            min_p: 1.0,
            presence_penalty: -2.0,
            frequency_penalty: 2.0,
            logit_bias: vec![(9, -100.0), (0, 100.0)],
            logprobs: true,
            top_logprobs: 20,
            ..SamplingParams::default()
        };
        assert_eq!(p.validate(VOCAB), Ok(()));
        let greedy = SamplingParams {
            temperature: 0.0,
            min_p: 0.0,
            ..SamplingParams::default()
        };
        assert_eq!(greedy.validate(VOCAB), Ok(()));
    }

    #[test]
    fn each_error_names_its_field_and_range() {
        let d = SamplingParams::default;
        let cases: Vec<(SamplingParams, &str)> = vec![
            (
                SamplingParams {
                    temperature: 2.5,
                    ..d()
                },
                "temperature must be in 0..=2",
            ),
            (
                SamplingParams {
                    temperature: -0.1,
                    ..d()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..d()
                },
                "temperature",
            ),
            (
                SamplingParams { top_p: 0.0, ..d() },
                "top_p must be in (0, 1]",
            ),
            (SamplingParams { top_p: 1.01, ..d() }, "top_p"),
            (
                SamplingParams { min_p: 1.5, ..d() },
                "min_p must be in [0, 1]",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..d()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    presence_penalty: 2.1,
                    ..d()
                },
                "presence_penalty must be in -2..=2",
            ),
            (
                SamplingParams {
                    frequency_penalty: -3.0,
                    ..d()
                },
                "frequency_penalty must be in -2..=2",
            ),
            (
                SamplingParams {
                    logit_bias: vec![(10, 1.0)],
                    ..d()
                },
                "logit_bias token id 10",
            ),
            (
                SamplingParams {
                    logit_bias: vec![(1, 101.0)],
                    ..d()
                },
                "logit_bias value for token 1 must be in -100..=100",
            ),
            (
                SamplingParams {
                    logprobs: true,
                    top_logprobs: 21,
                    ..d()
                },
                "top_logprobs must be in 0..=20, got 21",
            ),
            (
                SamplingParams {
                    top_logprobs: 2,
                    ..d()
                },
                "needs logprobs = true",
            ),
        ];
        for (params, expected) in cases {
            let msg = err_of(params);
            assert!(
                msg.contains(expected),
                "{msg:?} should contain {expected:?}"
            );
        }
    }

    #[test]
    fn any_bias_or_penalty_counts_as_changing_logits() {
        let d = SamplingParams::default;
        assert!(!SamplingParams {
            logit_bias: vec![(1, 0.5)],
            ..d()
        }
        .leaves_logits_unchanged());
        assert!(!SamplingParams {
            repetition_penalty: 1.1,
            ..d()
        }
        .leaves_logits_unchanged());
        assert!(!SamplingParams {
            presence_penalty: 0.1,
            ..d()
        }
        .leaves_logits_unchanged());
        assert!(!SamplingParams {
            frequency_penalty: 0.1,
            ..d()
        }
        .leaves_logits_unchanged());
    }
}
