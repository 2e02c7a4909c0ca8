//! A domain corpus as token ids: text files read in a fixed order, cut to a token budget, and
//! cut into blocks (training, the datastore) or sliding windows (perplexity).
//!
//! The order is the project's split rule (`scripts/data/corpora.py`): documents sort by the
//! first 8 hex digits of the SHA-256 of their file name, so "the first 400k tokens" is the same
//! fixed, content-independent subsample on every machine. Documents are joined with the
//! tokenizer's end-of-text token between them, as a causal LM's pre-training stream is.

use std::path::{Path, PathBuf};

use models::Tokenizer;
use sha2::{Digest, Sha256};

use crate::train::{Progress, Result, TrainError};

/// The split rule's number for a document name: the first 8 hex digits of its SHA-256.
pub fn name_hash(name: &str) -> u32 {
    let digest = Sha256::digest(name.as_bytes());
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// Whether a document belongs to the test split (about 10% of names).
pub fn is_test(name: &str) -> bool {
    name_hash(name).is_multiple_of(10)
}

/// A corpus read into one token stream.
#[derive(Debug, Clone)]
pub struct Corpus {
    /// Documents joined by the separator.
    pub tokens: Vec<u32>,
    /// The documents read, in order (the last may be cut short by the budget).
    pub documents: Vec<PathBuf>,
}

impl Corpus {
    /// Reads `paths` (files, or folders whose files are read), orders the documents by the
    /// split rule and tokenizes them until `max_tokens` (the last document is cut). Refuses a
    /// test-split document unless `allow_test`: nothing from a test split is trained on.
    pub fn read(
        paths: &[PathBuf],
        tokenizer: &Tokenizer,
        max_tokens: Option<usize>,
        allow_test: bool,
        progress: &mut dyn Progress,
    ) -> Result<Self> {
        let mut files = expand(paths)?;
        files.sort_by_key(|p| (name_hash(&file_name(p)), file_name(p)));
        if !allow_test {
            if let Some(p) = files.iter().find(|p| is_test(&file_name(p))) {
                return Err(TrainError::BadOption(format!(
                    "{} belongs to the test split (scripts/data/corpora.py's rule); training \
                     never reads test documents",
                    p.display()
                )));
            }
        }
        let separator = tokenizer.eos_ids().first().copied().unwrap_or(0);
        let budget = max_tokens.unwrap_or(usize::MAX);
        progress.phase("documents", files.len());
        let (mut tokens, mut documents) = (Vec::new(), Vec::new());
        for path in &files {
            if tokens.len() >= budget {
                break;
            }
            let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
            let ids = tokenizer
                .encode(&text, false)
                .map_err(|e| TrainError::Prompt(format!("{}: {e}", path.display())))?;
            if !tokens.is_empty() {
                tokens.push(separator);
            }
            tokens.extend(ids);
            documents.push(path.clone());
            progress.advance(1);
        }
        tokens.truncate(budget);
        if tokens.len() < 2 {
            return Err(TrainError::BadOption(
                "the corpus holds fewer than 2 tokens".into(),
            ));
        }
        Ok(Self { tokens, documents })
    }

    /// Blocks of at most `len` tokens, each starting where the previous one's last token
    /// is, so that every position with a next token is predicted in exactly one block:
    /// `(start, block)`; block position `i` is stream position `start + i` and predicts
    /// `start + i + 1`.
    pub fn blocks(&self, len: usize) -> Vec<(usize, &[u32])> {
        let len = len.max(2);
        let n = self.tokens.len();
        let mut out = Vec::new();
        let mut start = 0;
        while start + 1 < n {
            let end = (start + len).min(n);
            out.push((start, &self.tokens[start..end]));
            start = end - 1;
        }
        out
    }

    /// Sliding windows for perplexity: windows of `len` tokens every `stride` tokens; each
    /// window scores the tokens it predicts that no earlier window scored (its last `stride`
    /// predictions, all of them in the first window). Returns `(window, first scored offset)`:
    /// the window predicts its token `i + 1` from position `i`, for `i >= first - 1`.
    pub fn windows(&self, len: usize, stride: usize) -> Vec<(&[u32], usize)> {
        let (len, stride) = (len.max(2), stride.clamp(1, len.max(2)));
        let n = self.tokens.len();
        let mut out = Vec::new();
        let mut scored_to = 1; // tokens before this index are scored (token 0 never is)
        let mut start = 0;
        while scored_to < n {
            let end = (start + len).min(n);
            out.push((&self.tokens[start..end], scored_to - start));
            scored_to = end;
            // A window's first token has no context in it: keep at least one token of overlap.
            start = (start + stride).min(end - 1);
            if end == n {
                break;
            }
        }
        out
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Files named, and the files (not sub-folders) of folders named.
fn expand(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).map_err(|e| TrainError::io(path, e))?;
        if !meta.is_dir() {
            files.push(path.clone());
            continue;
        }
        let entries = std::fs::read_dir(path).map_err(|e| TrainError::io(path, e))?;
        for entry in entries {
            let p = entry.map_err(|e| TrainError::io(path, e))?.path();
            if p.is_file() {
                files.push(p);
            }
        }
    }
    if files.is_empty() {
        return Err(TrainError::BadOption("no corpus files given".into()));
    }
    Ok(files)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn corpus(n: u32) -> Corpus {
        Corpus {
            tokens: (0..n).collect(),
            documents: vec![],
        }
    }

    #[test]
    fn the_split_rule_matches_the_python_script() {
        // sha256("library__os.html.txt") and sha256("licenses__mit.LICENSE.txt"), first 8 hex
        // digits, as `python3 -c 'import hashlib; print(hashlib.sha256(b"...").hexdigest()[:8])'`
        // prints them.
        assert_eq!(
            format!("{:08x}", name_hash("library__os.html.txt")),
            "d4c9f524"
        );
        assert_eq!(
            format!("{:08x}", name_hash("licenses__mit.LICENSE.txt")),
            "7ef9916e"
        );
    }

    #[test]
    fn windows_score_every_token_but_the_first_exactly_once() {
        for (n, len, stride) in [(10, 4, 2), (11, 4, 2), (9, 16, 8), (100, 10, 5), (7, 3, 3)] {
            let c = corpus(n);
            let mut scored = vec![0; n as usize];
            for (w, first) in c.windows(len, stride) {
                assert!(w.len() <= len && first >= 1 && first < w.len().max(2));
                for i in first..w.len() {
                    scored[w[i] as usize] += 1;
                }
            }
            assert_eq!(scored[0], 0);
            assert!(
                scored[1..].iter().all(|&s| s == 1),
                "{n} {len} {stride}: {scored:?}"
            );
        }
    }

    #[test]
    fn blocks_predict_every_position_once() {
        for (n, len) in [(9, 4), (10, 4), (2, 4), (30, 7)] {
            let c = corpus(n);
            let mut predicted = vec![0; n as usize];
            for (start, block) in c.blocks(len) {
                assert!(block.len() <= len && block.len() >= 2);
                assert_eq!(block[0] as usize, start);
                for i in 0..block.len() - 1 {
                    predicted[start + i] += 1;
                }
            }
            assert_eq!(predicted[n as usize - 1], 0);
            assert!(
                predicted[..n as usize - 1].iter().all(|&p| p == 1),
                "{predicted:?}"
            );
        }
    }
}
