//! What the trainers' and the refusal evaluation's command lines share: the model to use,
//! layer-range flags and the progress bar. Prompt files are read by `plugins::train::prompts`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use models::bundle::{LoadOptions, LoadedModel};
use plugins::memory::corpus::Corpus;
use plugins::train::Progress;

/// A progress bar over `len` units of work (`unit`: "step", "completion"), with the elapsed
/// time and an ETA; on stderr, hidden when stderr is not a terminal.
pub fn progress_bar(len: usize, unit: &str) -> anyhow::Result<ProgressBar> {
    let template = format!(
        "{unit} {{pos}}/{{len}} [{{bar:30}}] {{msg}} | {{elapsed_precise}} ETA {{eta_precise}}"
    );
    let style = ProgressStyle::with_template(&template)?.progress_chars("=> ");
    Ok(ProgressBar::new(len as u64).with_style(style))
}

/// [`Progress`] for a terminal: one bar with an ETA per phase on stderr; when stderr is not a
/// terminal (a log file, `nohup`), a line per tenth of each phase with its ETA instead. With a
/// log file, each training step's losses as one JSON line
/// (`{"step": 0, "loss": ..., ...}`), flushed as it goes so the file can be watched.
pub struct BarProgress {
    bar: Option<ProgressBar>,
    /// The current phase, for the lines written when the bar is hidden.
    phase: Option<PhaseLines>,
    log: Option<(PathBuf, BufWriter<File>)>,
    /// The first failure to write the log, reported by [`BarProgress::finish`].
    failed: Option<anyhow::Error>,
}

impl BarProgress {
    /// Progress bars, and the losses logged to `log` when given (created or truncated).
    pub fn new(log: Option<PathBuf>) -> anyhow::Result<Self> {
        Self::with_log(log, false)
    }

    /// [`Self::new`], adding to the log when it exists (a resumed run).
    pub fn appending(log: Option<PathBuf>) -> anyhow::Result<Self> {
        Self::with_log(log, true)
    }

    fn with_log(log: Option<PathBuf>, append: bool) -> anyhow::Result<Self> {
        let log = match log {
            None => None,
            Some(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .append(append)
                    .truncate(!append)
                    .open(&path)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                Some((path, BufWriter::new(file)))
            }
        };
        Ok(Self {
            bar: None,
            phase: None,
            log,
            failed: None,
        })
    }

    /// Clears the last bar; an error if the loss log could not be written.
    pub fn finish(mut self) -> anyhow::Result<()> {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        self.failed.take().map_or(Ok(()), Err)
    }
}

impl Progress for BarProgress {
    fn phase(&mut self, name: &str, total: usize) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        match progress_bar(total, name) {
            Ok(bar) => {
                self.phase = bar.is_hidden().then(|| PhaseLines::new(name, total));
                self.bar = Some(bar);
            }
            Err(e) => eprintln!("{name}: {total} (no progress bar: {e})"),
        }
    }

    fn advance(&mut self, n: usize) {
        if let Some(bar) = &self.bar {
            bar.inc(n as u64);
        }
        if let Some(line) = self.phase.as_mut().and_then(|p| p.advance(n)) {
            eprintln!("{line}");
        }
    }

    fn losses(&mut self, step: usize, losses: &[(&'static str, f32)]) {
        let (Some((path, log)), None) = (&mut self.log, &self.failed) else {
            return;
        };
        let mut line = serde_json::Map::new();
        line.insert("step".into(), step.into());
        for &(name, value) in losses {
            line.insert(name.into(), f64::from(value).into());
        }
        let written =
            writeln!(log, "{}", serde_json::Value::Object(line)).and_then(|()| log.flush());
        if let Err(e) = written {
            self.failed =
                Some(anyhow::Error::new(e).context(format!("cannot write {}", path.display())));
        }
    }
}

/// The training text of a corpus trainer (test documents refused), with its size on stderr.
pub fn read_training_corpus(
    paths: &[PathBuf],
    tokenizer: &models::Tokenizer,
    max_tokens: usize,
    progress: &mut dyn Progress,
) -> anyhow::Result<Corpus> {
    let corpus = Corpus::read(paths, tokenizer, Some(max_tokens), false, progress)?;
    eprintln!(
        "corpus: {} tokens from {} documents",
        corpus.tokens.len(),
        corpus.documents.len()
    );
    Ok(corpus)
}

/// A controller decay τ: a positive number, or `none` (a patch that never fades).
pub fn parse_decay(s: &str) -> Result<Option<f32>, String> {
    match s.trim() {
        "none" => Ok(None),
        x => match x.parse::<f32>() {
            Ok(d) if d.is_finite() && d > 0.0 => Ok(Some(d)),
            _ => Err(format!("`{x}` is not a positive number or `none`")),
        },
    }
}

/// A phase's progress as lines on stderr, one per tenth done, for runs nobody watches live.
struct PhaseLines {
    name: String,
    total: usize,
    done: usize,
    next_tenth: usize,
    started: std::time::Instant,
}

impl PhaseLines {
    fn new(name: &str, total: usize) -> Self {
        Self {
            name: name.to_string(),
            total,
            done: 0,
            next_tenth: 1,
            started: std::time::Instant::now(),
        }
    }

    /// The line to print when `n` more units take the phase past its next tenth.
    fn advance(&mut self, n: usize) -> Option<String> {
        self.done += n;
        if self.total == 0 || self.done * 10 < self.next_tenth * self.total {
            return None;
        }
        self.next_tenth = self.done * 10 / self.total + 1;
        let elapsed = self.started.elapsed().as_secs_f64();
        let left = elapsed * (self.total.saturating_sub(self.done)) as f64 / self.done as f64;
        Some(format!(
            "{}: {}/{} ({}%) in {elapsed:.0} s, about {left:.0} s left",
            self.name,
            self.done,
            self.total,
            self.done * 100 / self.total
        ))
    }
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
        vision: None,
        max_positions: Some(max_positions),
        chat_template: None,
    };
    models::bundle::load(path, &Device::Cpu, &options)
        .with_context(|| format!("cannot load the model at {}", path.display()))
}

/// What plug-ins loaded by an offline command are checked against: the loaded model's shapes
/// on the CPU (no served id, no tokenizer identity to compare).
pub fn offline_base(loaded: &LoadedModel) -> plugins::BaseModel {
    plugins::BaseModel {
        id: String::new(),
        config: loaded.model.config.clone(),
        device: Device::Cpu,
        tokenizer_hash: None,
        kv_dtype: models::KvDtype::F32,
    }
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

/// Refuses an output folder that holds files, unless `overwrite`.
pub fn check_out_dir(out: &Path, overwrite: bool) -> anyhow::Result<()> {
    let occupied = match std::fs::read_dir(out) {
        Ok(mut entries) => entries.next().is_some(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", out.display())),
    };
    if occupied && !overwrite {
        bail!(
            "the output folder {} is not empty; choose a new folder or pass --overwrite",
            out.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::PhaseLines;

    #[test]
    fn a_hidden_phase_prints_a_line_per_tenth_crossed() {
        let mut p = PhaseLines::new("steps", 100);
        assert_eq!(p.advance(5), None);
        let line = p.advance(5).unwrap();
        assert!(line.starts_with("steps: 10/100 (10%) in "), "{line}");
        assert!(p.advance(25).unwrap().contains("35/100 (35%)"));
        assert_eq!(p.advance(4), None);
        assert!(p.advance(1).unwrap().contains("40/100 (40%)"));
        assert!(p.advance(60).unwrap().contains("100/100 (100%)"));
        assert_eq!(PhaseLines::new("empty", 0).advance(1), None);
    }
}
