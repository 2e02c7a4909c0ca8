//! Structured outputs: `response_format` (`json_object`, `json_schema`) enforced while sampling.
//!
//! A request's format is compiled once, in validation, into a [`Constraint`]: an llguidance
//! matcher (the constrained-decoding library llama.cpp and mistral.rs use) over the served
//! model's vocabulary. Each step, before the sequence samples, the constraint masks the tokens
//! that cannot continue a valid output (their logits become -inf), and after it samples, the
//! constraint consumes the token. The mask belongs to the sequence, not the batch, so a
//! constrained row shares its step with unconstrained ones and with any plug-in chain (plug-ins
//! change the logits; the mask applies last). Once the output is complete only the stop tokens
//! are allowed, so a request that ends with `finish_reason: "stop"` holds a whole JSON value
//! that validates against the schema; one cut by `max_tokens` ends with `"length"`.
//!
//! Schemas go through llguidance's JSON-schema compiler, which refuses what it cannot enforce
//! (keywords it does not implement, remote `$ref`s: nothing is ever fetched) with a message that
//! names it; that becomes a 400 on `response_format`. Output is compact JSON on one line (`": "`
//! and `", "` between items).

mod constraint;
mod format;
mod tok_env;

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::earley::SlicedBiasComputer;
use llguidance::toktrie::{InferenceCapabilities, TokEnv};
use llguidance::{Matcher, ParserFactory};
use models::Tokenizer;
use serde_json::{json, Value};

pub use constraint::Constraint;
pub use format::ResponseFormat;

/// Why a format could not become a constraint.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GrammarError {
    #[error("cannot build the token trie of this vocabulary: {0}")]
    Vocabulary(String),
    /// The schema uses something the constraint cannot enforce, or is not a schema.
    #[error("{0}")]
    Unsupported(String),
}

/// The served vocabulary, ready to compile formats into constraints. Built once per model.
pub struct Grammars {
    factory: ParserFactory,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").finish_non_exhaustive()
    }
}

impl Grammars {
    /// For a model whose logits have `vocab_size` entries over `tokenizer`'s ids.
    pub fn new(tokenizer: Arc<Tokenizer>, vocab_size: usize) -> Result<Self, GrammarError> {
        let env = tok_env::TokenizerEnv::new(tokenizer, vocab_size)?;
        let caps = InferenceCapabilities {
            ff_tokens: false,
            backtrack: false,
            conditional_ff_tokens: false,
            fork: false,
        };
        let slices = SlicedBiasComputer::general_slices();
        let env: TokEnv = Arc::new(env);
        let mut factory = ParserFactory::new(&env, caps, &slices)
            .map_err(|e| GrammarError::Vocabulary(e.to_string()))?;
        factory.quiet();
        Ok(Self { factory })
    }

    /// The constraint of `format`, or `None` for plain text.
    pub fn compile(&self, format: &ResponseFormat) -> Result<Option<Constraint>, GrammarError> {
        let Some(schema) = format.schema() else {
            return Ok(None);
        };
        self.constraint(TopLevelGrammar::from_json_schema(with_layout(schema)))
            .map(Some)
    }

    /// The constraint of an llguidance Lark grammar (tool calls: `%json` schemas inside a
    /// grammar of tags and literals).
    pub fn compile_lark(&self, grammar: &str) -> Result<Constraint, GrammarError> {
        self.constraint(TopLevelGrammar::from_lark(grammar.to_string()))
    }

    fn constraint(&self, grammar: TopLevelGrammar) -> Result<Constraint, GrammarError> {
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| GrammarError::Unsupported(e.to_string()))?;
        let eos = self.factory.tok_env().tok_trie().eos_token();
        Ok(Constraint::new(Matcher::new(Ok(parser)), eos))
    }
}

/// Output JSON on one line with a space after `:` and `,`, as models usually write it:
/// unconstrained whitespace lets a small model pad forever with newlines and spaces. A schema
/// that sets llguidance's own options (`x-guidance`) keeps them.
pub(crate) fn with_layout(mut schema: Value) -> Value {
    if let Value::Object(map) = &mut schema {
        map.entry("x-guidance").or_insert_with(
            || json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
        );
    }
    schema
}

#[cfg(test)]
mod tests;
