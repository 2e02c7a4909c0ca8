//! Confining plug-in paths to the plug-in folder.
//!
//! A path from a request or the config resolves against the folder when relative; it must
//! exist, and its canonical form (symlinks followed, `..` removed) must lie inside the
//! folder's canonical form. Checking the canonical form is what stops both `../` traversal
//! and a symlink inside the folder that points out of it.

use std::path::{Path, PathBuf};

use crate::error::{PluginError, Result};

/// The canonical path of `path` inside `dir` (`dir` itself canonical).
pub(crate) fn confine(dir: &Path, path: &Path) -> Result<PathBuf> {
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        dir.join(path)
    };
    let canonical = joined.canonicalize().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => PluginError::Missing(path.to_path_buf()),
        _ => PluginError::bad_file(&joined, e),
    })?;
    if !canonical.starts_with(dir) {
        return Err(PluginError::OutsideDir {
            path: path.to_path_buf(),
            dir: dir.to_path_buf(),
        });
    }
    Ok(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_absolute_traversal_and_symlink_escapes() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("plugins");
        std::fs::create_dir_all(dir.join("a")).unwrap();
        std::fs::create_dir_all(root.path().join("secret")).unwrap();
        let dir = dir.canonicalize().unwrap();

        assert_eq!(confine(&dir, Path::new("a")).unwrap(), dir.join("a"));
        assert_eq!(confine(&dir, &dir.join("a")).unwrap(), dir.join("a"));
        let escape = confine(&dir, Path::new("../secret")).unwrap_err();
        assert!(matches!(escape, PluginError::OutsideDir { .. }), "{escape}");
        let outside = confine(&dir, &root.path().join("secret")).unwrap_err();
        assert!(
            matches!(outside, PluginError::OutsideDir { .. }),
            "{outside}"
        );
        let missing = confine(&dir, Path::new("nope")).unwrap_err();
        assert!(matches!(missing, PluginError::Missing(_)), "{missing}");

        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(root.path().join("secret"), dir.join("link")).unwrap();
            let link = confine(&dir, Path::new("link")).unwrap_err();
            assert!(matches!(link, PluginError::OutsideDir { .. }), "{link}");
        }
    }
}
