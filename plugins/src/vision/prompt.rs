//! How an image and its questions become training tokens: the chat template renders the
//! conversation exactly as the server renders a chat request, the image part written as the
//! tower's prompt tokens (`around`, `global`, then `image` once per image token, `around`,
//! as Idefics3's processor writes them), and the assistant's answers are the targets.

use models::chat_template::{ChatMessage, ChatTemplate};
pub use models::vision::ImageTokens;
use models::Tokenizer;

use crate::train::{Result, TrainError};

/// The image tokens of a tower trained for SmolLM2, whose tokenizer has none of its own: three
/// of its special tokens that mark code-dataset cells and never occur in chat.
pub fn smollm2_image_tokens() -> ImageTokens {
    ImageTokens {
        around: "<jupyter_start>".into(),
        global: "<jupyter_text>".into(),
        image: "<empty_output>".into(),
    }
}

/// The image token's id; each of the three must be one token of `tokenizer`.
pub fn image_id(tokens: &ImageTokens, tokenizer: &Tokenizer) -> Result<u32> {
    for piece in [&tokens.around, &tokens.global] {
        single(tokenizer, piece)?;
    }
    single(tokenizer, &tokens.image)
}

fn single(tokenizer: &Tokenizer, piece: &str) -> Result<u32> {
    match tokenizer.encode(piece, true) {
        Ok(ids) if ids.len() == 1 => Ok(ids[0]),
        _ => Err(TrainError::BadOption(format!(
            "`{piece}` is not one token of the model's tokenizer"
        ))),
    }
}

/// A tokenized conversation about one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    pub tokens: Vec<u32>,
    /// `(position, target)`: the token at `position + 1` is `target`, an answer token.
    pub targets: Vec<(usize, u32)>,
}

/// Renders turns of `(question, answer)` about one image (placed before the first question)
/// with the template, as the server renders a chat request.
pub struct Renderer<'a> {
    pub tokenizer: &'a Tokenizer,
    pub template: &'a ChatTemplate,
    pub image_text: String,
}

impl Renderer<'_> {
    /// The prompt of a single question, as the server renders it.
    pub fn question(&self, question: &str) -> Result<Vec<u32>> {
        self.encode(&self.messages(&[(question, "")])[..1], true)
    }

    /// Every turn with its answer; targets are each answer's tokens and the end-of-turn token.
    pub fn conversation(&self, turns: &[(&str, &str)]) -> Result<Conversation> {
        let messages = self.messages(turns);
        let tokens = self.encode(&messages, false)?;
        let end = *self.tokenizer.eos_ids().first().ok_or_else(|| {
            TrainError::BadOption("the tokenizer has no end-of-turn token".into())
        })?;
        let mut targets = Vec::new();
        for (k, (_, answer)) in turns.iter().enumerate() {
            let start = self.encode(&messages[..2 * k + 1], true)?.len();
            let mut answer = self.tokenizer.encode(answer, false).map_err(prompt_error)?;
            answer.push(end);
            if tokens.get(start..start + answer.len()) != Some(answer.as_slice()) {
                return Err(TrainError::Prompt(format!(
                    "the chat template does not render answer {k} where its prompt ends"
                )));
            }
            targets.extend((0..answer.len()).map(|i| (start + i - 1, answer[i])));
        }
        Ok(Conversation { tokens, targets })
    }

    fn messages(&self, turns: &[(&str, &str)]) -> Vec<ChatMessage> {
        let message = |role: &str, content: String| ChatMessage {
            role: role.into(),
            content,
            tool_calls: None,
            tool_call_id: None,
        };
        let mut out = Vec::with_capacity(2 * turns.len());
        for (k, (q, a)) in turns.iter().enumerate() {
            let image = if k == 0 { self.image_text.as_str() } else { "" };
            out.push(message("user", format!("{image}{q}")));
            out.push(message("assistant", (*a).to_string()));
        }
        out
    }

    fn encode(&self, messages: &[ChatMessage], generation_prompt: bool) -> Result<Vec<u32>> {
        let text = self
            .template
            .render(messages, generation_prompt, None)
            .map_err(|e| TrainError::Prompt(format!("chat template: {e}")))?;
        self.tokenizer
            .encode_with_bos(&text, true)
            .map_err(prompt_error)
    }
}

fn prompt_error(e: impl std::fmt::Display) -> TrainError {
    TrainError::Prompt(e.to_string())
}
