//! PEFT LoRA adapters (`LoraAdapter::load`): `adapter_config.json` and
//! `adapter_model.safetensors` (the input split by `graft_fuzz::split`) checked against the
//! tiny base model; a typed error or an adapter, never a panic.
#![no_main]

use graft_fuzz::{tiny_base, write_pair};
use libfuzzer_sys::fuzz_target;
use plugins::files::PluginFiles;
use plugins::lora::{LoraAdapter, CONFIG_FILE, WEIGHTS_FILE};

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = write_pair("lora", (CONFIG_FILE, WEIGHTS_FILE), data) else {
        return;
    };
    let _ = LoraAdapter::load("fuzz", &dir, &tiny_base(), &mut PluginFiles::unconfined());
});
