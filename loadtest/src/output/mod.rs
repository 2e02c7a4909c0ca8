//! Everything a run leaves behind: the table on stdout ([`table`]) and the files of `--out`
//! ([`write_dir`]: JSON, JSONL, CSV, metrics texts and the HTML report).

mod files;
pub mod table;

use std::path::{Path, PathBuf};

use crate::report;
use crate::run::RunReport;

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write JSON to {path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot write CSV to {path}: {source}")]
    Csv { path: PathBuf, source: csv::Error },
}

impl OutputError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        OutputError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    fn json(path: &Path, source: serde_json::Error) -> Self {
        OutputError::Json {
            path: path.to_path_buf(),
            source,
        }
    }

    fn csv(path: &Path, source: csv::Error) -> Self {
        OutputError::Csv {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Writes `summary.json`, `requests.jsonl`, `requests.csv`, `report.html` (and `metrics/`)
/// into `dir`, creating it.
pub fn write_dir(dir: &Path, report: &RunReport) -> Result<(), OutputError> {
    std::fs::create_dir_all(dir).map_err(|e| OutputError::io(dir, e))?;
    files::write_summary(dir, report)?;
    files::write_requests(dir, report)?;
    files::write_metrics(dir, report)?;
    let path = dir.join("report.html");
    std::fs::write(&path, report::html(report)).map_err(|e| OutputError::io(&path, e))
}
