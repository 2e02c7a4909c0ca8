//! Helpers shared by tests that need the real default model.

use std::path::PathBuf;

/// The default model's GGUF for tests: `GRAFT_DEFAULT_MODEL_GGUF` when set, else the
/// library's own cached copy, fetched on first use ([`crate::default_model::path`]).
/// Returns `None` (the test prints why and passes vacuously) only when the developer sets
/// `GRAFT_SKIP_REAL_MODEL=1`; a failing fetch otherwise fails the test.
pub fn default_model_for_tests() -> Option<PathBuf> {
    if std::env::var("GRAFT_SKIP_REAL_MODEL").as_deref() == Ok("1") {
        eprintln!("GRAFT_SKIP_REAL_MODEL=1: skipping a real-model test");
        return None;
    }
    if let Ok(p) = std::env::var("GRAFT_DEFAULT_MODEL_GGUF") {
        return Some(PathBuf::from(p));
    }
    match crate::default_model::path() {
        Ok(p) => Some(p),
        Err(e) => panic!("the default model is needed for this test: {e}"),
    }
}
