//! Prompt lists for the steering trainers and the refusal evaluation: read from files and
//! rendered with the model's chat template.
//!
//! Prompt files: a JSON array of strings or of objects with `instruction`, `prompt` or `text`
//! (the format of shared/data/refusal), or JSONL with one such string or object per line.

use std::path::Path;

use models::bundle::LoadedModel;
use models::chat_template::ChatMessage;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;

use super::{Result, TrainError};

/// The prompts of a file, shuffled with `seed` and cut to `limit`.
pub fn read_prompts(path: &Path, limit: usize, seed: u64) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|source| TrainError::Unreadable {
        path: path.to_path_buf(),
        source,
    })?;
    let values: Vec<Value> = match serde_json::from_str::<Value>(&text) {
        Ok(Value::Array(items)) => items,
        _ => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l).map_err(|e| TrainError::BadLine {
                    path: path.to_path_buf(),
                    line: i + 1,
                    message: format!("not JSON: {e}"),
                })
            })
            .collect::<Result<_>>()?,
    };
    let bad = |message: String| TrainError::BadPrompts {
        path: path.to_path_buf(),
        message,
    };
    let mut prompts = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            prompt_text(v).ok_or_else(|| bad(format!("entry {} has no prompt text", i + 1)))
        })
        .collect::<Result<Vec<String>>>()?;
    if prompts.is_empty() {
        return Err(bad("holds no prompts".into()));
    }
    prompts.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    prompts.truncate(limit);
    Ok(prompts)
}

fn prompt_text(v: &Value) -> Option<String> {
    let s = match v {
        Value::String(s) => s,
        Value::Object(o) => ["instruction", "prompt", "text"]
            .iter()
            .find_map(|k| o.get(*k)?.as_str())?,
        _ => return None,
    };
    Some(s.to_string())
}

/// Token ids of `instruction` as a user turn with the generation prompt after it.
pub fn chat_ids(loaded: &LoadedModel, instruction: &str) -> Result<Vec<u32>> {
    let template = loaded
        .chat_template
        .as_ref()
        .ok_or_else(|| TrainError::Prompt("the model has no chat template".into()))?;
    let messages = [ChatMessage::text("user", instruction)];
    let text = template
        .render(&messages, true, None)
        .map_err(|e| TrainError::Prompt(e.to_string()))?;
    tokens(loaded, &text, true)
}

/// `chat_ids` of every prompt.
pub fn chat_ids_all(loaded: &LoadedModel, prompts: &[String]) -> Result<Vec<Vec<u32>>> {
    prompts.iter().map(|p| chat_ids(loaded, p)).collect()
}

/// The token ids of `text`, special tokens parsed when `special`.
pub fn tokens(loaded: &LoadedModel, text: &str, special: bool) -> Result<Vec<u32>> {
    loaded
        .tokenizer
        .encode(text, special)
        .map_err(|e| TrainError::Prompt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_and_jsonl_of_strings_or_objects_are_read_and_faults_named() {
        let dir = tempfile::tempdir().unwrap();
        let array = dir.path().join("a.json");
        std::fs::write(&array, r#"["x", {"instruction": "y"}, {"text": "z"}]"#).unwrap();
        let mut got = read_prompts(&array, 10, 0).unwrap();
        got.sort();
        assert_eq!(got, ["x", "y", "z"]);
        assert_eq!(read_prompts(&array, 2, 0).unwrap().len(), 2);
        let lines = dir.path().join("l.jsonl");
        std::fs::write(&lines, "\"x\"\n\n{\"prompt\": \"y\"}\n").unwrap();
        assert_eq!(read_prompts(&lines, 10, 0).unwrap().len(), 2);

        let e = |text: &str| {
            std::fs::write(&lines, text).unwrap();
            read_prompts(&lines, 10, 0).unwrap_err().to_string()
        };
        assert!(e("\"x\"\n{oops\n").contains("line 2: not JSON"));
        assert!(e("[1]").ends_with("entry 1 has no prompt text"));
        assert!(e("[]").ends_with("holds no prompts"));
        let missing = read_prompts(&dir.path().join("nope.json"), 1, 0).unwrap_err();
        assert!(missing.to_string().starts_with("cannot read "), "{missing}");
    }
}
