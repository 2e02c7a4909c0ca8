//! Text <-> token ids for the served model: the first step of request validation (the rendered
//! chat template becomes prompt ids) and the last step of every generation step (sampled ids
//! become streamed text, through [`IncrementalDecoder`]).
//!
//! A [`Tokenizer`] is built either from GGUF metadata ([`Tokenizer::from_gguf`], the default:
//! the tokenizer travels inside the weights file) or from a Hugging Face `tokenizer.json`
//! ([`Tokenizer::from_file`]). GGUF vocabularies are tokenized exactly as llama.cpp does
//! (src/llama-vocab.cpp), because GGUF files are produced for and checked against llama.cpp:
//! byte-level BPE (`gpt2`) runs on the `tokenizers` crate with llama.cpp's pre-tokenizer regexes,
//! SentencePiece (`llama`) runs on our port of llama.cpp's SPM merger ([`spm`]). Special-token
//! splitting ([`special`]) and decoding (per-token byte strings, concatenated) are shared by all
//! backends, so `decode` and the streaming decoder agree byte for byte.

mod bytelevel;
mod error;
mod gguf;
mod hf;
mod incremental;
mod pretok;
mod special;
mod spm;

#[cfg(test)]
mod test_vocab;

use std::collections::HashMap;
use std::path::Path;

pub use error::TokenizerError;
pub use incremental::IncrementalDecoder;

use special::{Fragment, SpecialSplitter, SpecialToken};
use spm::SpmModel;

/// What a vocabulary entry is, as GGUF `tokenizer.ggml.token_type` numbers it (llama.cpp's
/// `llama_token_type`). Decides whether the entry is matched in prompt text only when parsing
/// specials, always, or never, and whether decode may skip it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenKind {
    /// Ordinary text (type 1; also used for type 0, "undefined").
    Normal,
    /// The unknown token (type 2).
    Unknown,
    /// A control token such as BOS, EOS or `<|im_start|>` (type 3).
    Control,
    /// A user-defined token, always matched whole in text (type 4).
    UserDefined,
    /// A placeholder that decodes to nothing (type 5).
    Unused,
    /// A byte-fallback token `<0xXX>` (type 6).
    Byte,
}

impl TokenKind {
    /// Maps a GGUF `tokenizer.ggml.token_type` value.
    pub fn from_gguf(token_type: i64) -> Self {
        match token_type {
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Normal,
        }
    }

    /// Control and unknown tokens: written in text only when parsing specials, dropped by
    /// `decode(.., skip_special = true)`.
    pub fn is_special(self) -> bool {
        matches!(self, Self::Control | Self::Unknown)
    }
}

/// Token strings that end a turn or a text. llama.cpp's end-of-generation list (without its
/// fill-in-the-middle entries); a vocabulary's control tokens with one of these names join
/// [`Tokenizer::eos_ids`].
const END_OF_TURN_NAMES: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "</s>",
];

/// The model-specific half of tokenization: how one plain text fragment becomes ids.
#[derive(Clone)]
enum Backend {
    /// Byte-level BPE (or anything a tokenizer.json describes), on the `tokenizers` crate.
    Hf(Box<tokenizers::Tokenizer>),
    /// llama.cpp's SentencePiece merger; `add_space_prefix` puts a space before the first
    /// fragment and before every fragment that follows a special token.
    Spm {
        // Boxed: the 256-entry byte table would otherwise make every `Backend` 2 KiB.
        model: Box<SpmModel>,
        add_space_prefix: bool,
    },
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Hf(_) => f.write_str("Hf"),
            Self::Spm { .. } => f.write_str("Spm"),
        }
    }
}

impl Backend {
    fn encode_text(
        &self,
        text: &str,
        after_special: bool,
        out: &mut Vec<u32>,
    ) -> Result<(), TokenizerError> {
        match self {
            Self::Hf(tk) => {
                let encoding = tk.encode(text, false).map_err(TokenizerError::backend)?;
                out.extend_from_slice(encoding.get_ids());
                Ok(())
            }
            Self::Spm {
                model,
                add_space_prefix,
            } => {
                let prefix = if *add_space_prefix && after_special {
                    " "
                } else {
                    ""
                };
                let escaped = format!("{prefix}{text}").replace(' ', spm::SPACE_MARK);
                model.encode(&escaped, out)
            }
        }
    }
}

/// Everything a loader works out; [`Tokenizer::assemble`] adds the derived lookups.
struct Parts {
    backend: Backend,
    /// Vocabulary entries as stored (`Ġhello`, `▁hello`, `<0x0A>`, `<|im_end|>`).
    pieces: Vec<String>,
    kinds: Vec<TokenKind>,
    /// What each entry decodes to.
    bytes: Vec<Vec<u8>>,
    /// Tokens the splitter extracts from prompt text before the backend runs.
    specials: Vec<SpecialToken>,
    bos: Option<u32>,
    eos: Option<u32>,
    /// Further end-of-generation ids named by the loader (GGUF `eot_token_id`, `eom_token_id`).
    extra_eos: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
    /// Decode drops one leading space of the first emitted piece (SentencePiece's prefix space).
    strip_leading_space: bool,
}

/// A loaded tokenizer. Cheap to share (`Arc<Tokenizer>`): every method takes `&self`.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    backend: Backend,
    pieces: Vec<String>,
    kinds: Vec<TokenKind>,
    bytes: Vec<Vec<u8>>,
    token_to_id: HashMap<String, u32>,
    specials: SpecialSplitter,
    bos: Option<u32>,
    eos: Option<u32>,
    eos_ids: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
    strip_leading_space: bool,
}

impl Tokenizer {
    /// Builds the tokenizer stored in a GGUF file's metadata (`tokenizer.ggml.*`).
    pub fn from_gguf(
        content: &candle_core::quantized::gguf_file::Content,
    ) -> Result<Self, TokenizerError> {
        gguf::load(&content.metadata)
    }

    /// Loads a Hugging Face `tokenizer.json`; BOS/EOS and `add_bos_token` come from the
    /// `tokenizer_config.json` beside it when there is one.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        hf::load(path.as_ref())
    }

    fn assemble(parts: Parts) -> Self {
        let mut token_to_id = HashMap::with_capacity(parts.pieces.len());
        for (id, piece) in parts.pieces.iter().enumerate() {
            // Last entry wins on duplicates, as llama.cpp's `token_to_id`.
            token_to_id.insert(piece.clone(), id as u32);
        }
        let mut eos_ids: Vec<u32> = parts.eos.into_iter().chain(parts.extra_eos).collect();
        for name in END_OF_TURN_NAMES {
            if let Some(&id) = token_to_id.get(*name) {
                if parts.kinds.get(id as usize) == Some(&TokenKind::Control) {
                    eos_ids.push(id);
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        eos_ids.retain(|id| seen.insert(*id));
        Self {
            backend: parts.backend,
            pieces: parts.pieces,
            kinds: parts.kinds,
            bytes: parts.bytes,
            token_to_id,
            specials: SpecialSplitter::new(parts.specials),
            bos: parts.bos,
            eos: parts.eos,
            eos_ids,
            add_bos: parts.add_bos,
            add_eos: parts.add_eos,
            strip_leading_space: parts.strip_leading_space,
        }
    }

    /// Text to ids, never adding BOS/EOS. With `parse_special`, control tokens written in the
    /// text (`<|im_start|>`) become their single ids; without, they are tokenized as the
    /// characters they are made of. User-defined tokens are matched either way (llama.cpp).
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        let mut after_special = true;
        for fragment in self.specials.split(text, parse_special) {
            match fragment {
                Fragment::Token(id) => {
                    out.push(id);
                    after_special = true;
                }
                Fragment::Text(t) => {
                    self.backend.encode_text(t, after_special, &mut out)?;
                    after_special = false;
                }
            }
        }
        Ok(out)
    }

    /// As [`Self::encode`], with BOS in front when the model asks for it ([`Self::add_bos`]).
    pub fn encode_with_bos(
        &self,
        text: &str,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = Vec::new();
        if let (true, Some(bos)) = (self.add_bos, self.bos) {
            ids.push(bos);
        }
        ids.extend(self.encode(text, parse_special)?);
        Ok(ids)
    }

    /// Ids to text. With `skip_special`, control and unknown tokens are left out. Bytes that
    /// do not form valid UTF-8 become U+FFFD. An id outside the vocabulary is an error.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        let mut bytes = Vec::new();
        let mut at_start = true;
        for &id in ids {
            self.append_bytes(id, skip_special, &mut at_start, &mut bytes)?;
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Appends what `id` decodes to. `at_start` tracks whether anything was emitted yet, for
    /// SentencePiece's rule that the first piece loses its prefix space; decode and the
    /// streaming decoder share this so their output is identical.
    fn append_bytes(
        &self,
        id: u32,
        skip_special: bool,
        at_start: &mut bool,
        out: &mut Vec<u8>,
    ) -> Result<(), TokenizerError> {
        let piece = self
            .token_bytes(id)
            .ok_or(TokenizerError::TokenOutOfRange {
                id,
                vocab_size: self.vocab_size(),
            })?;
        let skipped = skip_special && self.kinds[id as usize].is_special();
        if skipped || piece.is_empty() {
            return Ok(());
        }
        let piece = match (*at_start && self.strip_leading_space, piece) {
            (true, [b' ', rest @ ..]) => rest,
            _ => piece,
        };
        *at_start = false;
        out.extend_from_slice(piece);
        Ok(())
    }

    /// The vocabulary entry for `id` as stored (`Ġhello`, `▁hello`, `<0x0A>`).
    pub fn token_piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(String::as_str)
    }

    /// The bytes `id` decodes to on its own (no leading-space rule applied). Not always valid
    /// UTF-8: byte tokens and byte-level pieces can hold part of a character.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.bytes.get(id as usize).map(Vec::as_slice)
    }

    /// What kind of vocabulary entry `id` is.
    pub fn token_kind(&self, id: u32) -> Option<TokenKind> {
        self.kinds.get(id as usize).copied()
    }

    /// The id of a vocabulary entry given as stored (`<|im_end|>`, `Ġhello`).
    pub fn token_id(&self, piece: &str) -> Option<u32> {
        self.token_to_id.get(piece).copied()
    }

    /// Number of vocabulary entries (ids are `0..vocab_size()`).
    /// `sha256:<hex>` over every token (id order: its kind and bytes) and the BOS/EOS ids: two
    /// tokenizers with the same identity map text to the same ids, token for token, as long as
    /// their merge rules agree, which the same vocabulary in the same order implies for every
    /// model family graft loads. A model that predicts over another model's ids (a memory
    /// decoder) records the identity of the tokenizer it was trained with.
    pub fn identity(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update((self.bytes.len() as u64).to_le_bytes());
        for (bytes, kind) in self.bytes.iter().zip(&self.kinds) {
            h.update([u8::from(kind.is_special())]);
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        }
        for id in [self.bos, self.eos] {
            h.update(id.map_or(u64::MAX, u64::from).to_le_bytes());
        }
        let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// The beginning-of-sequence id, if the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// Every id that ends generation: EOS first, then end-of-turn control tokens
    /// (`<|im_end|>`, `<|eot_id|>`, `<|endoftext|>`, ...) present in the vocabulary.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The BOS token's text, for chat templates (`bos_token`).
    pub fn bos_token(&self) -> Option<&str> {
        self.bos.and_then(|id| self.token_piece(id))
    }

    /// The EOS token's text, for chat templates (`eos_token`).
    pub fn eos_token(&self) -> Option<&str> {
        self.eos.and_then(|id| self.token_piece(id))
    }

    /// Whether prompts start with BOS (`tokenizer.ggml.add_bos_token` / `add_bos_token`).
    pub fn add_bos(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    /// Whether the model expects EOS appended to encoded text (`add_eos_token`); encoding
    /// never does it, callers that need it (embedding models) append [`Self::eos_ids`]`[0]`.
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::test_vocab::{self, gpt2_char as c, spm_byte};
    use super::*;

    #[test]
    fn tokenizer_and_stream_state_can_cross_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Tokenizer>();
        shareable::<IncrementalDecoder>();
    }

    #[test]
    fn identity_is_stable_and_follows_the_vocabulary() {
        let a = test_vocab::gpt2_tokenizer("gpt-2");
        assert_eq!(a.identity(), test_vocab::gpt2_tokenizer("gpt-2").identity());
        assert!(a.identity().starts_with("sha256:") && a.identity().len() == 7 + 64);
        let mut renamed = a.clone();
        renamed.bytes[5] = b"another".to_vec();
        assert_ne!(renamed.identity(), a.identity());
        let mut other_eos = a.clone();
        other_eos.eos = Some(3);
        assert_ne!(other_eos.identity(), a.identity());
    }

    #[test]
    fn gpt2_vocab_merges_to_hand_checked_ids() {
        let tk = test_vocab::gpt2_tokenizer("gpt-2");
        assert_eq!(tk.encode("hello the", false).unwrap(), [265, 263]);
        // No space before "the": `Ġt he` cannot apply, only `h e`.
        assert_eq!(tk.encode("the", false).unwrap(), [c('t'), 260]);
        assert_eq!(tk.encode(" 12", false).unwrap(), [c(' '), 267]);
        assert_eq!(
            tk.encode("a  b", false).unwrap(),
            [c('a'), c(' '), c(' '), c('b')]
        );
        assert_eq!(tk.decode(&[265, 263], false).unwrap(), "hello the");
    }

    #[test]
    fn smollm_pre_tokenizer_splits_digits_before_merging() {
        let tk = test_vocab::gpt2_tokenizer("smollm");
        assert_eq!(tk.encode("12", false).unwrap(), [c('1'), c('2')]);
        assert_eq!(tk.encode(" 12", false).unwrap(), [c(' '), c('1'), c('2')]);
        assert_eq!(tk.encode("hello the", false).unwrap(), [265, 263]);
    }

    #[test]
    fn control_tokens_parse_only_when_asked() {
        let tk = test_vocab::gpt2_tokenizer("gpt-2");
        let text = "<|im_start|>hello<|im_end|>";
        assert_eq!(tk.encode(text, true).unwrap(), [1, 265, 2]);
        let plain = tk.encode(text, false).unwrap();
        let chars = |s: &str| s.chars().map(c).collect::<Vec<_>>();
        let mut expected = chars("<|im_start|>");
        expected.push(265);
        expected.extend(chars("<|im_end|>"));
        assert_eq!(plain, expected);
        assert_eq!(tk.decode(&plain, true).unwrap(), text);
        assert_eq!(tk.decode(&[1, 265, 2], false).unwrap(), text);
        assert_eq!(tk.decode(&[1, 265, 2], true).unwrap(), "hello");
    }

    #[test]
    fn user_defined_tokens_always_match() {
        let tk = test_vocab::gpt2_tokenizer("gpt-2");
        assert_eq!(tk.encode("a<tool>b", false).unwrap(), [c('a'), 3, c('b')]);
        assert_eq!(tk.decode(&[3], true).unwrap(), "<tool>");
    }

    #[test]
    fn gpt2_special_ids_and_bos_rules() {
        let tk = test_vocab::gpt2_tokenizer("gpt-2");
        assert_eq!(tk.bos_id(), Some(1));
        assert_eq!(tk.bos_token(), Some("<|im_start|>"));
        assert_eq!(tk.eos_token(), Some("<|im_end|>"));
        // EOS first, then the end-of-turn control tokens present.
        assert_eq!(tk.eos_ids(), [2, 0]);
        assert!(!tk.add_bos());
        assert_eq!(tk.encode_with_bos("hello", false).unwrap(), [265]);
        assert_eq!(tk.token_id("Ġthe"), Some(263));
        assert_eq!(tk.token_piece(263), Some("Ġthe"));
        assert_eq!(tk.token_kind(3), Some(TokenKind::UserDefined));
        assert_eq!(tk.vocab_size(), 268);
    }

    #[test]
    fn spm_merges_by_score_with_prefix_space() {
        let tk = test_vocab::spm_tokenizer();
        assert_eq!(tk.encode("hello world", false).unwrap(), [271, 276]);
        assert_eq!(tk.decode(&[271, 276], false).unwrap(), "hello world");
        // `i` is not a piece: byte fallback.
        assert_eq!(tk.encode("hi", false).unwrap(), [259, 260, spm_byte(b'i')]);
        assert!(tk.add_bos());
        assert_eq!(tk.encode_with_bos("hello", false).unwrap(), [1, 271]);
    }

    #[test]
    fn spm_special_tokens_and_space_after_them() {
        let tk = test_vocab::spm_tokenizer();
        // A prefix space also follows a special token (llama.cpp `is_prev_special`).
        assert_eq!(tk.encode("<s>hello", true).unwrap(), [1, 271]);
        let plain = [259, spm_byte(b'<'), spm_byte(b's'), spm_byte(b'>'), 270];
        assert_eq!(tk.encode("<s>hello", false).unwrap(), plain);
        assert_eq!(tk.decode(&[1, 271], true).unwrap(), "hello");
        assert_eq!(tk.decode(&[1, 271], false).unwrap(), "<s> hello");
        assert_eq!(tk.eos_ids(), [2]);
        assert_eq!(tk.bos_token(), Some("<s>"));
    }

    #[test]
    fn decode_of_out_of_range_id_is_an_error_not_a_panic() {
        let tk = test_vocab::spm_tokenizer();
        let err = tk.decode(&[271, 9999], false).unwrap_err();
        assert!(matches!(
            err,
            TokenizerError::TokenOutOfRange {
                id: 9999,
                vocab_size: 277
            }
        ));
    }

    #[test]
    fn encode_decode_round_trips_on_awkward_text() {
        let texts = [
            "",
            " ",
            "\n\n",
            "  x  ",
            "😀 日本 café",
            "a\u{0}b",
            "tab\there",
        ];
        for tk in [
            test_vocab::gpt2_tokenizer("smollm"),
            test_vocab::spm_tokenizer(),
        ] {
            for text in texts {
                let ids = tk.encode(text, true).unwrap();
                assert_eq!(tk.decode(&ids, false).unwrap(), text, "{ids:?}");
            }
        }
    }

    #[test]
    fn unknown_pre_tokenizer_fails_the_load_naming_it() {
        let md = test_vocab::gpt2_metadata("no-such-pre");
        let err = Tokenizer::from_gguf(&test_vocab::gguf_content(&md)).unwrap_err();
        assert!(
            matches!(err, TokenizerError::UnsupportedPreTokenizer(ref n) if n == "no-such-pre")
        );
        assert!(err.to_string().contains("no-such-pre"));
    }

    #[test]
    fn missing_metadata_names_the_key() {
        for key in [
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.model",
        ] {
            let md: Vec<_> = test_vocab::gpt2_metadata("gpt-2")
                .into_iter()
                .filter(|(k, _)| *k != key)
                .collect();
            let err = Tokenizer::from_gguf(&test_vocab::gguf_content(&md)).unwrap_err();
            assert!(
                matches!(err, TokenizerError::MissingKey(k) if k == key),
                "{err}"
            );
            assert!(err.to_string().contains(key));
        }
    }

    #[test]
    fn malformed_metadata_is_typed() {
        let mut md = test_vocab::spm_metadata();
        md.retain(|(k, _)| *k != "tokenizer.ggml.scores");
        md.push((
            "tokenizer.ggml.scores",
            candle_core::quantized::gguf_file::Value::Array(vec![]),
        ));
        let err = Tokenizer::from_gguf(&test_vocab::gguf_content(&md)).unwrap_err();
        assert!(matches!(
            err,
            TokenizerError::LengthMismatch {
                key: "tokenizer.ggml.scores",
                ..
            }
        ));

        let mut md = test_vocab::spm_metadata();
        md[0].1 = candle_core::quantized::gguf_file::Value::String("bert".into());
        let err = Tokenizer::from_gguf(&test_vocab::gguf_content(&md)).unwrap_err();
        assert!(matches!(err, TokenizerError::UnsupportedModel(ref m) if m == "bert"));
    }
}
