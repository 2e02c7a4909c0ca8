//! The one error type of plug-in loading and resolution. Each variant maps to one HTTP
//! status in the server's error table; messages name the plug-in, parameter or file at fault.

use std::path::PathBuf;

use crate::kinds::PluginKind;

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("unknown plug-in `{0}`")]
    NotFound(String),
    #[error("unknown plug-in type `{0}` (known: {known})", known = PluginKind::known())]
    UnknownType(String),
    #[error("plug-in `{name}` is a {actual}, not a {requested}")]
    WrongType {
        name: String,
        actual: PluginKind,
        requested: PluginKind,
    },
    #[error("plug-in `{plugin}`: parameter `{param}` {message}")]
    BadParameter {
        plugin: String,
        param: String,
        message: String,
    },
    #[error("`{0}` is built in: requests name it by type alone, and there is nothing to load")]
    BuiltIn(String),
    #[error("a `{0}` plug-in needs a `name`: the name it was loaded under")]
    NameRequired(PluginKind),
    #[error("invalid plug-in name `{name}`: {message}")]
    BadName { name: String, message: String },
    #[error("a plug-in named `{0}` is already loaded (unload it first, or set \"replace\": true)")]
    AlreadyLoaded(String),
    #[error("`{path}` cannot be used: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error("`{0}` does not exist")]
    Missing(PathBuf),
    #[error("plug-in `{name}` has unusable weights: {message}")]
    BadWeights { name: String, message: String },
    #[error("plug-in `{name}` does not fit the base model: {message}")]
    Incompatible { name: String, message: String },
    #[error("plug-in path `{path}` is outside the plug-in folder `{dir}`")]
    OutsideDir { path: PathBuf, dir: PathBuf },
    #[error(
        "no plug-in folder is configured (--plugin-dir), so plug-ins cannot be loaded from paths"
    )]
    NoPluginDir,
    #[error(
        "plug-in memory budget exhausted: `{name}` needs {needed} bytes, {free} of {budget} are \
         free and every other resident plug-in is in use"
    )]
    OverBudget {
        name: String,
        needed: usize,
        free: usize,
        budget: usize,
    },
    #[error(
        "plug-in `{name}` changed on disk since it was registered ({registered}, now {found}); \
         replace it explicitly to serve the new files"
    )]
    Changed {
        name: String,
        registered: String,
        found: String,
    },
    /// Built through `From`, which drops candle's backtrace.
    #[error("tensor operation failed while preparing a plug-in: {0}")]
    Tensor(candle_core::Error),
}

impl From<candle_core::Error> for PluginError {
    fn from(e: candle_core::Error) -> Self {
        Self::Tensor(models::error::without_backtrace(e))
    }
}

impl PluginError {
    pub(crate) fn bad_file(path: impl Into<PathBuf>, message: impl ToString) -> Self {
        Self::BadFile {
            path: path.into(),
            message: message.to_string(),
        }
    }

    pub(crate) fn incompatible(name: &str, message: impl ToString) -> Self {
        Self::Incompatible {
            name: name.to_string(),
            message: message.to_string(),
        }
    }
}

pub type Result<T, E = PluginError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candle_backtraces_never_reach_plugin_error_messages() {
        let e = candle_core::Error::WithBacktrace {
            inner: Box::new(candle_core::Error::Msg("boom".into())),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        assert_eq!(
            PluginError::from(e).to_string(),
            "tensor operation failed while preparing a plug-in: boom"
        );
    }
}
