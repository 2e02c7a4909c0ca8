//! Log-probabilities in the two shapes OpenAI clients read: chat's
//! `{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}` and legacy completions'
//! parallel lists `tokens` / `token_logprobs` / `top_logprobs` / `text_offset` (what
//! lm-evaluation-harness scores with `echo=true, logprobs=N`).
//!
//! A token is named by its text, or with vLLM's `return_tokens_as_token_ids` by
//! `token_id:<id>`: texts are lossy (a byte-fallback piece has no text of its own, and text
//! re-tokenizes differently), ids let a client score exactly the tokens it was given.

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

/// How log-probs name tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TokenNames {
    /// The token's text (OpenAI).
    #[default]
    Text,
    /// `token_id:<id>` (vLLM's `return_tokens_as_token_ids`).
    Ids,
}

impl TokenNames {
    /// `Ids` when the request set `return_tokens_as_token_ids`.
    pub fn from_flag(as_ids: Option<bool>) -> Self {
        match as_ids {
            Some(true) => Self::Ids,
            _ => Self::Text,
        }
    }

    pub fn name(self, engine: &dyn Engine, id: u32) -> String {
        match self {
            Self::Text => engine.token_text(id),
            Self::Ids => format!("token_id:{id}"),
        }
    }
}

/// One chat `logprobs.content` entry.
pub fn chat_entry(engine: &dyn Engine, names: TokenNames, lp: &TokenLogprob) -> ChatLogprob {
    let top = lp
        .top
        .iter()
        .map(|&(id, logprob)| chat_token(engine, names, id, logprob))
        .collect();
    let TopLogprob {
        token,
        logprob,
        bytes,
    } = chat_token(engine, names, lp.id, lp.logprob);
    ChatLogprob {
        token,
        logprob,
        bytes,
        top_logprobs: top,
    }
}

/// `bytes` are the name's, as vLLM sends them with token-id names.
fn chat_token(engine: &dyn Engine, names: TokenNames, id: u32, logprob: f32) -> TopLogprob {
    let token = names.name(engine, id);
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
    /// Character offset of each token in the returned text (counted on token texts, also
    /// when tokens are named by id).
    pub text_offset: Vec<usize>,
}

impl LegacyLogprobs {
    /// Appends token `id`; `offset` is the running character offset, advanced past it.
    pub fn push(
        &mut self,
        engine: &dyn Engine,
        names: TokenNames,
        id: u32,
        lp: Option<&TokenLogprob>,
        offset: &mut usize,
    ) {
        let text = engine.token_text(id);
        self.text_offset.push(*offset);
        *offset += text.chars().count();
        self.tokens.push(match names {
            TokenNames::Text => text,
            TokenNames::Ids => names.name(engine, id),
        });
        self.token_logprobs.push(lp.map(|lp| finite(lp.logprob)));
        self.top_logprobs.push(lp.map(|lp| {
            lp.top
                .iter()
                .map(|&(id, logprob)| (names.name(engine, id), finite(logprob)))
                .collect()
        }));
    }

    /// The prompt's tokens: `lps` are the log-probs of prompt tokens 1.. (the engine's
    /// `PromptLogprobs`); a missing one is `null`.
    pub fn prompt(
        engine: &dyn Engine,
        names: TokenNames,
        prompt: &[u32],
        lps: &[TokenLogprob],
        offset: &mut usize,
    ) -> Self {
        let mut out = Self::default();
        for (i, &id) in prompt.iter().enumerate() {
            let lp = i.checked_sub(1).and_then(|j| lps.get(j));
            out.push(engine, names, id, lp, offset);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::fake::{FakeEngine, BOS, BYTE_OFFSET};

    fn lp(id: u32, logprob: f32, top: &[(u32, f32)]) -> TokenLogprob {
        TokenLogprob {
            id,
            logprob,
            top: top.to_vec(),
        }
    }

    #[test]
    fn chat_entries_named_by_id_keep_log_probs_and_carry_the_names_bytes() {
        let engine = FakeEngine::default();
        let a = BYTE_OFFSET + u32::from(b'a');
        let entry = lp(a, -0.25, &[(a, -0.25), (BOS, f32::NEG_INFINITY)]);
        let text = chat_entry(&engine, TokenNames::Text, &entry);
        let ids = chat_entry(&engine, TokenNames::Ids, &entry);
        assert_eq!(text.token, "a");
        assert_eq!(ids.token, format!("token_id:{a}"));
        assert_eq!(ids.bytes, ids.token.as_bytes());
        assert_eq!(ids.logprob, text.logprob);
        let top: Vec<_> = ids.top_logprobs.iter().map(|t| t.token.as_str()).collect();
        assert_eq!(top, [format!("token_id:{a}"), "token_id:0".to_string()]);
        assert_eq!(ids.top_logprobs[1].logprob, FLOOR);
    }

    #[test]
    fn legacy_tokens_named_by_id_keep_text_offsets() {
        let engine = FakeEngine::default();
        let prompt = [
            BOS,
            BYTE_OFFSET + u32::from(b'h'),
            BYTE_OFFSET + u32::from(b'i'),
        ];
        let lps = [
            lp(prompt[1], -1.0, &[(prompt[2], -0.5)]),
            lp(prompt[2], -2.0, &[]),
        ];
        let by = |names| LegacyLogprobs::prompt(&engine, names, &prompt, &lps, &mut 0);
        let (text, ids) = (by(TokenNames::Text), by(TokenNames::Ids));
        assert_eq!(text.tokens, ["<s>", "h", "i"]);
        assert_eq!(ids.tokens, ["token_id:0", "token_id:106", "token_id:107"]);
        assert_eq!(ids.text_offset, text.text_offset);
        assert_eq!(ids.text_offset, [0, 3, 4]);
        assert_eq!(ids.token_logprobs, text.token_logprobs);
        let top = ids.top_logprobs[1]
            .as_ref()
            .map(|t| t.keys().cloned().collect::<Vec<_>>());
        assert_eq!(top, Some(vec!["token_id:107".to_string()]));
    }
}
