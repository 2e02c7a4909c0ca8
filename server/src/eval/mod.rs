//! `server eval ...`: evaluations of plug-ins through the real generation path; thin shims over
//! each kind's evaluation in the plugins crate (`plugins::controller::eval`).

mod early_exit;
mod long_context;
mod perplexity;
mod refusal;
pub(crate) mod svg;
mod vision;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum EvalCommand {
    /// Refusal rate on harmful and harmless prompts for the base model, a steering vector at
    /// several scales and a steering controller; with fluency of the harmless answers
    Refusal(Box<refusal::RefusalArgs>),
    /// Token-level perplexity of the base model, plug-in chains (a memory decoder at every
    /// mixing weight, a LoRA adapter) and the kNN-LM baseline on text files
    Perplexity(Box<perplexity::PerplexityArgs>),
    /// Decode speed against agreement with the full model of an early-exit plug-in over a
    /// sweep of predictor thresholds, on held-out prompts
    EarlyExit(Box<early_exit::EarlyExitArgs>),
    /// A sparse-attention plug-in on long held-out text: attention-mass recall against the
    /// oracle, Quest and recency at each budget, and decoding against dense (perplexity,
    /// agreement, keys read, tokens/s)
    LongContext(Box<long_context::LongContextArgs>),
    /// A vision tower (`server train vision`) on the held-out questions of its synthetic set,
    /// answered by the serving forward pass: accuracy by question kind, and sample images
    Vision(Box<vision::VisionArgs>),
}

pub fn run(command: EvalCommand) -> anyhow::Result<()> {
    match command {
        EvalCommand::Refusal(args) => refusal::run(*args),
        EvalCommand::Perplexity(args) => perplexity::run(*args),
        EvalCommand::EarlyExit(args) => early_exit::run(*args),
        EvalCommand::LongContext(args) => long_context::run(*args),
        EvalCommand::Vision(args) => vision::run(*args),
    }
}
