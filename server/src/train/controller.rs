//! `server train controller`: trains the steering controller (plugins::controller) from
//! harmful and harmless instructions and writes `config.json` + `model.safetensors`. The
//! recipe is `plugins::controller::recipe`; this shim checks the flags, shows progress, writes
//! the files and prints what the run measured.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use plugins::controller::eval::refusal_token_ids;
use plugins::controller::recipe::{fit, Recipe};
use plugins::controller::train::TrainOptions;
use plugins::controller::{BaseIdentity, ControllerConfig, TYPE};
use plugins::train::prompts::read_prompts;

use super::args::{load_model, model_path, offline_base, parse_range, BarProgress};

#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// Base model [default: the default model]
    #[arg(long)]
    model: Option<PathBuf>,
    /// Harmful instructions (shared/data/refusal/harmful_train.json)
    #[arg(long)]
    harmful: PathBuf,
    /// Harmless instructions (shared/data/refusal/harmless_train.json)
    #[arg(long)]
    harmless: PathBuf,
    /// Folder to write config.json and model.safetensors into
    #[arg(long)]
    out: PathBuf,
    /// Prompts used from each file
    #[arg(long, default_value_t = 256)]
    limit: usize,
    /// Harmful prompts (of the --limit drawn) kept out of training and written to
    /// held_out_harmful.json beside the controller, to evaluate and choose on
    #[arg(long, default_value_t = 0)]
    hold_out_harmful: usize,
    /// Layers the controller reads, comma-separated ascending
    #[arg(long, default_value = "6,8,10,12")]
    input_layers: String,
    /// Layers it steers, FIRST-LAST
    #[arg(long, default_value = "1-20")]
    steered_layers: String,
    /// Patch scale α the served controller uses (written to config.json)
    #[arg(long, default_value_t = 16.0)]
    alpha: f32,
    /// Default decay τ of the served patch over generated tokens (token t gets exp(-t/τ) of
    /// it; written to config.json, a request's `decay` overrides it, `null` turns it off).
    /// τ 2 keeps the refusals and removes most of the degenerate loops (docs/BENCHMARKS.md)
    #[arg(long, default_value = "2", value_parser = parse_decay)]
    decay: Decay,
    /// Patch scale used to probe each layer's refusal-score gain (small enough that the gains
    /// stay roughly linear)
    #[arg(long, default_value_t = 4.0)]
    probe_alpha: f32,
    /// Width of the controller's hidden layer
    #[arg(long, default_value_t = 128)]
    units: usize,
    /// Optimisation steps of the MLP (AdamW, batches of 32 prompts)
    #[arg(long, default_value_t = 600)]
    steps: usize,
    /// AdamW learning rate of the MLP
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Harmful prompts whose per-layer refusal-score gains set the weight targets
    #[arg(long, default_value_t = 48)]
    sensitivity_prompts: usize,
    /// Start of a refusal, for the directions
    #[arg(long, default_value = "I'm sorry, but I can't")]
    refusal_reply: String,
    /// Start of an answer, for the directions
    #[arg(long, default_value = "Sure, here is")]
    answer_reply: String,
    /// Words whose first token opens a refusal (the refusal score's R)
    #[arg(long, default_value = "I,As,Sorry")]
    refusal_tokens: String,
    /// Seed of the prompt shuffle (--limit) and of the MLP's initialisation and batches
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// The loss log `--out` receives beside the controller, one JSON line per MLP step.
const LOG_FILE: &str = "train_log.jsonl";

/// The harmful prompts `--hold-out-harmful` kept out of training (a JSON array of strings,
/// which `eval refusal --harmful` reads).
const HELD_OUT_FILE: &str = "held_out_harmful.json";

pub fn run(args: ControllerArgs) -> anyhow::Result<()> {
    let input_layers: Vec<usize> = args
        .input_layers
        .split(',')
        .map(|s| s.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .context("--input-layers must be comma-separated layer numbers")?;
    let steered = parse_range(&args.steered_layers)?;
    let path = model_path(&args.model)?;
    let loaded = load_model(&path, 1024)?;
    let base = offline_base(&loaded);
    let config = ControllerConfig {
        kind: TYPE.into(),
        base_model: BaseIdentity::of(&base),
        input_layers,
        steered_layers: steered,
        hidden_units: args.units,
        alpha: args.alpha,
        decay: args.decay.0,
    };
    config.check("controller", &base)?;
    let mut harmful = read_prompts(&args.harmful, args.limit, args.seed)?;
    if args.hold_out_harmful > 0 && args.hold_out_harmful >= harmful.len() {
        bail!(
            "--hold-out-harmful {} leaves none of the {} harmful prompts to train on",
            args.hold_out_harmful,
            harmful.len()
        );
    }
    let held_out: Vec<String> = harmful.drain(..args.hold_out_harmful).collect();
    let harmless = read_prompts(&args.harmless, args.limit, args.seed)?;
    let refusal_ids = refusal_token_ids(&loaded, &args.refusal_tokens)?;
    if refusal_ids.is_empty() {
        bail!("--refusal-tokens lists no words");
    }
    let recipe = Recipe {
        config,
        replies: (&args.refusal_reply, &args.answer_reply),
        refusal_ids: &refusal_ids,
        probe_alpha: args.probe_alpha,
        sensitivity_prompts: args.sensitivity_prompts,
        options: TrainOptions {
            units: args.units,
            steps: args.steps,
            lr: args.lr,
            weight_loss: 1.0,
            batch: 32,
            seed: args.seed,
        },
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    if !held_out.is_empty() {
        let path = args.out.join(HELD_OUT_FILE);
        std::fs::write(&path, serde_json::to_string_pretty(&held_out)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let mut progress = BarProgress::new(Some(args.out.join(LOG_FILE)))?;
    let fitted = fit(&loaded, &harmful, &harmless, &recipe, &mut progress)?;
    progress.finish()?;
    fitted.tensors.save(&args.out, &recipe.config)?;
    let ((l0, l1), (harmful, harmless)) = (fitted.losses, fitted.mean_strength);
    println!(
        "loss {l0:.3} -> {l1:.3}; held-out: AUROC {:.3}, mean strength harmful {harmful:.2} / \
         harmless {harmless:.2}",
        fitted.auroc
    );
    let best = &fitted.best_layers;
    println!(
        "most effective layer per harmful prompt (first 10): {:?}",
        &best[..best.len().min(10)]
    );
    println!("controller written to {}", args.out.display());
    Ok(())
}

/// `--decay`: a positive number, or `none` (a patch that never fades). A newtype, since clap
/// reads an `Option` field as an optional flag.
#[derive(Debug, Clone, Copy)]
struct Decay(Option<f32>);

fn parse_decay(s: &str) -> Result<Decay, String> {
    super::args::parse_decay(s).map(Decay)
}
