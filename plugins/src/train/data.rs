//! Training data: a JSONL file, one example per line, in one of three forms.
//!
//! - `{"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", "content":
//!   "..."}]}`: OpenAI chat messages. The last message must be the assistant's; it is the
//!   target. The prompt is the model's chat template applied to the messages before it with
//!   the generation prompt, tokenized as the server tokenizes a chat request (BOS when the
//!   model asks for it, special tokens parsed). The target is the assistant's content
//!   followed by the model's end-of-turn token (its first EOS id), so the adapter learns to
//!   stop where the reply ends.
//! - `{"prompt": "...", "completion": "..."}`: plain text without the chat template; the prompt
//!   is tokenized as `/v1/completions` tokenizes it, the target is the completion followed by
//!   the end-of-turn token.
//! - `{"text": "..."}`: plain text for language modelling: every token after the first is a
//!   target, nothing is appended (a document may go on in the next line), and a text longer
//!   than `max_len` tokens keeps its beginning.
//!
//! Target text is tokenized on its own, without parsing special tokens (it is literal text).
//! Other keys on a line are ignored. The loss covers target tokens only (prompt and padding
//! are masked out). Blank lines are skipped; any other line that is not one of these forms is
//! an error naming its line number. An example longer than `max_len` tokens loses tokens from
//! the left of its prompt; one whose target does not fit with at least one prompt token
//! before it is skipped and reported in [`Dataset::skipped`].

use std::path::Path;

use candle_core::{Device, Tensor};
use models::chat_template::{ChatMessage, ChatTemplate};
use models::Tokenizer;
use serde_json::{Map, Value};

use super::{Result, TrainError};

/// One tokenized example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Prompt tokens, then target tokens.
    pub tokens: Vec<u32>,
    /// How many of `tokens` belong to the prompt (at least 1).
    pub prompt_len: usize,
    /// The example's line in its file, from 1.
    pub line: usize,
}

impl Example {
    /// Tokens the loss is computed on.
    pub fn target_len(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

/// The usable examples of a file and what was done to the others.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    pub examples: Vec<Example>,
    /// Lines whose target alone exceeds the length limit.
    pub skipped: Vec<usize>,
    /// How many examples lost prompt tokens to the length limit.
    pub truncated: usize,
}

/// Turns lines of the training format into [`Example`]s for one model.
#[derive(Debug, Clone, Copy)]
pub struct Encoder<'a> {
    tokenizer: &'a Tokenizer,
    template: Option<&'a ChatTemplate>,
    end_of_turn: u32,
    max_len: usize,
}

impl<'a> Encoder<'a> {
    /// `template` is needed only for chat lines; `max_len` caps an example's tokens.
    pub fn new(
        tokenizer: &'a Tokenizer,
        template: Option<&'a ChatTemplate>,
        max_len: usize,
    ) -> Result<Self> {
        let end_of_turn = *tokenizer.eos_ids().first().ok_or_else(|| {
            TrainError::BadOption(
                "the tokenizer has no end-of-sequence token to end targets with".into(),
            )
        })?;
        if max_len < 2 {
            return Err(TrainError::BadOption(format!(
                "max length {max_len} leaves no room for a prompt token and a target token"
            )));
        }
        Ok(Self {
            tokenizer,
            template,
            end_of_turn,
            max_len,
        })
    }

    /// Reads and encodes every line of `path`.
    pub fn load(&self, path: &Path) -> Result<Dataset> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        let mut data = Dataset::default();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let bad = |message: String| TrainError::BadLine {
                path: path.to_path_buf(),
                line: i + 1,
                message,
            };
            let (prompt, target) = self.encode(line).map_err(bad)?;
            match self.fit(prompt, target, i + 1) {
                Some((example, truncated)) => {
                    data.truncated += usize::from(truncated);
                    data.examples.push(example);
                }
                None => data.skipped.push(i + 1),
            }
        }
        Ok(data)
    }

    /// One line as (prompt tokens, target tokens), or what is wrong with it.
    pub fn encode(&self, line: &str) -> std::result::Result<(Vec<u32>, Vec<u32>), String> {
        let value: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
        let map = value.as_object().ok_or("not a JSON object")?;
        if map.contains_key("text") {
            if map.contains_key("messages") || map.contains_key("prompt") {
                return Err("has `text` and another form's key; use one form".into());
            }
            return self.plain(&text(map, "text")?);
        }
        let (prompt, target) = match (map.get("messages"), map.contains_key("prompt")) {
            (Some(messages), false) => self.chat(messages)?,
            (None, true) => (text(map, "prompt")?, text(map, "completion")?),
            (Some(_), true) => return Err("has both `messages` and `prompt`; use one form".into()),
            (None, false) => {
                return Err(
                    "expected {\"messages\": [...]}, {\"prompt\": ..., \"completion\": ...} or {\"text\": ...}"
                        .into(),
                )
            }
        };
        let tk = self.tokenizer;
        let prompt = tk
            .encode_with_bos(&prompt, true)
            .map_err(|e| e.to_string())?;
        if prompt.is_empty() {
            return Err("the prompt is empty, so the first target token has nothing to follow (the model adds no BOS token)".into());
        }
        let mut target = tk.encode(&target, false).map_err(|e| e.to_string())?;
        target.push(self.end_of_turn);
        Ok((prompt, target))
    }

    /// A `text` line: the first token (BOS when the model adds one) as the prompt, the rest,
    /// cut to `max_len` tokens in all, as the target.
    fn plain(&self, text: &str) -> std::result::Result<(Vec<u32>, Vec<u32>), String> {
        let mut tokens = self
            .tokenizer
            .encode_with_bos(text, true)
            .map_err(|e| e.to_string())?;
        if tokens.len() < 2 {
            return Err("`text` needs at least two tokens: one to predict from, one target".into());
        }
        tokens.truncate(self.max_len);
        let target = tokens.split_off(1);
        Ok((tokens, target))
    }

    /// The rendered prompt and the assistant's reply of a `messages` line.
    fn chat(&self, messages: &Value) -> std::result::Result<(String, String), String> {
        let messages: Vec<ChatMessage> = serde_json::from_value(messages.clone()).map_err(|e| {
            format!("`messages` must be a list of {{\"role\", \"content\"}} strings: {e}")
        })?;
        let Some((last, before)) = messages.split_last() else {
            return Err("`messages` is empty".into());
        };
        if last.role != "assistant" {
            return Err(format!(
                "the last message is from `{}`; it must be the assistant's reply to learn",
                last.role
            ));
        }
        let template = self
            .template
            .ok_or("the model has no chat template, so `messages` lines cannot be rendered; use {\"prompt\", \"completion\"} lines")?;
        let prompt = template
            .render(before, true, None)
            .map_err(|e| format!("chat template: {e}"))?;
        Ok((prompt, last.content.clone()))
    }

    /// Applies the length limit: drops prompt tokens from the left, keeping at least one;
    /// `None` when the target alone leaves no room for one.
    fn fit(&self, prompt: Vec<u32>, target: Vec<u32>, line: usize) -> Option<(Example, bool)> {
        if target.len() >= self.max_len {
            return None;
        }
        let keep = prompt.len().min(self.max_len - target.len());
        let truncated = keep < prompt.len();
        let mut tokens = prompt[prompt.len() - keep..].to_vec();
        tokens.extend(target);
        Some((
            Example {
                tokens,
                prompt_len: keep,
                line,
            },
            truncated,
        ))
    }
}

fn text(map: &Map<String, Value>, key: &str) -> std::result::Result<String, String> {
    match map.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(format!("`{key}` must be a string")),
        None => Err(format!("`{key}` is missing")),
    }
}

/// Examples padded on the right into one matrix, with the positions whose next token is a
/// target. Padding needs no attention mask: with causal attention a real token never sees the
/// padding after it, and padded positions are never among `positions`.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `(b, t)` u32, padded with id 0.
    pub ids: Tensor,
    /// `(n,)` u32: flat indices into `(b * t)` of the positions that predict a target.
    pub positions: Tensor,
    /// `(n,)` u32: the token each of those positions must predict.
    pub targets: Tensor,
    /// Real (not padding) tokens in the batch.
    pub tokens: usize,
}

impl Batch {
    pub fn new(examples: &[&Example], device: &Device) -> Result<Self> {
        let t = examples.iter().map(|e| e.tokens.len()).max().unwrap_or(0);
        if t == 0 {
            return Err(TrainError::BadOption("an empty batch".into()));
        }
        let mut ids = vec![0u32; examples.len() * t];
        let (mut positions, mut targets) = (Vec::new(), Vec::new());
        for (r, e) in examples.iter().enumerate() {
            ids[r * t..r * t + e.tokens.len()].copy_from_slice(&e.tokens);
            for i in e.prompt_len.max(1)..e.tokens.len() {
                positions.push((r * t + i - 1) as u32);
                targets.push(e.tokens[i]);
            }
        }
        let n = positions.len();
        Ok(Self {
            ids: Tensor::from_vec(ids, (examples.len(), t), device)?,
            positions: Tensor::from_vec(positions, n, device)?,
            targets: Tensor::from_vec(targets, n, device)?,
            tokens: examples.iter().map(|e| e.tokens.len()).sum(),
        })
    }

    /// How many target tokens the loss averages over.
    pub fn target_tokens(&self) -> usize {
        self.targets.elem_count()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_pads_on_the_right_and_predicts_each_target_from_the_position_before_it() {
        let long = Example {
            tokens: vec![5, 6, 7, 8, 9],
            prompt_len: 3,
            line: 1,
        };
        let short = Example {
            tokens: vec![1, 2, 3],
            prompt_len: 1,
            line: 2,
        };
        let batch = Batch::new(&[&long, &short], &Device::Cpu).unwrap();
        assert_eq!(
            batch.ids.to_vec2::<u32>().unwrap(),
            [[5, 6, 7, 8, 9], [1, 2, 3, 0, 0]]
        );
        // Row 0 predicts 8 at position 2 and 9 at 3; row 1 (offset 5) 2 at 0 and 3 at 1.
        assert_eq!(batch.positions.to_vec1::<u32>().unwrap(), [2, 3, 5, 6]);
        assert_eq!(batch.targets.to_vec1::<u32>().unwrap(), [8, 9, 2, 3]);
        assert_eq!((batch.tokens, batch.target_tokens()), (8, 4));
    }
}
