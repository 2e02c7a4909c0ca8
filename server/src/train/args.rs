//! What the trainers' and the refusal evaluation's command lines share: the model to use,
//! layer-range flags and the progress bar. Prompt files are read by `plugins::train::prompts`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use models::bundle::{LoadOptions, LoadedModel};

/// A progress bar over `len` units of work (`unit`: "step", "completion"), with the elapsed
/// time and an ETA; on stderr, hidden when stderr is not a terminal.
pub fn progress_bar(len: usize, unit: &str) -> anyhow::Result<ProgressBar> {
    let template = format!(
        "{unit} {{pos}}/{{len}} [{{bar:30}}] {{msg}} | {{elapsed_precise}} ETA {{eta_precise}}"
    );
    let style = ProgressStyle::with_template(&template)?.progress_chars("=> ");
    Ok(ProgressBar::new(len as u64).with_style(style))
}

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
