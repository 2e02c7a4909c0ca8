//! Building a [`Tokenizer`] from a Hugging Face `tokenizer.json` (with its
//! `tokenizer_config.json`), used when such files sit beside safetensors weights instead of
//! a GGUF carrying its own vocabulary.
//!
//! The `tokenizers` crate encodes plain text; special added tokens are split out by our own
//! splitter (so `parse_special` means the same for every backend), which is why the crate's own
//! special-token matching is switched off. Decoding does not go through the crate's decoder
//! pipeline: the decoder section of tokenizer.json is inspected once to learn how each
//! vocabulary entry maps to bytes (byte-level, or SentencePiece `▁` + byte fallback), so that
//! streaming and whole-sequence decoding share one byte table. A decoder we cannot express that
//! way (WordPiece, CTC, ...) is refused by name at load.

use std::path::Path;

use serde_json::Value as Json;

use super::special::{Match, SpecialToken};
use super::{bytelevel, spm, Backend, Parts, TokenKind, Tokenizer, TokenizerError};

/// How vocabulary entries map to bytes, read from tokenizer.json's `decoder`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct DecoderStyle {
    byte_level: bool,
    /// `▁` stands for a space (Metaspace, or `Replace("▁", " ")`).
    metaspace: bool,
    /// `<0xXX>` entries are single bytes.
    byte_fallback: bool,
    /// The first piece loses one leading space (`Strip` start, Metaspace prepend).
    strip_leading_space: bool,
}

/// Loads `tokenizer.json` and the optional `tokenizer_config.json` beside it.
pub(crate) fn load(path: &Path) -> Result<Tokenizer, TokenizerError> {
    let json = read_json(path)?;
    let style = decoder_style(json.get("decoder"))?;
    let mut tk = tokenizers::Tokenizer::from_file(path).map_err(|e| TokenizerError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    // Special added tokens are extracted by our splitter, and only when parsing specials.
    tk.set_encode_special_tokens(true);
    let config_path = path.with_file_name("tokenizer_config.json");
    let config = if config_path.exists() {
        Some(read_json(&config_path)?)
    } else {
        None
    };
    let vocab = VocabTables::new(&tk, style);
    let token_id = |name: Option<String>| name.and_then(|n| tk.token_to_id(&n));
    let (template_bos, template_adds_bos) = post_processor_bos(&tk)?;
    let bos = token_id(config_token(config.as_ref(), "bos_token")).or(template_bos);
    let eos = token_id(config_token(config.as_ref(), "eos_token"));
    let config_flag = |key: &str| config.as_ref().and_then(|c| c.get(key)?.as_bool());
    Ok(Tokenizer::assemble(Parts {
        specials: vocab.specials,
        bos,
        eos,
        extra_eos: Vec::new(),
        add_bos: config_flag("add_bos_token").unwrap_or(template_adds_bos),
        add_eos: config_flag("add_eos_token").unwrap_or(false),
        strip_leading_space: style.strip_leading_space,
        pieces: vocab.pieces,
        kinds: vocab.kinds,
        bytes: vocab.bytes,
        backend: Backend::Hf(Box::new(tk)),
    }))
}

fn read_json(path: &Path) -> Result<Json, TokenizerError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| TokenizerError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// `bos_token` / `eos_token` of tokenizer_config.json: a string or `{"content": ...}`.
fn config_token(config: Option<&Json>, key: &str) -> Option<String> {
    match config?.get(key)? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// Whether the post-processor puts a token in front of a single sequence, and which: the BOS
/// of tokenizers whose config does not say (Llama 3 ships `add_bos_token` only in the template).
fn post_processor_bos(tk: &tokenizers::Tokenizer) -> Result<(Option<u32>, bool), TokenizerError> {
    let plain = tk.encode("a", false).map_err(TokenizerError::backend)?;
    let with = tk.encode("a", true).map_err(TokenizerError::backend)?;
    let (plain, with) = (plain.get_ids(), with.get_ids());
    // `with` is `[bos] + plain (+ suffix)` exactly when the template prepends one token.
    let prepends = with.len() > plain.len() && with.get(1..=plain.len()) == Some(plain);
    let first = with.first().copied().filter(|_| prepends);
    Ok((first, first.is_some()))
}

/// Flattens `Sequence` decoders and reads the byte mapping they imply.
fn decoder_style(decoder: Option<&Json>) -> Result<DecoderStyle, TokenizerError> {
    let mut style = DecoderStyle::default();
    let mut stack: Vec<&Json> = decoder.into_iter().collect();
    while let Some(d) = stack.pop() {
        if d.is_null() {
            continue;
        }
        let kind = d.get("type").and_then(Json::as_str).unwrap_or_default();
        match kind {
            "Sequence" => stack.extend(
                d.get("decoders")
                    .and_then(Json::as_array)
                    .into_iter()
                    .flatten(),
            ),
            "ByteLevel" => style.byte_level = true,
            "ByteFallback" => style.byte_fallback = true,
            "Fuse" => {}
            "Metaspace" => {
                style.metaspace = true;
                let scheme = d.get("prepend_scheme").and_then(Json::as_str);
                let legacy = d.get("add_prefix_space").and_then(Json::as_bool);
                style.strip_leading_space |= matches!(scheme, Some("first" | "always"))
                    || (scheme.is_none() && legacy != Some(false));
            }
            "Replace" if replaces_metaspace(d) => style.metaspace = true,
            "Strip" => {
                let content = d.get("content").and_then(Json::as_str);
                let start = d.get("start").and_then(Json::as_u64).unwrap_or(0);
                style.strip_leading_space |= content == Some(" ") && start > 0;
            }
            other => return Err(TokenizerError::UnsupportedDecoder(other.to_string())),
        }
    }
    Ok(style)
}

/// `Replace` of `▁` by a space, the Llama 2 tokenizer.json spelling of Metaspace decoding.
fn replaces_metaspace(d: &Json) -> bool {
    let pattern = d
        .get("pattern")
        .and_then(|p| p.get("String"))
        .and_then(Json::as_str);
    pattern == Some(spm::SPACE_MARK) && d.get("content").and_then(Json::as_str) == Some(" ")
}

/// Per-id tables of a tokenizer.json vocabulary (added tokens included).
struct VocabTables {
    pieces: Vec<String>,
    kinds: Vec<TokenKind>,
    bytes: Vec<Vec<u8>>,
    specials: Vec<SpecialToken>,
}

impl VocabTables {
    fn new(tk: &tokenizers::Tokenizer, style: DecoderStyle) -> Self {
        let vocab = tk.get_vocab(true);
        let n = vocab.values().max().map_or(0, |&m| m as usize + 1);
        let mut pieces = vec![String::new(); n];
        for (piece, id) in vocab {
            pieces[id as usize] = piece;
        }
        let added = tk.get_added_tokens_decoder();
        let mut kinds = Vec::with_capacity(n);
        let mut bytes = Vec::with_capacity(n);
        let mut specials = Vec::new();
        for (id, piece) in pieces.iter().enumerate() {
            let (kind, raw) = match added.get(&(id as u32)) {
                Some(t) if t.special => (TokenKind::Control, t.content.as_bytes().to_vec()),
                Some(t) => (TokenKind::UserDefined, t.content.as_bytes().to_vec()),
                None => plain_piece(piece, style),
            };
            if let Some(t) = added.get(&(id as u32)).filter(|t| t.special) {
                specials.push(SpecialToken {
                    text: t.content.clone(),
                    id: id as u32,
                    matched: Match::WhenParsingSpecial,
                    lstrip: t.lstrip,
                    rstrip: t.rstrip,
                });
            }
            kinds.push(kind);
            bytes.push(raw);
        }
        Self {
            pieces,
            kinds,
            bytes,
            specials,
        }
    }
}

/// Kind and bytes of a model vocabulary entry (not an added token).
fn plain_piece(piece: &str, style: DecoderStyle) -> (TokenKind, Vec<u8>) {
    if style.byte_fallback {
        let byte = piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>'));
        if let Some(b) = byte.and_then(|h| u8::from_str_radix(h, 16).ok()) {
            return (TokenKind::Byte, vec![b]);
        }
    }
    let bytes = if style.byte_level {
        bytelevel::piece_to_bytes(piece)
    } else if style.metaspace {
        piece.replace(spm::SPACE_MARK, " ").into_bytes()
    } else {
        piece.as_bytes().to_vec()
    };
    (TokenKind::Normal, bytes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::tokenizer::test_vocab;

    #[test]
    fn llama2_style_decoder_is_metaspace_with_byte_fallback_and_strip() {
        let d: Json = serde_json::json!({"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]});
        let s = decoder_style(Some(&d)).unwrap();
        assert!(s.metaspace && s.byte_fallback && s.strip_leading_space && !s.byte_level);
    }

    #[test]
    fn wordpiece_decoder_is_refused_by_name() {
        let d: Json = serde_json::json!({"type": "WordPiece", "prefix": "##"});
        let err = decoder_style(Some(&d)).unwrap_err();
        assert!(matches!(err, TokenizerError::UnsupportedDecoder(ref n) if n == "WordPiece"));
    }

    #[test]
    fn config_tokens_may_be_strings_or_objects() {
        let c = serde_json::json!({"bos_token": "<s>", "eos_token": {"content": "</s>"}});
        assert_eq!(config_token(Some(&c), "bos_token").as_deref(), Some("<s>"));
        assert_eq!(config_token(Some(&c), "eos_token").as_deref(), Some("</s>"));
        assert_eq!(config_token(Some(&c), "pad_token"), None);
    }

    /// Writes the byte-level test vocabulary as a GPT-2 style tokenizer.json (ByteLevel
    /// pre-tokenizer and decoder, added tokens) plus a tokenizer_config.json.
    fn write_gpt2_tokenizer_json(dir: &Path, config: &Json) -> std::path::PathBuf {
        use tokenizers::models::bpe::{Vocab, BPE};
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        use tokenizers::AddedToken;

        let (tokens, merges) = test_vocab::gpt2_tokens_and_merges();
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .unwrap()
            })
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .unwrap();
        let mut tk = tokenizers::Tokenizer::new(bpe);
        tk.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        tk.with_decoder(Some(ByteLevel::default()));
        let special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
        tk.add_special_tokens(special.map(|t| AddedToken::from(t, true)))
            .unwrap();
        tk.add_tokens([AddedToken::from("<tool>", false)]).unwrap();
        let path = dir.join("tokenizer.json");
        tk.save(&path, false).unwrap();
        let config_text = serde_json::to_string(config).unwrap();
        std::fs::write(dir.join("tokenizer_config.json"), config_text).unwrap();
        path
    }

    #[test]
    fn tokenizer_json_encodes_like_the_equivalent_gguf() {
        let dir = tempfile::tempdir().unwrap();
        let config = serde_json::json!({
            "bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>", "add_bos_token": true
        });
        let hf = Tokenizer::from_file(write_gpt2_tokenizer_json(dir.path(), &config)).unwrap();
        let gguf = test_vocab::gpt2_tokenizer("gpt-2");
        let texts = [
            "hello the 12",
            "<|im_start|>hello<|im_end|>",
            "a<tool>b",
            "😀 café",
            " a  b ",
        ];
        for text in texts {
            for parse_special in [true, false] {
                let ids = hf.encode(text, parse_special).unwrap();
                assert_eq!(ids, gguf.encode(text, parse_special).unwrap(), "{text:?}");
                assert_eq!(hf.decode(&ids, false).unwrap(), text);
            }
        }
        assert_eq!(hf.bos_id(), Some(1));
        assert_eq!(hf.eos_token(), Some("<|im_end|>"));
        assert_eq!(hf.eos_ids(), [2, 0]);
        assert_eq!(hf.encode_with_bos("hello", true).unwrap(), [1, 265]);
        assert_eq!(hf.token_kind(3), Some(TokenKind::UserDefined));
        assert_eq!(hf.vocab_size(), gguf.vocab_size());
    }

    #[test]
    fn tokenizer_json_without_config_has_no_bos() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_gpt2_tokenizer_json(dir.path(), &serde_json::json!({}));
        std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
        let hf = Tokenizer::from_file(path).unwrap();
        assert_eq!(hf.bos_id(), None);
        assert!(!hf.add_bos());
        assert_eq!(hf.encode_with_bos("hello", false).unwrap(), [265]);
    }

    #[test]
    fn missing_tokenizer_json_is_an_io_error_naming_the_path() {
        let err = Tokenizer::from_file("/nonexistent/tokenizer.json").unwrap_err();
        assert!(matches!(err, TokenizerError::Io { .. }));
        assert!(err.to_string().contains("/nonexistent/tokenizer.json"));
    }
}
