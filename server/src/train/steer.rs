//! `server train steer`: per-layer steering directions from a positive and a negative prompt
//! set (activations at each prompt's last token, chat template applied), written as a
//! llama.cpp control-vector GGUF, with a table of how well each layer's direction separates
//! held-out prompts to choose layers by.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use plugins::steer::train::{direction, last_token_activations, separation, Method, Separation};
use plugins::steer::ControlVector;
use serde_json::json;

use super::prompts::{chat_ids_all, load_model, model_path, parse_range, read_prompts};

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
    /// mean-diff (difference of class means) or pca (first axis of paired differences)
    #[arg(long, default_value = "mean-diff")]
    method: String,
    /// Layers to write, FIRST-LAST inclusive [default: 1 to the last layer]
    #[arg(long)]
    layers: Option<String>,
    /// Prompts used from each set (shuffled with --seed)
    #[arg(long, default_value_t = 128)]
    limit: usize,
    /// Fraction of each set held out to score the directions
    #[arg(long, default_value_t = 0.25)]
    holdout: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the per-layer scores as JSON here
    #[arg(long)]
    report: Option<PathBuf>,
}

pub fn run(args: SteerArgs) -> anyhow::Result<()> {
    let method = Method::parse(&args.method).context("--method must be mean-diff or pca")?;
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
    eprintln!(
        "collecting activations of {} + {} prompts ...",
        pos.len(),
        neg.len()
    );
    let acts = |p: &[String], reply: &str| -> anyhow::Result<Vec<Vec<Vec<f32>>>> {
        let mut ids = chat_ids_all(&loaded, p)?;
        let reply_ids = loaded.tokenizer.encode(reply, false)?;
        ids.iter_mut().for_each(|i| i.extend_from_slice(&reply_ids));
        Ok(last_token_activations(&loaded.model, &ids, 16)?)
    };
    let (pa, na) = (
        acts(&pos, &args.positive_reply)?,
        acts(&neg, &args.negative_reply)?,
    );
    let split = |n: usize| n - ((n as f64 * args.holdout).round() as usize).min(n - 1);
    let (sp, sn) = (split(pa.len()), split(na.len()));
    let mut directions = std::collections::BTreeMap::new();
    let mut rows = Vec::new();
    println!(
        "layer   AUROC  accuracy  Cohen's d   (held-out: {} positive, {} negative)",
        pa.len() - sp,
        na.len() - sn
    );
    for layer in first..=last {
        let at = |xs: &[Vec<Vec<f32>>]| xs.iter().map(|x| x[layer].clone()).collect::<Vec<_>>();
        let (p, n) = (at(&pa), at(&na));
        let d = direction(method, &p[..sp], &n[..sn]);
        let held = if sp < p.len() && sn < n.len() {
            (&p[sp..], &n[sn..])
        } else {
            (&p[..], &n[..])
        };
        let s: Separation = separation(&d, (&p[..sp], &n[..sn]), held);
        println!(
            "{layer:>5}  {:>6.3}  {:>8.3}  {:>9.2}",
            s.auroc, s.accuracy, s.cohens_d
        );
        rows.push(json!({"layer": layer, "auroc": s.auroc, "accuracy": s.accuracy, "cohens_d": s.cohens_d}));
        directions.insert(layer, d);
    }
    let hint = loaded.model.config.architecture.name().to_string();
    ControlVector {
        model_hint: Some(hint),
        directions,
    }
    .write(&args.out)?;
    println!(
        "wrote {} (unit directions for layers {first}-{last}, method {})",
        args.out.display(),
        args.method
    );
    if let Some(report) = &args.report {
        std::fs::write(
            report,
            serde_json::to_string_pretty(&json!({"method": args.method, "layers": rows}))?,
        )
        .with_context(|| format!("cannot write {}", report.display()))?;
    }
    Ok(())
}
