//! `server eval perplexity`: token-level perplexity of the base model, of plug-in chains (a
//! memory decoder at every λ, a LoRA adapter) and of the kNN-LM baseline on text files, through
//! the real serving path: every window is a request to the engine with prompt log-probs, the
//! plug-ins resolved by the server's registry from the request's `plugins` JSON. The mixture
//! math and the kNN-LM are `plugins::memory::eval`.
//!
//! Windows of `--window` tokens every `--stride` tokens, each scoring the tokens no earlier
//! window scored (the last `--stride` once the first window is past), over the files joined in
//! the split rule's order and cut to `--max-tokens`.

use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::Device;
use clap::Args;
use models::sampling::SamplingParams;
use plugins::memory::corpus::Corpus;
use plugins::memory::datastore::Datastore;
use plugins::memory::eval::{knn_logprobs, mixture, perplexity};
use plugins::registry::{Registry, RegistryConfig, Source};
use plugins::spec::PluginSpec;
use plugins::{BaseModel, PluginKind};
use serde_json::{json, Value};

use super::svg::{line_chart, Series};
use crate::train::args::{load_model, model_path, BarProgress};
use plugins::train::Progress;
use server::config::PluginEntry;
use server::engine::{Engine, EngineConfig, Event, GenerateRequest, OutputRules, RealEngine};

/// Windows in flight at once.
const WAVE: usize = 8;

#[derive(Debug, Args)]
pub struct PerplexityArgs {
    /// Base model [default: the default model]
    #[arg(long)]
    model: Option<PathBuf>,
    /// Text to score: files, or folders whose files are read (a corpus's test split)
    #[arg(long, num_args = 1.., required = true)]
    text: Vec<PathBuf>,
    /// Scored tokens at most (the text is cut, in the split rule's document order)
    #[arg(long, default_value_t = 32_768)]
    max_tokens: usize,
    /// Tokens to pass over before scoring: with a training split and the trainer's
    /// --max-tokens, the documents after the ones it trained on (a validation set)
    #[arg(long, default_value_t = 0)]
    skip_tokens: usize,
    /// Folder plug-in paths must lie under, as for `server serve`
    #[arg(long, default_value = ".")]
    plugin_dir: PathBuf,
    /// Plug-in to load, TYPE:NAME=PATH (repeatable), as for `server serve`
    #[arg(long)]
    plugin: Vec<String>,
    /// A plug-in chain to score, as a request's `plugins` JSON (repeatable); a chain ending
    /// in a memory is also scored at every --lambdas value
    #[arg(long)]
    plugins: Vec<String>,
    /// Mixing weights λ for memory and kNN-LM curves
    #[arg(long, default_value = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8")]
    lambdas: String,
    /// A datastore (datastore.safetensors from `server train memory`'s work folder): also
    /// score the kNN-LM mixed with the base at every λ
    #[arg(long)]
    datastore: Option<PathBuf>,
    /// Neighbours per token for the kNN-LM
    #[arg(long, default_value_t = 64)]
    knn_k: usize,
    /// Temperature τ of the kNN-LM
    #[arg(long, default_value_t = 2.0)]
    knn_temperature: f32,
    /// Tokens per window
    #[arg(long, default_value_t = 1024)]
    window: usize,
    /// Tokens between window starts
    #[arg(long, default_value_t = 512)]
    stride: usize,
    /// Write the results as JSON here
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write a plot of perplexity against λ (SVG) here
    #[arg(long)]
    plot: Option<PathBuf>,
}

pub fn run(args: PerplexityArgs) -> anyhow::Result<()> {
    let lambdas = parse_lambdas(&args.lambdas)?;
    let chains: Vec<Vec<PluginSpec>> = args
        .plugins
        .iter()
        .map(|j| serde_json::from_str(j).with_context(|| format!("--plugins {j}")))
        .collect::<anyhow::Result<_>>()?;
    let path = model_path(&args.model)?;
    let loaded = load_model(&path, args.window)?;
    let registry = registry(&loaded, &args)?;
    let mut progress = BarProgress::new(None)?;
    // One token more than the scored ones: the first token is never scored.
    let budget = Some(args.skip_tokens + args.max_tokens + 1);
    let mut corpus = Corpus::read(&args.text, &loaded.tokenizer, budget, true, &mut progress)?;
    if corpus.tokens.len() < args.skip_tokens + 2 {
        bail!(
            "the text holds {} tokens, none left to score after --skip-tokens {}",
            corpus.tokens.len(),
            args.skip_tokens
        );
    }
    corpus.tokens.drain(..args.skip_tokens);
    let windows = corpus.windows(args.window, args.stride);
    // The kNN-LM reads the base's keys before the engine takes the model.
    let knn = match &args.datastore {
        Some(store_path) => Some(knn_logprobs(
            &loaded.model,
            &Datastore::load(store_path)?,
            &windows,
            args.knn_k,
            args.knn_temperature,
            &mut progress,
        )?),
        None => None,
    };
    let engine = RealEngine::new(
        loaded,
        EngineConfig {
            model_id: "eval".into(),
            ..EngineConfig::default()
        },
    )?;
    let base = score(&engine, &windows, &[], "base", &mut progress)?;
    let base_ppl = perplexity(&base);
    let mut rows = vec![row("base", None, base_ppl, base_ppl, base.len())];
    for chain in &chains {
        let label = serde_json::to_string(chain)?;
        let calls = registry.resolve(chain)?.calls;
        let served = score(&engine, &windows, &calls, &label, &mut progress)?;
        rows.push(row(
            &label,
            None,
            perplexity(&served),
            base_ppl,
            served.len(),
        ));
        if let Some(alone) = memory_alone(chain) {
            let calls = registry.resolve(&alone)?.calls;
            let memory = score(&engine, &windows, &calls, &label, &mut progress)?;
            rows.push(row(
                &format!("{label} alone"),
                Some(1.0),
                perplexity(&memory),
                base_ppl,
                memory.len(),
            ));
            for &l in &lambdas {
                let p = perplexity(&mixture(&base, &memory, l));
                rows.push(row(
                    &format!("{label} mixed"),
                    Some(l),
                    p,
                    base_ppl,
                    base.len(),
                ));
            }
        }
    }
    if let Some(knn) = &knn {
        for &l in &lambdas {
            let p = perplexity(&mixture(&base, knn, l));
            rows.push(row("knn-lm", Some(l), p, base_ppl, base.len()));
        }
    }
    progress.finish()?;
    print_table(&rows);
    if let Some(out) = &args.out {
        let report = json!({"text": args.text, "skip_tokens": args.skip_tokens, "scored_tokens": base.len(), "window": args.window,
            "stride": args.stride, "knn_k": args.knn_k, "knn_temperature": args.knn_temperature,
            "results": rows});
        std::fs::write(out, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    if let Some(plot) = &args.plot {
        std::fs::write(plot, chart(&rows, base_ppl))
            .with_context(|| format!("cannot write {}", plot.display()))?;
    }
    Ok(())
}

fn row(config: &str, lambda: Option<f64>, ppl: f64, base: f64, tokens: usize) -> Value {
    json!({"config": config, "lambda": lambda, "perplexity": ppl, "vs_base": ppl / base, "tokens": tokens})
}

/// The chain with its last plug-in, a memory, at λ = 1: the memory's own distribution.
fn memory_alone(chain: &[PluginSpec]) -> Option<Vec<PluginSpec>> {
    let last = chain.last().filter(|s| s.kind == PluginKind::Memory)?;
    let mut alone = chain.to_vec();
    let mut spec = last.clone();
    spec.params.insert("lambda".into(), json!(1.0));
    *alone.last_mut()? = spec;
    Some(alone)
}

fn registry(
    loaded: &models::bundle::LoadedModel,
    args: &PerplexityArgs,
) -> anyhow::Result<Registry> {
    let base = BaseModel {
        id: "eval".into(),
        config: loaded.model.config.clone(),
        device: Device::Cpu,
        tokenizer_hash: Some(loaded.tokenizer.identity()),
        kv_dtype: models::KvDtype::F32,
    };
    let config = RegistryConfig {
        dir: Some(args.plugin_dir.clone()),
        budget_bytes: usize::MAX,
    };
    let registry = Registry::new(base, config).context("--plugin-dir")?;
    for text in &args.plugin {
        let entry = PluginEntry::parse(text)?;
        registry
            .load(entry.kind, &entry.name, &entry.path, Source::Config, false)
            .with_context(|| format!("cannot load plug-in `{}`", entry.name))?;
    }
    Ok(registry)
}

/// The log-probability of every scored token, window by window, through the engine.
fn score(
    engine: &RealEngine,
    windows: &[(&[u32], usize)],
    hooks: &[models::HookCall],
    label: &str,
    progress: &mut BarProgress,
) -> anyhow::Result<Vec<f32>> {
    progress.phase(&format!("windows of {label}"), windows.len());
    let mut out = Vec::new();
    for (w, wave) in windows.chunks(WAVE).enumerate() {
        let mut receivers = Vec::with_capacity(wave.len());
        for (i, (window, _)) in wave.iter().enumerate() {
            receivers.push(engine.submit(GenerateRequest {
                id: format!("ppl-{w}-{i}"),
                prompt: window.to_vec(),
                sampling: SamplingParams {
                    temperature: 0.0,
                    ..SamplingParams::default()
                },
                seed: 0,
                max_tokens: 1,
                stop: Vec::new(),
                stop_token_ids: Vec::new(),
                prompt_logprobs: Some(0),
                hooks: hooks.to_vec(),
                output: OutputRules::default(),
                cache_prompt: true,
                constraint: None,
                embed: false,
            })?);
        }
        for ((window, first), mut rx) in wave.iter().zip(receivers) {
            let mut logprobs = None;
            while let Some(event) = rx.blocking_recv() {
                match event {
                    Event::PromptLogprobs(p) => logprobs = Some(p),
                    Event::Failed(e) => bail!("scoring failed: {e}"),
                    _ => {}
                }
            }
            let logprobs = logprobs.context("the engine sent no prompt log-probs")?;
            // Entry j is prompt token j + 1's.
            if logprobs.len() + 1 != window.len() {
                bail!(
                    "{} prompt log-probs for {} tokens",
                    logprobs.len(),
                    window.len()
                );
            }
            out.extend(logprobs[first - 1..].iter().map(|t| t.logprob));
            progress.advance(1);
        }
    }
    Ok(out)
}

fn parse_lambdas(list: &str) -> anyhow::Result<Vec<f64>> {
    list.split(',')
        .map(|s| {
            let l: f64 = s
                .trim()
                .parse()
                .with_context(|| format!("--lambdas: `{s}`"))?;
            if !(0.0..=1.0).contains(&l) {
                bail!("--lambdas: {l} is not within [0, 1]");
            }
            Ok(l)
        })
        .collect()
}

fn print_table(rows: &[Value]) {
    println!(
        "{:<60} {:>6} {:>11} {:>8} {:>8}",
        "config", "lambda", "perplexity", "vs base", "tokens"
    );
    for r in rows {
        let lambda = r["lambda"]
            .as_f64()
            .map_or("-".to_string(), |l| format!("{l:.2}"));
        println!(
            "{:<60} {:>6} {:>11.3} {:>8.3} {:>8}",
            r["config"].as_str().unwrap_or(""),
            lambda,
            r["perplexity"].as_f64().unwrap_or(f64::NAN),
            r["vs_base"].as_f64().unwrap_or(f64::NAN),
            r["tokens"]
        );
    }
}

fn chart(rows: &[Value], base: f64) -> String {
    let mut labels: Vec<&str> = Vec::new();
    for r in rows {
        let l = r["config"].as_str().unwrap_or("");
        if r["lambda"].is_f64() && !l.ends_with(" alone") && !labels.contains(&l) {
            labels.push(l);
        }
    }
    let series: Vec<Series> = labels
        .iter()
        .map(|label| Series {
            label: label.chars().take(28).collect(),
            points: std::iter::once((0.0, base))
                .chain(
                    rows.iter()
                        .filter(|r| r["config"] == *label)
                        .filter_map(|r| Some((r["lambda"].as_f64()?, r["perplexity"].as_f64()?))),
                )
                .collect(),
        })
        .collect();
    let top = rows
        .iter()
        .filter_map(|r| r["perplexity"].as_f64())
        .filter(|p| p.is_finite())
        .fold(base, f64::max);
    line_chart(
        "Perplexity against the mixing weight λ (λ = 0: the base model)",
        "λ",
        "perplexity",
        (0.0, top * 1.05),
        &series,
    )
}
