//! The plug-in trait every loaded plug-in implements, and a loaded plug-in's identity.

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use models::hooks::HookParams;
use models::Hook;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::base::BaseModel;
use crate::controller::SteeringController;
use crate::error::{PluginError, Result};
use crate::kind::PluginKind;
use crate::lora::LoraAdapter;
use crate::steer::SteeringVector;

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

/// Loads a plug-in of `kind` from `path` (already resolved and confined) and checks it
/// against the base model. Nothing is returned unless the whole file applies.
pub fn load(kind: PluginKind, name: &str, path: &Path, base: &BaseModel) -> Result<LoadedPlugin> {
    let mut hash = ContentHash::default();
    let plugin: Arc<dyn Plugin> = match kind {
        PluginKind::Lora => Arc::new(LoraAdapter::load(name, path, base, &mut hash)?),
        PluginKind::Steer => Arc::new(SteeringVector::load(name, path, base, &mut hash)?),
        PluginKind::Controller => Arc::new(SteeringController::load(name, path, base, &mut hash)?),
    };
    Ok(LoadedPlugin {
        name: name.to_string(),
        kind,
        path: path.to_path_buf(),
        hash: hash.finish(),
        plugin,
    })
}

/// SHA-256 over the bytes a loader reads, fed in the order it reads them.
#[derive(Default)]
pub struct ContentHash(Sha256);

impl ContentHash {
    pub fn update(&mut self, bytes: &[u8]) {
        // Length-prefixed, so file boundaries count: (ab, c) and (a, bc) hash differently.
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    /// Reads a plug-in file and adds it to the hash; an unreadable file is a `BadFile` error
    /// naming it.
    pub fn read(&mut self, path: &Path) -> Result<Vec<u8>> {
        let bytes = std::fs::read(path).map_err(|e| PluginError::bad_file(path, e))?;
        self.update(&bytes);
        Ok(bytes)
    }

    pub fn finish(self) -> String {
        let digest = self.0.finalize();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    }
}
