//! Streaming detokenization: turns the ids a sequence samples, one at a time, into the text
//! deltas that go out as SSE chunks. The engine keeps one [`IncrementalDecoder`] per sequence.
//!
//! Byte accumulation over token pieces, not TGI's decode-the-prefix-twice technique: each id
//! contributes the bytes [`Tokenizer::token_bytes`] gives it, and only complete UTF-8 characters
//! leave the buffer, so an emoji spread over four byte tokens comes out whole with the fourth.
//! It is exact for byte-level BPE and SentencePiece byte fallback alike and costs O(1) per
//! token. The concatenation of all deltas plus [`IncrementalDecoder::finish`] equals
//! [`Tokenizer::decode`] of the same ids, by construction: both go through the same per-token
//! byte append, and invalid bytes become U+FFFD at the same positions.

use super::{Tokenizer, TokenizerError};

/// Per-sequence state of streaming decode.
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    skip_special: bool,
    /// Whether nothing has been emitted yet (SentencePiece drops the first piece's space).
    at_start: bool,
    /// Bytes not yet returned: at most one incomplete UTF-8 character between pushes.
    pending: Vec<u8>,
}

impl IncrementalDecoder {
    /// A decoder whose output equals `decode(ids, skip_special)`: with SentencePiece models the
    /// first piece loses its prefix space, as a chat reply should.
    pub fn new(skip_special: bool) -> Self {
        Self {
            skip_special,
            at_start: true,
            pending: Vec::new(),
        }
    }

    /// A decoder for text that continues a prompt (plain completions): the first piece keeps
    /// its leading space, since it separates the new text from the prompt's last word.
    pub fn continuing(skip_special: bool) -> Self {
        Self {
            at_start: false,
            ..Self::new(skip_special)
        }
    }

    /// Adds one id; returns the newly completed text, or `None` when the id completed no
    /// character (a partial UTF-8 sequence, a skipped special token).
    pub fn push(
        &mut self,
        tokenizer: &Tokenizer,
        id: u32,
    ) -> Result<Option<String>, TokenizerError> {
        tokenizer.append_bytes(id, self.skip_special, &mut self.at_start, &mut self.pending)?;
        let text = self.take_complete();
        Ok((!text.is_empty()).then_some(text))
    }

    /// Flushes what is left at the end of the sequence; an incomplete trailing character
    /// becomes U+FFFD here and only here.
    pub fn finish(&mut self) -> Option<String> {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        (!text.is_empty()).then_some(text)
    }

    /// Number of bytes held back waiting for the rest of a character.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Takes every complete character from the buffer. A byte sequence that can never become
    /// valid is replaced by U+FFFD right away, exactly where `String::from_utf8_lossy` puts it,
    /// so the stream stays equal to a whole-sequence decode; only a valid-so-far tail waits.
    fn take_complete(&mut self) -> String {
        let mut out = String::new();
        let mut consumed = 0;
        while consumed < self.pending.len() {
            let rest = &self.pending[consumed..];
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    consumed = self.pending.len();
                }
                Err(e) => {
                    let valid = &rest[..e.valid_up_to()];
                    out.push_str(&String::from_utf8_lossy(valid));
                    consumed += valid.len();
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            consumed += bad;
                        }
                        None => break,
                    }
                }
            }
        }
        self.pending.drain(..consumed);
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::tokenizer::test_vocab;

    /// Streams `ids` and checks the stream against `decode`, and that no delta carries U+FFFD.
    fn assert_stream_matches_decode(tk: &Tokenizer, ids: &[u32], skip_special: bool) -> String {
        let mut dec = IncrementalDecoder::new(skip_special);
        let mut streamed = String::new();
        for &id in ids {
            if let Some(delta) = dec.push(tk, id).unwrap() {
                assert!(!delta.contains('\u{FFFD}'), "delta {delta:?} of {ids:?}");
                streamed.push_str(&delta);
            }
        }
        streamed.extend(dec.finish());
        assert_eq!(
            streamed,
            tk.decode(ids, skip_special).unwrap(),
            "ids {ids:?}"
        );
        streamed
    }

    const TEXTS: &[&str] = &[
        "Hello world",
        "  leading spaces and trailing  ",
        "emoji 😀🎉 mixed with text",
        "日本語のテキストと中文",
        "café naïve résumé",
        "line\nbreaks\n\n\tand tabs",
        "👨‍👩‍👧 family (ZWJ sequence)",
        "numbers 2024 and 3.14159",
        "",
    ];

    #[test]
    fn byte_level_stream_equals_decode_and_never_emits_replacement_chars() {
        let tk = test_vocab::gpt2_tokenizer("gpt-2");
        for text in TEXTS {
            let ids = tk.encode(text, false).unwrap();
            assert_eq!(assert_stream_matches_decode(&tk, &ids, false), *text);
        }
    }

    #[test]
    fn spm_stream_equals_decode_including_byte_fallback() {
        let tk = test_vocab::spm_tokenizer();
        for text in TEXTS {
            let ids = tk.encode(text, false).unwrap();
            assert_eq!(assert_stream_matches_decode(&tk, &ids, false), *text);
        }
    }

    #[test]
    fn emoji_split_over_byte_tokens_is_held_back_until_complete() {
        let tk = test_vocab::spm_tokenizer();
        let ids = tk.encode("😀", false).unwrap();
        // "▁" then four byte tokens: F0 9F 98 80.
        assert_eq!(ids.len(), 5);
        let mut dec = IncrementalDecoder::continuing(false);
        let deltas: Vec<_> = ids.iter().map(|&id| dec.push(&tk, id).unwrap()).collect();
        assert_eq!(
            deltas,
            [Some(" ".into()), None, None, None, Some("😀".into())]
        );
        assert_eq!(dec.pending_len(), 0);
    }

    #[test]
    fn truncated_character_becomes_replacement_only_at_finish() {
        let tk = test_vocab::spm_tokenizer();
        let ids = tk.encode("😀", false).unwrap();
        let cut = &ids[..3];
        let mut dec = IncrementalDecoder::new(false);
        for &id in cut {
            assert_eq!(dec.push(&tk, id).unwrap(), None);
        }
        assert_eq!(dec.finish().as_deref(), Some("\u{FFFD}"));
        assert_eq!(tk.decode(cut, false).unwrap(), "\u{FFFD}");
    }

    #[test]
    fn invalid_bytes_mid_stream_match_lossy_decode() {
        let tk = test_vocab::spm_tokenizer();
        let byte = |b: u8| tk.token_id(&format!("<0x{b:02X}>")).unwrap();
        // A lone continuation byte, then a valid 2-byte character.
        let ids = [byte(0x80), byte(0xC3), byte(0xA9)];
        let mut dec = IncrementalDecoder::new(false);
        let deltas: Vec<_> = ids.iter().map(|&id| dec.push(&tk, id).unwrap()).collect();
        // Never-valid bytes are replaced at once, a valid prefix waits for its character.
        assert_eq!(deltas, [Some("\u{FFFD}".into()), None, Some("é".into())]);
        assert_eq!(tk.decode(&ids, false).unwrap(), "\u{FFFD}é");
    }

    #[test]
    fn skipped_specials_and_out_of_range_ids() {
        let tk = test_vocab::gpt2_tokenizer("gpt-2");
        let ids = tk.encode("<|im_start|>hi<|im_end|>", true).unwrap();
        assert_eq!(assert_stream_matches_decode(&tk, &ids, true), "hi");
        let mut dec = IncrementalDecoder::new(true);
        let err = dec.push(&tk, 1_000_000).unwrap_err();
        assert!(matches!(
            err,
            TokenizerError::TokenOutOfRange { id: 1_000_000, .. }
        ));
    }
}
