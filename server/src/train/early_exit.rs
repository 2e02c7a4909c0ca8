//! `server train early-exit`: trains SpecEE's per-layer predictors (plugins::early_exit::train)
//! on the model's own greedy answers to a prompt file and writes the plug-in the server loads
//! (`config.json` + `predictors.safetensors`), `report.json` (per-layer precision and recall,
//! exit histogram, simulated agreement on held-out answers) and `report.svg`.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use plugins::early_exit::report::Report;
use plugins::early_exit::train::{train, TrainOptions};
use plugins::train::prompts::{chat_ids_all, read_prompts};

use super::args::{check_out_dir, load_model, model_path, offline_base, BarProgress};
use crate::eval::svg::{line_chart, Series};

#[derive(Debug, Args)]
pub struct EarlyExitArgs {
    /// Base model: a .gguf file or a Hugging Face folder [default: the default model]
    #[arg(long)]
    model: Option<PathBuf>,
    /// Instructions to answer (JSON array or JSONL of strings or {"instruction"|"prompt"|"text"}
    /// objects), rendered with the chat template
    #[arg(long, default_value = "../shared/data/refusal/harmless_train.json")]
    prompts: PathBuf,
    /// Folder to write the plug-in and its report into; must be empty or new
    #[arg(long)]
    out: PathBuf,
    /// Write into --out even if it holds files
    #[arg(long)]
    overwrite: bool,
    /// Prompts used (shuffled with --seed): the first half's answers teach the successor
    /// table, the second half's give the predictors' examples (a fifth of them held out)
    #[arg(long, default_value_t = 160)]
    limit: usize,
    /// Greedy tokens generated per prompt
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Prompts decoded together
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Candidate tokens scored per layer (SpecEE's k)
    #[arg(long, default_value_t = 4)]
    draft_tokens: usize,
    /// Longest n-gram prompt lookup matches for candidates
    #[arg(long, default_value_t = 3)]
    lookup_max: usize,
    /// First layer with a predictor (every layer from it to the fourth-last gets one)
    /// [default: a quarter of the layers]
    #[arg(long)]
    first_layer: Option<usize>,
    /// Hidden units of each predictor
    #[arg(long, default_value_t = 64)]
    hidden_units: usize,
    /// Passes over the examples (Adam, batches of 1,024)
    #[arg(long, default_value_t = 100)]
    epochs: usize,
    /// Adam learning rate of the predictors
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Default predictor threshold, written to config.json
    #[arg(long, default_value_t = 0.5)]
    threshold: f32,
    /// Tokens may leave only in steps running at most this many rows (written to
    /// config.json): with more, an exit costs more than it saves on the default model
    #[arg(long, default_value_t = 1)]
    max_batch_rows: usize,
    /// Seed of the prompt shuffle and the predictors' initialisation
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(args: EarlyExitArgs) -> anyhow::Result<()> {
    check_out_dir(&args.out, args.overwrite)?;
    let loaded = load_model(&model_path(&args.model)?, 2048)?;
    let config = &loaded.model.config;
    let base = offline_base(&loaded);
    let prompts = read_prompts(&args.prompts, args.limit, args.seed)
        .with_context(|| "pass --prompts FILE (e.g. shared/data/refusal/harmless_train.json)")?;
    if prompts.len() < 4 {
        bail!(
            "{} holds {} prompts; at least 4 are needed",
            args.prompts.display(),
            prompts.len()
        );
    }
    let ids = chat_ids_all(&loaded, &prompts)?;
    let opts = TrainOptions {
        max_new_tokens: args.max_new_tokens,
        batch: args.batch,
        draft_tokens: args.draft_tokens,
        lookup_max: args.lookup_max,
        hidden_units: args.hidden_units,
        first_layer: args.first_layer.unwrap_or(config.num_layers / 4),
        epochs: args.epochs,
        lr: args.lr,
        threshold: args.threshold,
        max_batch_rows: args.max_batch_rows,
        seed: args.seed,
    };
    let mut progress = BarProgress::new(None)?;
    let stop = loaded.tokenizer.eos_ids().to_vec();
    let name = args
        .out
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("early-exit");
    let (plugin, report) = train(
        &loaded.model,
        &base,
        name,
        &ids,
        &stop,
        &opts,
        &mut progress,
    )?;
    progress.finish()?;
    plugin.save(&args.out)?;
    let json = serde_json::json!({"options": opts, "prompts": prompts.len(), "report": report});
    let path = args.out.join("report.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::write(args.out.join("report.svg"), chart(&report))?;
    print_summary(&report);
    println!("wrote {}", args.out.display());
    Ok(())
}

/// Per layer: precision, recall, the share of tokens already settled, and the share of exits.
fn chart(r: &Report) -> String {
    let line = |label: &str, f: &dyn Fn(&plugins::early_exit::report::LayerReport) -> f64| Series {
        label: label.into(),
        points: r.layers.iter().map(|l| (l.layer as f64, f(l))).collect(),
    };
    let exits: usize = r.histogram_all_layers.iter().sum::<usize>().max(1);
    let series = [
        line("precision", &|l| l.precision),
        line("recall", &|l| l.recall),
        line("top token final", &|l| l.settled),
        line("share of exits", &|l| {
            r.histogram_all_layers[l.layer] as f64 / exits as f64
        }),
    ];
    let title = format!(
        "early-exit predictors, threshold {}, held-out tokens",
        r.threshold
    );
    line_chart(&title, "layer", "share", (0.0, 1.0), &series)
}

fn print_summary(r: &Report) {
    println!(
        "held-out decode tokens: {}, final token among the candidates: {:.1}%",
        r.tokens,
        100.0 * r.candidate_hit_rate
    );
    println!("layer  top=final  precision  recall  exits");
    for l in &r.layers {
        println!(
            "{:>5}  {:>9.3}  {:>9.3}  {:>6.3}  {:>5}",
            l.layer, l.settled, l.precision, l.recall, r.histogram_all_layers[l.layer]
        );
    }
    for (what, e) in [
        ("every layer scheduled", &r.all_layers),
        ("offline + online schedule", &r.scheduled),
    ] {
        println!(
            "{what}: {:.1}% of tokens exit, mean exit layer {:.2}, agreement {:.2}%",
            100.0 * e.exit_fraction,
            e.mean_exit_layer,
            100.0 * e.agreement
        );
    }
    println!("offline layers: {:?}", r.offline_layers);
}
