//! The plug-in registry: loaded plug-ins by name, checked against the base model, with
//! paths confined to the plug-in folder and resident memory under a budget.
//!
//! A registered plug-in is a name, a type and a path; its tensors are resident or not. When
//! loading one would exceed the budget, the least recently used resident plug-ins that no
//! request holds are evicted (their registration stays, and the next request that names
//! them loads them again, as LoRAX does). A plug-in a running request holds is never
//! evicted, so the budget can be exhausted: that request gets [`PluginError::OverBudget`]
//! (a 503 to retry) rather than an unbounded memory use.
//!
//! One mutex guards the table: every operation is a few map look-ups, and decisions that
//! read and change several entries (eviction) must be atomic. File reads and tensor loads run
//! outside it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use models::{Hook, HookCall};
use serde::Serialize;

use crate::base::BaseModel;
use crate::chain::{Chain, ChainEntry};
use crate::error::{PluginError, Result};
use crate::files::PluginFiles;
use crate::kinds::{PluginKind, KINDS};
use crate::paths::confine;
use crate::plugin::{self, LoadedPlugin, Plugin, PluginCounter};
use crate::spec::PluginSpec;

/// The registry's limits.
/// The hash a built-in plug-in reports in a response's chain echo: it has no files.
pub const BUILT_IN: &str = "built-in";

#[derive(Debug, Clone, Default)]
pub struct RegistryConfig {
    /// The folder plug-in paths must lie under; `None` refuses every path.
    pub dir: Option<PathBuf>,
    /// Resident plug-in memory the registry may hold, in bytes.
    pub budget_bytes: usize,
}

/// How a plug-in got registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Config,
    Api,
}

/// One registered plug-in as `GET /v1/plugins` lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PluginInfo {
    #[serde(rename = "type")]
    pub kind: PluginKind,
    pub name: String,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub path: PathBuf,
    pub hash: String,
    pub source: Source,
    /// Whether its tensors are in memory now.
    pub resident: bool,
    pub bytes: usize,
    /// Requests holding it right now.
    pub in_use: usize,
}

struct Entry {
    kind: PluginKind,
    path: PathBuf,
    source: Source,
    hash: String,
    bytes: usize,
    resident: Option<Arc<dyn Plugin>>,
    last_used: u64,
}

impl Entry {
    /// Requests holding the resident plug-in (the registry's own reference excluded).
    fn in_use(&self) -> usize {
        self.resident
            .as_ref()
            .map_or(0, |p| Arc::strong_count(p).saturating_sub(1))
    }

    fn info(&self, name: &str) -> PluginInfo {
        PluginInfo {
            kind: self.kind,
            name: name.to_string(),
            path: self.path.clone(),
            hash: self.hash.clone(),
            source: self.source,
            resident: self.resident.is_some(),
            bytes: self.bytes,
            in_use: self.in_use(),
        }
    }
}

#[derive(Default)]
struct State {
    entries: BTreeMap<String, Entry>,
    /// Ticks on every use; orders entries for eviction.
    clock: u64,
}

pub struct Registry {
    base: BaseModel,
    dir: Option<PathBuf>,
    budget: usize,
    state: Mutex<State>,
    /// One instance per built-in kind (no files, never evicted), made at start.
    built_ins: BTreeMap<PluginKind, Arc<dyn Plugin>>,
}

impl Registry {
    /// A registry for `base`; the plug-in folder must exist.
    pub fn new(base: BaseModel, config: RegistryConfig) -> Result<Self> {
        let dir = match config.dir {
            None => None,
            Some(d) => Some(d.canonicalize().map_err(|e| PluginError::bad_file(&d, e))?),
        };
        Ok(Self {
            base,
            dir,
            budget: config.budget_bytes,
            state: Mutex::new(State::default()),
            built_ins: KINDS
                .iter()
                .filter_map(|row| Some((row.kind, (row.built_in?)())))
                .collect(),
        })
    }

    pub fn base(&self) -> &BaseModel {
        &self.base
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The table stays consistent across a panic elsewhere (every change is one insert or
        // remove), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Loads `path` as plug-in `name` and registers it. With `replace`, an existing plug-in
    /// of that name is replaced (requests already running keep the old one).
    pub fn load(
        &self,
        kind: PluginKind,
        name: &str,
        path: &Path,
        source: Source,
        replace: bool,
    ) -> Result<PluginInfo> {
        self.check_name(name)?;
        let dir = self.dir.as_ref().ok_or(PluginError::NoPluginDir)?;
        let path = confine(dir, path)?;
        if !replace && self.lock().entries.contains_key(name) {
            return Err(PluginError::AlreadyLoaded(name.to_string()));
        }
        let loaded = plugin::load(kind, name, &path, &self.base, PluginFiles::confined_to(dir))?;
        let mut state = self.lock();
        if !replace && state.entries.contains_key(name) {
            return Err(PluginError::AlreadyLoaded(name.to_string()));
        }
        self.make_room(&mut state, &loaded, Some(name))?;
        let entry = new_entry(loaded, source, &mut state.clock);
        let info = entry.info(name);
        state.entries.insert(name.to_string(), entry);
        tracing::info!(plugin = name, %kind, hash = %info.hash, bytes = info.bytes, "plug-in loaded");
        Ok(info)
    }

    /// Unregisters `name`; requests already holding it finish with it.
    pub fn unload(&self, name: &str) -> Result<PluginInfo> {
        let entry = self
            .lock()
            .entries
            .remove(name)
            .ok_or_else(|| PluginError::NotFound(name.to_string()))?;
        tracing::info!(plugin = name, "plug-in unloaded");
        Ok(entry.info(name))
    }

    pub fn list(&self) -> Vec<PluginInfo> {
        let state = self.lock();
        state.entries.iter().map(|(n, e)| e.info(n)).collect()
    }

    /// Every resident plug-in's counters, with its name.
    pub fn counters(&self) -> Vec<(String, PluginCounter)> {
        let state = self.lock();
        let resident = state
            .entries
            .iter()
            .filter_map(|(n, e)| Some((n, e.resident.as_ref()?)));
        resident
            .flat_map(|(n, p)| p.counters().into_iter().map(move |c| (n.clone(), c)))
            .collect()
    }

    /// The type of a registered plug-in.
    pub fn kind_of(&self, name: &str) -> Option<PluginKind> {
        self.lock().entries.get(name).map(|e| e.kind)
    }

    /// Resident plug-in bytes and the budget.
    pub fn memory(&self) -> (usize, usize) {
        let state = self.lock();
        (resident_bytes(&state), self.budget)
    }

    /// Resolves a request's `plugins` list, in order, into hook calls and their echo. A
    /// built-in kind resolves to its one instance (a `name`, if given, must be the type's).
    pub fn resolve(&self, specs: &[PluginSpec]) -> Result<Chain> {
        let mut chain = Chain::default();
        for spec in specs {
            let kind = spec.kind;
            let (plugin, name, hash) = match self.built_ins.get(&kind) {
                Some(plugin) => (
                    plugin.clone(),
                    kind.name().to_string(),
                    BUILT_IN.to_string(),
                ),
                None if spec.name.is_empty() => return Err(PluginError::NameRequired(kind)),
                None => {
                    let (plugin, hash) = self.acquire(&spec.name, kind)?;
                    (plugin, spec.name.clone(), hash)
                }
            };
            if !spec.name.is_empty() && name != spec.name {
                return Err(PluginError::BuiltIn(kind.name().to_string()));
            }
            let params = plugin.request_params(&spec.params)?;
            chain.entries.push(ChainEntry { kind, name, hash });
            let hook: Arc<dyn Hook> = plugin;
            chain.calls.push(HookCall::new(hook, params));
        }
        Ok(chain)
    }

    /// The resident plug-in `name` (loading it again if it was evicted) and its hash.
    ///
    /// A plug-in loaded again must be the one registered: if its files changed on disk since,
    /// the load is refused ([`PluginError::Changed`]) rather than serving other weights under
    /// the same name; only an explicit replace changes what a name means.
    fn acquire(&self, name: &str, requested: PluginKind) -> Result<(Arc<dyn Plugin>, String)> {
        let (path, registered_hash) = {
            let mut state = self.lock();
            state.clock += 1;
            let clock = state.clock;
            let entry = state
                .entries
                .get_mut(name)
                .ok_or_else(|| PluginError::NotFound(name.to_string()))?;
            if entry.kind != requested {
                return Err(PluginError::WrongType {
                    name: name.to_string(),
                    actual: entry.kind,
                    requested,
                });
            }
            entry.last_used = clock;
            if let Some(p) = &entry.resident {
                return Ok((p.clone(), entry.hash.clone()));
            }
            (entry.path.clone(), entry.hash.clone())
        };
        let dir = self.dir.as_ref().ok_or(PluginError::NoPluginDir)?;
        let loaded = plugin::load(
            requested,
            name,
            &path,
            &self.base,
            PluginFiles::confined_to(dir),
        )?;
        let mut state = self.lock();
        let entry = state
            .entries
            .get(name)
            .filter(|e| e.path == path && e.kind == requested)
            .ok_or_else(|| PluginError::NotFound(name.to_string()))?;
        // Loaded by another request, or replaced, while this one read the files.
        if let Some(p) = &entry.resident {
            return Ok((p.clone(), entry.hash.clone()));
        }
        if loaded.hash != registered_hash {
            return Err(PluginError::Changed {
                name: name.to_string(),
                registered: registered_hash,
                found: loaded.hash,
            });
        }
        self.make_room(&mut state, &loaded, None)?;
        let plugin = loaded.plugin.clone();
        if let Some(e) = state.entries.get_mut(name) {
            (e.resident, e.bytes) = (Some(loaded.plugin), plugin.resident_bytes());
        }
        tracing::info!(plugin = name, "evicted plug-in loaded again");
        Ok((plugin, registered_hash))
    }

    /// Evicts idle resident plug-ins, least recently used first, until `new` fits. `replacing`
    /// names an entry about to be replaced, whose memory is freed by the replacement.
    fn make_room(
        &self,
        state: &mut State,
        new: &LoadedPlugin,
        replacing: Option<&str>,
    ) -> Result<()> {
        let needed = new.plugin.resident_bytes();
        let freed = replacing
            .and_then(|n| state.entries.get(n))
            .filter(|e| e.resident.is_some())
            .map_or(0, |e| e.bytes);
        loop {
            let used = resident_bytes(state) - freed;
            if used + needed <= self.budget {
                return Ok(());
            }
            let victim = state
                .entries
                .iter()
                .filter(|(n, e)| {
                    e.resident.is_some() && e.in_use() == 0 && Some(n.as_str()) != replacing
                })
                .min_by_key(|(_, e)| e.last_used)
                .map(|(n, _)| n.clone());
            let Some(victim) = victim else {
                return Err(PluginError::OverBudget {
                    name: new.name.clone(),
                    needed,
                    free: self.budget.saturating_sub(used),
                    budget: self.budget,
                });
            };
            if let Some(e) = state.entries.get_mut(&victim) {
                e.resident = None;
            }
            tracing::info!(plugin = %victim, "idle plug-in evicted to stay within the memory budget");
        }
    }

    /// Names are plain identifiers (path- and URL-safe, never `.` or `..`), and may not
    /// shadow the base model or look like a `base::adapter` model reference.
    fn check_name(&self, name: &str) -> Result<()> {
        let bad = |m: &str| {
            Err(PluginError::BadName {
                name: name.to_string(),
                message: m.to_string(),
            })
        };
        let ok_char = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
        let starts_plain = name.starts_with(|c: char| c.is_ascii_alphanumeric());
        if !starts_plain || name.len() > 128 || !name.chars().all(ok_char) {
            return bad(
                "use 1 to 128 characters among letters, digits, '.', '_' and '-', \
                 starting with a letter or digit",
            );
        }
        if name == self.base.id {
            return bad("it is the base model's name");
        }
        Ok(())
    }
}

fn new_entry(loaded: LoadedPlugin, source: Source, clock: &mut u64) -> Entry {
    *clock += 1;
    Entry {
        kind: loaded.kind,
        path: loaded.path,
        source,
        hash: loaded.hash,
        bytes: loaded.plugin.resident_bytes(),
        resident: Some(loaded.plugin),
        last_used: *clock,
    }
}

fn resident_bytes(state: &State) -> usize {
    state
        .entries
        .values()
        .filter(|e| e.resident.is_some())
        .map(|e| e.bytes)
        .sum()
}
