//! `server`: graft's OpenAI-compatible HTTP front end and the engine thread behind it.
//!
//! Request path: `http` parses and validates the wire request into an
//! [`engine::GenerateRequest`], submits it to an [`engine::Engine`] (the real engine thread
//! owning the model, or a scripted fake in HTTP tests), and streams the engine's
//! [`engine::Event`]s back as JSON or server-sent events.

pub mod config;
pub mod engine;
pub mod http;
pub mod memory;
pub mod structured;
pub mod tools;
