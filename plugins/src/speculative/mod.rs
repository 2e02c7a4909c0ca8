//! Speculative decoding, a built-in plug-in (no file, no name):
//! `{"type": "speculative", "method": "ngram", "num_speculative_tokens": 4,
//! "prompt_lookup_min": 1, "prompt_lookup_max": 3}`, the fields vLLM's `speculative_config`
//! uses for the same method.
//!
//! The plug-in only drafts ([`models::Hook::draft`]); the engine verifies: the next step feeds
//! the last sampled token and the drafts in one row, samples each position in order exactly as
//! it would have one step at a time (same logits bit for bit, same random stream), keeps the
//! drafts its own samples agree with and cuts the KV cache back after the first that
//! disagrees. The output is therefore the base model's, greedy or sampled, token for token;
//! what speculation changes is how many forward steps it takes.

pub mod ngram;

use std::sync::Arc;

use models::hooks::{HookParams, HookPoints};
use models::{Hook, PrefixReuse};
use serde_json::{Map, Value};

use crate::error::{PluginError, Result};
use crate::kinds::PluginKind;
use crate::params;
use crate::plugin::Plugin;

/// The name the built-in instance is known by in errors and logs.
pub const NAME: &str = "speculative";

/// Most draft tokens a request may ask for per step.
pub const MAX_SPECULATIVE_TOKENS: usize = 16;

/// Longest n-gram prompt lookup may match.
pub const MAX_LOOKUP: usize = 16;

/// What a request asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpeculativeParams {
    /// Drafts per step, at most.
    pub num_speculative_tokens: usize,
    pub prompt_lookup_min: usize,
    pub prompt_lookup_max: usize,
}

/// The draft source. One instance serves every request; it holds nothing.
#[derive(Debug, Default)]
pub struct Speculative;

impl Speculative {
    pub fn built_in() -> Arc<dyn Plugin> {
        Arc::new(Speculative)
    }
}

impl Hook for Speculative {
    fn name(&self) -> &str {
        NAME
    }

    fn points(&self) -> HookPoints {
        HookPoints {
            draft: true,
            ..HookPoints::default()
        }
    }

    /// Neutral: drafts are verified by the model, whose keys and values for the tokens kept
    /// are the ones one-token steps would leave, and the drafter keeps no state.
    fn prefix_reuse(&self, _params: &HookParams) -> PrefixReuse {
        PrefixReuse::Neutral
    }

    fn draft(&self, params: &HookParams, tokens: &[u32], max: usize) -> Vec<u32> {
        let Some(p) = params.downcast_ref::<SpeculativeParams>() else {
            return Vec::new();
        };
        let k = p.num_speculative_tokens.min(max);
        ngram::propose(tokens, p.prompt_lookup_min, p.prompt_lookup_max, k)
    }
}

impl Plugin for Speculative {
    fn kind(&self) -> PluginKind {
        PluginKind::Speculative
    }

    /// vLLM's defaults: `num_speculative_tokens` is required there and 4 here (the request
    /// shape's own example); with neither lookup bound given both are 5 (vLLM), with one given
    /// the other equals it.
    fn request_params(&self, p: &Map<String, Value>) -> Result<HookParams> {
        let known = [
            "method",
            "num_speculative_tokens",
            "prompt_lookup_min",
            "prompt_lookup_max",
        ];
        params::reject_unknown(NAME, p, &known)?;
        match p.get("method").map(|m| m.as_str()) {
            None | Some(Some("ngram")) => {}
            Some(_) => {
                return Err(bad(
                    "method",
                    format!("must be \"ngram\", got {}", p["method"]),
                ))
            }
        }
        let k = params::count(
            NAME,
            p,
            "num_speculative_tokens",
            (1, MAX_SPECULATIVE_TOKENS),
        )?;
        let min = params::count(NAME, p, "prompt_lookup_min", (1, MAX_LOOKUP))?;
        let max = params::count(NAME, p, "prompt_lookup_max", (1, MAX_LOOKUP))?;
        let (min, max) = match (min, max) {
            (None, None) => (5, 5),
            (Some(n), None) | (None, Some(n)) => (n, n),
            (Some(min), Some(max)) => (min, max),
        };
        if min > max {
            return Err(bad(
                "prompt_lookup_min",
                format!("must be at most prompt_lookup_max ({max}), got {min}"),
            ));
        }
        Ok(Arc::new(SpeculativeParams {
            num_speculative_tokens: k.unwrap_or(4),
            prompt_lookup_min: min,
            prompt_lookup_max: max,
        }))
    }

    fn resident_bytes(&self) -> usize {
        0
    }
}

fn bad(param: &str, message: String) -> PluginError {
    PluginError::BadParameter {
        plugin: NAME.to_string(),
        param: param.to_string(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<SpeculativeParams> {
        let map = v.as_object().cloned().unwrap_or_default();
        let params = Speculative.request_params(&map)?;
        Ok(*params.downcast_ref::<SpeculativeParams>().unwrap())
    }

    #[test]
    fn vllm_defaults_fill_what_the_request_leaves_out() {
        let p = parse(json!({})).unwrap();
        assert_eq!(
            (
                p.num_speculative_tokens,
                p.prompt_lookup_min,
                p.prompt_lookup_max
            ),
            (4, 5, 5)
        );
        let p = parse(json!({"method": "ngram", "prompt_lookup_max": 3})).unwrap();
        assert_eq!((p.prompt_lookup_min, p.prompt_lookup_max), (3, 3));
        let p = parse(
            json!({"num_speculative_tokens": 8, "prompt_lookup_min": 1, "prompt_lookup_max": 3}),
        )
        .unwrap();
        assert_eq!(
            (
                p.num_speculative_tokens,
                p.prompt_lookup_min,
                p.prompt_lookup_max
            ),
            (8, 1, 3)
        );
    }

    #[test]
    fn bad_parameters_are_named() {
        for (body, param) in [
            (json!({"method": "eagle"}), "method"),
            (json!({"method": 3}), "method"),
            (
                json!({"num_speculative_tokens": 0}),
                "num_speculative_tokens",
            ),
            (
                json!({"num_speculative_tokens": 17}),
                "num_speculative_tokens",
            ),
            (
                json!({"num_speculative_tokens": 2.5}),
                "num_speculative_tokens",
            ),
            (
                json!({"prompt_lookup_min": 4, "prompt_lookup_max": 2}),
                "prompt_lookup_min",
            ),
            (json!({"prompt_lookup_max": -1}), "prompt_lookup_max"),
            (json!({"lookahead": 2}), "lookahead"),
        ] {
            let e = parse(body.clone()).unwrap_err().to_string();
            assert!(e.contains(&format!("`{param}`")), "{body}: {e}");
        }
    }

    #[test]
    fn drafts_come_from_prompt_lookup_within_the_engine_limit() {
        let params: HookParams = Arc::new(SpeculativeParams {
            num_speculative_tokens: 4,
            prompt_lookup_min: 1,
            prompt_lookup_max: 3,
        });
        let t = [1, 2, 3, 4, 9, 2, 3];
        assert_eq!(Speculative.draft(&params, &t, 8), vec![4, 9, 2, 3]);
        assert_eq!(Speculative.draft(&params, &t, 1), vec![4]);
        assert!(Speculative.draft(&params, &t, 0).is_empty());
        let foreign: HookParams = Arc::new(());
        assert!(Speculative.draft(&foreign, &t, 8).is_empty());
    }

    #[test]
    fn drafting_changes_nothing_a_cached_prefix_holds() {
        let params = parse(json!({"num_speculative_tokens": 4})).unwrap();
        let params: HookParams = Arc::new(params);
        assert_eq!(Speculative.prefix_reuse(&params), PrefixReuse::Neutral);
    }
}
