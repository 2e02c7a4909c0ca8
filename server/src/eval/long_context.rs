//! `server eval long-context`: a sparse-attention plug-in on long held-out text
//! (plugins::sparse_attention::eval): recall of the attention mass against the oracle, Quest
//! and recency at each budget, and teacher-forced decoding against dense (perplexity,
//! agreement, keys read, tokens/s), printed as Markdown tables and written as JSON and charts.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use plugins::files::PluginFiles;
use plugins::sparse_attention::eval::{evaluate, EvalOptions, EvalReport, METHODS};
use plugins::sparse_attention::train::Text;
use plugins::sparse_attention::SparseAttention;

use super::svg::{line_chart, Series};
use crate::config::KvCacheDtype;
use crate::train::args::{load_model, model_path, offline_base, BarProgress};

#[derive(Debug, Args)]
pub struct LongContextArgs {
    /// Base model: a .gguf file or a Hugging Face folder [default: the default model]
    #[arg(long)]
    model: Option<PathBuf>,
    /// The plug-in folder `server train sparse-attention` wrote
    #[arg(long)]
    plugin: PathBuf,
    /// Held-out plain-text files (never the training split), joined and cut into windows
    #[arg(long, num_args = 1.., required = true)]
    text: Vec<PathBuf>,
    /// Folder for report.json, recall.svg and layers.svg
    #[arg(long)]
    out: PathBuf,
    /// Context lengths, comma-separated
    #[arg(long, default_value = "2048,4096,8192")]
    contexts: String,
    /// Token budgets, comma-separated
    #[arg(long, default_value = "256,512,1024,2048")]
    budgets: String,
    /// Windows per context length
    #[arg(long, default_value_t = 3)]
    windows: usize,
    /// Scored tokens at the end of each window (decoded one per step)
    #[arg(long, default_value_t = 1024)]
    tail: usize,
    /// Query positions per window for recall, from the scored tail
    #[arg(long, default_value_t = 64)]
    queries: usize,
    /// Timed decode runs of every configuration, alternating (medians reported)
    #[arg(long, default_value_t = 3)]
    repetitions: usize,
    /// Also decode with the oracle's selection (the true heaviest blocks) at every budget:
    /// the best perplexity any gate could reach at that budget (slow; not timed)
    #[arg(long)]
    oracle: bool,
    /// How the KV cache holds keys and values (as `serve --kv-cache-dtype`)
    #[arg(long, value_enum, default_value_t = KvCacheDtype::F16)]
    kv_cache_dtype: KvCacheDtype,
    /// Seed of each window's sampled query positions
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn list(s: &str, what: &str) -> anyhow::Result<Vec<usize>> {
    s.split(',')
        .map(|x| x.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("--{what} must be comma-separated whole numbers"))
}

pub fn run(args: LongContextArgs) -> anyhow::Result<()> {
    let contexts = list(&args.contexts, "contexts")?;
    let longest = contexts.iter().copied().max().unwrap_or(0);
    let mut loaded = load_model(&model_path(&args.model)?, longest.max(64))?;
    let dtype = args.kv_cache_dtype.dtype();
    loaded.model.set_kv_dtype(dtype)?;
    let mut base = offline_base(&loaded);
    base.kv_dtype = dtype;
    let plugin = SparseAttention::load("eval", &args.plugin, &base, &mut PluginFiles::unconfined())
        .with_context(|| format!("cannot load {}", args.plugin.display()))?;
    let plugin = Arc::new(plugin);
    let block = plugin.config().block_size;
    if contexts
        .iter()
        .any(|&c| c % block != 0 || c <= args.tail + 1)
        || longest > base.config.max_position_embeddings
    {
        bail!("each context must be a multiple of {block}, longer than --tail, within the model's context");
    }
    let text = Text::read(&loaded, &args.text)?;
    let mut by_context = Vec::new();
    for &c in &contexts {
        let all = text.windows(c);
        if all.is_empty() {
            bail!("the text holds fewer than {c} tokens");
        }
        // Evenly spaced windows: every context length samples the whole text.
        let step = (all.len() / args.windows.max(1)).max(1);
        by_context.push(
            all.into_iter()
                .step_by(step)
                .take(args.windows)
                .collect::<Vec<_>>(),
        );
    }
    let opts = EvalOptions {
        contexts,
        budgets: list(&args.budgets, "budgets")?,
        windows: args.windows,
        tail: args.tail,
        queries: args.queries,
        repetitions: args.repetitions,
        oracle: args.oracle,
        seed: args.seed,
    };
    let mut progress = BarProgress::new(None)?;
    let report = evaluate(&loaded.model, &plugin, &by_context, &opts, &mut progress)?;
    progress.finish()?;
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(
        args.out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(args.out.join("recall.svg"), recall_chart(&report))?;
    std::fs::write(args.out.join("layers.svg"), layer_chart(&report))?;
    print!("{}", tables(&report));
    println!("wrote {}", args.out.display());
    Ok(())
}

/// The recall and decode tables in Markdown.
fn tables(r: &EvalReport) -> String {
    let mut s = String::from(
        "| context | budget | gate | oracle | Quest | recency |\n|---|---|---|---|---|---|\n",
    );
    for &c in &r.options.contexts {
        for &b in &r.options.budgets {
            let cell = |m: &str| {
                r.recall
                    .iter()
                    .find(|x| x.context == c && x.budget == b && x.method == m)
                    .map_or(String::from("-"), |x| format!("{:.3}", x.mean))
            };
            s += &format!(
                "| {c} | {b} | {} | {} | {} | {} |\n",
                cell("gate"),
                cell("oracle"),
                cell("quest"),
                cell("recency")
            );
        }
    }
    s += "\n| context | selection | budget | perplexity | vs dense | top-1 agreement | keys read | decode tok/s | vs dense |\n|---|---|---|---|---|---|---|---|---|\n";
    for &c in &r.options.contexts {
        let rows: Vec<_> = r.decode.iter().filter(|d| d.context == c).collect();
        let Some(dense) = rows.iter().find(|d| d.budget.is_none()) else {
            continue;
        };
        for d in &rows {
            let (read, speed) = match d.selection {
                "oracle" => ("-".to_string(), "- | -".to_string()),
                _ => (
                    format!("{:.3}", d.read_fraction),
                    format!("{:.1} | {:.2}x", d.tokens_per_s, d.speedup),
                ),
            };
            s += &format!(
                "| {c} | {} | {} | {:.3} | {:+.2}% | {:.3} | {read} | {speed} |\n",
                d.selection,
                d.budget.map_or("-".into(), |b| b.to_string()),
                d.perplexity,
                100.0 * (d.perplexity / dense.perplexity - 1.0),
                d.agreement,
            );
        }
    }
    s
}

/// Mean recall over layers against budget, one line per method and context.
fn recall_chart(r: &EvalReport) -> String {
    let mut series = Vec::new();
    for &c in &r.options.contexts {
        for m in METHODS {
            series.push(Series {
                label: format!("{m} @{c}"),
                points: r
                    .recall
                    .iter()
                    .filter(|x| x.context == c && x.method == m)
                    .map(|x| (x.budget as f64, x.mean))
                    .collect(),
            });
        }
    }
    line_chart(
        "attention-mass recall (mean over gated layers)",
        "budget (tokens)",
        "recall",
        (0.0, 1.0),
        &series,
    )
}

/// Recall per layer at the longest context and the budget nearest 1,024.
fn layer_chart(r: &EvalReport) -> String {
    let c = r.options.contexts.iter().copied().max().unwrap_or(0);
    let b = r
        .options
        .budgets
        .iter()
        .copied()
        .min_by_key(|&b| b.abs_diff(1024))
        .unwrap_or(0);
    let series: Vec<Series> = METHODS
        .iter()
        .map(|&m| Series {
            label: m.into(),
            points: r
                .recall
                .iter()
                .find(|x| x.context == c && x.budget == b && x.method == m)
                .map(|x| {
                    x.per_layer
                        .iter()
                        .enumerate()
                        .map(|(i, &v)| (i as f64, v))
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect();
    line_chart(
        &format!("recall per gated layer, context {c}, budget {b}"),
        "gated layer",
        "recall",
        (0.0, 1.0),
        &series,
    )
}
