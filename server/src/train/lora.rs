//! `server train lora`: trains a LoRA adapter on a JSONL file (format: `plugins::train::data`)
//! or on a domain corpus (`--corpus`, read as `server train memory` reads it: the split rule's
//! order, a token budget, test documents refused, then cut into `--max-len` blocks) and writes it where `--out` says, in the PEFT format the server's `--plugin` / `/v1/plugins`
//! load. The trainer is `plugins::lora::train`; this shim checks the flags, shows progress and
//! writes the run's files.
//!
//! Every option is checked before the model loads, so a typo fails in milliseconds. The run
//! writes `train_log.jsonl` (one line per step) beside the adapter as it goes, shows progress
//! on a terminal (a log line every 5% otherwise), and ends with the mean target-token
//! cross-entropy of the base model and of the adapter on held-out examples: `--eval`, or every
//! tenth example of `--data` (held out of training) when there is no `--eval`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::Device;
use clap::Args;
use models::bundle::{LoadOptions, LoadedModel};
use plugins::lora::train::{
    hold_out, mean_completion_ce, parse_targets, LoraTrainConfig, LoraTrainer,
};
use plugins::train::{Dataset, DenseLlama, Encoder, Example};
use serde_json::json;

/// The log `--out` receives beside the adapter.
const LOG_FILE: &str = "train_log.jsonl";
/// The run's options, for provenance (PEFT's config has no place for them).
const ARGS_FILE: &str = "training_args.json";

#[derive(Debug, Args)]
pub struct LoraArgs {
    /// Base model: a .gguf file or a Hugging Face folder [default: the default model,
    /// fetched on first use]
    #[arg(long)]
    model: Option<PathBuf>,
    /// Training examples, JSONL: {"messages": [...]}, {"prompt": ..., "completion": ...} or {"text": ...}
    /// per line
    #[arg(long, required_unless_present = "corpus", conflicts_with = "corpus")]
    data: Option<PathBuf>,
    /// Or a domain corpus (text files, or folders of them; the memory decoder's corpora), cut
    /// into blocks of --max-len tokens trained on as plain text
    #[arg(long, num_args = 1..)]
    corpus: Vec<PathBuf>,
    /// Tokens of --corpus to read (the same fixed subsample `server train memory` reads)
    #[arg(long, default_value_t = 400_000, requires = "corpus")]
    max_tokens: usize,
    /// Examples for the final evaluation, JSONL [default: every tenth example of --data or
    /// block of --corpus, held out of training]
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Folder to write the adapter (and train_log.jsonl) into; must be empty or new
    #[arg(long)]
    out: PathBuf,
    /// Write into --out even if it holds files
    #[arg(long)]
    overwrite: bool,
    /// LoRA rank r
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// LoRA alpha: the delta is scaled by alpha / r
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    /// rsLoRA: scale by alpha / sqrt(r) instead
    #[arg(long)]
    rslora: bool,
    /// Comma-separated projections to adapt
    #[arg(
        long,
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    targets: String,
    /// Optimizer steps
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// Examples per step
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Peak learning rate (AdamW; decays linearly to 0)
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    /// Longest example in tokens; longer prompts lose their beginning
    #[arg(long, default_value_t = 256)]
    max_len: usize,
    /// Seed of the initialisation and the batch order
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also evaluate the adapter every N steps (logged as eval_ce)
    #[arg(long)]
    eval_every: Option<usize>,
}

pub fn run(args: LoraArgs) -> anyhow::Result<()> {
    let config = LoraTrainConfig {
        rank: args.rank,
        alpha: args.alpha,
        rslora: args.rslora,
        targets: parse_targets(&args.targets)?,
        steps: args.steps,
        batch_size: args.batch_size,
        lr: args.lr,
        seed: args.seed,
    };
    config.validate()?;
    check_inputs(&args)?;
    let model_path = match &args.model {
        Some(p) => p.clone(),
        None => models::default_model::path()?,
    };
    let loaded = load_model(&model_path, args.max_len)?;
    let (train, eval) = load_data(&args, &loaded)?;
    let dense = DenseLlama::from_llama(&loaded.model, args.max_len, &Device::Cpu)?;
    drop(loaded); // the quantized copy is not needed any more
    let mut trainer = LoraTrainer::new(&dense, config)?;
    tracing::info!(
        examples = train.len(),
        eval_examples = eval.len(),
        parameters = trainer.parameters(),
        "training a LoRA adapter"
    );
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    write_args(&args, &model_path)?;
    let summary = train_loop(&mut trainer, &train, &eval, &args)?;
    super::loss_chart::write(&args.out.join(LOG_FILE), &args.out.join("train_loss.svg"))?;
    let name = file_name(&model_path);
    trainer.save(&args.out, &name)?;
    println!(
        "trained {} steps in {:.1} s ({:.2} s/step, {:.0} tokens/s); adapter written to {}",
        args.steps,
        summary.seconds,
        summary.seconds / args.steps as f64,
        summary.tokens as f64 / summary.seconds.max(1e-9),
        args.out.display()
    );
    report_eval(&dense, &trainer, &eval, &args)
}

/// Cheap checks before the model loads.
fn check_inputs(args: &LoraArgs) -> anyhow::Result<()> {
    for path in args.data.iter().chain(&args.eval) {
        if !path.is_file() {
            bail!("the data file {} does not exist", path.display());
        }
    }
    if args.max_len < 2 {
        bail!("--max-len must be at least 2 (a prompt token and a target token)");
    }
    if args.eval_every == Some(0) {
        bail!("--eval-every must be at least 1");
    }
    super::args::check_out_dir(&args.out, args.overwrite)?;
    Ok(())
}

fn load_model(path: &Path, max_len: usize) -> anyhow::Result<LoadedModel> {
    let started = Instant::now();
    let options = LoadOptions {
        vision: None,
        max_positions: Some(max_len),
        chat_template: None,
    };
    let loaded = models::bundle::load(path, &Device::Cpu, &options)
        .with_context(|| format!("cannot load the model at {}", path.display()))?;
    tracing::info!(path = %path.display(), seconds = started.elapsed().as_secs_f64(), "model loaded");
    let context = loaded.model.config.max_position_embeddings;
    if max_len > context {
        bail!("--max-len {max_len} exceeds the model's context of {context} tokens");
    }
    Ok(loaded)
}

/// The training examples and the evaluation examples.
fn load_data(
    args: &LoraArgs,
    loaded: &LoadedModel,
) -> anyhow::Result<(Vec<Example>, Vec<Example>)> {
    let encoder = Encoder::new(
        &loaded.tokenizer,
        loaded.chat_template.as_ref(),
        args.max_len,
    )?;
    let data = match &args.data {
        Some(path) => read(&encoder, path, args.max_len)?,
        None => corpus_blocks(args, loaded)?,
    };
    let (train, eval) = match &args.eval {
        Some(path) => (data, read(&encoder, path, args.max_len)?),
        None => hold_out(data),
    };
    if train.is_empty() {
        bail!("the data leave no examples to train on after holding out the evaluation examples; pass --eval");
    }
    Ok((train, eval))
}

/// `--corpus` as plain-text examples: blocks of `--max-len` tokens overlapping by one token,
/// so every token after the first is a target exactly once.
fn corpus_blocks(args: &LoraArgs, loaded: &LoadedModel) -> anyhow::Result<Vec<Example>> {
    let mut progress = super::args::BarProgress::new(None)?;
    let corpus = super::args::read_training_corpus(
        &args.corpus,
        &loaded.tokenizer,
        args.max_tokens,
        &mut progress,
    )?;
    progress.finish()?;
    let examples = corpus
        .blocks(args.max_len)
        .into_iter()
        .enumerate()
        .map(|(i, (_, block))| Example {
            tokens: block.to_vec(),
            prompt_len: 1,
            line: i + 1,
        })
        .collect();
    Ok(examples)
}

/// One file's examples; an error when none is usable.
fn read(encoder: &Encoder<'_>, path: &Path, max_len: usize) -> anyhow::Result<Vec<Example>> {
    let Dataset {
        examples,
        skipped,
        truncated,
    } = encoder.load(path)?;
    if !skipped.is_empty() {
        tracing::warn!(
            file = %path.display(),
            lines = ?skipped,
            "skipped examples whose target alone exceeds --max-len {max_len}"
        );
    }
    if truncated > 0 {
        tracing::info!(file = %path.display(), truncated, "prompts shortened from the left to fit --max-len");
    }
    if examples.is_empty() {
        let why = match skipped.len() {
            0 => "it has no examples".to_string(),
            n => format!("all {n} examples exceed --max-len {max_len}"),
        };
        bail!("{} holds no usable examples: {why}", path.display());
    }
    Ok(examples)
}

/// Totals of a run.
struct Summary {
    seconds: f64,
    tokens: usize,
}

/// Runs every step, logging each to `train_log.jsonl` and the progress display.
fn train_loop(
    trainer: &mut LoraTrainer<'_>,
    train: &[Example],
    eval: &[Example],
    args: &LoraArgs,
) -> anyhow::Result<Summary> {
    let log_path = args.out.join(LOG_FILE);
    let mut log = BufWriter::new(
        File::create(&log_path).with_context(|| format!("cannot write {}", log_path.display()))?,
    );
    let bar = super::args::progress_bar(args.steps, "step")?;
    let log_every = (args.steps / 20).max(1);
    let started = Instant::now();
    let mut tokens = 0;
    for _ in 0..args.steps {
        let step_started = Instant::now();
        let report = trainer.step(train)?;
        let seconds = step_started.elapsed().as_secs_f64();
        tokens += report.tokens;
        let mut line = json!({
            "step": report.step, "loss": report.loss, "lr": report.lr,
            "tokens": report.tokens, "target_tokens": report.target_tokens, "seconds": seconds,
        });
        let eval_now = args.eval_every.is_some_and(|n| report.step % n == 0);
        if eval_now && !eval.is_empty() {
            let ce = mean_completion_ce(
                trainer.model(),
                eval,
                Some(trainer.factors()),
                args.batch_size,
            )?;
            line["eval_ce"] = json!(ce.ce);
        }
        writeln!(log, "{line}")
            .and_then(|()| log.flush())
            .with_context(|| format!("cannot write {}", log_path.display()))?;
        let rate = tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!("loss {:.4} | {rate:.0} tok/s", report.loss));
        bar.inc(1);
        if bar.is_hidden() && (report.step % log_every == 0 || report.step == args.steps) {
            tracing::info!(
                step = report.step,
                loss = report.loss,
                tokens_per_s = rate as u64,
                "training"
            );
        }
    }
    bar.finish_and_clear();
    Ok(Summary {
        seconds: started.elapsed().as_secs_f64(),
        tokens,
    })
}

/// Base model vs base + adapter on the evaluation examples, printed on stdout.
fn report_eval(
    dense: &DenseLlama,
    trainer: &LoraTrainer<'_>,
    eval: &[Example],
    args: &LoraArgs,
) -> anyhow::Result<()> {
    if eval.is_empty() {
        println!("eval: skipped (a single example leaves none to hold out; pass --eval)");
        return Ok(());
    }
    let base = mean_completion_ce(dense, eval, None, args.batch_size)?;
    let adapted = mean_completion_ce(dense, eval, Some(trainer.factors()), args.batch_size)?;
    let source = match args.eval {
        Some(_) => "evaluation",
        None => "held-out",
    };
    println!(
        "eval: base CE {:.4} -> adapter CE {:.4} ({:+.1}%) on {} {source} examples ({} target tokens)",
        base.ce,
        adapted.ce,
        (adapted.ce - base.ce) / base.ce * 100.0,
        base.examples,
        base.target_tokens
    );
    Ok(())
}

/// The options of the run, beside the adapter.
fn write_args(args: &LoraArgs, model: &Path) -> anyhow::Result<()> {
    let value = json!({
        "model": model, "data": args.data, "corpus": args.corpus,
        "max_tokens": (!args.corpus.is_empty()).then_some(args.max_tokens), "eval": args.eval, "rank": args.rank,
        "alpha": args.alpha, "rslora": args.rslora, "targets": args.targets,
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "max_len": args.max_len, "seed": args.seed, "eval_every": args.eval_every,
    });
    let path = args.out.join(ARGS_FILE);
    std::fs::write(&path, serde_json::to_string_pretty(&value)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// What `base_model_name_or_path` records: the model's file or folder name.
fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}
