//! GGUF model files through the whole loader (`models::bundle::load`): the header walk
//! (`gguf_check`), candle's parse, the model config and tensors, the tokenizer and the chat
//! template from the metadata. A typed error or a model, never a panic.
#![no_main]

use candle_core::Device;
use graft_fuzz::scratch_dir;
use libfuzzer_sys::fuzz_target;
use models::bundle::{load, LoadOptions};

fuzz_target!(|data: &[u8]| {
    let path = scratch_dir().join("model.gguf");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let options = LoadOptions {
        max_positions: Some(256),
        chat_template: None,
        vision: None,
    };
    let _ = load(&path, &Device::Cpu, &options);
});
