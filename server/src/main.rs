//! The `server` binary: `server serve` runs the OpenAI-compatible HTTP server, `server fetch`
//! downloads the default model ahead of time and prints its path, `server train <kind>` trains
//! a plug-in offline (see `train`), `server eval <kind>` evaluates one, `server probe` is a
//! health check for container images.
//!
//! `serve` binds the socket first, so /health answers 503 while the model loads in the
//! background; then it fills the app's engine slot and /health turns 200. On SIGINT/SIGTERM
//! it drains: it keeps accepting connections, so a readiness probe sees /health answer 503
//! and new generation requests get 503 with Retry-After, while in-flight requests finish for
//! up to `drain_seconds` (the engine fails what is left); then it closes the listener, lets
//! the last responses go out, and exits 0. A model that fails to load stops the server with
//! an error (exit 1).

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use axum::serve::ListenerExt;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use models::bundle::{LoadOptions, LoadedModel};
use plugins::{BaseModel, Registry, RegistryConfig, Source};
use server::config::{self, DeviceKind, LogFormat, ServeConfig};
use server::engine::Engine;
use server::http::images::{ImageConfig, ImageFetcher, ImageLimits};
use server::http::{app, AppState, EngineSlot, HttpConfig};
use tokio::sync::{oneshot, watch};

mod eval;
mod probe;
mod train;

/// Time past the drain deadline for the engine's last step and the final bytes to leave.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Parser)]
#[command(
    name = "server",
    version,
    about = "graft: an OpenAI-compatible LLM server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible HTTP API (flags > GRAFT_* environment > --config file >
    /// defaults)
    Serve(Box<ServeArgs>),
    /// Fetch the default model into the cache and print its path
    Fetch,
    /// Train a plug-in offline on the frozen base model
    Train {
        #[command(subcommand)]
        kind: train::TrainCommand,
    },
    /// Evaluate plug-ins through the real generation path
    Eval {
        #[command(subcommand)]
        kind: eval::EvalCommand,
    },
    /// Ask a local server's /health (or --path) and exit 0 if it answers 200: a health check
    /// for images without curl
    Probe(probe::ProbeArgs),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// TOML configuration file; config/default.toml lists every option
    #[arg(long, env = "GRAFT_CONFIG")]
    config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit
    #[arg(long)]
    print_config: bool,
    #[command(flatten)]
    options: ServeConfig,
}

/// Start-up and command errors are printed as their chain of causes and exit 1; returning
/// them from `main` would print anyhow's backtrace too when RUST_BACKTRACE is set.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    // Before any thread starts: candle otherwise re-reads /proc/cpuinfo on every matmul.
    models::threads::pin_cpu_threads(None);
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match cli.command {
        Command::Fetch => {
            init_logging(LogFormat::Text);
            let path = models::default_model::path()?;
            println!("{}", path.display());
            Ok(())
        }
        Command::Train { kind } => {
            init_logging(LogFormat::Text);
            train::run(kind)
        }
        Command::Eval { kind } => {
            init_logging(LogFormat::Text);
            eval::run(kind)
        }
        Command::Probe(args) => probe::run(&args),
        Command::Serve(args) => {
            let sub = matches
                .subcommand_matches("serve")
                .ok_or_else(|| anyhow!("clap lost the serve arguments"))?;
            let file = args.config.as_deref().map(config::from_file).transpose()?;
            let config = config::resolve(&args.options, sub, file)?;
            config.validate()?;
            if args.print_config {
                print!("{}", config.to_toml()?);
                return Ok(());
            }
            init_logging(config.log_format);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let result = runtime.block_on(serve(config));
            // A model still loading (or fetching) must not hold the exit up.
            runtime.shutdown_timeout(Duration::from_secs(1));
            result
        }
    }
}

/// Logs go to stderr so `server fetch` can print the path alone on stdout.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // hnsw_rs (the memory trainer's neighbour search) logs its internals at info.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,hnsw_rs=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // `try_init` fails only when a subscriber is already set; the first one keeps logging.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Stops the engine: finish accepted requests within the drain time, fail the rest. Blocks.
type EngineStop = Box<dyn FnOnce(Duration) + Send>;

/// A started engine and the way to stop it.
struct BuiltEngine {
    engine: Arc<dyn Engine>,
    registry: Arc<Registry>,
    shutdown: EngineStop,
}

/// What the model loader, the stop watcher and `serve` share.
struct Lifecycle {
    slot: Arc<EngineSlot>,
    drain: Duration,
    /// The engine's shutdown, set once the model is loaded.
    engine_stop: Mutex<Option<EngineStop>>,
    /// Why the server stopped, when it was not a signal.
    failure: Mutex<Option<anyhow::Error>>,
}

async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    let http = HttpConfig {
        api_keys: config.api_keys()?,
        max_body_bytes: config.max_body_bytes,
        max_tokens_default: config.max_tokens_default,
        request_timeout: config.request_timeout(),
        allowed_origins: config.allowed_origins()?,
        tool_call_parser: config.tool_call_parser,
        images: ImageConfig {
            limits: ImageLimits {
                max_images: config.max_images_per_request,
                max_bytes: config.max_image_bytes,
                max_pixels: config.max_image_pixels,
            },
            fetcher: ImageFetcher::new(
                &config.allowed_media_domains,
                Duration::from_secs(config.media_fetch_timeout),
            )
            .context("the image URL client")?,
        },
    };
    let state = AppState::new(EngineSlot::loading(), http)?;
    let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", config.host, config.port))?;
    let address: SocketAddr = listener.local_addr()?;
    tracing::info!(%address, "listening; /health answers 503 until the model is loaded");

    let life = Arc::new(Lifecycle {
        slot: state.slot.clone(),
        drain: Duration::from_secs(config.drain_seconds),
        engine_stop: Mutex::default(),
        failure: Mutex::default(),
    });
    let (fatal_tx, fatal_rx) = oneshot::channel();
    let (stopping_tx, stopping_rx) = watch::channel(false);
    tokio::spawn(load_in_background(config, life.clone(), fatal_tx));
    let drained = drain_on_stop(fatal_rx, life.clone(), stopping_tx);
    // Streamed tokens are small writes: without TCP_NODELAY, Nagle's algorithm holds each one
    // back until the client's delayed ACK, adding milliseconds to every inter-token gap.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    // The listener closes only once the drain is over; until then it keeps accepting.
    let server = axum::serve(listener, app(state)).with_graceful_shutdown(drained);
    run_until_drained(server.into_future(), stopping_rx, life.drain).await?;
    finish(&life)
}

/// Reports how the server ended.
fn finish(life: &Lifecycle) -> anyhow::Result<()> {
    let failed = life.failure.lock().ok().and_then(|mut f| f.take());
    match failed {
        Some(e) => Err(e),
        None => {
            tracing::info!("shut down cleanly");
            Ok(())
        }
    }
}

/// Loads the model and starts the engine off the async threads, then fills the slot; a
/// failure is sent to `fatal`, which stops the server.
async fn load_in_background(
    config: ServeConfig,
    life: Arc<Lifecycle>,
    fatal: oneshot::Sender<anyhow::Error>,
) {
    let loaded = tokio::task::spawn_blocking(move || load(&config)).await;
    match loaded {
        Ok(Ok(built)) => {
            if let Ok(mut stop) = life.engine_stop.lock() {
                *stop = Some(built.shutdown);
            }
            life.slot.fill_plugins(built.registry);
            let warm = built.engine.clone();
            life.slot.fill(built.engine);
            tracing::info!("model ready; serving");
            tokio::task::spawn_blocking(move || prepare_grammars(warm.as_ref()));
        }
        Ok(Err(e)) => {
            let _ = fatal.send(e);
        }
        Err(join) => {
            let _ = fatal.send(anyhow!("the model loader panicked: {join}"));
        }
    }
}

/// Builds the vocabulary's token trie for constrained decoding (structured outputs, forced tool
/// calls) right after start-up, off the async threads, so the first such request does not
/// build it on the worker that serves it.
fn prepare_grammars(engine: &dyn Engine) {
    let started = Instant::now();
    let ready = engine.grammars().is_some();
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(ready, seconds, "constrained decoding prepared");
}

/// Finds (fetching if needed) and loads the model, then starts the engine on it.
fn load(config: &ServeConfig) -> anyhow::Result<BuiltEngine> {
    let path = match &config.model {
        Some(path) => path.clone(),
        None => {
            tracing::info!("no model configured; using the default model (fetched on first use)");
            models::default_model::path()?
        }
    };
    let device = match config.device {
        DeviceKind::Cpu => candle_core::Device::Cpu,
        // candle answers with an error when built without the `cuda` feature.
        DeviceKind::Cuda => candle_core::Device::new_cuda(0)
            .map_err(models::error::without_backtrace)
            .context("device = cuda needs a GPU and a binary built with `--features cuda`")?,
    };
    let options = LoadOptions {
        vision: config.vision.clone(),
        max_positions: config.max_context,
        chat_template: config.chat_template_text()?,
    };
    let started = Instant::now();
    let mut loaded = models::bundle::load(&path, &device, &options)
        .with_context(|| format!("cannot load the model at {}", path.display()))?;
    tracing::info!(
        path = %path.display(),
        seconds = started.elapsed().as_secs_f64(),
        "model loaded"
    );
    loaded
        .model
        .set_activation_quantization(config.activations.mode());
    loaded
        .model
        .set_kv_dtype(config.kv_cache_dtype.dtype())
        .context("kv_cache_dtype")?;
    let registry = Arc::new(build_registry(&loaded, &device, config)?);
    build_engine(loaded, registry, config)
}

/// The plug-in registry for the loaded model, with the configured plug-ins loaded; one that
/// cannot be applied stops the start-up (serving without a plug-in the operator listed would
/// answer its requests with 404s).
fn build_registry(
    loaded: &LoadedModel,
    device: &candle_core::Device,
    config: &ServeConfig,
) -> anyhow::Result<Registry> {
    let base = BaseModel {
        id: config.served_model_id(),
        config: loaded.model.config.clone(),
        device: device.clone(),
        tokenizer_hash: Some(loaded.tokenizer.identity()),
        kv_dtype: loaded.model.kv_dtype(),
    };
    if let Some(identity) = &base.tokenizer_hash {
        tracing::info!(tokenizer_identity = %identity, "tokenizer identity (a memory decoder's graft.tokenizer_hash)");
    }
    let registry_config = RegistryConfig {
        dir: config.plugin_dir.clone(),
        budget_bytes: config.plugin_budget_bytes(),
    };
    let registry = Registry::new(base, registry_config).context("plugin_dir")?;
    for entry in config.plugin_entries()? {
        registry
            .load(entry.kind, &entry.name, &entry.path, Source::Config, false)
            .with_context(|| format!("cannot load plug-in `{}`", entry.name))?;
    }
    Ok(registry)
}

/// Starts the real engine on `loaded`: the one place the binary names its engine type.
fn build_engine(
    loaded: LoadedModel,
    registry: Arc<Registry>,
    config: &ServeConfig,
) -> anyhow::Result<BuiltEngine> {
    let engine_config = server::engine::EngineConfig {
        model_id: config.served_model_id(),
        max_running: config.max_running,
        max_batch_tokens: config.max_batch_tokens,
        prefill_chunk: config.prefill_chunk,
        max_waiting: config.max_waiting,
        kv_budget_bytes: config.kv_budget_bytes(),
        speculation_max_batch: config.speculative_disable_by_batch_size,
        prefix_caching: config.prefix_caching,
    };
    let engine = Arc::new(server::engine::RealEngine::new(loaded, engine_config)?);
    let stopper = engine.clone();
    Ok(BuiltEngine {
        engine,
        registry,
        shutdown: Box::new(move |drain| stopper.shutdown(drain)),
    })
}

/// Resolves when the server has drained. On SIGINT/SIGTERM (or a fatal load error) it starts
/// the drain: /health and the model routes answer 503 from now on, and the engine gets `drain`
/// to finish what it accepted; it resolves once the engine has stopped. Until then the
/// listener keeps accepting, so probes and clients get their 503s instead of a refused
/// connection.
async fn drain_on_stop(
    fatal: oneshot::Receiver<anyhow::Error>,
    life: Arc<Lifecycle>,
    stopping: watch::Sender<bool>,
) {
    tokio::select! {
        _ = shutdown_signal() => {
            tracing::info!(drain_seconds = life.drain.as_secs(), "signal received; draining");
        }
        Ok(e) = fatal => {
            tracing::error!(error = %format!("{e:#}"), "cannot serve; stopping");
            if let Ok(mut f) = life.failure.lock() {
                *f = Some(e);
            }
        }
    }
    life.slot.begin_shutdown();
    let _ = stopping.send(true);
    let stop = life.engine_stop.lock().ok().and_then(|mut s| s.take());
    if let Some(stop) = stop {
        let drain = life.drain;
        // The engine's shutdown blocks until its thread has drained and exited.
        let stopped = tokio::task::spawn_blocking(move || stop(drain));
        if tokio::time::timeout(drain + SHUTDOWN_GRACE, stopped)
            .await
            .is_err()
        {
            tracing::warn!("the engine did not stop in time; closing anyway");
        }
    }
    tracing::info!("drained; closing the listener");
}

/// Runs the server until it has drained and sent its last responses, or until `drain` (plus
/// a grace) after the stop began, whichever is first: a client that never reads must not
/// keep the process alive.
async fn run_until_drained(
    server: impl std::future::Future<Output = std::io::Result<()>>,
    mut stopping: watch::Receiver<bool>,
    drain: Duration,
) -> anyhow::Result<()> {
    let deadline = async {
        if stopping.wait_for(|s| *s).await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(drain + SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        result = server => result.context("the HTTP server failed"),
        _ = deadline => {
            tracing::warn!("drain time is over; closing the remaining connections");
            Ok(())
        }
    }
}

/// SIGINT (Ctrl-C) or, on Unix, SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            // Without a handler, never report a signal that did not happen.
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every flag of every command (serve, train, eval, and what comes later) says what it is
    /// in `--help`.
    #[test]
    fn every_flag_of_every_command_has_a_help_line() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() {
                    missing.push(format!("{path} --{}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "server", &mut missing);
        assert!(missing.is_empty(), "flags without help: {missing:#?}");
    }
}
