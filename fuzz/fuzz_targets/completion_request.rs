//! POST /v1/completions request bodies, from bytes through the JSON extractor and the
//! route's validation (`server::http::fuzzing::completion_request`) on the fake engine's
//! byte-level tokenizer and model info. A 4xx-shaped `ApiError` or requests, never a panic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use server::engine::fake::{FakeConfig, FakeEngine};
use server::http::fuzzing::completion_request;
use server::http::state::HttpConfig;

fuzz_target!(|data: &[u8]| {
    static ENGINE: OnceLock<FakeEngine> = OnceLock::new();
    let engine = ENGINE.get_or_init(|| FakeEngine::new(FakeConfig::default()));
    let _ = completion_request(data, engine, &HttpConfig::default());
});
