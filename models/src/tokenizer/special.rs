//! Splitting prompt text on special-token strings before the model's own tokenization runs:
//! the first step of [`super::Tokenizer::encode`], which is how a rendered chat template's
//! `<|im_start|>` becomes one id instead of seven pieces of punctuation.
//!
//! Mirrors llama.cpp's `tokenizer_st_partition`: special tokens are tried longest first, each
//! splitting every text fragment left by the longer ones, so a token that contains another
//! (`<|end|>` inside `<|endoftext|>`) never steals its text. Control and unknown tokens are
//! matched only when the caller asks to parse specials; user-defined tokens always are (as in
//! llama.cpp and the Hugging Face added-vocabulary, which always extract non-special added
//! tokens).

/// When a special token string in the text is turned into its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Match {
    /// Only when encoding with `parse_special` (control and unknown tokens).
    WhenParsingSpecial,
    /// Always (user-defined tokens).
    Always,
}

/// One special token the splitter looks for.
#[derive(Debug, Clone)]
pub(crate) struct SpecialToken {
    pub(crate) text: String,
    pub(crate) id: u32,
    pub(crate) matched: Match,
    /// Swallow whitespace on the left of a match (Hugging Face `lstrip`).
    pub(crate) lstrip: bool,
    /// Swallow whitespace on the right of a match (Hugging Face `rstrip`).
    pub(crate) rstrip: bool,
}

/// A piece of the input: plain text for the model's tokenizer, or an already resolved id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fragment<'t> {
    Text(&'t str),
    Token(u32),
}

/// The special tokens of a vocabulary, longest first.
#[derive(Debug, Clone, Default)]
pub(crate) struct SpecialSplitter {
    tokens: Vec<SpecialToken>,
}

impl SpecialSplitter {
    /// Sorts by descending length (ties by id, so the order does not depend on input order).
    pub(crate) fn new(mut tokens: Vec<SpecialToken>) -> Self {
        tokens.retain(|t| !t.text.is_empty());
        tokens.sort_by(|a, b| b.text.len().cmp(&a.text.len()).then(a.id.cmp(&b.id)));
        Self { tokens }
    }

    /// Splits `text` into fragments; never yields an empty text fragment.
    pub(crate) fn split<'t>(&self, text: &'t str, parse_special: bool) -> Vec<Fragment<'t>> {
        let mut fragments = Vec::new();
        if !text.is_empty() {
            fragments.push(Fragment::Text(text));
        }
        for token in &self.tokens {
            if token.matched == Match::WhenParsingSpecial && !parse_special {
                continue;
            }
            fragments = fragments
                .into_iter()
                .flat_map(|f| match f {
                    Fragment::Text(t) => split_one(t, token),
                    Fragment::Token(_) => vec![f],
                })
                .collect();
        }
        fragments
    }
}

/// Splits one text fragment on every occurrence of one token.
fn split_one<'t>(mut text: &'t str, token: &SpecialToken) -> Vec<Fragment<'t>> {
    let mut out = Vec::new();
    while let Some(pos) = text.find(token.text.as_str()) {
        let mut left = &text[..pos];
        if token.lstrip {
            left = left.trim_end_matches(is_c_space);
        }
        if !left.is_empty() {
            out.push(Fragment::Text(left));
        }
        out.push(Fragment::Token(token.id));
        text = &text[pos + token.text.len()..];
        if token.rstrip {
            text = text.trim_start_matches(is_c_space);
        }
    }
    if !text.is_empty() {
        out.push(Fragment::Text(text));
    }
    out
}

/// C's `isspace` in the "C" locale, which llama.cpp uses for lstrip/rstrip.
fn is_c_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\u{0B}' | '\u{0C}' | '\r')
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tok(text: &str, id: u32, matched: Match) -> SpecialToken {
        SpecialToken {
            text: text.to_string(),
            id,
            matched,
            lstrip: false,
            rstrip: false,
        }
    }

    #[test]
    fn longer_tokens_win_over_their_substrings() {
        let s = SpecialSplitter::new(vec![
            tok("<|end|>", 1, Match::WhenParsingSpecial),
            tok("<|endoftext|>", 2, Match::WhenParsingSpecial),
        ]);
        let got = s.split("a<|endoftext|>b<|end|>", true);
        use Fragment::*;
        assert_eq!(got, vec![Text("a"), Token(2), Text("b"), Token(1)]);
    }

    #[test]
    fn control_tokens_stay_text_unless_parsing_special() {
        let s = SpecialSplitter::new(vec![
            tok("<c>", 1, Match::WhenParsingSpecial),
            tok("<u>", 2, Match::Always),
        ]);
        use Fragment::*;
        assert_eq!(s.split("x<c>y<u>", false), vec![Text("x<c>y"), Token(2)]);
        assert_eq!(s.split("<c><c>", true), vec![Token(1), Token(1)]);
        assert!(s.split("", true).is_empty());
    }

    #[test]
    fn strip_flags_swallow_adjacent_whitespace() {
        let mut t = tok("<m>", 7, Match::WhenParsingSpecial);
        t.lstrip = true;
        t.rstrip = true;
        let s = SpecialSplitter::new(vec![t]);
        use Fragment::*;
        assert_eq!(
            s.split("a \t<m>\n b", true),
            vec![Text("a"), Token(7), Text("b")]
        );
    }
}
