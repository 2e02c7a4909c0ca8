//! `server eval vision`: a vision tower (`server train vision`) attached to its language model,
//! asked the held-out questions of its synthetic set through the serving forward pass
//! (`plugins::vision::served`); writes `report.json` (accuracy by question kind, median
//! prompt length, vision-tower and prefill times) and `samples/` (the first test images as PNG, with each
//! question, its answer and whether the model answered it right, `questions.jsonl`).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::Device;
use clap::Args;
use std::sync::Arc;

use models::bundle::{LoadOptions, LoadedModel};
use plugins::vision::data;
use plugins::vision::eval::test_question;
use plugins::vision::prompt::Renderer;
use plugins::vision::served::{served_sweep, upper_median, Served, Verdict};
use plugins::vision_prune::eval::{scorer_name, PruningSweep};
use plugins::vision_prune::{Scorer, VisionPrune};

use crate::config::KvCacheDtype;
use crate::train::args::{model_path, offline_base, BarProgress};

#[derive(Debug, Args)]
pub struct VisionArgs {
    /// Language model the tower was trained for [default: the default model]
    #[arg(long)]
    model: Option<PathBuf>,
    /// The tower's folder (what `server train vision --out` wrote)
    #[arg(long)]
    vision: PathBuf,
    /// Held-out questions asked (the first N of the test split)
    #[arg(long, default_value_t = 500)]
    questions: usize,
    /// Seed of the synthetic set [default: the one the tower was trained with]
    #[arg(long)]
    seed: Option<u64>,
    /// Test images written to samples/ with their questions
    #[arg(long, default_value_t = 16)]
    samples: usize,
    /// Folder for report.json and samples/
    #[arg(long)]
    out: PathBuf,
    /// How the KV cache holds keys and values (as `serve --kv-cache-dtype`)
    #[arg(long, value_enum, default_value_t = KvCacheDtype::F16)]
    kv_cache_dtype: KvCacheDtype,
    /// Also answer every question with this fraction of the image tokens kept by random
    /// pruning (`vision_prune`), e.g. 0.5,0.25,0.1; each question goes to the dense model and
    /// every ratio in turn
    #[arg(long, value_delimiter = ',')]
    prune_keep: Vec<f32>,
    /// How pruning picks the image tokens that stay, for each --prune-keep: random and/or
    /// attention (FastV); --prune-module adds learned
    #[arg(long, value_delimiter = ',', default_value = "random,attention", value_parser = parse_scorer)]
    prune_scorers: Vec<Scorer>,
    /// Layer (0-based) after which pruning removes image tokens [default: the one ending the
    /// first half, 14 of 30]
    #[arg(long)]
    prune_layer: Option<usize>,
    /// A trained `vision_prune` plug-in folder (`server train vision-prune --out`): its
    /// decision module (scorer `learned`) is measured at every --prune-keep beside the others
    #[arg(long)]
    prune_module: Option<PathBuf>,
}

pub fn run(args: VisionArgs) -> anyhow::Result<()> {
    let path = model_path(&args.model)?;
    let options = LoadOptions {
        vision: Some(args.vision.clone()),
        ..Default::default()
    };
    let mut loaded = models::bundle::load(&path, &Device::Cpu, &options).with_context(|| {
        format!(
            "cannot load {} with {}",
            path.display(),
            args.vision.display()
        )
    })?;
    loaded.model.set_kv_dtype(args.kv_cache_dtype.dtype())?;
    let Some(template) = &loaded.chat_template else {
        bail!("the model has no chat template to ask questions with");
    };
    let Some(vision) = &loaded.vision else {
        bail!("{} attached no vision tower", args.vision.display());
    };
    let seed = match args.seed {
        Some(seed) => seed,
        None => trained_seed(&args.vision)?,
    };
    let served = Served {
        model: &loaded.model,
        vision,
        renderer: Renderer {
            tokenizer: &loaded.tokenizer,
            template,
            image_text: vision.image_prompt(),
        },
    };
    let pruning = pruning(&args, &loaded)?;
    let mut progress = BarProgress::new(None)?;
    let mut runs = served_sweep(
        &served,
        &pruning.chains(),
        seed,
        args.questions,
        &mut progress,
    )?;
    progress.finish()?;
    let (accuracy, verdicts) = runs.remove(0);
    std::fs::create_dir_all(&args.out)?;
    let median = |f: &dyn Fn(&Verdict) -> f64| upper_median(verdicts.iter().map(f));
    let report = serde_json::json!({
        "tower": args.vision,
        "seed": seed,
        "kv_cache_dtype": args.kv_cache_dtype,
        "accuracy": accuracy.fraction(),
        "by_kind": accuracy.by_kind,
        "questions": accuracy.questions,
        "median_prompt_tokens": median(&|v| v.answer.prompt_tokens as f64),
        "median_vision_tower_ms": median(&|v| v.answer.encode.as_secs_f64() * 1e3),
        "median_prefill_ms": median(&|v| v.answer.prefill_ms()),
        "pruning": pruning.report(&loaded.model.config, &verdicts, &runs),
    });
    std::fs::write(
        args.out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    write_samples(
        &args.out.join("samples"),
        seed,
        &verdicts[..args.samples.min(verdicts.len())],
    )?;
    println!("{accuracy}");
    for ((scorer, keep), (pruned, _)) in pruning.runs().into_iter().zip(&runs) {
        println!(
            "{} pruning, {:.0}% of image tokens kept: {:.1}%",
            scorer_name(scorer),
            keep * 100.0,
            pruned.fraction() * 100.0
        );
    }
    println!("wrote {}", args.out.display());
    Ok(())
}

/// The seed in the tower's `config.json` (`graft.training.options.seed`).
fn trained_seed(dir: &Path) -> anyhow::Result<u64> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)?;
    json["graft"]["training"]["options"]["seed"]
        .as_u64()
        .with_context(|| format!("{} names no training seed: pass --seed", path.display()))
}

/// Test question `i` for each verdict: `samples/NNN.png` and one JSON line
/// (`{"image": "000.png", "question", "answer", "model_answer", "right"}`).
fn write_samples(dir: &Path, seed: u64, verdicts: &[Verdict]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("questions.jsonl");
    let mut lines =
        std::fs::File::create(&path).with_context(|| format!("cannot write {}", path.display()))?;
    let size = data::IMAGE_SIZE as u32;
    for (i, verdict) in verdicts.iter().enumerate() {
        let (sample, q) = test_question(seed, i);
        let name = format!("{i:03}.png");
        let Some(image) = image::RgbImage::from_raw(size, size, sample.rgb) else {
            bail!("sample {i} is not a {size}x{size} RGB image");
        };
        image.save(dir.join(&name))?;
        let q = &sample.questions[q];
        let line = serde_json::json!({
            "image": name, "question": q.text, "answer": q.answer,
            "model_answer": verdict.answer.text, "right": verdict.right,
        });
        writeln!(lines, "{line}")?;
    }
    Ok(())
}

/// The pruning configurations the flags ask for: the built-in scorers after `--prune-layer`
/// (default: the end of the first half) and a trained module (`--prune-module`), whose layer
/// is the default when it is given.
fn pruning(args: &VisionArgs, loaded: &LoadedModel) -> anyhow::Result<PruningSweep> {
    let base = offline_base(loaded);
    let learned = match &args.prune_module {
        Some(dir) => {
            let mut files = plugins::files::PluginFiles::unconfined();
            let plugin = VisionPrune::load("learned", dir, &base, &mut files)
                .with_context(|| format!("cannot load the plug-in at {}", dir.display()))?;
            Some(Arc::new(plugin))
        }
        None => None,
    };
    let layer = args
        .prune_layer
        .or(learned.as_ref().map(|m| m.config().layer))
        .unwrap_or((loaded.model.config.num_layers / 2).saturating_sub(1));
    if args.prune_keep.is_empty() {
        return Ok(PruningSweep::new(&base, 0, layer, &[], None, Vec::new())?);
    }
    let Some(vision) = &loaded.vision else {
        bail!("pruning needs a vision tower");
    };
    let image = vision.tower.config().image_token_id;
    let sweep = PruningSweep::new(
        &base,
        image,
        layer,
        &args.prune_scorers,
        learned,
        args.prune_keep.clone(),
    )?;
    Ok(sweep)
}

fn parse_scorer(name: &str) -> Result<Scorer, String> {
    serde_json::from_value(serde_json::Value::String(name.into()))
        .map_err(|_| format!("`{name}` is not a scorer (random, attention, learned)"))
}
