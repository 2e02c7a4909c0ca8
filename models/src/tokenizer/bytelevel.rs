//! GPT-2 byte-level alphabet: the reversible map between the 256 byte values and the printable
//! characters byte-level BPE vocabularies are written in (space is `Ġ`, newline `Ċ`, ...).
//! Encoding goes through the `tokenizers` crate's ByteLevel pre-tokenizer; this table serves the
//! other direction, turning each vocabulary entry into the raw bytes decode and the streaming
//! decoder emit.

use std::collections::HashMap;
use std::sync::LazyLock;

/// Character -> byte, the inverse of OpenAI's `bytes_to_unicode` (gpt-2 `encoder.py`).
static CHAR_TO_BYTE: LazyLock<HashMap<char, u8>> = LazyLock::new(|| {
    (0..=255u8)
        .map(|b| (byte_to_char(b), b))
        .collect::<HashMap<char, u8>>()
});

/// The printable stand-in for one byte: printable Latin-1 bytes stand for themselves, the
/// remaining 68 bytes map, in order, to U+0100 onwards.
pub(crate) fn byte_to_char(b: u8) -> char {
    let printable = |x: u8| matches!(x, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        return char::from(b);
    }
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    // 0x100 + rank < 0x144, always a valid scalar value.
    char::from_u32(0x100 + rank).unwrap_or(char::REPLACEMENT_CHARACTER)
}

/// The raw bytes a byte-level vocabulary entry stands for. A character outside the byte-level
/// alphabet (only possible in hand-edited vocabularies) is passed through as its own UTF-8,
/// where llama.cpp would print an `[UNK_BYTE_..]` marker.
pub(crate) fn piece_to_bytes(piece: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(piece.len());
    for c in piece.chars() {
        match CHAR_TO_BYTE.get(&c) {
            Some(&b) => out.push(b),
            None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn alphabet_matches_gpt2_landmarks() {
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(byte_to_char(b'a'), 'a');
        assert_eq!(byte_to_char(0x00), '\u{100}');
        assert_eq!(byte_to_char(0xAD), '\u{143}');
        assert_eq!(CHAR_TO_BYTE.len(), 256);
    }

    #[test]
    fn pieces_round_trip_to_bytes() {
        assert_eq!(piece_to_bytes("Ġhello"), b" hello");
        let emoji = "😀".as_bytes();
        let piece: String = emoji.iter().map(|&b| byte_to_char(b)).collect();
        assert_eq!(piece_to_bytes(&piece), emoji);
    }
}
