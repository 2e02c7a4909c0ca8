//! Steering-controller plug-ins (`SteeringController::load`): `config.json` and
//! `model.safetensors` (the input split by `graft_fuzz::split`) checked against the tiny base
//! model; a typed error or a controller, never a panic.
#![no_main]

use graft_fuzz::{tiny_base, write_pair};
use libfuzzer_sys::fuzz_target;
use plugins::controller::{SteeringController, CONFIG_FILE, WEIGHTS_FILE};
use plugins::files::PluginFiles;

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = write_pair("controller", (CONFIG_FILE, WEIGHTS_FILE), data) else {
        return;
    };
    let _ = SteeringController::load("fuzz", &dir, &tiny_base(), &mut PluginFiles::unconfined());
});
