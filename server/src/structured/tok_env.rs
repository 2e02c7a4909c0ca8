//! The served vocabulary as llguidance sees it: every token's bytes in a trie.

use std::sync::Arc;

use llguidance::toktrie::{TokRxInfo, TokTrie, TokenId};
use models::Tokenizer;

use super::GrammarError;

pub(crate) struct TokenizerEnv {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv {
    /// Ids `0..vocab_size` (the logits' width, which may exceed the tokenizer's vocabulary):
    /// ordinary tokens by the bytes they decode to; control tokens marked special, so no text
    /// ever matches them; ids the tokenizer lacks empty, so they are never allowed.
    pub fn new(tokenizer: Arc<Tokenizer>, vocab_size: usize) -> Result<Self, GrammarError> {
        let Some(&eos) = tokenizer.eos_ids().first() else {
            return Err(GrammarError::Vocabulary(
                "the tokenizer has no end-of-sequence token".into(),
            ));
        };
        let size = vocab_size.max(tokenizer.vocab_size());
        let words: Vec<Vec<u8>> = (0..size as u32)
            .map(
                |id| match (tokenizer.token_kind(id), tokenizer.token_bytes(id)) {
                    (Some(kind), _) if kind.is_special() => {
                        let piece = tokenizer.token_piece(id).unwrap_or_default();
                        [&[TokTrie::SPECIAL_TOKEN_MARKER], piece.as_bytes()].concat()
                    }
                    (_, Some(bytes)) => bytes.to_vec(),
                    (_, None) => Vec::new(),
                },
            )
            .collect();
        let info = TokRxInfo {
            tok_bos: tokenizer.bos_id(),
            ..TokRxInfo::new(size as u32, eos)
        };
        let trie = TokTrie::from(&info, &words);
        Ok(Self { trie, tokenizer })
    }
}

impl llguidance::toktrie::TokenizerEnv for TokenizerEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// Text to ids as the model would see it (no special tokens parsed); bytes that are not
    /// UTF-8 are replaced, which llguidance tolerates (it checks tokenizations it relies on).
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.tokenizer
            .encode(&String::from_utf8_lossy(s), false)
            .unwrap_or_default()
    }
}
