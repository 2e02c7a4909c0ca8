//! POST /v1/chat/completions request bodies, from bytes through the JSON extractor and the
//! route's validation (`server::http::fuzzing::chat_request`) on the fake engine's byte-level
//! tokenizer and model info. A 4xx-shaped `ApiError` or requests, never a panic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use server::engine::fake::{FakeConfig, FakeEngine};
use server::http::fuzzing::chat_request;
use server::http::state::HttpConfig;

fuzz_target!(|data: &[u8]| {
    static ENGINE: OnceLock<FakeEngine> = OnceLock::new();
    let engine = ENGINE.get_or_init(|| FakeEngine::new(FakeConfig::default()));
    let _ = chat_request(data, engine, &HttpConfig::default());
});
