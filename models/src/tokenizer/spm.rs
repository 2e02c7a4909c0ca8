//! SentencePiece-style tokenization of GGUF `tokenizer.ggml.model = "llama"` vocabularies
//! (Llama 2, Mistral 7B, TinyLlama): the encode half of a plain text segment, called by
//! [`super::Tokenizer::encode`] after special tokens have been split out.
//!
//! Follows llama.cpp's `llm_tokenizer_spm` (src/llama-vocab.cpp), itself a port of
//! SentencePiece's BPE mode: start from single UTF-8 characters, repeatedly merge the adjacent
//! pair whose concatenation is the highest-scoring vocabulary entry (ties: leftmost pair), and
//! emit `<0xXX>` byte tokens for whatever is left that is not in the vocabulary. Same tie rules
//! and the same "merged text must have the recorded size" staleness check, so ids match
//! llama.cpp bit for bit. Departure: where llama.cpp aborts on a byte with no byte token, we use
//! the unknown token, or return a typed error when there is none.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use super::TokenizerError;

/// SentencePiece's whitespace stand-in, U+2581.
pub(crate) const SPACE_MARK: &str = "\u{2581}";

/// The SPM model: piece lookup, per-piece scores and the byte fallback table.
#[derive(Debug, Clone)]
pub(crate) struct SpmModel {
    token_to_id: HashMap<String, u32>,
    scores: Vec<f32>,
    byte_ids: [Option<u32>; 256],
    unk: Option<u32>,
}

/// One symbol of the working sequence: a byte range of the text plus links to its neighbours.
#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge of two adjacent symbols.
#[derive(Debug, Clone, Copy)]
struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    size: usize,
}

impl Ord for Bigram {
    /// Highest score first, then the leftmost pair, as llama.cpp's `llm_bigram_spm::comparator`.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

impl SpmModel {
    /// Builds the model. Byte tokens are looked up as `<0xXX>` first and then as the raw
    /// one-byte string, the same order as llama.cpp's `byte_to_token`.
    pub(crate) fn new(pieces: &[String], scores: Vec<f32>, unk: Option<u32>) -> Self {
        let mut token_to_id = HashMap::with_capacity(pieces.len());
        for (id, piece) in pieces.iter().enumerate() {
            token_to_id.insert(piece.clone(), id as u32);
        }
        let mut byte_ids = [None; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            let hex = format!("<0x{b:02X}>");
            *slot = token_to_id.get(&hex).copied().or_else(|| {
                let raw = [b as u8];
                std::str::from_utf8(&raw)
                    .ok()
                    .and_then(|s| token_to_id.get(s).copied())
            });
        }
        Self {
            token_to_id,
            scores,
            byte_ids,
            unk,
        }
    }

    /// Tokenizes `text`, which must already have its spaces replaced by `▁` (and the optional
    /// prefix space added), appending ids to `out`.
    pub(crate) fn encode(&self, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        let mut session = Session::new(self, text);
        session.merge_all();
        session.emit(out)
    }
}

/// The state of one tokenization, as llama.cpp's `llm_tokenizer_spm_session`.
struct Session<'a> {
    model: &'a SpmModel,
    text: &'a str,
    symbols: Vec<Symbol>,
    queue: BinaryHeap<Bigram>,
}

impl<'a> Session<'a> {
    fn new(model: &'a SpmModel, text: &'a str) -> Self {
        let n = text.chars().count();
        let symbols = text
            .char_indices()
            .enumerate()
            .map(|(i, (start, c))| Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: (i + 1 < n).then_some(i + 1),
            })
            .collect();
        Self {
            model,
            text,
            symbols,
            queue: BinaryHeap::new(),
        }
    }

    fn merge_all(&mut self) {
        for i in 1..self.symbols.len() {
            self.try_add_bigram(Some(i - 1), Some(i));
        }
        while let Some(bigram) = self.queue.pop() {
            let (left, right) = (self.symbols[bigram.left], self.symbols[bigram.right]);
            // One side was merged away or grew since this candidate was queued: stale.
            if left.len == 0 || right.len == 0 || left.len + right.len != bigram.size {
                continue;
            }
            self.symbols[bigram.left].len += right.len;
            self.symbols[bigram.right].len = 0;
            self.symbols[bigram.left].next = right.next;
            if let Some(next) = right.next {
                self.symbols[next].prev = Some(bigram.left);
            }
            self.try_add_bigram(left.prev, Some(bigram.left));
            self.try_add_bigram(Some(bigram.left), right.next);
        }
    }

    fn try_add_bigram(&mut self, left: Option<usize>, right: Option<usize>) {
        let (Some(left), Some(right)) = (left, right) else {
            return;
        };
        let start = self.symbols[left].start;
        let size = self.symbols[left].len + self.symbols[right].len;
        let Some(merged) = self.text.get(start..start + size) else {
            return;
        };
        let Some(&id) = self.model.token_to_id.get(merged) else {
            return;
        };
        let score = self.model.scores.get(id as usize).copied().unwrap_or(0.0);
        self.queue.push(Bigram {
            left,
            right,
            score,
            size,
        });
    }

    /// Emits each final symbol: its id when it is a vocabulary entry, else its bytes.
    ///
    /// llama.cpp's `resegment` also consults a reverse-merge map, but a merge is only ever
    /// recorded for text that is a vocabulary entry, so that branch can never be reached by a
    /// symbol that failed the lookup; leaving it out changes no output.
    fn emit(&self, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        let mut cursor = (!self.symbols.is_empty()).then_some(0);
        while let Some(i) = cursor {
            let sym = self.symbols[i];
            let piece = self
                .text
                .get(sym.start..sym.start + sym.len)
                .unwrap_or_default();
            match self.model.token_to_id.get(piece) {
                Some(&id) => out.push(id),
                None => self.push_bytes(piece, out)?,
            }
            cursor = sym.next;
        }
        Ok(())
    }

    fn push_bytes(&self, piece: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        for &b in piece.as_bytes() {
            let id = self.model.byte_ids[b as usize]
                .or(self.model.unk)
                .ok_or(TokenizerError::UnencodableByte(b))?;
            out.push(id);
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn model(pieces: &[(&str, f32)], unk: Option<u32>) -> SpmModel {
        let names: Vec<String> = pieces.iter().map(|(p, _)| p.to_string()).collect();
        SpmModel::new(&names, pieces.iter().map(|(_, s)| *s).collect(), unk)
    }

    fn encode(m: &SpmModel, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::new();
        m.encode(text, &mut out).map(|()| out)
    }

    #[test]
    fn equal_scores_merge_the_leftmost_pair_first() {
        let m = model(&[("a", 0.0), ("aa", -1.0)], None);
        assert_eq!(encode(&m, "aaa").unwrap(), [1, 0]);
    }

    #[test]
    fn higher_score_wins_over_position() {
        let m = model(&[("a", 0.0), ("b", 0.0), ("ab", -2.0), ("bb", -1.0)], None);
        assert_eq!(encode(&m, "abb").unwrap(), [0, 3]);
    }

    #[test]
    fn missing_bytes_use_unk_or_fail_typed() {
        let m = model(&[("<unk>", 0.0), ("a", 0.0)], Some(0));
        assert_eq!(encode(&m, "aé").unwrap(), [1, 0, 0]);
        let m = model(&[("a", 0.0)], None);
        let err = encode(&m, "é").unwrap_err();
        assert!(matches!(err, TokenizerError::UnencodableByte(0xC3)));
    }

    #[test]
    fn empty_text_gives_no_ids() {
        let m = model(&[("a", 0.0)], None);
        assert!(encode(&m, "").unwrap().is_empty());
    }
}
