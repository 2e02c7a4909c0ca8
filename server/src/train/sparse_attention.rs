//! `server train sparse-attention`: trains SeerAttention-R's per-layer gates
//! (plugins::sparse_attention::train) by self-distillation on long text and writes the
//! plug-in the server loads (`config.json` + `gates.safetensors`), `report.json` (per-layer
//! held-out KL and recall), `report.svg`, `train_log.jsonl` (each layer's KL by step) and
//! `loss.svg` (its chart, the layers one after another).

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use plugins::sparse_attention::train::{train, Report, Target, Text, TrainOptions};

use super::args::{check_out_dir, load_model, model_path, offline_base, BarProgress};
use crate::eval::svg::{line_chart, Series};

/// Each layer's KL by step (`{"step": l * steps + s, "kl": ...}`), and its chart.
const LOG_FILE: &str = "train_log.jsonl";

#[derive(Debug, Args)]
pub struct SparseAttentionArgs {
    /// Base model: a .gguf file or a Hugging Face folder [default: the default model]
    #[arg(long)]
    model: Option<PathBuf>,
    /// Plain-text files to distil on (e.g. the training split of
    /// `scripts/data/corpora.py --only long-text`), joined and cut into windows
    #[arg(long, num_args = 1.., required = true)]
    text: Vec<PathBuf>,
    /// Folder to write the plug-in and its report into; must be empty or new
    #[arg(long)]
    out: PathBuf,
    /// Write into --out even if it holds files
    #[arg(long)]
    overwrite: bool,
    /// Tokens per window (a multiple of --block-size, within the model's context)
    #[arg(long, default_value_t = 8192)]
    length: usize,
    /// Windows used, picked by a seeded shuffle (the last tenth held out for the report)
    #[arg(long, default_value_t = 40)]
    sequences: usize,
    /// Query positions sampled per window from its second half
    #[arg(long, default_value_t = 128)]
    queries: usize,
    /// Keys per block
    #[arg(long, default_value_t = 64)]
    block_size: usize,
    /// Width of the gate's projections
    #[arg(long, default_value_t = 64)]
    gate_dim: usize,
    /// Layers 0..N read densely and get no gate
    #[arg(long, default_value_t = 0)]
    dense_layers: usize,
    /// Do not always read the first block (the attention sink)
    #[arg(long)]
    no_sink_block: bool,
    /// Default token budget written to config.json (and used for the report)
    #[arg(long, default_value_t = 1024)]
    budget: usize,
    /// AdamW steps per layer
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// Windows per step
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Peak learning rate (20 warm-up steps, cosine decay to a hundredth)
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// What each gate learns over the earlier blocks: `peak` (SeerAttention-R's: each
    /// block's largest attention probability) or `mass` (its summed probability)
    #[arg(long, value_enum, default_value = "peak")]
    target: TargetArg,
    /// Seed of the window shuffle, the sampled positions and the gates' initialisation
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum TargetArg {
    Peak,
    Mass,
}

pub fn run(args: SparseAttentionArgs) -> anyhow::Result<()> {
    check_out_dir(&args.out, args.overwrite)?;
    let loaded = load_model(&model_path(&args.model)?, args.length.max(64))?;
    let base = offline_base(&loaded);
    if args.length > base.config.max_position_embeddings {
        bail!(
            "--length {} exceeds the model's context of {} tokens",
            args.length,
            base.config.max_position_embeddings
        );
    }
    let cut = Text::read(&loaded, &args.text)?.windows(args.length);
    let opts = TrainOptions {
        length: args.length,
        sequences: args.sequences,
        queries: args.queries,
        block_size: args.block_size,
        gate_dim: args.gate_dim,
        dense_layers: args.dense_layers,
        sink_block: !args.no_sink_block,
        budget: args.budget,
        steps: args.steps,
        batch: args.batch,
        lr: args.lr,
        target: match args.target {
            TargetArg::Peak => Target::Peak,
            TargetArg::Mass => Target::Mass,
        },
        seed: args.seed,
    };
    std::fs::create_dir_all(&args.out)?;
    let log = args.out.join(LOG_FILE);
    let mut progress = BarProgress::new(Some(log))?;
    let name = args
        .out
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("sparse-attention");
    let (plugin, report) = train(&loaded.model, &base, name, &cut, &opts, &mut progress)?;
    progress.finish()?;
    plugin.save(&args.out)?;
    let path = args.out.join("report.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::write(args.out.join("report.svg"), chart(&report))?;
    // Layers train one after another: step `l * steps + s` is layer l's step s.
    super::loss_chart::write(&args.out.join(LOG_FILE), &args.out.join("loss.svg"))?;
    println!(
        "{} windows of {} tokens from {} files ({} held out)",
        cut.len().min(args.sequences),
        args.length,
        args.text.len(),
        report.heldout_windows
    );
    println!(
        "layer  train KL  held-out KL  held-out recall@{}",
        args.budget
    );
    for l in &report.layers {
        println!(
            "{:>5}  {:>8.4}  {:>11.4}  {:>8.3}",
            l.layer, l.final_train_kl, l.heldout_kl, l.heldout_recall
        );
    }
    println!("wrote {}", args.out.display());
    Ok(())
}

/// Per layer: held-out KL and the target's mass the default budget keeps.
fn chart(r: &Report) -> String {
    let series = [
        Series {
            label: "held-out KL".into(),
            points: r
                .layers
                .iter()
                .map(|l| (l.layer as f64, l.heldout_kl as f64))
                .collect(),
        },
        Series {
            label: format!("recall at {}", r.options.budget),
            points: r
                .layers
                .iter()
                .map(|l| (l.layer as f64, l.heldout_recall as f64))
                .collect(),
        },
    ];
    let top = r
        .layers
        .iter()
        .map(|l| l.heldout_kl as f64)
        .fold(1.0, f64::max);
    line_chart(
        "sparse-attention gates, held-out windows",
        "layer",
        "KL (nats) / recall",
        (0.0, top),
        &series,
    )
}
