//! A load tester for OpenAI-compatible inference servers (graft, llama.cpp's server, vLLM),
//! over plain HTTP only, so it measures every server the same way.
//!
//! The flow of a run: the command line ([`cli`]) becomes a validated [`Config`]; [`run()`]
//! resolves the model and, level by level, drives a closed or open loop ([`load`]) of requests
//! built by the [`workload`] (synthetic or from a JSONL file, with a seeded mix of plug-in
//! chains), each measured by the [`client`] into a [`RequestRecord`]; [`stats`] turns the
//! records into percentiles, rates and goodput per level and per chain; [`output`] prints the
//! table and writes the files, and [`report`] the HTML page.
//!
//! Definitions follow vLLM's `bench serve` (and GenAI-Perf/GuideLLM, which agree): TTFT until
//! the first non-empty content, ITL between consecutive content chunks, TPOT =
//! (E2E - TTFT) / (output tokens - 1) per request, goodput as DistServe defines it.

pub mod cli;
pub mod client;
pub mod config;
pub mod live;
pub mod load;
pub mod output;
pub mod parse;
pub mod record;
pub mod report;
pub mod run;
pub mod scrape;
pub mod stats;
pub mod workload;

pub use config::Config;
pub use record::RequestRecord;
pub use run::{run, LevelResult, RunReport};
