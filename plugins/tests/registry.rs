//! The registry on a tiny model: load, list, resolve and unload; names, types and parameters
//! checked; paths confined; resident memory kept under the budget by evicting idle adapters
//! least recently used first; running requests keep the version they resolved.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use models::tiny::{tiny_config, TinyModel};
use models::{Architecture, Projection};
use plugins::lora::tiny::TinyAdapter;
use plugins::lora::LoraParams;
use plugins::steer::ControlVector;
use plugins::{
    BaseModel, PluginError, PluginKind, PluginSpec, Registry, RegistryConfig, Source, KINDS,
};
use serde_json::json;

struct Fixture {
    dir: tempfile::TempDir,
    config: models::ModelConfig,
}

impl Fixture {
    fn new() -> Self {
        let tiny = TinyModel::random(tiny_config(Architecture::Llama), 1).unwrap();
        Self {
            dir: tempfile::tempdir().unwrap(),
            config: tiny.config,
        }
    }

    /// Writes an adapter (about 2.3 KB per rank at this size) named `name` in the folder.
    fn adapter(&self, name: &str, r: usize, seed: u64) -> PathBuf {
        let a = TinyAdapter::random(
            &self.config,
            r,
            2.0,
            &[Projection::Q, Projection::Down],
            seed,
        )
        .unwrap();
        let path = self.dir.path().join(name);
        a.write(&path).unwrap();
        PathBuf::from(name)
    }

    fn registry(&self, budget_bytes: usize) -> Registry {
        let base = BaseModel {
            id: "tiny-base".into(),
            config: self.config.clone(),
            device: Device::Cpu,
            tokenizer_hash: None,
            kv_dtype: models::KvDtype::F32,
        };
        let config = RegistryConfig {
            dir: Some(self.dir.path().to_path_buf()),
            budget_bytes,
        };
        Registry::new(base, config).unwrap()
    }
}

fn lora(name: &str) -> PluginSpec {
    PluginSpec::named(PluginKind::Lora, name)
}

fn load(r: &Registry, name: &str, path: &Path) -> Result<plugins::PluginInfo, PluginError> {
    r.load(PluginKind::Lora, name, path, Source::Api, false)
}

#[test]
fn load_list_resolve_unload() {
    let f = Fixture::new();
    let reg = f.registry(1 << 20);
    let info = load(&reg, "sql", &f.adapter("sql", 2, 1)).unwrap();
    assert!(info.hash.starts_with("sha256:") && info.resident && info.bytes > 0);
    assert_eq!(reg.list().len(), 1);

    let mut spec = lora("sql");
    spec.params.insert("scale".into(), json!(0.25));
    let chain = reg.resolve(&[spec]).unwrap();
    assert_eq!(chain.entries[0].hash, info.hash);
    assert_eq!(chain.calls[0].hook.name(), "sql");
    let params = chain.calls[0].params.downcast_ref::<LoraParams>().unwrap();
    assert_eq!(params.scale, 0.25);
    assert_eq!(reg.list()[0].in_use, 1, "the chain holds the adapter");

    reg.unload("sql").unwrap();
    assert!(reg.list().is_empty());
    assert!(matches!(
        reg.resolve(&[lora("sql")]),
        Err(PluginError::NotFound(_))
    ));
    assert_eq!(
        chain.calls[0].hook.name(),
        "sql",
        "a running request keeps its adapter"
    );
}

#[test]
fn the_same_files_hash_the_same_and_different_files_differently() {
    let f = Fixture::new();
    let reg = f.registry(1 << 20);
    let a = load(&reg, "a", &f.adapter("a", 2, 1)).unwrap();
    let b = load(&reg, "b", &f.adapter("b", 2, 1)).unwrap();
    let c = load(&reg, "c", &f.adapter("c", 2, 2)).unwrap();
    assert_eq!(a.hash, b.hash);
    assert_ne!(a.hash, c.hash);
}

#[test]
fn bad_requests_name_the_problem() {
    let f = Fixture::new();
    let reg = f.registry(1 << 20);
    load(&reg, "sql", &f.adapter("sql", 2, 1)).unwrap();
    let err = |spec: PluginSpec| reg.resolve(&[spec]).unwrap_err().to_string();

    assert!(err(lora("nope")).contains("unknown plug-in `nope`"));
    let steer = PluginSpec::named(PluginKind::Steer, "sql");
    assert!(err(steer).contains("`sql` is a lora, not a steer"));
    let mut s = lora("sql");
    s.params.insert("scale".into(), json!("big"));
    assert!(err(s).contains("`scale` must be a number"));
    let mut s = lora("sql");
    s.params.insert("layers".into(), json!([1, 2]));
    assert!(err(s).contains("`layers` is not a parameter"));
}

/// Loading goes through the kinds table: each kind's row reads its own format, so the same
/// files load as their kind and are refused by every other kind's loader.
#[test]
fn every_kind_loads_through_its_row_of_the_table() {
    let f = Fixture::new();
    let reg = f.registry(1 << 20);
    let lora_path = f.adapter("a", 2, 1);
    let steer_path = PathBuf::from("v.gguf");
    let hidden = f.config.hidden_size;
    ControlVector {
        model_hint: Some("llama".into()),
        directions: [(1, plugins::steer::unit(vec![1.0; hidden]))].into(),
    }
    .write(&f.dir.path().join(&steer_path))
    .unwrap();
    let files = [
        (PluginKind::Lora, &lora_path),
        (PluginKind::Steer, &steer_path),
    ];
    for (kind, path) in files {
        for row in &KINDS {
            let name = format!("{}-{}", kind.name(), row.name);
            let loaded = reg.load(row.kind, &name, path, Source::Api, false);
            if row.kind == kind {
                assert_eq!(loaded.unwrap().kind, kind, "{name}");
                assert_eq!(reg.kind_of(&name), Some(kind));
                assert_eq!(
                    reg.resolve(&[PluginSpec::named(kind, &name)])
                        .unwrap()
                        .entries[0]
                        .kind,
                    kind
                );
            } else if row.built_in.is_some() {
                let e = loaded.unwrap_err();
                assert!(matches!(e, PluginError::BuiltIn(_)), "{name}: {e}");
            } else {
                let e = loaded.unwrap_err();
                assert!(
                    matches!(e, PluginError::BadFile { .. } | PluginError::Missing(_)),
                    "{name}: {e}"
                );
            }
        }
    }
}

/// A built-in kind has no files: requests name it by type, its one instance serves them all
/// and nothing loads under its type.
#[test]
fn built_in_kinds_resolve_by_type_alone() {
    let f = Fixture::new();
    let reg = f.registry(1 << 20);
    for row in KINDS.iter().filter(|row| row.built_in.is_some()) {
        let by_type = PluginSpec::named(row.kind, "");
        let by_name = PluginSpec::named(row.kind, row.name);
        let chain = reg.resolve(&[by_type, by_name]).unwrap();
        for entry in &chain.entries {
            assert_eq!(
                (entry.kind, entry.name.as_str(), entry.hash.as_str()),
                (row.kind, row.name, "built-in")
            );
        }
        assert!(
            Arc::ptr_eq(&chain.calls[0].hook, &chain.calls[1].hook),
            "one instance"
        );
        let other = reg
            .resolve(&[PluginSpec::named(row.kind, "mine")])
            .unwrap_err();
        assert!(matches!(other, PluginError::BuiltIn(_)), "{other}");
        assert!(
            other
                .to_string()
                .contains(&format!("`{}` is built in", row.name)),
            "{other}"
        );
        assert!(
            reg.list().is_empty(),
            "built-ins are not registered plug-ins"
        );
    }
    let unnamed = reg
        .resolve(&[PluginSpec::named(PluginKind::Lora, "")])
        .unwrap_err();
    assert!(
        matches!(unnamed, PluginError::NameRequired(PluginKind::Lora)),
        "{unnamed}"
    );
}

#[test]
fn names_paths_and_duplicates_are_checked() {
    let f = Fixture::new();
    let reg = f.registry(1 << 20);
    let path = f.adapter("sql", 2, 1);
    for bad in [
        "",
        "a/b",
        "base::x",
        "tiny-base",
        "../x",
        "..",
        ".",
        ".hidden",
    ] {
        assert!(
            matches!(load(&reg, bad, &path), Err(PluginError::BadName { .. })),
            "{bad:?}"
        );
    }
    assert!(matches!(
        load(&reg, "x", Path::new("../../etc")),
        Err(PluginError::OutsideDir { .. })
    ));
    assert!(matches!(
        load(&reg, "x", Path::new("missing")),
        Err(PluginError::Missing(_))
    ));
    load(&reg, "sql", &path).unwrap();
    assert!(matches!(
        load(&reg, "sql", &path),
        Err(PluginError::AlreadyLoaded(_))
    ));

    let old = reg.resolve(&[lora("sql")]).unwrap();
    let new_path = f.adapter("sql2", 2, 9);
    let replaced = reg
        .load(PluginKind::Lora, "sql", &new_path, Source::Api, true)
        .unwrap();
    assert_ne!(old.entries[0].hash, replaced.hash);
    assert_eq!(
        reg.resolve(&[lora("sql")]).unwrap().entries[0].hash,
        replaced.hash
    );

    let no_dir = Registry::new(
        BaseModel {
            id: "b".into(),
            config: f.config.clone(),
            device: Device::Cpu,
            tokenizer_hash: None,
            kv_dtype: models::KvDtype::F32,
        },
        RegistryConfig {
            dir: None,
            budget_bytes: 1 << 20,
        },
    )
    .unwrap();
    assert!(matches!(
        load(&no_dir, "sql", &path),
        Err(PluginError::NoPluginDir)
    ));
}

#[test]
fn over_budget_evicts_the_least_recently_used_idle_adapter_and_reloads_it_on_demand() {
    let f = Fixture::new();
    let probe = f.registry(usize::MAX);
    let one = load(&probe, "p", &f.adapter("p", 2, 1)).unwrap().bytes;
    let reg = f.registry(2 * one);
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        load(&reg, name, &f.adapter(name, 2, i as u64)).unwrap();
        if *name == "b" {
            reg.resolve(&[lora("a")]).unwrap(); // a is now more recent than b
        }
    }
    let resident = |reg: &Registry| -> Vec<String> {
        reg.list()
            .into_iter()
            .filter(|p| p.resident)
            .map(|p| p.name)
            .collect()
    };
    assert_eq!(resident(&reg), ["a", "c"], "b was the least recently used");
    assert_eq!(reg.list().len(), 3, "evicted adapters stay registered");

    let held = reg.resolve(&[lora("b")]).unwrap(); // loads b again, evicting a
    assert_eq!(resident(&reg), ["b", "c"]);
    let held_c = reg.resolve(&[lora("c")]).unwrap();
    let err = reg.resolve(&[lora("a")]).unwrap_err();
    assert!(
        matches!(err, PluginError::OverBudget { .. }),
        "b and c are in use: {err}"
    );
    drop((held, held_c));
    reg.resolve(&[lora("a")]).unwrap();
    assert_eq!(reg.memory().0, 2 * one);
}

#[cfg(unix)]
#[test]
fn regression_files_symlinked_out_of_the_plugin_folder_are_refused() {
    let f = Fixture::new();
    let reg = f.registry(1 << 20);
    let outside = tempfile::tempdir().unwrap();
    let path = f.adapter("sql", 2, 1);
    // The folder is inside, its weights file points outside (a copy of a valid file, so
    // only the confinement can refuse it).
    let weights = f.dir.path().join("sql/adapter_model.safetensors");
    let target = outside.path().join("weights.safetensors");
    std::fs::rename(&weights, &target).unwrap();
    std::os::unix::fs::symlink(&target, &weights).unwrap();
    let err = load(&reg, "sql", &path).unwrap_err();
    assert!(matches!(err, PluginError::OutsideDir { .. }), "{err}");

    // A config symlinked to any readable file is not read, so nothing of it is echoed.
    let secret = outside.path().join("secret");
    std::fs::write(&secret, "{\"s3cr3t\": true}").unwrap();
    let p2 = f.adapter("ctl", 2, 2);
    let config = f.dir.path().join("ctl/adapter_config.json");
    std::fs::remove_file(&config).unwrap();
    std::os::unix::fs::symlink(&secret, &config).unwrap();
    let err = load(&reg, "ctl", &p2).unwrap_err();
    assert!(matches!(err, PluginError::OutsideDir { .. }), "{err}");
    assert!(!err.to_string().contains("s3cr3t"), "{err}");
}

#[cfg(unix)]
#[test]
fn regression_a_fifo_in_the_plugin_folder_is_refused_without_hanging() {
    let f = Fixture::new();
    let reg = f.registry(1 << 20);
    let path = f.adapter("sql", 2, 1);
    let weights = f.dir.path().join("sql/adapter_model.safetensors");
    std::fs::remove_file(&weights).unwrap();
    let made = std::process::Command::new("mkfifo").arg(&weights).status();
    assert!(made.is_ok_and(|s| s.success()), "mkfifo failed");
    let err = load(&reg, "sql", &path).unwrap_err();
    assert!(
        matches!(err, PluginError::BadFile { .. }) && err.to_string().contains("regular file"),
        "{err}"
    );
}

#[test]
fn regression_an_evicted_plugin_whose_files_changed_is_not_reloaded_under_its_name() {
    let f = Fixture::new();
    let probe = f.registry(usize::MAX);
    let one = load(&probe, "p", &f.adapter("p", 2, 1)).unwrap().bytes;
    let reg = f.registry(one);
    let a = f.adapter("a", 2, 1);
    let registered = load(&reg, "a", &a).unwrap().hash;
    load(&reg, "b", &f.adapter("b", 2, 2)).unwrap(); // evicts a
    f.adapter("a", 2, 7); // other weights, same folder
    let err = reg.resolve(&[lora("a")]).unwrap_err();
    match &err {
        PluginError::Changed {
            name,
            registered: r,
            found,
        } => {
            assert_eq!((name.as_str(), r), ("a", &registered));
            assert_ne!(found, &registered);
        }
        other => panic!("expected Changed, got {other}"),
    }
    // Only an explicit replace changes what the name serves.
    let replaced = reg
        .load(PluginKind::Lora, "a", &a, Source::Api, true)
        .unwrap();
    assert_eq!(
        reg.resolve(&[lora("a")]).unwrap().entries[0].hash,
        replaced.hash
    );
}
