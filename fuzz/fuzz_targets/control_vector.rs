//! Control-vector GGUF files (`ControlVector::parse`): arbitrary bytes must give a vector or a
//! typed error, never a panic or a hang.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use plugins::steer::ControlVector;

fuzz_target!(|data: &[u8]| {
    let _ = ControlVector::parse(Path::new("fuzz.gguf"), data);
});
