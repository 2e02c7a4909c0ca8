//! `server train ...`: offline trainers that write plug-ins the server loads. Part of the
//! binary only; the training itself lives in `plugins::train`, this module turns flags into
//! a run, shows progress, writes the run's log and reports the result.

mod lora;

use clap::Subcommand;

/// What `server train` can train.
#[derive(Debug, Subcommand)]
pub enum TrainCommand {
    /// Train a LoRA adapter on the frozen base model; writes the PEFT files
    /// (adapter_config.json, adapter_model.safetensors) the server loads as a plug-in
    Lora(Box<lora::LoraArgs>),
}

pub fn run(command: TrainCommand) -> anyhow::Result<()> {
    match command {
        TrainCommand::Lora(args) => lora::run(*args),
    }
}
