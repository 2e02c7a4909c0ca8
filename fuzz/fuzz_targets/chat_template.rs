//! Chat-template rendering (`models::chat_template`). The first byte picks the case:
//! - even: arbitrary messages (the rest split on NUL into role, content, role, ...) through the
//!   real SmolLM2 template, with and without the generation prompt;
//! - odd: the rest as template text (at most 4 KiB), compiled and rendered with two fixed
//!   messages.
//!
//! Compilation or rendering may fail with a typed error; neither may panic or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use models::chat_template::{ChatMessage, ChatTemplate};

/// SmolLM2-135M-Instruct's `chat_template` from its `tokenizer_config.json`, the default model.
const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const MAX_TEMPLATE: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    if mode % 2 == 0 {
        render_messages(&text, mode & 2 != 0);
    } else if text.len() <= MAX_TEMPLATE {
        render_template(&text);
    }
});

fn render_messages(text: &str, add_generation_prompt: bool) {
    let Ok(template) = ChatTemplate::new(SMOLLM2, None, Some("<|im_end|>".into())) else {
        return;
    };
    let parts: Vec<&str> = text.split('\0').collect();
    let messages: Vec<ChatMessage> = parts
        .chunks(2)
        .map(|pair| ChatMessage::text(pair[0], *pair.get(1).unwrap_or(&"")))
        .collect();
    let _ = template.render(&messages, add_generation_prompt, None);
}

fn render_template(source: &str) {
    let Ok(template) = ChatTemplate::new(source, Some("<s>".into()), Some("</s>".into())) else {
        return;
    };
    let messages = [
        ChatMessage::text("system", "Be brief."),
        ChatMessage::text("user", "Hello!"),
    ];
    let tools = serde_json::json!([{"type": "function", "function": {"name": "f"}}]);
    let _ = template.render(&messages, true, Some(&tools));
}
