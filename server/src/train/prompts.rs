//! What the steering trainers and the refusal evaluation share: the model to use, prompt
//! lists read from files, and prompts rendered with the model's chat template.
//!
//! Prompt files: a JSON array of strings or of objects with `instruction`, `prompt` or `text`
//! (the format of shared/data/refusal), or JSONL with one such string or object per line.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::Device;
use models::bundle::{LoadOptions, LoadedModel};
use models::chat_template::ChatMessage;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;

/// The model at `path`, or the default model (fetched on first use).
pub fn model_path(path: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match path {
        Some(p) => Ok(p.clone()),
        None => Ok(models::default_model::path()?),
    }
}

pub fn load_model(path: &Path, max_positions: usize) -> anyhow::Result<LoadedModel> {
    let options = LoadOptions {
        max_positions: Some(max_positions),
        chat_template: None,
    };
    models::bundle::load(path, &Device::Cpu, &options)
        .with_context(|| format!("cannot load the model at {}", path.display()))
}

/// The prompts of a file, shuffled with `seed` and cut to `limit`.
pub fn read_prompts(path: &Path, limit: usize, seed: u64) -> anyhow::Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let values: Vec<Value> = match serde_json::from_str::<Value>(&text) {
        Ok(Value::Array(items)) => items,
        _ => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))
            })
            .collect::<anyhow::Result<_>>()?,
    };
    let mut prompts = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            prompt_text(v)
                .with_context(|| format!("{}: entry {} has no prompt text", path.display(), i + 1))
        })
        .collect::<anyhow::Result<Vec<String>>>()?;
    if prompts.is_empty() {
        bail!("{} holds no prompts", path.display());
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
pub fn chat_ids(loaded: &LoadedModel, instruction: &str) -> anyhow::Result<Vec<u32>> {
    let template = loaded
        .chat_template
        .as_ref()
        .context("the model has no chat template")?;
    let messages = [ChatMessage {
        role: "user".into(),
        content: instruction.to_string(),
    }];
    let text = template.render(&messages, true, None)?;
    Ok(loaded.tokenizer.encode(&text, true)?)
}

/// `chat_ids` of every prompt.
pub fn chat_ids_all(loaded: &LoadedModel, prompts: &[String]) -> anyhow::Result<Vec<Vec<u32>>> {
    prompts.iter().map(|p| chat_ids(loaded, p)).collect()
}

/// `a-b` or `a..b` (inclusive) into `(a, b)`.
pub fn parse_range(s: &str) -> anyhow::Result<(usize, usize)> {
    let (a, b) = s
        .split_once('-')
        .or_else(|| s.split_once(".."))
        .context("expected FIRST-LAST, e.g. 8-20")?;
    let (a, b) = (a.trim().parse()?, b.trim().parse()?);
    if a > b {
        bail!("range {s}: first is after last");
    }
    Ok((a, b))
}
