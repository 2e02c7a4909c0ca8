//! `server train <kind>`: offline trainers that write plug-ins the server loads. Part of the
//! binary only, and thin: each kind's trainer lives in its folder of the plugins crate
//! (`plugins::<kind>::train`, shared pieces in `plugins::train`); this module turns flags into
//! a run, shows progress, writes the run's log and reports the result.

pub mod args;
mod controller;
mod early_exit;
mod lora;
mod loss_chart;
mod memory;
mod sparse_attention;
mod steer;
mod vision;
mod vision_prune;

use clap::Subcommand;

/// What `server train` can train.
#[derive(Debug, Subcommand)]
pub enum TrainCommand {
    /// Train a LoRA adapter on the frozen base model; writes the PEFT files
    /// (adapter_config.json, adapter_model.safetensors) the server loads as a plug-in
    Lora(Box<lora::LoraArgs>),
    /// Compute per-layer steering directions from two prompt sets; writes a llama.cpp
    /// control-vector GGUF the server loads as a `steer` plug-in
    Steer(Box<steer::SteerArgs>),
    /// Train a steering controller (Guiding Giants) from harmful and harmless instructions;
    /// writes config.json + model.safetensors the server loads as a `controller` plug-in
    Controller(Box<controller::ControllerArgs>),
    /// Train a memory decoder on a domain corpus (a datastore of the base's hidden states,
    /// kNN-LM targets, then KL + cross-entropy training); writes config.json + model.gguf the
    /// server loads as a `memory` plug-in
    Memory(Box<memory::MemoryArgs>),
    /// Train speculative early-exit predictors (SpecEE) on the model's own greedy answers;
    /// writes config.json + predictors.safetensors the server loads as an `early_exit`
    /// plug-in, and report.json / report.svg
    EarlyExit(Box<early_exit::EarlyExitArgs>),
    /// Train learned sparse-attention gates (SeerAttention-R) by self-distillation from the
    /// model's own attention on long text; writes config.json + gates.safetensors the server
    /// loads as a `sparse_attention` plug-in, and report.json / report.svg
    SparseAttention(Box<sparse_attention::SparseAttentionArgs>),
    /// Train a vision tower (SigLIP encoder + connector) for the frozen language model on a
    /// seeded synthetic visual question set; writes the folder `server serve --vision` loads
    /// and report.json (held-out accuracy)
    Vision(Box<vision::VisionArgs>),
    /// Train LVPruning's decision module for a trained vision tower (both models frozen):
    /// which image tokens a question needs after the middle layer; writes config.json +
    /// decision.safetensors the server loads as a `vision_prune` plug-in (scorer `learned`)
    VisionPrune(Box<vision_prune::VisionPruneArgs>),
}

pub fn run(command: TrainCommand) -> anyhow::Result<()> {
    match command {
        TrainCommand::Lora(args) => lora::run(*args),
        TrainCommand::Steer(args) => steer::run(*args),
        TrainCommand::Controller(args) => controller::run(*args),
        TrainCommand::Memory(args) => memory::run(*args),
        TrainCommand::EarlyExit(args) => early_exit::run(*args),
        TrainCommand::SparseAttention(args) => sparse_attention::run(*args),
        TrainCommand::Vision(args) => vision::run(*args),
        TrainCommand::VisionPrune(args) => vision_prune::run(*args),
    }
}
