//! Reading a plug-in's files: confined to the plug-in folder, regular files only, bounded in
//! size, and hashed in the order they are read.
//!
//! Every byte a plug-in loader reads goes through [`PluginFiles::read`]. For plug-ins the
//! registry loads (from the config or `POST /v1/plugins`), each file's canonical path must
//! lie inside the plug-in folder, so a folder inside it whose `config.json` is a symlink to
//! `/etc/passwd` is refused before anything is read (checking only the folder is not enough:
//! its files are opened by name). A FIFO or device would block or never end, so only regular
//! files are opened, and without blocking: opening a FIFO for reading waits for a writer
//! unless `O_NONBLOCK` is set. Sizes are bounded before reading, and the read itself stops at
//! the bound in case the file grows meanwhile.
//!
//! The trainers and `server eval` load files the operator names on the command line; they use
//! [`PluginFiles::unconfined`], which keeps every check but the folder.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{PluginError, Result};
use crate::paths::confine;

/// Largest JSON file (a plug-in's `config.json`) a loader reads.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Largest tensor file (safetensors, GGUF) a loader reads: far above any adapter for the
/// models graft serves, far below what would exhaust memory by accident.
pub const MAX_TENSOR_BYTES: u64 = 8 << 30;

/// What a file holds, which sets its size bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileRole {
    Config,
    Tensors,
}

impl FileRole {
    fn max_bytes(self) -> u64 {
        match self {
            Self::Config => MAX_CONFIG_BYTES,
            Self::Tensors => MAX_TENSOR_BYTES,
        }
    }
}

/// The files one plug-in load reads, and the SHA-256 of their bytes in reading order.
pub struct PluginFiles {
    /// The canonical plug-in folder every file must resolve inside; `None` for files the
    /// operator named directly.
    root: Option<PathBuf>,
    hash: Sha256,
}

impl PluginFiles {
    /// Files confined to `root`, which must be canonical (the registry canonicalizes its
    /// folder once, at start-up).
    pub fn confined_to(root: &Path) -> Self {
        Self {
            root: Some(root.to_path_buf()),
            hash: Sha256::default(),
        }
    }

    /// Files named by the operator (trainers, `server eval`, tests): every check but the
    /// folder.
    pub fn unconfined() -> Self {
        Self {
            root: None,
            hash: Sha256::default(),
        }
    }

    /// Reads one file and adds it to the hash. A path outside the folder, a file that is not
    /// a regular file, or one over `role`'s size bound is refused before its content is read.
    pub fn read(&mut self, path: &Path, role: FileRole) -> Result<Vec<u8>> {
        let resolved = match &self.root {
            Some(root) => confine(root, path)?,
            None => path.to_path_buf(),
        };
        let bytes = read_regular(&resolved, role.max_bytes())
            .map_err(|message| PluginError::bad_file(path, message))?;
        self.update(&bytes);
        Ok(bytes)
    }

    fn update(&mut self, bytes: &[u8]) {
        // Length-prefixed, so file boundaries count: (ab, c) and (a, bc) hash differently.
        self.hash.update((bytes.len() as u64).to_le_bytes());
        self.hash.update(bytes);
    }

    /// `sha256:<hex>` over every file read: two loads agree exactly when the plug-in's
    /// content does.
    pub fn finish(self) -> String {
        let digest = self.hash.finalize();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    }
}

/// The bytes of the regular file at `path`, at most `max_bytes` of them; the error is a
/// message for [`PluginError::BadFile`].
fn read_regular(path: &Path, max_bytes: u64) -> std::result::Result<Vec<u8>, String> {
    let file = open_without_blocking(path).map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file (plug-in files must be plain files)".into());
    }
    if meta.len() > max_bytes {
        return Err(too_large(meta.len(), max_bytes));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_large(bytes.len() as u64, max_bytes));
    }
    Ok(bytes)
}

fn too_large(len: u64, max_bytes: u64) -> String {
    format!("the file has {len} bytes, over the {max_bytes}-byte limit for plug-in files")
}

/// Opens for reading without following a final symlink (the path is canonical already, so a
/// symlink there now was swapped in after the check) and without waiting for a FIFO's writer.
#[cfg(unix)]
fn open_without_blocking(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)
}

#[cfg(not(unix))]
fn open_without_blocking(path: &Path) -> std::io::Result<File> {
    File::open(path)
}

/// Creates `dir` and writes `config` into `dir/config.json`, pretty-printed: how every
/// trainer-written plug-in folder starts (its tensors follow).
pub fn write_config(dir: &Path, config: &impl serde::Serialize) -> Result<()> {
    let io = |e: std::io::Error| PluginError::bad_file(dir, e);
    std::fs::create_dir_all(dir).map_err(io)?;
    let json = serde_json::to_vec_pretty(config).map_err(|e| PluginError::bad_file(dir, e))?;
    std::fs::write(dir.join("config.json"), json).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder() -> (tempfile::TempDir, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("plugins");
        std::fs::create_dir_all(dir.join("p")).unwrap();
        std::fs::write(root.path().join("secret.json"), b"{\"s3cr3t-content\": 1}").unwrap();
        let dir = dir.canonicalize().unwrap();
        (root, dir)
    }

    #[test]
    fn a_file_inside_the_folder_is_read_and_hashed() {
        let (_root, dir) = folder();
        std::fs::write(dir.join("p/config.json"), b"{}").unwrap();
        let mut files = PluginFiles::confined_to(&dir);
        let bytes = files.read(&dir.join("p/config.json"), FileRole::Config);
        assert_eq!(bytes.unwrap(), b"{}");
        let mut again = PluginFiles::unconfined();
        again
            .read(&dir.join("p/config.json"), FileRole::Config)
            .unwrap();
        assert_eq!(files.finish(), again.finish());
    }

    #[cfg(unix)]
    #[test]
    fn regression_a_file_symlinked_out_of_the_folder_is_refused() {
        let (root, dir) = folder();
        let link = dir.join("p/config.json");
        std::os::unix::fs::symlink(root.path().join("secret.json"), &link).unwrap();
        let err = PluginFiles::confined_to(&dir)
            .read(&link, FileRole::Config)
            .unwrap_err();
        assert!(matches!(err, PluginError::OutsideDir { .. }), "{err}");
        assert!(
            !err.to_string().contains("s3cr3t"),
            "echoes the target: {err}"
        );
        // A symlink to a file inside the folder is fine.
        std::fs::write(dir.join("p/real.json"), b"{}").unwrap();
        std::os::unix::fs::symlink(dir.join("p/real.json"), dir.join("p/alias.json")).unwrap();
        let mut files = PluginFiles::confined_to(&dir);
        assert!(files
            .read(&dir.join("p/alias.json"), FileRole::Config)
            .is_ok());
    }

    #[cfg(unix)]
    #[test]
    fn regression_a_fifo_is_refused_without_blocking() {
        let (_root, dir) = folder();
        let fifo = dir.join("p/adapter_model.safetensors");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo failed");
        // Without O_NONBLOCK this read waits forever for a writer.
        let err = PluginFiles::unconfined()
            .read(&fifo, FileRole::Tensors)
            .unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn a_device_is_refused() {
        let err = PluginFiles::unconfined()
            .read(Path::new("/dev/zero"), FileRole::Tensors)
            .unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    #[test]
    fn regression_reads_are_bounded_by_size() {
        let (_root, dir) = folder();
        let big = dir.join("p/config.json");
        std::fs::write(&big, vec![b' '; MAX_CONFIG_BYTES as usize + 1]).unwrap();
        let err = PluginFiles::confined_to(&dir)
            .read(&big, FileRole::Config)
            .unwrap_err();
        assert!(err.to_string().contains("byte limit"), "{err}");
        std::fs::write(&big, vec![b' '; MAX_CONFIG_BYTES as usize]).unwrap();
        assert!(PluginFiles::confined_to(&dir)
            .read(&big, FileRole::Config)
            .is_ok());
    }

    #[test]
    fn file_boundaries_change_the_hash() {
        let (_root, dir) = folder();
        let (a, b) = (dir.join("p/a"), dir.join("p/b"));
        let hash = |x: &[u8], y: &[u8]| {
            std::fs::write(&a, x).unwrap();
            std::fs::write(&b, y).unwrap();
            let mut files = PluginFiles::confined_to(&dir);
            files.read(&a, FileRole::Config).unwrap();
            files.read(&b, FileRole::Config).unwrap();
            files.finish()
        };
        assert_ne!(hash(b"ab", b"c"), hash(b"a", b"bc"));
    }
}
