//! Log-probabilities in the two shapes OpenAI clients read: chat's
//! `{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}` and legacy completions'
//! parallel lists `tokens` / `token_logprobs` / `top_logprobs` / `text_offset` (what
//! lm-evaluation-harness scores with `echo=true, logprobs=N`).

use std::collections::BTreeMap;

use serde::Serialize;

use super::replies::{ChatLogprob, TopLogprob};
use crate::engine::{Engine, TokenLogprob};

/// OpenAI reports an impossible token as -9999 rather than -inf, which JSON cannot carry.
const FLOOR: f64 = -9999.0;

/// Widened to f64 as JSON numbers are, so every route writes the same digits.
fn finite(logprob: f32) -> f64 {
    if logprob.is_finite() {
        f64::from(logprob)
    } else {
        FLOOR
    }
}

/// One chat `logprobs.content` entry.
pub fn chat_entry(engine: &dyn Engine, lp: &TokenLogprob) -> ChatLogprob {
    let top = lp
        .top
        .iter()
        .map(|&(id, logprob)| chat_token(engine, id, logprob))
        .collect();
    let TopLogprob {
        token,
        logprob,
        bytes,
    } = chat_token(engine, lp.id, lp.logprob);
    ChatLogprob {
        token,
        logprob,
        bytes,
        top_logprobs: top,
    }
}

fn chat_token(engine: &dyn Engine, id: u32, logprob: f32) -> TopLogprob {
    let token = engine.token_text(id);
    TopLogprob {
        bytes: token.as_bytes().to_vec(),
        logprob: finite(logprob),
        token,
    }
}

/// Legacy completions log-probs; the first prompt token has none (`null`), as in OpenAI.
#[derive(Debug, Clone, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct LegacyLogprobs {
    pub tokens: Vec<String>,
    /// `null` for the prompt's first token.
    pub token_logprobs: Vec<Option<f64>>,
    /// Per token: each alternative's text and log-prob; `null` where `token_logprobs` is.
    pub top_logprobs: Vec<Option<BTreeMap<String, f64>>>,
    /// Character offset of each token in the returned text.
    pub text_offset: Vec<usize>,
}

impl LegacyLogprobs {
    /// Appends token `id`; `offset` is the running character offset, advanced past it.
    pub fn push(
        &mut self,
        engine: &dyn Engine,
        id: u32,
        lp: Option<&TokenLogprob>,
        offset: &mut usize,
    ) {
        let text = engine.token_text(id);
        self.text_offset.push(*offset);
        *offset += text.chars().count();
        self.tokens.push(text);
        self.token_logprobs.push(lp.map(|lp| finite(lp.logprob)));
        self.top_logprobs.push(lp.map(|lp| {
            lp.top
                .iter()
                .map(|&(id, logprob)| (engine.token_text(id), finite(logprob)))
                .collect()
        }));
    }

    /// The prompt's tokens: `lps` are the log-probs of prompt tokens 1.. (the engine's
    /// `PromptLogprobs`); a missing one is `null`.
    pub fn prompt(
        engine: &dyn Engine,
        prompt: &[u32],
        lps: &[TokenLogprob],
        offset: &mut usize,
    ) -> Self {
        let mut out = Self::default();
        for (i, &id) in prompt.iter().enumerate() {
            let lp = i.checked_sub(1).and_then(|j| lps.get(j));
            out.push(engine, id, lp, offset);
        }
        out
    }
}
