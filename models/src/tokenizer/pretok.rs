//! The byte-level BPE pipeline for GGUF `tokenizer.ggml.model = "gpt2"` vocabularies: which
//! regex splits run before the BPE merges, chosen by `tokenizer.ggml.pre`. Built once at load
//! and used by [`super::Tokenizer::encode`] on every plain text fragment.
//!
//! The table is llama.cpp's (`llm_tokenizer_bpe` and the `tokenizer_pre` switch in
//! src/llama-vocab.cpp): each name selects a list of regexes applied one after another, every
//! match and every gap between matches becoming a separate piece (Hugging Face `Split` with
//! `Isolated` behaviour), then the byte-level mapping, then BPE. Where llama.cpp hand-adapted a
//! Hugging Face regex for `std::regex` (`(?i:'s|...)` -> `'[sS]|...`) we use its adapted form;
//! Oniguruma accepts both and they select the same text. Pre-tokenizers whose llama.cpp form is
//! an approximation we cannot reproduce with Oniguruma (tekken, gpt-4o, deepseek, ...) are
//! rejected by name rather than silently tokenized differently.

use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::SplitDelimiterBehavior;

use super::TokenizerError;

/// OpenAI GPT-2's word regex, as llama.cpp writes it (Hugging Face's ByteLevel adds a final
/// `|\s+`, which only re-matches gaps that an `Isolated` split keeps anyway).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

/// Llama 3's regex (numbers in runs of at most three digits).
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen 2's regex (every digit on its own).
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How a GGUF byte-level BPE vocabulary pre-tokenizes and merges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BpeRecipe {
    /// Regexes applied in order, each splitting the pieces the previous one left.
    pub(crate) regexes: Vec<&'static str>,
    /// A pre-token that is itself a vocabulary entry is emitted whole, skipping the merges
    /// (llama.cpp's `ignore_merges`, set for the Llama 3 family).
    pub(crate) ignore_merges: bool,
    /// Whether the family prepends BOS by default (overridden by `tokenizer.ggml.add_bos_token`).
    pub(crate) add_bos: bool,
}

/// Looks up `tokenizer.ggml.pre`; `None` (key absent) means llama.cpp's "default".
pub(crate) fn recipe(pre: Option<&str>) -> Result<BpeRecipe, TokenizerError> {
    let plain = |regexes: Vec<&'static str>| BpeRecipe {
        regexes,
        ignore_merges: false,
        add_bos: false,
    };
    let name = pre.unwrap_or("default");
    let recipe = match name {
        "default" => plain(vec![
            r"[\p{P}\$\+<=>\^~\|]+",
            GPT2,
            r"\p{N}+",
            "[0-9][0-9][0-9]",
        ]),
        // "gpt2" is not a llama.cpp name; accepted as the obvious alias of "gpt-2".
        "gpt2" | "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es"
        | "jina-v2-de" | "a.x-4.0" | "mellum" | "modern-bert" | "mpt" | "olmo" | "jais"
        | "trillion" | "granite-docling" | "exaone4" => plain(vec![GPT2]),
        // Every digit a piece of its own before the GPT-2 regex (SmolLM, StarCoder).
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b"
        | "mellum2" => plain(vec![r"\p{N}", GPT2]),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => BpeRecipe {
            regexes: vec![LLAMA3],
            ignore_merges: true,
            add_bos: true,
        },
        "dbrx" | "smaug-bpe" => plain(vec![LLAMA3]),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" | "stablelm2" | "hunyuan"
        | "solar-open" => plain(vec![QWEN2]),
        other => return Err(TokenizerError::UnsupportedPreTokenizer(other.to_string())),
    };
    Ok(recipe)
}

impl BpeRecipe {
    /// The `tokenizers` pre-tokenizer: the regex splits, then the byte-level mapping (without
    /// its own regex and without a prefix space, as llama.cpp).
    pub(crate) fn pre_tokenizer(&self) -> Result<PreTokenizerWrapper, TokenizerError> {
        let mut steps = Vec::with_capacity(self.regexes.len() + 1);
        for re in &self.regexes {
            let split = Split::new(
                SplitPattern::Regex((*re).to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(TokenizerError::backend)?;
            steps.push(PreTokenizerWrapper::Split(split));
        }
        steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
            false, false, false,
        )));
        Ok(PreTokenizerWrapper::Sequence(Sequence::new(steps)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

    fn pieces(pre: &str, text: &str) -> Vec<String> {
        let pt = recipe(Some(pre)).and_then(|r| r.pre_tokenizer()).unwrap();
        let mut s = PreTokenizedString::from(text);
        pt.pre_tokenize(&mut s).unwrap();
        s.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(p, _, _)| p.to_string())
            .collect()
    }

    #[test]
    fn smollm_splits_each_digit_before_the_gpt2_regex() {
        assert_eq!(pieces("smollm", " 2024"), ["Ġ", "2", "0", "2", "4"]);
        assert_eq!(pieces("smollm", "a1b"), ["a", "1", "b"]);
    }

    #[test]
    fn gpt2_keeps_digit_runs_and_leading_spaces() {
        assert_eq!(pieces("gpt-2", " 2024 is"), ["Ġ2024", "Ġis"]);
        assert_eq!(pieces("gpt-2", "a  b"), ["a", "Ġ", "Ġb"]);
    }

    #[test]
    fn llama3_groups_digits_by_three() {
        assert_eq!(pieces("llama3", "12345"), ["123", "45"]);
        assert_eq!(pieces("llama3", "I'M"), ["I", "'M"]);
    }

    #[test]
    fn qwen2_splits_single_digits() {
        assert_eq!(pieces("qwen2", "x 42"), ["x", "Ġ", "4", "2"]);
    }

    #[test]
    fn unknown_pre_tokenizer_is_named_in_the_error() {
        let err = recipe(Some("tekken")).unwrap_err();
        assert!(matches!(err, TokenizerError::UnsupportedPreTokenizer(ref n) if n == "tekken"));
    }
}
