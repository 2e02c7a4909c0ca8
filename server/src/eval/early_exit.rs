//! `server eval early-exit`: speed against agreement of an early-exit plug-in on held-out
//! prompts (plugins::early_exit::eval), printed as a table and written as JSON and a chart.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use models::HookCall;
use plugins::early_exit::eval::{evaluate, EvalOptions, EvalReport};
use plugins::early_exit::EarlyExit;
use plugins::files::PluginFiles;
use plugins::lora::LoraAdapter;
use plugins::train::prompts::{chat_ids_all, read_prompts};
use plugins::Plugin;

use super::svg::{line_chart, Series};
use crate::train::args::{load_model, model_path, offline_base, BarProgress};

#[derive(Debug, Args)]
pub struct EarlyExitArgs {
    /// Base model: a .gguf file or a Hugging Face folder [default: the default model]
    #[arg(long)]
    model: Option<PathBuf>,
    /// The plug-in folder `server train early-exit` wrote
    #[arg(long)]
    plugin: PathBuf,
    /// A LoRA adapter (PEFT folder) run before the early exit in every chain, the base's too:
    /// do predictors trained on the base model stay valid on the adapted one?
    #[arg(long)]
    lora: Option<PathBuf>,
    /// Held-out instructions (never the training file)
    #[arg(long, default_value = "../shared/data/refusal/harmless_val.json")]
    prompts: PathBuf,
    /// Prompts used (shuffled with --seed)
    #[arg(long, default_value_t = 32)]
    limit: usize,
    /// Seed of the prompt shuffle
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Greedy tokens per answer (timed runs ignore the end of turn and run to it)
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Predictor thresholds to sweep, comma-separated
    #[arg(long, default_value = "0.3,0.5,0.7,0.9")]
    thresholds: String,
    /// Prompts decoded together in the timed runs, comma-separated
    #[arg(long, default_value = "1,8")]
    batches: String,
    /// Timed repetitions of every configuration (medians reported)
    #[arg(long, default_value_t = 3)]
    repetitions: usize,
    /// Write the report as JSON here
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write the speed-against-agreement chart (SVG) here
    #[arg(long)]
    plot: Option<PathBuf>,
}

pub fn run(args: EarlyExitArgs) -> anyhow::Result<()> {
    let list = |s: &str, what: &str| -> anyhow::Result<Vec<String>> {
        let v: Vec<String> = s
            .split(',')
            .map(|x| x.trim().to_string())
            .filter(|x| !x.is_empty())
            .collect();
        anyhow::ensure!(!v.is_empty(), "{what} lists nothing");
        Ok(v)
    };
    let thresholds = list(&args.thresholds, "--thresholds")?
        .iter()
        .map(|t| {
            t.parse::<f32>()
                .with_context(|| format!("--thresholds: `{t}` is not a number"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let batches = list(&args.batches, "--batches")?
        .iter()
        .map(|b| {
            b.parse::<usize>()
                .ok()
                .filter(|&b| b > 0)
                .with_context(|| format!("--batches: `{b}` is not a positive count"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let loaded = load_model(&model_path(&args.model)?, 2048)?;
    let base = offline_base(&loaded);
    let plugin = Arc::new(EarlyExit::load(
        "early-exit",
        &args.plugin,
        &base,
        &mut PluginFiles::unconfined(),
    )?);
    let before = match &args.lora {
        None => Vec::new(),
        Some(dir) => {
            let lora: Arc<dyn Plugin> = Arc::new(LoraAdapter::load(
                "lora",
                dir,
                &base,
                &mut PluginFiles::unconfined(),
            )?);
            let params = lora.request_params(&serde_json::Map::new())?;
            vec![HookCall::new(lora, params)]
        }
    };
    let prompts = read_prompts(&args.prompts, args.limit, args.seed)?;
    let ids = chat_ids_all(&loaded, &prompts)?;
    let opts = EvalOptions {
        max_new_tokens: args.max_new_tokens,
        thresholds,
        batches,
        repetitions: args.repetitions.max(1),
    };
    let mut progress = BarProgress::new(None)?;
    let stop = loaded.tokenizer.eos_ids().to_vec();
    let report = evaluate(
        &loaded.model,
        &plugin,
        &before,
        &ids,
        &stop,
        &opts,
        &mut progress,
    )?;
    progress.finish()?;
    print_table(&report);
    if let Some(path) = &args.out {
        let json = serde_json::json!({"options": opts, "plugin": args.plugin, "lora": args.lora, "report": report});
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, chart(&report))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn print_table(r: &EvalReport) {
    let base: Vec<String> = r
        .base_tokens_per_s
        .iter()
        .map(|(b, t)| format!("batch {b}: {t:.1} tok/s"))
        .collect();
    println!("{} prompts; base {}", r.prompts, base.join(", "));
    println!("threshold  agreement  exits  mean layer  checks/token  identical  ppl ratio  speed-up per batch");
    for t in &r.thresholds {
        let speed: Vec<String> = t
            .tokens_per_s
            .iter()
            .map(|(b, _, x)| format!("{b}: {x:.3}x"))
            .collect();
        println!(
            "{:>9}  {:>8.2}%  {:>4.1}%  {:>10.2}  {:>12.2}  {:>8.1}%  {:>9.3}  {}",
            t.threshold,
            100.0 * t.agreement,
            100.0 * t.exit_fraction,
            t.mean_exit_layer,
            t.checks_per_token,
            100.0 * t.identical_answers,
            t.perplexity_ratio,
            speed.join(", ")
        );
    }
}

/// Speed-up (per batch size) against teacher-forced agreement, one point per threshold.
fn chart(r: &EvalReport) -> String {
    let batches: Vec<usize> = r.base_tokens_per_s.iter().map(|b| b.0).collect();
    let series: Vec<Series> = batches
        .iter()
        .enumerate()
        .map(|(i, b)| Series {
            label: format!("batch {b}"),
            points: r
                .thresholds
                .iter()
                .map(|t| (100.0 * t.agreement, t.tokens_per_s[i].2))
                .collect(),
        })
        .collect();
    let lo = r
        .thresholds
        .iter()
        .flat_map(|t| t.tokens_per_s.iter().map(|s| s.2))
        .fold(1.0, f64::min);
    let hi = r
        .thresholds
        .iter()
        .flat_map(|t| t.tokens_per_s.iter().map(|s| s.2))
        .fold(1.0, f64::max);
    line_chart(
        "early exit: decode speed-up against teacher-forced agreement",
        "agreement with the full model (%)",
        "decode tokens/s over base",
        (lo.min(0.9), hi.max(1.1)),
        &series,
    )
}
