//! The whole HTTP stack (`server::http::app`) on a real socket over the scripted fake engine
//! (`server::engine::fake`): for tests that need a socket but not a model. The schemathesis
//! run of the end-to-end tests (tests/e2e/test_openapi.py) fuzzes the API through it, where
//! random `max_tokens` on the real model would take hours. Not for users: its "model" echoes
//! the prompt back byte by byte.
//!
//! `cargo run -p server --example fake_server -- --port 8000`; stops on SIGINT/SIGTERM.

use std::sync::Arc;

use anyhow::Context;
use candle_core::Device;
use clap::Parser;
use models::tiny::tiny_config;
use models::Architecture;
use plugins::{BaseModel, Registry, RegistryConfig};
use server::engine::fake::{FakeConfig, FakeEngine};
use server::engine::{Engine, ModelInfo};
use server::http::{app, AppState, EngineSlot, HttpConfig};

#[derive(Debug, Parser)]
#[command(about = "graft's HTTP API over the scripted fake engine (tests only)")]
struct Args {
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// The fake model's context, in tokens (one per byte of the prompt).
    #[arg(long, default_value_t = 4096)]
    context_length: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let defaults = FakeConfig::default();
    let fake = FakeEngine::new(FakeConfig {
        info: ModelInfo {
            context_length: args.context_length,
            ..defaults.info.clone()
        },
        ..defaults
    });
    // An empty plug-in folder, so the registry routes answer as they do on a real server.
    let plugin_dir = tempfile::tempdir().context("plug-in folder")?;
    let base = BaseModel {
        id: fake.info().id.clone(),
        config: tiny_config(Architecture::Llama),
        device: Device::Cpu,
        tokenizer_hash: None,
        kv_dtype: models::KvDtype::F32,
    };
    let registry = Registry::new(
        base,
        RegistryConfig {
            dir: Some(plugin_dir.path().to_path_buf()),
            budget_bytes: 1 << 20,
        },
    )?;
    let slot = EngineSlot::loading();
    slot.fill_plugins(Arc::new(registry));
    slot.fill(Arc::new(fake));
    let state = AppState::new(slot, HttpConfig::default())?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port))
        .await
        .with_context(|| format!("cannot listen on port {}", args.port))?;
    eprintln!("fake_server listening on {}", listener.local_addr()?);
    axum::serve(listener, app(state))
        .with_graceful_shutdown(stop_signal())
        .await?;
    Ok(())
}

/// SIGINT or SIGTERM.
async fn stop_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
