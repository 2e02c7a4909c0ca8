//! `server train vision`: trains a vision tower for the frozen language model on the seeded
//! synthetic question set (`plugins::vision`) and writes the folder `server serve --vision`
//! loads (`config.json`, `model.safetensors`, `preprocessor_config.json`), with
//! `report.json` (held-out accuracy by question kind, teacher-forced), `train_log.jsonl` and
//! `loss.svg`. `server eval vision` asks the same questions through the serving path.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use plugins::train::DenseLlama;
use plugins::vision::eval::accuracy;
use plugins::vision::files::{self, TowerInfo};
use plugins::vision::prompt::{image_id, smollm2_image_tokens, Renderer};
use plugins::vision::tower::TowerShape;
use plugins::vision::train::{train, TrainOptions, Trainer};

use super::args::{check_out_dir, load_model, model_path, BarProgress};

const LOG_FILE: &str = "train_log.jsonl";

#[derive(Debug, Args)]
pub struct VisionArgs {
    /// Language model (kept frozen): a .gguf file or a Hugging Face folder [default: the
    /// default model]
    #[arg(long)]
    model: Option<PathBuf>,
    /// Folder to write the tower into; must be empty or new (see --resume)
    #[arg(long)]
    out: PathBuf,
    /// Go on from the checkpoint a stopped run left in --out
    #[arg(long)]
    resume: bool,
    /// Write into --out even if it holds files (starts afresh)
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// Seed of the synthetic images and questions and of the tower's initialisation
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Alignment steps (image tokens to word embeddings; the language model does not run)
    #[arg(long, default_value_t = TrainOptions::default().align_steps)]
    align_steps: usize,
    /// Images per alignment step
    #[arg(long, default_value_t = TrainOptions::default().align_batch)]
    align_batch: usize,
    /// Peak learning rate of alignment
    #[arg(long, default_value_t = TrainOptions::default().align_lr)]
    align_lr: f64,
    /// Answering steps (through the frozen language model)
    #[arg(long, default_value_t = TrainOptions::default().steps)]
    steps: usize,
    /// Images per answering step
    #[arg(long, default_value_t = TrainOptions::default().batch)]
    batch: usize,
    /// Questions asked about each image in one training conversation
    #[arg(long, default_value_t = TrainOptions::default().turns)]
    turns: usize,
    /// Peak learning rate of answering (20 warm-up steps, cosine decay to a tenth)
    #[arg(long, default_value_t = TrainOptions::default().lr)]
    lr: f64,
    /// Width of the encoder
    #[arg(long, default_value_t = TrainOptions::default().shape.hidden_size)]
    hidden_size: usize,
    /// Encoder layers
    #[arg(long, default_value_t = TrainOptions::default().shape.num_hidden_layers)]
    layers: usize,
    /// Attention heads per encoder layer
    #[arg(long, default_value_t = TrainOptions::default().shape.num_attention_heads)]
    heads: usize,
    /// Alignment also makes the last row of image tokens spell a summary of the image (each
    /// shape's colour, name and side, the count, the word)
    #[arg(long)]
    summary_row: bool,
    /// With --summary-row, weight of the summary row's alignment during answering
    #[arg(long, default_value_t = TrainOptions::default().keep_summary)]
    keep_summary: f64,
    /// Held-out questions for the report
    #[arg(long, default_value_t = 500)]
    test_questions: usize,
}

pub fn run(args: VisionArgs) -> anyhow::Result<()> {
    let resuming = prepare_out(&args)?;
    let opts = options(&args);
    opts.validate()?;
    let loaded = load_model(&model_path(&args.model)?, 1024)?;
    let template = loaded
        .chat_template
        .as_ref()
        .context("the model has no chat template to render questions with")?;
    let dense = DenseLlama::from_llama(&loaded.model, 1024, &candle_core::Device::Cpu)?;
    let tokens = smollm2_image_tokens();
    let trainer = Trainer {
        dense: &dense,
        renderer: Renderer {
            tokenizer: &loaded.tokenizer,
            template,
            image_text: tokens.text(opts.shape.tokens()),
        },
        image_id: image_id(&tokens, &loaded.tokenizer)?,
        processor: files::processor(opts.shape.image_size),
    };
    std::fs::create_dir_all(&args.out)?;
    let started = std::time::Instant::now();
    let log = Some(args.out.join(LOG_FILE));
    let mut progress = match resuming {
        true => BarProgress::appending(log)?,
        false => BarProgress::new(log)?,
    };
    let tower = train(&trainer, &opts, &args.out, &mut progress)?;
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    // Evaluated as served: the folder holds f16 weights.
    tower.round_to_f16()?;
    let report = accuracy(
        &trainer,
        &tower,
        opts.seed,
        args.test_questions,
        &mut progress,
    )?;
    progress.finish()?;
    let info = TowerInfo {
        image_tokens: tokens,
        tokenizer: loaded.tokenizer.identity(),
        text_hidden_size: loaded.model.config.hidden_size,
    };
    let training = serde_json::json!({
        "options": opts,
        "train_minutes": minutes,
        "test_accuracy": report.fraction(),
    });
    let text_config = loaded.model.config.hf_json();
    files::write(
        &args.out,
        &tower,
        trainer.image_id,
        &info,
        text_config,
        training.clone(),
    )?;
    let mut full = training;
    full["accuracy"] = serde_json::to_value(&report)?;
    std::fs::write(
        args.out.join("report.json"),
        serde_json::to_string_pretty(&full)?,
    )?;
    super::loss_chart::write(&args.out.join(LOG_FILE), &args.out.join("loss.svg"))?;
    println!(
        "trained in {minutes:.1} min\n{report}\nwrote {}",
        args.out.display()
    );
    Ok(())
}

/// Readies `--out`; whether the run resumes from the checkpoint there.
fn prepare_out(args: &VisionArgs) -> anyhow::Result<bool> {
    let checkpointed = ["checkpoint", "checkpoint.old"]
        .iter()
        .any(|d| args.out.join(d).join("state.json").exists());
    if checkpointed && !args.resume && !args.overwrite {
        bail!(
            "{} holds a training checkpoint: --resume to go on from it, --overwrite to start afresh",
            args.out.display()
        );
    }
    if args.resume && checkpointed {
        return Ok(true);
    }
    check_out_dir(&args.out, args.overwrite)?;
    // --overwrite starts afresh: a checkpoint left there would otherwise be resumed.
    for name in ["checkpoint", "checkpoint.old", "checkpoint.new"] {
        let dir = args.out.join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot remove {}", dir.display()))?;
        }
    }
    Ok(false)
}

fn options(args: &VisionArgs) -> TrainOptions {
    let default = TrainOptions::default();
    TrainOptions {
        shape: TowerShape {
            hidden_size: args.hidden_size,
            intermediate_size: 4 * args.hidden_size,
            num_hidden_layers: args.layers,
            num_attention_heads: args.heads,
            ..default.shape
        },
        seed: args.seed,
        align_steps: args.align_steps,
        align_batch: args.align_batch,
        align_lr: args.align_lr,
        steps: args.steps,
        batch: args.batch,
        turns: args.turns,
        lr: args.lr,
        summary_row: args.summary_row,
        keep_summary: args.keep_summary,
        ..default
    }
}
