//! The work folder of a memory training run: the datastore, the kNN targets, the shared layers'
//! outputs, checkpoints and the loss log, kept so that an interrupted run resumes. The first
//! two stages take most of an hour at the default sizes; a run given the same folder reuses
//! them, and [`WorkFolder::open`] refuses a folder made with other settings, whose files would
//! silently mix two runs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::Value;

use super::corpus::Corpus;
use super::datastore::{Datastore, SharedInputs, DATASTORE_FILE, INPUTS_FILE};
use super::targets::{KnnTargets, TARGETS_FILE};
use crate::train::{Progress, TrainError};

type Result<T> = std::result::Result<T, TrainError>;

/// The settings a work folder was made with.
pub const RUN_FILE: &str = "run.json";

/// The settings the datastore (and the shared layers' outputs) depend on; a run that changes
/// only the others (the kNN search, the loss, the optimiser) may adopt another run's datastore.
pub const DATASTORE_SETTINGS: [&str; 5] = ["model", "corpus", "max_tokens", "block_len", "layers"];

/// How the kNN targets are made.
#[derive(Debug, Clone, Copy)]
pub struct KnnSpec {
    /// Tokens per datastore block.
    pub block_len: usize,
    /// Neighbours per position (the position itself excluded).
    pub k: usize,
    /// τ of p ∝ exp(-d² / τ).
    pub temperature: f32,
    /// Exact blocked search instead of an HNSW graph.
    pub exact: bool,
}

/// What building the targets took, when this run built them.
#[derive(Debug, Clone, Copy)]
pub struct BuildReport {
    pub keys: usize,
    /// False when the folder held the datastore already (only the targets were built).
    pub datastore_built: bool,
    pub datastore_seconds: f64,
    pub knn_seconds: f64,
    /// The HNSW graph's recall@k against exact search; `None` for exact search.
    pub recall: Option<f64>,
}

/// The training inputs the work folder holds or builds.
pub struct TrainingTargets {
    pub targets: KnnTargets,
    /// The base's residual stream below the memory's first layer, when it shares layers.
    pub inputs: Option<SharedInputs>,
    /// `None` when an earlier run's files were reused.
    pub built: Option<BuildReport>,
}

/// A run's work folder.
#[derive(Debug, Clone)]
pub struct WorkFolder {
    pub path: PathBuf,
    /// Whether an earlier run with the same settings made it.
    pub resumed: bool,
    settings: Value,
}

impl WorkFolder {
    /// Creates the folder and records `settings`, or checks them against the recorded ones.
    pub fn open(path: &Path, settings: &Value) -> Result<Self> {
        std::fs::create_dir_all(path).map_err(|e| TrainError::io(path, e))?;
        let file = path.join(RUN_FILE);
        let resumed = match std::fs::read_to_string(&file) {
            Ok(text) => {
                let recorded: Value = serde_json::from_str(&text).map_err(|e| {
                    TrainError::BadOption(format!("cannot parse {}: {e}", file.display()))
                })?;
                if &recorded != settings {
                    return Err(TrainError::BadOption(format!(
                        "the work folder {} holds a run with other settings ({text}); pass \
                         another --work-dir or delete it",
                        path.display()
                    )));
                }
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let text = serde_json::to_string_pretty(settings)
                    .map_err(|e| TrainError::BadOption(e.to_string()))?;
                std::fs::write(&file, text).map_err(|e| TrainError::io(&file, e))?;
                false
            }
            Err(e) => return Err(TrainError::io(&file, e)),
        };
        Ok(Self {
            path: path.to_path_buf(),
            resumed,
            settings: settings.clone(),
        })
    }

    /// Links (or copies) another work folder's datastore and shared-layer outputs into this
    /// one, after checking that it was made with the same [`DATASTORE_SETTINGS`]. Returns
    /// the files taken; none when this folder has its own.
    pub fn adopt_datastore(&self, other: &Path) -> Result<Vec<PathBuf>> {
        let file = other.join(RUN_FILE);
        let text = std::fs::read_to_string(&file).map_err(|e| TrainError::io(&file, e))?;
        let theirs: Value = serde_json::from_str(&text)
            .map_err(|e| TrainError::BadOption(format!("cannot parse {}: {e}", file.display())))?;
        if let Some(key) = DATASTORE_SETTINGS
            .iter()
            .find(|&&k| theirs.get(k) != self.settings.get(k))
        {
            return Err(TrainError::BadOption(format!(
                "{} was made with another `{key}` ({} against {}): its datastore does not fit",
                other.display(),
                theirs.get(key).unwrap_or(&Value::Null),
                self.settings.get(key).unwrap_or(&Value::Null)
            )));
        }
        let mut taken = Vec::new();
        for name in [DATASTORE_FILE, INPUTS_FILE] {
            let (from, to) = (other.join(name), self.path.join(name));
            if !from.exists() || to.exists() {
                continue;
            }
            if std::fs::hard_link(&from, &to).is_err() {
                std::fs::copy(&from, &to).map_err(|e| TrainError::io(&to, e))?;
            }
            taken.push(to);
        }
        Ok(taken)
    }

    /// The kNN targets (and the shared layers' outputs when the memory reads them), from this
    /// folder when an earlier run made them, else built and saved: the datastore over the
    /// corpus in `spec.block_len` blocks (unless the folder holds it already), then each key's
    /// neighbours.
    pub fn knn_targets(
        &self,
        model: &models::Llama,
        corpus: &Corpus,
        spec: KnnSpec,
        shared_layers: usize,
        progress: &mut dyn Progress,
    ) -> Result<TrainingTargets> {
        let targets_path = self.path.join(TARGETS_FILE);
        let inputs_path = self.path.join(INPUTS_FILE);
        let have_inputs = shared_layers == 0 || inputs_path.exists();
        if targets_path.exists() && have_inputs {
            let inputs = (shared_layers > 0)
                .then(|| SharedInputs::load(&inputs_path))
                .transpose()?;
            return Ok(TrainingTargets {
                targets: KnnTargets::load(&targets_path)?,
                inputs,
                built: None,
            });
        }
        let started = Instant::now();
        let store_path = self.path.join(DATASTORE_FILE);
        let datastore_built = !(store_path.exists() && have_inputs);
        let (store, inputs) = if !datastore_built {
            let inputs = (shared_layers > 0)
                .then(|| SharedInputs::load(&inputs_path))
                .transpose()?;
            (Datastore::load(&store_path)?, inputs)
        } else {
            let blocks = corpus.blocks(spec.block_len);
            let (store, inputs) = Datastore::build(model, &blocks, 1, shared_layers, progress)?;
            store.save(&store_path)?;
            if let Some(inputs) = &inputs {
                inputs.save(&inputs_path)?;
            }
            (store, inputs)
        };
        let datastore_seconds = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let (targets, recall) =
            KnnTargets::build(&store, spec.k, spec.temperature, spec.exact, progress)?;
        targets.save(&targets_path)?;
        let built = BuildReport {
            keys: store.len(),
            datastore_built,
            datastore_seconds,
            knn_seconds: started.elapsed().as_secs_f64(),
            recall,
        };
        Ok(TrainingTargets {
            targets,
            inputs,
            built: Some(built),
        })
    }
}

/// The base layers a memory is made of: `N` (the base's last N), `all`, or comma-separated
/// `a-b` ranges and single layers, each below `base_layers`.
pub fn parse_layers(spec: &str, base_layers: usize) -> Result<Vec<usize>> {
    let bad = |why: String| TrainError::BadOption(format!("--layers {spec}: {why}"));
    let spec = spec.trim();
    if spec == "all" {
        return Ok((0..base_layers).collect());
    }
    if let Ok(n) = spec.parse::<usize>() {
        if n == 0 || n > base_layers {
            return Err(bad(format!("the base has {base_layers} layers")));
        }
        return Ok((base_layers - n..base_layers).collect());
    }
    let layer = |s: &str| {
        s.trim()
            .parse::<usize>()
            .map_err(|_| bad(format!("`{s}` is not a layer number")))
    };
    let mut layers = Vec::new();
    for part in spec.split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (layer(a)?, layer(b)?),
            None => (layer(part)?, layer(part)?),
        };
        if a > b {
            return Err(bad(format!("range {part}: first is after last")));
        }
        layers.extend(a..=b);
    }
    if let Some(l) = layers.iter().find(|&&l| l >= base_layers) {
        return Err(bad(format!(
            "layer {l} does not exist (the base has {base_layers})"
        )));
    }
    Ok(layers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn layers_are_the_last_n_all_or_ranges() {
        assert_eq!(parse_layers("3", 30).unwrap(), vec![27, 28, 29]);
        assert_eq!(parse_layers("all", 3).unwrap(), vec![0, 1, 2]);
        assert_eq!(parse_layers("0-2, 7", 30).unwrap(), vec![0, 1, 2, 7]);
        for (spec, needle) in [
            ("0", "has 30 layers"),
            ("31", "has 30 layers"),
            ("5-2", "first is after last"),
            ("28-30", "layer 30 does not exist"),
            ("x", "`x` is not a layer number"),
        ] {
            let e = parse_layers(spec, 30).unwrap_err().to_string();
            assert!(e.contains(needle), "{spec}: {e}");
        }
    }

    #[test]
    fn a_work_folder_resumes_with_its_settings_and_refuses_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.work");
        let settings = json!({"k": 64, "lr": 1e-4});
        assert!(!WorkFolder::open(&path, &settings).unwrap().resumed);
        assert!(WorkFolder::open(&path, &settings).unwrap().resumed);
        let e = WorkFolder::open(&path, &json!({"k": 32, "lr": 1e-4})).unwrap_err();
        assert!(
            e.to_string().contains("holds a run with other settings"),
            "{e}"
        );
    }

    #[test]
    fn a_datastore_is_adopted_only_from_a_run_with_the_same_corpus_settings() {
        let dir = tempfile::tempdir().unwrap();
        let base = json!({"model": "m", "corpus": ["c"], "max_tokens": 10, "block_len": 4,
            "layers": "6", "knn_temperature": 16.0});
        let first = WorkFolder::open(&dir.path().join("a"), &base).unwrap();
        std::fs::write(first.path.join(DATASTORE_FILE), "keys").unwrap();
        let mut other_tau = base.clone();
        other_tau["knn_temperature"] = json!(4.0);
        let second = WorkFolder::open(&dir.path().join("b"), &other_tau).unwrap();
        let taken = second.adopt_datastore(&first.path).unwrap();
        assert_eq!(taken, vec![second.path.join(DATASTORE_FILE)]);
        assert_eq!(std::fs::read_to_string(&taken[0]).unwrap(), "keys");
        assert!(second.adopt_datastore(&first.path).unwrap().is_empty());

        let mut other_corpus = base;
        other_corpus["max_tokens"] = json!(20);
        let third = WorkFolder::open(&dir.path().join("c"), &other_corpus).unwrap();
        let e = third.adopt_datastore(&first.path).unwrap_err().to_string();
        assert!(e.contains("another `max_tokens` (10 against 20)"), "{e}");
    }
}
