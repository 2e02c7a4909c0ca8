//! `server train steer`: per-layer steering directions from a positive and a negative prompt
//! set (activations at each prompt's last token, chat template applied), written as a
//! llama.cpp control-vector GGUF, with a table of how well each layer's direction separates
//! held-out prompts to choose layers by. The trainer is `plugins::steer::train`; this shim
//! checks the flags, prints the table and writes the files.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use plugins::steer::train::{train_vector, LayerScore, Method, VectorOptions};
use plugins::train::prompts::read_prompts;
use serde_json::json;

use super::args::{load_model, model_path, parse_range, BarProgress};

#[derive(Debug, Args)]
pub struct SteerArgs {
    /// Base model: a .gguf file or a Hugging Face folder [default: the default model]
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompts the direction points towards (JSON array or JSONL of strings or
    /// {"instruction"|"prompt"|"text"} objects)
    #[arg(long)]
    positive: PathBuf,
    /// Prompts the direction points away from
    #[arg(long)]
    negative: PathBuf,
    /// Text appended to every positive prompt after the generation prompt: the start of the
    /// assistant's reply (e.g. "I'm sorry, but I can't"), for behaviour directions from
    /// contrastive replies as repeng builds them
    #[arg(long, default_value = "")]
    positive_reply: String,
    /// The same for the negative prompts (e.g. "Sure, here is")
    #[arg(long, default_value = "")]
    negative_reply: String,
    /// The control-vector GGUF to write
    #[arg(long)]
    out: PathBuf,
    /// How each layer's direction is found from the two sets' activations
    #[arg(long, value_enum, default_value_t = MethodArg::MeanDiff)]
    method: MethodArg,
    /// Layers to write, FIRST-LAST inclusive [default: 1 to the last layer]
    #[arg(long)]
    layers: Option<String>,
    /// Prompts used from each set (shuffled with --seed)
    #[arg(long, default_value_t = 128)]
    limit: usize,
    /// Fraction of each set held out to score the directions
    #[arg(long, default_value_t = 0.25)]
    holdout: f64,
    /// Seed of the shuffle that picks --limit prompts from each file
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the per-layer scores as JSON here
    #[arg(long)]
    report: Option<PathBuf>,
}

/// `--method`, as `--help` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum MethodArg {
    /// The difference of the two sets' mean activations
    MeanDiff,
    /// The first principal axis of the paired differences
    Pca,
}

impl MethodArg {
    /// The flag's value, as written on the command line and in the report.
    fn name(self) -> &'static str {
        match self {
            Self::MeanDiff => "mean-diff",
            Self::Pca => "pca",
        }
    }
}

pub fn run(args: SteerArgs) -> anyhow::Result<()> {
    let method = match args.method {
        MethodArg::MeanDiff => Method::MeanDiff,
        MethodArg::Pca => Method::Pca,
    };
    if !(0.0..0.9).contains(&args.holdout) {
        bail!("--holdout must be in [0, 0.9)");
    }
    let pos = read_prompts(&args.positive, args.limit, args.seed)?;
    let neg = read_prompts(&args.negative, args.limit, args.seed)?;
    let path = model_path(&args.model)?;
    let loaded = load_model(&path, 1024)?;
    let layers = loaded.model.config.num_layers;
    let (first, last) = match &args.layers {
        Some(r) => parse_range(r)?,
        None => (1, layers - 1),
    };
    if first == 0 || last >= layers {
        bail!(
            "--layers must lie within 1-{} (layer 0 is never steered)",
            layers - 1
        );
    }
    let options = VectorOptions {
        method,
        layers: (first, last),
        holdout: args.holdout,
        replies: (&args.positive_reply, &args.negative_reply),
    };
    let mut progress = BarProgress::new(None)?;
    let trained = train_vector(&loaded, &pos, &neg, &options, &mut progress)?;
    progress.finish()?;
    println!(
        "layer   AUROC  accuracy  Cohen's d   (held-out: {} positive, {} negative)",
        trained.held_out.0, trained.held_out.1
    );
    let mut rows = Vec::new();
    for LayerScore {
        layer,
        separation: s,
    } in &trained.scores
    {
        println!(
            "{layer:>5}  {:>6.3}  {:>8.3}  {:>9.2}",
            s.auroc, s.accuracy, s.cohens_d
        );
        rows.push(json!({"layer": layer, "auroc": s.auroc, "accuracy": s.accuracy, "cohens_d": s.cohens_d}));
    }
    trained.vector.write(&args.out)?;
    println!(
        "wrote {} (unit directions for layers {first}-{last}, method {})",
        args.out.display(),
        args.method.name()
    );
    if let Some(report) = &args.report {
        std::fs::write(
            report,
            serde_json::to_string_pretty(&json!({"method": args.method.name(), "layers": rows}))?,
        )
        .with_context(|| format!("cannot write {}", report.display()))?;
    }
    Ok(())
}
