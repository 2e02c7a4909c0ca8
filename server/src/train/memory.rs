//! `server train memory`: trains a memory decoder on a domain corpus and writes the folder the
//! server loads as a `memory` plug-in (config.json + model.gguf or model.safetensors). The
//! stages are `plugins::memory::{corpus, datastore, targets, train}`; this shim runs them,
//! shows progress and keeps the run's intermediate files in a work folder so an interrupted
//! run resumes: the datastore and the kNN targets are reused when present, training resumes
//! from its last checkpoint. The losses go to `train_log.jsonl` in the work folder, copied
//! beside the memory at the end.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::quantized::GgmlDType;
use clap::{Args, ValueEnum};
use plugins::memory::targets::TARGETS_FILE;
use plugins::memory::train::{train, write_memory, MemoryTrainConfig, WeightsFormat};
use plugins::memory::work::{parse_layers, KnnSpec, TrainingTargets, WorkFolder};
use plugins::memory::{GraftBlock, TYPE};
use serde_json::json;

use super::args::{load_model, model_path, BarProgress};

const LOG_FILE: &str = "train_log.jsonl";
/// The losses' plot beside the log.
const LOSS_CHART: &str = "train_loss.svg";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// model.gguf with Q8_0 matrices (what the server runs fastest)
    GgufQ8_0,
    /// model.gguf with f16 matrices
    GgufF16,
    /// model.safetensors, f32
    Safetensors,
}

#[derive(Debug, Args)]
pub struct MemoryArgs {
    /// Base model (the datastore model and the memory's initialisation): a .gguf file or a
    /// Hugging Face folder [default: the default model, fetched on first use]
    #[arg(long)]
    model: Option<PathBuf>,
    /// Training text: files, or folders whose files are read (a corpus's train split)
    #[arg(long, num_args = 1.., required = true)]
    corpus: Vec<PathBuf>,
    /// Folder to write the memory into; must be empty or new
    #[arg(long)]
    out: PathBuf,
    /// Write into --out even if it holds files
    #[arg(long)]
    overwrite: bool,
    /// Folder for the datastore, the kNN targets, checkpoints and the loss log; a run given
    /// the same folder resumes [default: OUT.work beside --out]
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Take the datastore from another run's work folder (made with the same model, corpus,
    /// --max-tokens, --block-len and --layers) instead of building it: for a run that changes
    /// only the kNN search, the loss or the optimiser
    #[arg(long)]
    datastore_from: Option<PathBuf>,
    /// Training tokens: the first N of the corpus in the split rule's document order
    #[arg(long, default_value_t = 400_000)]
    max_tokens: usize,
    /// Base layers the memory starts from and trains: N (the base's last N; the memory shares
    /// the layers below and reads their output), `all`, or ranges like 0-11,27-29 (a memory
    /// whose first layer is base layer s shares the s layers below it)
    #[arg(long, default_value = "6")]
    layers: String,
    /// Neighbours per position for the kNN targets
    #[arg(long, default_value_t = 64)]
    k: usize,
    /// Temperature τ of the kNN distribution, p ∝ exp(-d / τ) over squared L2 distances
    #[arg(long, default_value_t = 2.0)]
    knn_temperature: f32,
    /// Search neighbours exactly instead of through an HNSW graph (quadratic in the tokens:
    /// about 40 minutes for 400k on 2 cores, against 10)
    #[arg(long)]
    exact_knn: bool,
    /// Weight of the KL term in the loss (the rest is cross-entropy)
    #[arg(long, default_value_t = 0.5)]
    alpha: f64,
    /// Peak learning rate (AdamW; decays linearly to 0)
    #[arg(long, default_value_t = 3e-4)]
    lr: f64,
    /// Passes over the training tokens
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Tokens per block, for the datastore and for training
    #[arg(long, default_value_t = 1024)]
    block_len: usize,
    /// Blocks per optimizer step
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Seed of the block order
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Steps between checkpoints in the work folder
    #[arg(long, default_value_t = 25)]
    checkpoint_every: usize,
    /// The memory's default mixing weight λ, written to its config
    #[arg(long, default_value_t = 0.5)]
    lambda: f32,
    /// How the memory's weights are written
    #[arg(long, value_enum, default_value_t = Format::GgufQ8_0)]
    format: Format,
}

pub fn run(args: MemoryArgs) -> anyhow::Result<()> {
    check_out(&args)?;
    let model_path = model_path(&args.model)?;
    let work = args
        .work_dir
        .clone()
        .unwrap_or_else(|| args.out.with_extension("work"));
    let loaded = load_model(&model_path, args.block_len.max(1024))?;
    let base_layers = parse_layers(&args.layers, loaded.model.config.num_layers)?;
    let config = MemoryTrainConfig {
        base_layers: base_layers.clone(),
        alpha: args.alpha,
        lr: args.lr,
        epochs: args.epochs,
        block_len: args.block_len,
        batch_size: args.batch_size,
        seed: args.seed,
        checkpoint_every: args.checkpoint_every,
    };
    config.validate(loaded.model.config.num_layers)?;
    let work = WorkFolder::open(&work, &settings(&args, &model_path))?;
    if work.resumed {
        eprintln!("resuming the run in {}", work.path.display());
    }
    if let Some(other) = &args.datastore_from {
        for file in work.adopt_datastore(other)? {
            eprintln!("datastore: {} from {}", file.display(), other.display());
        }
    }
    let mut progress = BarProgress::appending(Some(work.path.join(LOG_FILE)))?;
    let corpus = super::args::read_training_corpus(
        &args.corpus,
        &loaded.tokenizer,
        args.max_tokens,
        &mut progress,
    )?;
    let spec = KnnSpec {
        block_len: args.block_len,
        k: args.k,
        temperature: args.knn_temperature,
        exact: args.exact_knn,
    };
    let started = Instant::now();
    let stage = work.knn_targets(
        &loaded.model,
        &corpus,
        spec,
        config.shared_layers(),
        &mut progress,
    )?;
    report_targets(&stage, &work, args.k);
    let knn_seconds = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let model = train(
        &loaded.model,
        &corpus,
        &stage.targets,
        stage.inputs.as_ref(),
        &config,
        &work.path,
        &mut progress,
    )?;
    let train_seconds = started.elapsed().as_secs_f64();
    progress.finish()?;
    let graft = GraftBlock {
        kind: TYPE.into(),
        tokenizer_hash: Some(loaded.tokenizer.identity()),
        lambda: args.lambda,
        shared_layers: config.shared_layers(),
        base_layers: Some(base_layers),
    };
    let weights = write_memory(&model, &graft, format(args.format), &args.out)?;
    let log = args.out.join(LOG_FILE);
    std::fs::copy(work.path.join(LOG_FILE), &log)
        .with_context(|| format!("cannot write {}", log.display()))?;
    super::loss_chart::write(&log, &args.out.join(LOSS_CHART))?;
    // A resumed run trained only the steps after its checkpoint: no rate to show.
    let rate = match work.resumed {
        true => "resumed".to_string(),
        false => format!(
            "{:.0} tokens/s",
            (corpus.tokens.len() * args.epochs) as f64 / train_seconds.max(1e-9)
        ),
    };
    println!(
        "memory written to {} ({} layers); datastore + kNN targets {:.0} s, training {:.0} s \
         ({rate})",
        weights.display(),
        config.base_layers.len(),
        knn_seconds,
        train_seconds,
    );
    Ok(())
}

fn report_targets(stage: &TrainingTargets, work: &WorkFolder, k: usize) {
    let Some(built) = stage.built else {
        eprintln!(
            "kNN targets: reusing {}",
            work.path.join(TARGETS_FILE).display()
        );
        return;
    };
    let how = if built.datastore_built {
        "built"
    } else {
        "loaded"
    };
    eprintln!(
        "datastore: {} keys {how} in {:.0} s",
        built.keys, built.datastore_seconds
    );
    let recall = built
        .recall
        .map_or("exact search".into(), |r| format!("HNSW recall@{k} {r:.3}"));
    eprintln!(
        "kNN targets: {} positions, k = {k}, in {:.0} s ({recall})",
        stage.targets.len(),
        built.knn_seconds
    );
}

fn format(f: Format) -> WeightsFormat {
    match f {
        Format::GgufQ8_0 => WeightsFormat::Gguf(GgmlDType::Q8_0),
        Format::GgufF16 => WeightsFormat::Gguf(GgmlDType::F16),
        Format::Safetensors => WeightsFormat::Safetensors,
    }
}

fn check_out(args: &MemoryArgs) -> anyhow::Result<()> {
    super::args::check_out_dir(&args.out, args.overwrite)?;
    for path in &args.corpus {
        if !path.exists() {
            bail!("the corpus path {} does not exist", path.display());
        }
    }
    Ok(())
}

/// The settings a work folder is made with: a datastore, targets or checkpoint made with
/// other settings must not be reused.
fn settings(args: &MemoryArgs, model: &Path) -> serde_json::Value {
    json!({
        "model": model, "corpus": args.corpus, "max_tokens": args.max_tokens,
        "layers": args.layers, "k": args.k, "knn_temperature": args.knn_temperature, "exact_knn": args.exact_knn,
        "alpha": args.alpha, "lr": args.lr, "epochs": args.epochs,
        "block_len": args.block_len, "batch_size": args.batch_size, "seed": args.seed,
    })
}
