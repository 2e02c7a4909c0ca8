//! Typed errors of the tokenizer module. Loading errors surface at server start-up (a broken
//! GGUF or tokenizer.json), encode/decode errors surface per request (a prompt that cannot be
//! tokenized, a sampled id outside the vocabulary), so every variant names the key, file or id
//! at fault.

use std::path::PathBuf;

/// Everything that can go wrong while loading a tokenizer or converting text <-> ids.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A GGUF metadata key the tokenizer cannot do without is absent.
    #[error("GGUF metadata key `{0}` is missing")]
    MissingKey(&'static str),

    /// A GGUF metadata key holds a value of the wrong type.
    #[error("GGUF metadata key `{key}` should be {expected}")]
    WrongType {
        key: &'static str,
        expected: &'static str,
    },

    /// A per-token GGUF array (scores, token types) does not have one entry per token.
    #[error(
        "GGUF metadata key `{key}` has {got} entries but the vocabulary has {expected} tokens"
    )]
    LengthMismatch {
        key: &'static str,
        expected: usize,
        got: usize,
    },

    /// `tokenizer.ggml.model` names a tokenizer family this module does not implement.
    #[error("unsupported tokenizer model `{0}` (supported: gpt2, llama)")]
    UnsupportedModel(String),

    /// `tokenizer.ggml.pre` names a pre-tokenizer whose splitting rules are not implemented.
    #[error("unsupported pre-tokenizer type `{0}`")]
    UnsupportedPreTokenizer(String),

    /// The vocabulary holds no tokens.
    #[error("the tokenizer vocabulary is empty")]
    EmptyVocabulary,

    /// A token id given to decode (or to a lookup that must succeed) is not in the vocabulary.
    #[error("token id {id} is out of range for a vocabulary of {vocab_size} tokens")]
    TokenOutOfRange { id: u32, vocab_size: usize },

    /// SentencePiece byte fallback needed a `<0xXX>` token the vocabulary lacks, and there is
    /// no unknown token to use instead.
    #[error("byte 0x{0:02X} has no byte token and the vocabulary has no unknown token")]
    UnencodableByte(u8),

    /// A tokenizer.json uses a decoder whose byte mapping this module cannot reproduce.
    #[error("unsupported tokenizer.json decoder `{0}`")]
    UnsupportedDecoder(String),

    /// Reading a tokenizer file failed.
    #[error("cannot read `{path}`: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// A tokenizer or tokenizer_config file is not the JSON we expect.
    #[error("cannot parse `{path}`: {message}")]
    Parse { path: PathBuf, message: String },

    /// The `tokenizers` crate reported an error (building the BPE model, encoding).
    #[error("tokenizers backend: {0}")]
    Backend(String),
}

impl TokenizerError {
    /// Wraps an error of the `tokenizers` crate, whose boxed error type does not implement
    /// `std::error::Error` itself and so cannot be a `#[source]`.
    pub(crate) fn backend(err: impl std::fmt::Display) -> Self {
        Self::Backend(err.to_string())
    }
}
