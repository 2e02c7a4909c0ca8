//! The plug-in trait every loaded plug-in implements, and a loaded plug-in's identity.

use std::fmt::Debug;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use models::hooks::HookParams;
use models::Hook;
use serde_json::{Map, Value};

use crate::base::BaseModel;
use crate::error::{PluginError, Result};
use crate::files::PluginFiles;
use crate::kinds::PluginKind;
use crate::panic::panic_message;

/// A loaded plug-in: the hook the forward pass calls, plus what the registry needs.
///
/// A plug-in is immutable once loaded. A request holds its plug-ins through the
/// [`models::HookCall`]s of its chain, so replacing or unloading one never changes a request
/// already running.
pub trait Plugin: Hook + Debug {
    fn kind(&self) -> PluginKind;

    /// Turns one request's parameters (the fields of its `plugins` entry besides `type` and
    /// `name`) into what this plug-in's hook reads for that request's rows. An unknown field
    /// or a value out of range is [`crate::PluginError::BadParameter`] naming it.
    fn request_params(&self, params: &Map<String, Value>) -> Result<HookParams>;

    /// Bytes of tensors the plug-in keeps resident (on the model's device).
    fn resident_bytes(&self) -> usize;

    /// The counters this plug-in keeps for `/metrics`, since it was loaded (an evicted and
    /// reloaded plug-in starts again from zero, which Prometheus reads as a counter reset).
    fn counters(&self) -> Vec<PluginCounter> {
        Vec::new()
    }
}

/// One counter of a plug-in: the metric, its labels besides the plug-in's `name`, its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginCounter {
    pub metric: &'static str,
    /// What the counter counts, for the metric's `# HELP` line.
    pub help: &'static str,
    pub labels: Vec<(&'static str, String)>,
    pub value: u64,
}

/// A plug-in and where it came from.
#[derive(Debug, Clone)]
pub struct LoadedPlugin {
    pub name: String,
    pub kind: PluginKind,
    /// The folder or file it was loaded from (absolute).
    pub path: PathBuf,
    /// `sha256:<hex>` over the bytes of every file the loader read, in a fixed order: two
    /// loads agree exactly when the plug-in's content does.
    pub hash: String,
    pub plugin: Arc<dyn Plugin>,
}

/// Loads a plug-in of `kind` from `path` (already resolved and confined), reading its files
/// through `files`, and checks it against the base model; the kind's row of
/// [`crate::kinds::KINDS`] names its loader. Nothing is returned unless the whole
/// file applies.
///
/// A loader that panics on a file it should have refused (a bug, but the file comes from
/// outside) is answered like any bad file: the panic never reaches the caller.
pub fn load(
    kind: PluginKind,
    name: &str,
    path: &Path,
    base: &BaseModel,
    mut files: PluginFiles,
) -> Result<LoadedPlugin> {
    let loaded =
        std::panic::catch_unwind(AssertUnwindSafe(|| kind.load(name, path, base, &mut files)));
    let plugin = loaded.unwrap_or_else(|panic| {
        let said = panic_message(panic.as_ref());
        Err(PluginError::bad_file(
            path,
            format!("the loader could not read it ({said})"),
        ))
    })?;
    Ok(LoadedPlugin {
        name: name.to_string(),
        kind,
        path: path.to_path_buf(),
        hash: files.finish(),
        plugin,
    })
}
