//! Prompts from a JSONL file (`--prompts`): one `{"messages": [...]}` or `{"prompt": "..."}`
//! per line, with an optional `"max_tokens"`. Blank lines are skipped.
//!
//! A `prompt` line sent to the chat route becomes one user message; a `messages` line cannot go
//! to the completions route (that would need the server's chat template), so it is refused at
//! load time with its line number rather than sent in a shape the server would reject.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::Endpoint;

/// One line of the file, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLine {
    /// The body fields carrying the prompt: `{"messages": ...}` or `{"prompt": ...}`.
    pub fields: Value,
    pub max_tokens: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum PromptsError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {reason}")]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{0} holds no prompts")]
    Empty(PathBuf),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLine {
    messages: Option<Vec<Value>>,
    prompt: Option<String>,
    max_tokens: Option<u32>,
}

/// Reads and checks every line of `path` for `endpoint`.
pub fn load(path: &Path, endpoint: Endpoint) -> Result<Vec<PromptLine>, PromptsError> {
    let text = std::fs::read_to_string(path).map_err(|source| PromptsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let line = parse_line(raw, endpoint).map_err(|reason| PromptsError::Line {
            path: path.to_path_buf(),
            line: i + 1,
            reason,
        })?;
        out.push(line);
    }
    if out.is_empty() {
        return Err(PromptsError::Empty(path.to_path_buf()));
    }
    Ok(out)
}

fn parse_line(raw: &str, endpoint: Endpoint) -> Result<PromptLine, String> {
    let line: RawLine = serde_json::from_str(raw).map_err(|e| e.to_string())?;
    let fields = match (line.messages, line.prompt, endpoint) {
        (Some(_), Some(_), _) => return Err("has both `messages` and `prompt`".into()),
        (None, None, _) => return Err("has neither `messages` nor `prompt`".into()),
        (Some(m), None, Endpoint::Chat) => json!({ "messages": m }),
        (Some(_), None, Endpoint::Completions) => {
            return Err("`messages` needs --endpoint chat".into())
        }
        (None, Some(p), Endpoint::Chat) => json!({ "messages": [{"role": "user", "content": p}] }),
        (None, Some(p), Endpoint::Completions) => json!({ "prompt": p }),
    };
    Ok(PromptLine {
        fields,
        max_tokens: line.max_tokens,
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn lines_become_body_fields_for_each_endpoint() {
        let f = file(
            "{\"prompt\": \"hi\", \"max_tokens\": 7}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"yo\"}]}\n",
        );
        let chat = load(f.path(), Endpoint::Chat).unwrap();
        assert_eq!(chat.len(), 2);
        assert_eq!(chat[0].fields["messages"][0]["content"], "hi");
        assert_eq!(chat[0].max_tokens, Some(7));
        assert_eq!(chat[1].max_tokens, None);
        let err = load(f.path(), Endpoint::Completions)
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with(":3: `messages` needs --endpoint chat"),
            "{err}"
        );
    }

    #[test]
    fn bad_lines_name_their_number() {
        let f = file("{\"prompt\": \"a\"}\n{\"promt\": \"typo\"}\n");
        let err = load(f.path(), Endpoint::Completions)
            .unwrap_err()
            .to_string();
        assert!(err.contains(":2: unknown field `promt`"), "{err}");
        let f = file("\n\n");
        assert!(matches!(
            load(f.path(), Endpoint::Chat),
            Err(PromptsError::Empty(_))
        ));
    }
}
