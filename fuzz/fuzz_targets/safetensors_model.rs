//! Hugging Face model folders through the whole loader (`models::bundle::load`):
//! `config.json` and `model.safetensors` (the input split by `graft_fuzz::split`). A typed
//! error or a model, never a panic.
#![no_main]

use candle_core::Device;
use graft_fuzz::write_pair;
use libfuzzer_sys::fuzz_target;
use models::bundle::{load, LoadOptions};

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = write_pair("hf", ("config.json", "model.safetensors"), data) else {
        return;
    };
    let options = LoadOptions {
        max_positions: Some(256),
        chat_template: None,
        vision: None,
    };
    let _ = load(&dir, &Device::Cpu, &options);
});
