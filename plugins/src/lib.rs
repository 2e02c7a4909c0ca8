//! `plugins`: what a request can plug into the frozen base model at run time.
//!
//! A plug-in is a file on disk (in its ecosystem's format) loaded once into a [`Plugin`]: an
//! object that implements the decoder's [`models::Hook`] trait and turns each request's
//! parameters into hook parameters. The [`Registry`] holds the loaded plug-ins by name, checks
//! each against the base model before it is usable, confines paths to the plug-in folder and
//! keeps resident memory under a budget. [`Registry::resolve`] turns a request's plug-in list
//! into a [`Chain`]: the per-row hook calls the engine hands to the forward pass, plus what
//! the response echoes back.
//!
//! Each kind is one folder (`lora`, `steer`, `controller`, `memory`: hook, file format, parameters,
//! trainer, evaluation) and one row of [`KINDS`], the table every kind is named in.
//!
//! Where it sits: the HTTP layer resolves chains during validation (so every failure is a
//! 4xx before admission); the engine only ever sees [`models::HookCall`]s. Off the request
//! path, each kind's trainer (on the utilities [`train`] shares) trains plug-ins on the frozen
//! base model (`server train <kind>`) and writes the same files the registry loads.

pub mod base;
pub mod chain;
pub mod controller;
pub mod early_exit;
pub mod error;
pub mod files;
pub mod kinds;
pub mod lora;
pub mod memory;
mod panic;
mod params;
mod paths;
pub mod plugin;
pub mod registry;
pub mod sparse_attention;
pub mod spec;
pub mod speculative;
pub mod steer;
pub mod train;
pub mod vision;
pub mod vision_prune;
pub mod weights;

pub use base::BaseModel;
pub use chain::{Chain, ChainEntry};
pub use error::{PluginError, Result};
pub use kinds::{KindInfo, PluginKind, KINDS};
pub use panic::panic_message;
pub use plugin::{LoadedPlugin, Plugin, PluginCounter};
pub use registry::{PluginInfo, Registry, RegistryConfig, Source};
pub use spec::PluginSpec;
