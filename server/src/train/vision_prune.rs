//! `server train vision-prune`: trains LVPruning's decision module for a vision tower
//! `server train vision` wrote, with the language model and the tower frozen
//! (`plugins::vision_prune::train`), and writes the `vision_prune` plug-in folder
//! (`config.json` with the `learned` scorer, `decision.safetensors`), `train_log.jsonl`,
//! `loss.svg` and `report.json` (held-out divergence from the full model's answers, learned
//! against random pruning at the trained fraction). `server eval vision --prune-module DIR` measures it beside the baselines.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use plugins::base::BaseIdentity;
use plugins::train::DenseLlama;
use plugins::vision::files;
use plugins::vision::prompt::Renderer;
use plugins::vision::train::Trainer;
use plugins::vision_prune::module::ModuleShape;
use plugins::vision_prune::train::{held_out_divergence, train, PruneTrainOptions};
use plugins::vision_prune::{Scorer, VisionPrune, VisionPruneConfig, TYPE};

use super::args::{check_out_dir, load_model, model_path, offline_base, BarProgress};

const LOG_FILE: &str = "train_log.jsonl";

#[derive(Debug, Args)]
pub struct VisionPruneArgs {
    /// Language model (kept frozen): a .gguf file or a Hugging Face folder [default: the
    /// default model]
    #[arg(long)]
    model: Option<PathBuf>,
    /// The vision tower folder (`server train vision --out`), kept frozen
    #[arg(long)]
    tower: PathBuf,
    /// Folder to write the plug-in into; must be empty or new
    #[arg(long)]
    out: PathBuf,
    /// Write into --out even if it holds files
    #[arg(long)]
    overwrite: bool,
    /// Image tokens are pruned after this layer (0-based)
    #[arg(long, default_value_t = PruneTrainOptions::default().layer)]
    layer: usize,
    /// Fraction of image tokens the decisions learn to keep (the plug-in's default `keep`)
    #[arg(long, default_value_t = PruneTrainOptions::default().keep)]
    keep: f32,
    /// Training steps
    #[arg(long, default_value_t = PruneTrainOptions::default().steps)]
    steps: usize,
    /// Questions (each about its own image) per step
    #[arg(long, default_value_t = PruneTrainOptions::default().batch)]
    batch: usize,
    /// Peak learning rate (20 warm-up steps, cosine decay to a tenth)
    #[arg(long, default_value_t = PruneTrainOptions::default().lr)]
    lr: f64,
    /// Temperature of the relaxed (Gumbel-sigmoid) decisions
    #[arg(long, default_value_t = PruneTrainOptions::default().temperature)]
    temperature: f64,
    /// Weight of the kept-fraction penalty
    #[arg(long, default_value_t = PruneTrainOptions::default().ratio_weight)]
    ratio_weight: f64,
    /// Width of the module's cross-attention and MLP
    #[arg(long, default_value_t = ModuleShape::default().inner_size)]
    inner_size: usize,
    /// Attention heads of the module
    #[arg(long, default_value_t = ModuleShape::default().num_heads)]
    heads: usize,
    /// Seed of the samples, the initialisation and the decisions' noise
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Held-out steps (of --batch questions) for report.json's divergence from the full model
    #[arg(long, default_value_t = 16)]
    test_steps: usize,
}

pub fn run(args: VisionPruneArgs) -> anyhow::Result<()> {
    check_out_dir(&args.out, args.overwrite)?;
    let opts = options(&args);
    let loaded = load_model(&model_path(&args.model)?, 1024)?;
    opts.validate(loaded.model.config.num_layers)?;
    let template = loaded
        .chat_template
        .as_ref()
        .context("the model has no chat template to render questions with")?;
    let hidden = loaded.model.config.hidden_size;
    let (tower, vision) = files::read(&args.tower, hidden)
        .with_context(|| format!("cannot read the vision tower at {}", args.tower.display()))?;
    vision.check_tokenizer(&loaded.tokenizer)?;
    let dense = DenseLlama::from_llama(&loaded.model, 1024, &candle_core::Device::Cpu)?;
    let trainer = Trainer {
        dense: &dense,
        renderer: Renderer {
            tokenizer: &loaded.tokenizer,
            template,
            image_text: vision.image_tokens.text(vision.tokens_per_image()),
        },
        image_id: vision.image_token_id,
        processor: files::processor(vision.image_size),
    };
    std::fs::create_dir_all(&args.out)?;
    let started = std::time::Instant::now();
    let mut progress = BarProgress::new(Some(args.out.join(LOG_FILE)))?;
    let module = train(&trainer, &tower, &opts, &mut progress)?;
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    // Held-out steps: the samples after the training ones.
    let held_out = opts.steps + 1..opts.steps + 1 + args.test_steps;
    let kl = held_out_divergence(&trainer, &tower, &module, &opts, held_out, &mut progress)?;
    progress.finish()?;
    let base = offline_base(&loaded);
    let config = VisionPruneConfig {
        kind: TYPE.into(),
        base_model: BaseIdentity::of(&base),
        layer: opts.layer,
        image_token_id: vision.image_token_id,
        scorer: Scorer::Learned,
        keep: opts.keep,
        module: Some(opts.module),
    };
    VisionPrune::new("trained", config, Some(module), &base)?.save(&args.out)?;
    super::loss_chart::write(&args.out.join(LOG_FILE), &args.out.join("loss.svg"))?;
    let report = serde_json::json!({
        "options": opts,
        "train_minutes": minutes,
        "held_out_questions": args.test_steps * opts.batch,
        "held_out_kl": kl,
    });
    std::fs::write(
        args.out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    println!(
        "trained in {minutes:.1} min\nheld-out KL from the full model's answers at keep {}: \
         learned {:.4}, random {:.4} nats\nwrote {}",
        opts.keep,
        kl.learned,
        kl.random,
        args.out.display()
    );
    Ok(())
}

fn options(args: &VisionPruneArgs) -> PruneTrainOptions {
    PruneTrainOptions {
        layer: args.layer,
        keep: args.keep,
        module: ModuleShape {
            inner_size: args.inner_size,
            num_heads: args.heads,
        },
        steps: args.steps,
        batch: args.batch,
        lr: args.lr,
        temperature: args.temperature,
        ratio_weight: args.ratio_weight,
        seed: args.seed,
    }
}
