//! Shared pieces of the fuzz targets in `fuzz_targets/`: the tiny base model plug-ins are
//! checked against, a per-process scratch folder for loaders that read files, and the split
//! of one fuzz input into the two files of a plug-in folder.
//!
//! Build and run with `scripts/fuzz.sh` (docs/FUZZING.md says how and why).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::Device;
use models::tiny::tiny_config;
use models::Architecture;
use plugins::BaseModel;

/// The base model every plug-in target loads against: `models::tiny::tiny_config`'s Llama.
pub fn tiny_base() -> BaseModel {
    BaseModel {
        id: "tiny".into(),
        config: tiny_config(Architecture::Llama),
        device: Device::Cpu,
        tokenizer_hash: None,
        kv_dtype: models::KvDtype::F32,
    }
}

/// A folder private to this process, kept for its lifetime; targets overwrite their files in
/// it on every input (libFuzzer runs inputs one after another in one process).
pub fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("graft-fuzz-{}", std::process::id()));
        // A fuzz harness with no scratch folder cannot run at all; fail loudly at start-up.
        #[allow(clippy::expect_used)]
        std::fs::create_dir_all(&dir).expect("create the fuzz scratch folder");
        dir
    })
}

/// Splits an input into two files: the first two bytes (little-endian) give the first file's
/// length, clamped to what is there; the rest is the second file. [`join`] is the inverse,
/// used to write seeds.
pub fn split(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((head, rest)) = data.split_first_chunk::<2>() else {
        return (&[], data);
    };
    let n = usize::from(u16::from_le_bytes(*head)).min(rest.len());
    rest.split_at(n)
}

/// The input that [`split`] turns into `first` and `second`; `first` must be under 64 KiB.
pub fn join(first: &[u8], second: &[u8]) -> Vec<u8> {
    let n = u16::try_from(first.len()).unwrap_or(u16::MAX);
    let mut out = n.to_le_bytes().to_vec();
    out.extend_from_slice(first);
    out.extend_from_slice(second);
    out
}

/// Writes the two files of a plug-in folder from one input and returns the folder.
pub fn write_pair(sub: &str, names: (&str, &str), data: &[u8]) -> std::io::Result<PathBuf> {
    let dir = scratch_dir().join(sub);
    std::fs::create_dir_all(&dir)?;
    let (first, second) = split(data);
    std::fs::write(dir.join(names.0), first)?;
    std::fs::write(dir.join(names.1), second)?;
    Ok(dir)
}
