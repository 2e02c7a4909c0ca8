//! Building a [`Tokenizer`] from GGUF metadata (`tokenizer.ggml.*`), the default way graft gets
//! its tokenizer: it is read once at model load, right after the GGUF header.
//!
//! Keys, defaults and fallbacks follow llama.cpp's `llama_vocab::impl::load`: a missing
//! `tokenizer.ggml.pre` means "default", SentencePiece vocabularies default to BOS 1 / EOS 2 /
//! UNK 0 and a prefix space, and a special-token id outside the vocabulary is ignored with a
//! warning rather than failing the load. Departure: llama.cpp's GPT-2 default of BOS = EOS = 11
//! is not copied; a byte-level vocabulary without the keys simply has no BOS/EOS.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use tokenizers::models::bpe::{Vocab, BPE};

use super::special::{Match, SpecialToken};
use super::{bytelevel, pretok, spm, Backend, Parts, TokenKind, Tokenizer, TokenizerError};

const MODEL: &str = "tokenizer.ggml.model";
const PRE: &str = "tokenizer.ggml.pre";
const TOKENS: &str = "tokenizer.ggml.tokens";
const MERGES: &str = "tokenizer.ggml.merges";
const SCORES: &str = "tokenizer.ggml.scores";
const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const BOS_ID: &str = "tokenizer.ggml.bos_token_id";
const EOS_ID: &str = "tokenizer.ggml.eos_token_id";
const EOT_ID: &str = "tokenizer.ggml.eot_token_id";
const EOM_ID: &str = "tokenizer.ggml.eom_token_id";
const UNK_ID: &str = "tokenizer.ggml.unknown_token_id";
const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
const ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
const ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";

/// Typed access to the metadata map, every failure naming its key.
struct Meta<'a>(&'a HashMap<String, Value>);

impl<'a> Meta<'a> {
    fn get(&self, key: &'static str) -> Option<&'a Value> {
        self.0.get(key)
    }

    fn str(&self, key: &'static str) -> Result<Option<&'a str>, TokenizerError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(wrong_type(key, "a string")),
        }
    }

    fn bool(&self, key: &'static str) -> Result<Option<bool>, TokenizerError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => as_int(v)
                .map(|i| Some(i != 0))
                .ok_or_else(|| wrong_type(key, "a bool")),
        }
    }

    fn int(&self, key: &'static str) -> Result<Option<i64>, TokenizerError> {
        self.get(key)
            .map(|v| as_int(v).ok_or_else(|| wrong_type(key, "an integer")))
            .transpose()
    }

    fn array(&self, key: &'static str) -> Result<Option<&'a [Value]>, TokenizerError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items)),
            Some(_) => Err(wrong_type(key, "an array")),
        }
    }

    fn strings(&self, key: &'static str) -> Result<Option<Vec<String>>, TokenizerError> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(wrong_type(key, "an array of strings")),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// A per-token array, checked to have one entry per token.
    fn per_token<T>(
        &self,
        key: &'static str,
        n_tokens: usize,
        expected: &'static str,
        convert: impl Fn(&Value) -> Option<T>,
    ) -> Result<Option<Vec<T>>, TokenizerError> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        if items.len() != n_tokens {
            return Err(TokenizerError::LengthMismatch {
                key,
                expected: n_tokens,
                got: items.len(),
            });
        }
        let values = items
            .iter()
            .map(|v| convert(v).ok_or_else(|| wrong_type(key, expected)));
        values.collect::<Result<Vec<_>, _>>().map(Some)
    }

    /// A special-token id; one outside the vocabulary is dropped with a warning (llama.cpp).
    fn token_id(&self, key: &'static str, n_tokens: usize) -> Result<Option<u32>, TokenizerError> {
        let Some(id) = self.int(key)? else {
            return Ok(None);
        };
        match u32::try_from(id) {
            Ok(id) if (id as usize) < n_tokens => Ok(Some(id)),
            _ => {
                tracing::warn!(
                    key,
                    id,
                    n_tokens,
                    "special token id outside the vocabulary, ignored"
                );
                Ok(None)
            }
        }
    }
}

fn wrong_type(key: &'static str, expected: &'static str) -> TokenizerError {
    TokenizerError::WrongType { key, expected }
}

fn as_int(v: &Value) -> Option<i64> {
    match *v {
        Value::U8(x) => Some(x.into()),
        Value::I8(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        Value::I16(x) => Some(x.into()),
        Value::U32(x) => Some(x.into()),
        Value::I32(x) => Some(x.into()),
        Value::U64(x) => i64::try_from(x).ok(),
        Value::I64(x) => Some(x),
        _ => None,
    }
}

fn as_f32(v: &Value) -> Option<f32> {
    match *v {
        Value::F32(x) => Some(x),
        Value::F64(x) => Some(x as f32),
        _ => as_int(v).map(|i| i as f32),
    }
}

/// Reads the vocabulary and dispatches on `tokenizer.ggml.model`.
pub(crate) fn load(metadata: &HashMap<String, Value>) -> Result<Tokenizer, TokenizerError> {
    let meta = Meta(metadata);
    let model = meta.str(MODEL)?.ok_or(TokenizerError::MissingKey(MODEL))?;
    let pieces = meta
        .strings(TOKENS)?
        .ok_or(TokenizerError::MissingKey(TOKENS))?;
    if pieces.is_empty() {
        return Err(TokenizerError::EmptyVocabulary);
    }
    let kinds = meta
        .per_token(TOKEN_TYPE, pieces.len(), "an integer array", as_int)?
        .map(|types| types.into_iter().map(TokenKind::from_gguf).collect())
        .unwrap_or_else(|| vec![TokenKind::Normal; pieces.len()]);
    let parts = match model {
        "gpt2" => bpe_parts(&meta, pieces, kinds)?,
        "llama" => spm_parts(&meta, pieces, kinds)?,
        other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
    };
    Ok(Tokenizer::assemble(parts))
}

/// Byte-level BPE (`gpt2`): the `tokenizers` BPE model behind llama.cpp's pre-tokenizer.
fn bpe_parts(
    meta: &Meta<'_>,
    pieces: Vec<String>,
    kinds: Vec<TokenKind>,
) -> Result<Parts, TokenizerError> {
    let pre = meta.str(PRE)?;
    if pre.is_none() {
        tracing::warn!("GGUF has no {PRE}; using llama.cpp's 'default' pre-tokenizer");
    }
    let recipe = pretok::recipe(pre)?;
    let merges = meta
        .strings(MERGES)?
        .ok_or(TokenizerError::MissingKey(MERGES))?;
    let vocab: Vocab = pieces
        .iter()
        .enumerate()
        .map(|(id, p)| (p.clone(), id as u32))
        .collect();
    let merges = usable_merges(&vocab, &merges);
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(recipe.ignore_merges)
        .build()
        .map_err(TokenizerError::backend)?;
    let mut tk = tokenizers::Tokenizer::new(bpe);
    tk.with_pre_tokenizer(Some(recipe.pre_tokenizer()?));

    let bytes = pieces
        .iter()
        .zip(&kinds)
        .map(|(p, k)| match k {
            TokenKind::Normal | TokenKind::Byte => bytelevel::piece_to_bytes(p),
            TokenKind::Unused => Vec::new(),
            _ => p.as_bytes().to_vec(),
        })
        .collect();
    let n = pieces.len();
    Ok(Parts {
        backend: Backend::Hf(Box::new(tk)),
        specials: specials_from_kinds(&pieces, &kinds),
        bos: meta.token_id(BOS_ID, n)?,
        eos: meta.token_id(EOS_ID, n)?,
        extra_eos: end_of_turn_ids(meta, n)?,
        add_bos: meta.bool(ADD_BOS)?.unwrap_or(recipe.add_bos),
        add_eos: meta.bool(ADD_EOS)?.unwrap_or(false),
        strip_leading_space: false,
        pieces,
        kinds,
        bytes,
    })
}

/// Splits `"Ġ t"` into `("Ġ", "t")` at the first space after the first byte (llama.cpp), and
/// drops merges the `tokenizers` BPE builder would reject because a side or the result is not
/// in the vocabulary (llama.cpp could apply such a merge only to fall back to bytes after).
fn usable_merges(vocab: &Vocab, merges: &[String]) -> Vec<(String, String)> {
    let mut usable = Vec::with_capacity(merges.len());
    for m in merges {
        // Searching after the first character equals llama.cpp's byte offset 1: a space byte
        // never occurs inside a multi-byte character.
        let first_len = m.chars().next().map_or(0, char::len_utf8);
        let split = m
            .get(first_len..)
            .and_then(|rest| rest.find(' '))
            .map(|i| i + first_len);
        let Some((a, b)) = split.map(|i| (&m[..i], &m[i + 1..])) else {
            continue;
        };
        if vocab.contains_key(a) && vocab.contains_key(b) && vocab.contains_key(&format!("{a}{b}"))
        {
            usable.push((a.to_string(), b.to_string()));
        }
    }
    if usable.len() != merges.len() {
        tracing::warn!(
            dropped = merges.len() - usable.len(),
            "GGUF merges that are malformed or produce tokens outside the vocabulary were ignored"
        );
    }
    usable
}

/// SentencePiece (`llama`): llama.cpp's SPM merger over the scored vocabulary.
fn spm_parts(
    meta: &Meta<'_>,
    pieces: Vec<String>,
    kinds: Vec<TokenKind>,
) -> Result<Parts, TokenizerError> {
    let n = pieces.len();
    let scores = meta
        .per_token(SCORES, n, "a float array", as_f32)?
        .unwrap_or_else(|| vec![0.0; n]);
    let in_vocab = |id: u32| ((id as usize) < n).then_some(id);
    let unk = match meta.int(UNK_ID)? {
        Some(_) => meta.token_id(UNK_ID, n)?,
        None => in_vocab(0),
    };
    let bos = match meta.int(BOS_ID)? {
        Some(_) => meta.token_id(BOS_ID, n)?,
        None => in_vocab(1),
    };
    let eos = match meta.int(EOS_ID)? {
        Some(_) => meta.token_id(EOS_ID, n)?,
        None => in_vocab(2),
    };
    let add_space_prefix = meta.bool(ADD_SPACE_PREFIX)?.unwrap_or(true);
    let bytes = pieces
        .iter()
        .zip(&kinds)
        .map(|(p, k)| spm_piece_bytes(p, *k))
        .collect();
    Ok(Parts {
        backend: Backend::Spm {
            model: Box::new(spm::SpmModel::new(&pieces, scores, unk)),
            add_space_prefix,
        },
        specials: specials_from_kinds(&pieces, &kinds),
        bos,
        eos,
        extra_eos: end_of_turn_ids(meta, n)?,
        add_bos: meta.bool(ADD_BOS)?.unwrap_or(true),
        add_eos: meta.bool(ADD_EOS)?.unwrap_or(false),
        strip_leading_space: add_space_prefix,
        pieces,
        kinds,
        bytes,
    })
}

/// What an SPM vocabulary entry decodes to: `▁` is a space, `<0xXX>` one byte, specials their
/// own text, unused entries nothing (llama.cpp `token_to_piece`).
fn spm_piece_bytes(piece: &str, kind: TokenKind) -> Vec<u8> {
    match kind {
        TokenKind::Normal => piece.replace(spm::SPACE_MARK, " ").into_bytes(),
        TokenKind::Byte => parse_byte_token(piece)
            .map(|b| vec![b])
            .unwrap_or_else(|| piece.as_bytes().to_vec()),
        TokenKind::Unused => Vec::new(),
        TokenKind::Unknown | TokenKind::Control | TokenKind::UserDefined => {
            piece.as_bytes().to_vec()
        }
    }
}

/// `<0x0A>` -> 0x0A.
fn parse_byte_token(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

/// Control and unknown entries are matched in text only when parsing specials, user-defined
/// ones always (llama.cpp's special-token cache).
fn specials_from_kinds(pieces: &[String], kinds: &[TokenKind]) -> Vec<SpecialToken> {
    let matched = |k: TokenKind| match k {
        TokenKind::Control | TokenKind::Unknown => Some(Match::WhenParsingSpecial),
        TokenKind::UserDefined => Some(Match::Always),
        _ => None,
    };
    pieces
        .iter()
        .zip(kinds)
        .enumerate()
        .filter_map(|(id, (text, &kind))| {
            Some(SpecialToken {
                text: text.clone(),
                id: id as u32,
                matched: matched(kind)?,
                lstrip: false,
                rstrip: false,
            })
        })
        .collect()
}

fn end_of_turn_ids(meta: &Meta<'_>, n_tokens: usize) -> Result<Vec<u32>, TokenizerError> {
    let eot = meta.token_id(EOT_ID, n_tokens)?;
    let eom = meta.token_id(EOM_ID, n_tokens)?;
    Ok(eot.into_iter().chain(eom).collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn merges_split_at_the_first_space_after_the_first_byte() {
        let vocab: Vocab = ["a", "b", "ab", " ", " a", "Ġ", "Ġa"]
            .iter()
            .enumerate()
            .map(|(i, s)| (s.to_string(), i as u32))
            .collect();
        let merges = ["a b", "  a", "ab", "a c", "Ġ a", "Ġa a"].map(String::from);
        let got = usable_merges(&vocab, &merges);
        let want =
            [("a", "b"), (" ", "a"), ("Ġ", "a")].map(|(x, y)| (x.to_string(), y.to_string()));
        assert_eq!(got, want);
    }

    #[test]
    fn byte_tokens_parse_as_hex() {
        assert_eq!(parse_byte_token("<0x0A>"), Some(0x0A));
        assert_eq!(parse_byte_token("<0xff>"), Some(0xFF));
        assert_eq!(parse_byte_token("<0x>"), None);
        assert_eq!(spm_piece_bytes("▁a▁b", TokenKind::Normal), b" a b");
    }
}
