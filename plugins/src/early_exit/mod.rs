//! Speculative early exit (SpecEE, Xu et al. 2025): a decode token leaves the model at an
//! intermediate layer when a tiny per-layer predictor, fed that layer's logits of a few
//! candidate tokens, says the layer's top token is already the final one, and the layer's
//! top token, checked with the full LM head, is one of the candidates.
//!
//! Per decode step and row ([`EarlyExit`] as a [`Hook`]):
//! 1. `step_tokens`: the row's candidates for the next token ([`drafts::candidates`]:
//!    prompt lookup, then the trained successor table).
//! 2. `early_exit` after each layer from `min_layer - 1` on: features `[z, p, Δp]` of the
//!    candidates ([`predictor`]); at a scheduled layer (the file's offline layers plus
//!    `{e-2, e, e+2}` for the exit layers `e` of the row's last five tokens) the layer's
//!    predictor runs, and above `threshold` the hook answers [`Exit::IfTopIn`]: the model
//!    runs its LM head on that row and lets it leave when the top token is a candidate (those
//!    logits are the row's output, so an exit costs one LM head, like no exit). The skipped
//!    layers still get the token's keys and values from the exit hidden state, so later
//!    tokens attend over a complete cache.
//!
//! Prefill chunks and verification rows (several tokens) never exit. The output is the
//! model's own only where the exits agree with the full depth: this mode is lossy, measured by
//! `server eval early-exit` (agreement teacher-forced along the base's greedy output).
//!
//! Request: `{"type": "early_exit", "name": ..., "threshold": 0.5, "min_layer": 8}`.
//! Files: [`config`] (`config.json`) and `predictors.safetensors`, written by
//! `server train early-exit` ([`train`]).

pub mod config;
pub mod drafts;
pub mod eval;
pub mod generate;
pub mod predictor;
pub mod report;
pub mod state;
pub mod train;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Tensor};
use models::hooks::{HookParams, HookPoints};
use models::{Exit, Hook, HookGroup, HookRow, HookState, LogitsWanted, OutputHead, PrefixReuse};
use serde_json::{Map, Value};

pub use config::{EarlyExitConfig, CONFIG_FILE, TYPE, WEIGHTS_FILE};
use drafts::DraftTable;
use predictor::Predictor;
use state::{ExitState, StepScratch};

use crate::base::BaseModel;
use crate::error::{PluginError, Result};
use crate::files::{FileRole, PluginFiles};
use crate::kinds::PluginKind;
use crate::params;
use crate::plugin::{Plugin, PluginCounter};
use crate::weights;

/// What one request asked for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExitParams {
    /// Predictor probability above which a layer's top token is checked.
    pub threshold: f32,
    /// The first layer a token may leave after.
    pub min_layer: usize,
}

/// A loaded set of predictors; one [`Hook`] serving every request that selects it.
#[derive(Debug)]
pub struct EarlyExit {
    name: String,
    config: EarlyExitConfig,
    /// Indexed by layer; `None` where the file has no predictor.
    predictors: Vec<Option<Predictor>>,
    table: DraftTable,
    num_layers: usize,
    /// The final norm's weight and epsilon, read from the model at the first exit check.
    norm: OnceLock<(Vec<f32>, f64)>,
    counters: Counters,
}

/// What the hook has done since it was loaded, over every request.
#[derive(Debug, Default)]
struct Counters {
    /// Decode steps that could exit (single-token rows).
    decode_tokens: AtomicU64,
    /// Per layer: checks asked for ([`Exit::IfTopIn`]) and checks that failed.
    checks: Vec<AtomicU64>,
    failed: Vec<AtomicU64>,
}

/// A snapshot of [`EarlyExit::counts`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ExitCounts {
    pub decode_tokens: u64,
    /// Per layer: checks asked for.
    pub checks: Vec<u64>,
    /// Per layer: tokens that left there (checks that passed).
    pub exits: Vec<u64>,
}

impl ExitCounts {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &ExitCounts) -> ExitCounts {
        let minus = |a: &[u64], b: &[u64]| a.iter().zip(b).map(|(x, y)| x - y).collect();
        ExitCounts {
            decode_tokens: self.decode_tokens - earlier.decode_tokens,
            checks: minus(&self.checks, &earlier.checks),
            exits: minus(&self.exits, &earlier.exits),
        }
    }
}

impl EarlyExit {
    /// Loads `dir/config.json` and `dir/predictors.safetensors`, checked against the base.
    pub fn load(name: &str, dir: &Path, base: &BaseModel, files: &mut PluginFiles) -> Result<Self> {
        let config_path = dir.join(CONFIG_FILE);
        let config =
            EarlyExitConfig::read(&config_path, &files.read(&config_path, FileRole::Config)?)?;
        config.check(name, base)?;
        let path = dir.join(WEIGHTS_FILE);
        let bytes = files.read(&path, FileRole::Tensors)?;
        let tensors = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| PluginError::bad_file(&path, e))?;
        let (predictors, table) = read_tensors(name, &config, &tensors, base)?;
        Self::new(name, config, predictors, table, base)
    }

    /// A plug-in from its parts (what the trainer made), checked like a loaded one.
    pub fn new(
        name: &str,
        config: EarlyExitConfig,
        predictors: HashMap<usize, Predictor>,
        table: DraftTable,
        base: &BaseModel,
    ) -> Result<Self> {
        config.check(name, base)?;
        let bad = |m: String| Err(PluginError::incompatible(name, m));
        if table.k() != config.draft_tokens || table.vocab() != base.config.vocab_size {
            return bad(format!(
                "the draft table is {} x {}, expected {} x {}",
                table.vocab(),
                table.k(),
                base.config.vocab_size,
                config.draft_tokens
            ));
        }
        let num_layers = base.config.num_layers;
        let mut by_layer = vec![None; num_layers];
        for (&l, p) in &predictors {
            if !config.layers.contains(&l) {
                return bad(format!(
                    "a predictor for layer {l}, which layers does not list"
                ));
            }
            by_layer[l] = Some(p.clone());
        }
        if let Some(l) = config.layers.iter().find(|&&l| by_layer[l].is_none()) {
            return bad(format!("layer {l} has no predictor"));
        }
        Ok(Self {
            name: name.to_string(),
            config,
            predictors: by_layer,
            table,
            num_layers,
            norm: OnceLock::new(),
            counters: Counters {
                decode_tokens: AtomicU64::new(0),
                checks: (0..num_layers).map(|_| AtomicU64::new(0)).collect(),
                failed: (0..num_layers).map(|_| AtomicU64::new(0)).collect(),
            },
        })
    }

    pub fn config(&self) -> &EarlyExitConfig {
        &self.config
    }

    pub fn table(&self) -> &DraftTable {
        &self.table
    }

    pub fn predictor(&self, layer: usize) -> Option<&Predictor> {
        self.predictors.get(layer)?.as_ref()
    }

    /// Decode tokens seen, checks and exits per layer, since the plug-in was loaded.
    pub fn counts(&self) -> ExitCounts {
        let read = |v: &[AtomicU64]| v.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let (checks, failed): (Vec<u64>, Vec<u64>) =
            (read(&self.counters.checks), read(&self.counters.failed));
        ExitCounts {
            decode_tokens: self.counters.decode_tokens.load(Ordering::Relaxed),
            exits: checks.iter().zip(&failed).map(|(c, f)| c - f).collect(),
            checks,
        }
    }

    /// Writes `dir/config.json` and `dir/predictors.safetensors`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        crate::files::write_config(dir, &self.config)?;
        let mut tensors = HashMap::new();
        let cpu = Device::Cpu;
        for &l in &self.config.layers {
            let Some(p) = self.predictor(l) else { continue };
            let h = p.fc1_bias.len();
            let key = |part: &str| format!("layers.{l}.{part}");
            tensors.insert(
                key("fc1.weight"),
                Tensor::from_slice(&p.fc1_weight, (h, p.inputs), &cpu)?,
            );
            tensors.insert(key("fc1.bias"), Tensor::from_slice(&p.fc1_bias, h, &cpu)?);
            tensors.insert(
                key("fc2.weight"),
                Tensor::from_slice(&p.fc2_weight, (1, h), &cpu)?,
            );
            tensors.insert(key("fc2.bias"), Tensor::from_slice(&[p.fc2_bias], 1, &cpu)?);
        }
        let shape = (self.table.vocab(), self.table.k());
        tensors.insert(
            "draft_table".into(),
            Tensor::from_slice(self.table.rows(), shape, &cpu)?,
        );
        candle_core::safetensors::save(&tensors, dir.join(WEIGHTS_FILE))?;
        Ok(())
    }

    /// This row's parameters (the file's defaults for parameters another hook made, which
    /// never happens for a chain the registry resolved).
    fn params_of(&self, params: &HookParams) -> ExitParams {
        params
            .downcast_ref::<ExitParams>()
            .copied()
            .unwrap_or(ExitParams {
                threshold: self.config.threshold,
                min_layer: self.config.layers[0],
            })
    }

    /// Whether layer `l`'s predictor runs for a row whose last tokens left at `recent`.
    fn scheduled(&self, l: usize, recent: &std::collections::VecDeque<usize>) -> bool {
        state::scheduled(l, &self.config.offline_layers, recent)
    }

    /// Called for a row again in the step of its check: the check found its top token
    /// outside the candidates, and the row stayed.
    fn check_failed(&self, step: &mut StepScratch) {
        if let Some(layer) = step.checked_at.take() {
            self.counters.failed[layer].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The exit decision for one single-token row after layer `l`; `h` is its hidden state.
    fn decide(
        &self,
        l: usize,
        row: &HookRow<'_>,
        h: &Tensor,
        head: &OutputHead<'_>,
    ) -> models::Result<Exit> {
        let p = self.params_of(row.params);
        let last = self.config.layers[self.config.layers.len() - 1];
        if l > last {
            // The layer after the last check: the row is still here, so that check failed.
            row.with_state(&self.name, |s: &mut ExitState| {
                if let Some(step) = s.step.as_mut() {
                    self.check_failed(step);
                }
            })?;
            return Ok(Exit::Stay);
        }
        if l + 1 < p.min_layer {
            return Ok(Exit::Stay);
        }
        let norm = match self.norm.get() {
            Some(n) => n,
            None => {
                let n = head.norm_weight()?;
                self.norm.get_or_init(|| n)
            }
        };
        let need_rows = row.with_state(&self.name, |s: &mut ExitState| {
            s.step
                .as_ref()
                .filter(|st| st.rows.is_none())
                .map(|st| st.candidates.clone())
        })?;
        let fetched = need_rows.map(|c| head.token_rows(&c)).transpose()?;
        let x = h.flatten_all()?.to_vec1::<f32>()?;
        let x = predictor::rms_norm(&x, &norm.0, norm.1);
        row.with_state(&self.name, |s: &mut ExitState| {
            let scheduled = l >= p.min_layer && self.scheduled(l, &s.recent);
            let Some(step) = s.step.as_mut() else {
                return Exit::Stay;
            };
            self.check_failed(step);
            if let Some(rows) = fetched {
                step.rows = Some(rows);
            }
            let z = predictor::candidate_logits(step.rows.as_deref().unwrap_or(&[]), &x);
            let (features, probs) = predictor::features(&z, step.p_prev.as_deref());
            step.p_prev = Some(probs);
            match self.predictor(l).filter(|_| scheduled) {
                Some(pred)
                    if z.len() == self.config.draft_tokens
                        && pred.probability(&features) > p.threshold =>
                {
                    step.checked_at = Some(l);
                    self.counters.checks[l].fetch_add(1, Ordering::Relaxed);
                    Exit::IfTopIn(step.candidates.clone())
                }
                _ => Exit::Stay,
            }
        })
    }
}

/// The predictors and the draft table of `predictors.safetensors`, every tensor checked.
fn read_tensors(
    name: &str,
    config: &EarlyExitConfig,
    tensors: &safetensors::SafeTensors<'_>,
    base: &BaseModel,
) -> Result<(HashMap<usize, Predictor>, DraftTable)> {
    use candle_core::safetensors::Load;
    let cpu = Device::Cpu;
    let get = |tensor: &str, shape: &[usize], dtype: DType| -> Result<Tensor> {
        let view = tensors.tensor(tensor).map_err(|_| {
            PluginError::incompatible(
                name,
                format!("tensor `{tensor}` is missing from {WEIGHTS_FILE}"),
            )
        })?;
        let t = view.load(&cpu)?.to_dtype(dtype)?;
        if t.dims() != shape {
            return Err(PluginError::incompatible(
                name,
                format!(
                    "tensor `{tensor}` has shape {:?}, expected {shape:?}",
                    t.dims()
                ),
            ));
        }
        if dtype == DType::F32 {
            weights::check_tensor(name, &format!("tensor `{tensor}`"), &t)?;
        }
        Ok(t)
    };
    let (f, h) = (config.features(), config.hidden_units);
    let mut predictors = HashMap::new();
    for &l in &config.layers {
        let key = |part: &str| format!("layers.{l}.{part}");
        let vec = |t: Tensor| t.flatten_all()?.to_vec1::<f32>();
        predictors.insert(
            l,
            Predictor {
                inputs: f,
                fc1_weight: vec(get(&key("fc1.weight"), &[h, f], DType::F32)?)?,
                fc1_bias: vec(get(&key("fc1.bias"), &[h], DType::F32)?)?,
                fc2_weight: vec(get(&key("fc2.weight"), &[1, h], DType::F32)?)?,
                fc2_bias: vec(get(&key("fc2.bias"), &[1], DType::F32)?)?[0],
            },
        );
    }
    let vocab = base.config.vocab_size;
    let rows = get("draft_table", &[vocab, config.draft_tokens], DType::U32)?;
    let rows = rows.flatten_all()?.to_vec1::<u32>()?;
    if let Some(t) = rows.iter().find(|&&t| t as usize >= vocab) {
        return Err(PluginError::incompatible(
            name,
            format!("draft_table holds token {t}, outside the vocabulary of {vocab}"),
        ));
    }
    let table = DraftTable::from_rows(config.draft_tokens, rows)
        .ok_or_else(|| PluginError::incompatible(name, "draft_table is empty"))?;
    let known = |n: &str| {
        n == "draft_table"
            || config
                .layers
                .iter()
                .any(|l| n.starts_with(&format!("layers.{l}.")))
    };
    if let Some(extra) = tensors.names().into_iter().find(|n| !known(n)) {
        return Err(PluginError::incompatible(
            name,
            format!("unknown tensor `{extra}` in {WEIGHTS_FILE}"),
        ));
    }
    Ok((predictors, table))
}

impl Hook for EarlyExit {
    fn name(&self) -> &str {
        &self.name
    }

    fn points(&self) -> HookPoints {
        HookPoints {
            tokens: true,
            early_exit: true,
            ..HookPoints::default()
        }
    }

    /// Prompt positions only: prefill never exits, but a decode step that exits leaves keys
    /// and values propagated from an intermediate layer, which a prefill of the same tokens
    /// would not. The parameters change nothing a prompt leaves.
    fn prefix_reuse(&self, _params: &HookParams) -> PrefixReuse {
        PrefixReuse::PromptOnly(String::new())
    }

    fn new_state(&self, _params: &HookParams) -> models::Result<Option<Box<dyn HookState>>> {
        Ok(Some(Box::new(ExitState::default())))
    }

    fn state_bytes_per_token(&self, _params: &HookParams) -> usize {
        4
    }

    /// Keeps each row's tokens and, for a single-token (decode) row, opens the step with its
    /// candidates.
    fn step_tokens(&self, group: &HookGroup<'_>) -> models::Result<()> {
        for row in &group.rows {
            row.with_state(&self.name, |s: &mut ExitState| {
                s.settle(self.num_layers - 1);
                s.tokens.truncate(row.start_position);
                s.tokens.extend_from_slice(row.tokens);
                if row.tokens.len() == 1 {
                    self.counters.decode_tokens.fetch_add(1, Ordering::Relaxed);
                    s.step = Some(StepScratch {
                        candidates: drafts::candidates(
                            &s.tokens,
                            &self.table,
                            self.config.lookup_max,
                        ),
                        ..StepScratch::default()
                    });
                }
            })?;
        }
        Ok(())
    }

    fn early_exit(
        &self,
        layer: usize,
        group: &HookGroup<'_>,
        h: &Tensor,
        head: &OutputHead<'_>,
    ) -> models::Result<Option<Vec<Exit>>> {
        let first = self.config.layers[0].saturating_sub(1);
        let last = self.config.layers[self.config.layers.len() - 1] + 1;
        // A step only shrinks as rows leave, so a step too big to exit never opened a check.
        if layer < first || layer > last || group.step_rows > self.config.max_batch_rows {
            return Ok(None);
        }
        let mut exits = Vec::with_capacity(group.rows.len());
        let mut offset = 0;
        for (row, &len) in group.rows.iter().zip(&group.lengths) {
            // One token that wants its logits: a decode step (or a one-token last prompt chunk,
            // indistinguishable here); a middle prompt chunk of one token never leaves.
            let decoding = len == 1 && row.logits != LogitsWanted::None;
            exits.push(match decoding {
                true => self.decide(layer, row, &h.narrow(0, offset, 1)?, head)?,
                false => Exit::Stay,
            });
            offset += len;
        }
        Ok(Some(exits))
    }
}

impl Plugin for EarlyExit {
    fn kind(&self) -> PluginKind {
        PluginKind::EarlyExit
    }

    fn request_params(&self, p: &Map<String, Value>) -> Result<HookParams> {
        params::reject_unknown(&self.name, p, &["threshold", "min_layer"])?;
        let threshold = params::number(
            &self.name,
            p,
            "threshold",
            self.config.threshold,
            (0.0, 1.0),
        )?;
        if threshold == 0.0 {
            return Err(PluginError::BadParameter {
                plugin: self.name.clone(),
                param: "threshold".into(),
                message: "must be above 0".into(),
            });
        }
        let top = self.num_layers - 3;
        let min_layer =
            params::count(&self.name, p, "min_layer", (1, top))?.unwrap_or(self.config.layers[0]);
        Ok(Arc::new(ExitParams {
            threshold,
            min_layer,
        }))
    }

    /// `graft_early_exit_decode_tokens_total`, and per layer with a predictor
    /// `graft_early_exit_checks_total{layer}` and `graft_early_exit_tokens_total{layer}`.
    fn counters(&self) -> Vec<PluginCounter> {
        let c = self.counts();
        let mut out = vec![PluginCounter {
            metric: "graft_early_exit_decode_tokens_total",
            help: "Decode tokens that could leave early",
            labels: Vec::new(),
            value: c.decode_tokens,
        }];
        for &l in &self.config.layers {
            let layer = vec![("layer", l.to_string())];
            out.push(PluginCounter {
                metric: "graft_early_exit_checks_total",
                help: "LM-head checks of a layer's top token after its predictor fired",
                labels: layer.clone(),
                value: c.checks[l],
            });
            out.push(PluginCounter {
                metric: "graft_early_exit_tokens_total",
                help: "Decode tokens that left the model after this layer",
                labels: layer,
                value: c.exits[l],
            });
        }
        out
    }

    fn resident_bytes(&self) -> usize {
        let predictors: usize = self
            .predictors
            .iter()
            .flatten()
            .map(Predictor::parameters)
            .sum();
        (predictors + self.table.rows().len()) * 4
    }
}
