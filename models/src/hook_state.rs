//! Per-sequence plug-in state: what a hook keeps for one sequence between forward steps.
//!
//! Plug-ins are immutable objects shared by every request that names them; what belongs to one
//! sequence (a memory decoder's own KV cache, a sparse-attention gate's compressed keys, an
//! early-exit predictor's recent exit layers, a pruner's kept-token indices) lives in a
//! [`HookState`] that the hook creates for that sequence ([`crate::Hook::new_state`]). The
//! states of a sequence's chain, one slot per chain entry, form its [`ChainState`], which the
//! sequence's [`crate::KvCache`] owns beside the keys and values. So the state
//!
//! - is created when the sequence starts (the engine attaches it at admission; otherwise
//!   [`crate::Llama::forward`] attaches it on the first step the hook runs for the row),
//! - is reached from the hook's calls for that row ([`crate::HookRow::state`]),
//! - is freed with the cache, however the sequence ends (finished, cancelled, failed),
//! - is copied when the cache is forked (the `n > 1` choices of one request),
//! - is cut back with the cache ([`crate::KvCache::truncate`], rejected speculative tokens),
//! - is counted in the cache's bytes, hence in the scheduler's KV claim, `--kv-budget-mib`
//!   and `vllm:kv_cache_usage_perc`,
//!
//! and it is never shared between sequences: forking copies it.
//!
//! Each slot sits behind a mutex because hooks get `&self` and their rows' states through
//! shared references (a hook may fan its rows out over threads); the forward pass is the only
//! user while a step runs, so the lock is never contended.

use std::any::Any;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::error::{ModelError, Result};
use crate::hooks::HookCall;

/// One hook's state for one sequence.
pub trait HookState: Any + Send + fmt::Debug {
    /// Bytes this state holds (tensors and buffers), counted as KV-cache memory.
    fn allocated_bytes(&self) -> usize;

    /// An independent copy for a forked sequence: later steps of either never touch the other.
    fn fork(&self) -> Result<Box<dyn HookState>>;

    /// Forgets everything about positions `len` and later, as if the sequence had only ever
    /// fed positions `0..len` (rejected speculative tokens). Memory may be kept.
    fn truncate(&mut self, len: usize) -> Result<()>;
}

/// One hook's state for this sequence. Hooks are told apart by identity (the address of the
/// shared hook object, which the sequence's chain keeps alive) and by which occurrence in
/// the chain they are, so the same plug-in twice in a chain keeps two states.
struct Entry {
    hook: usize,
    occurrence: usize,
    state: Option<Mutex<Box<dyn HookState>>>,
}

/// The plug-in states of one sequence: one entry per hook of every chain it ran with (a
/// sequence keeps one chain, but a caller may add a hook for some steps only, a drafter say).
#[derive(Default)]
pub struct ChainState {
    entries: Vec<Entry>,
}

impl fmt::Debug for ChainState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let held = self.entries.iter().filter(|e| e.state.is_some()).count();
        f.debug_struct("ChainState")
            .field("states", &held)
            .field("bytes", &self.allocated_bytes())
            .finish()
    }
}

/// The identity of chain entry `position`: its hook's address and how many times that hook
/// came before it in the chain.
fn identity(chain: &[HookCall], position: usize) -> Option<(usize, usize)> {
    let call = chain.get(position)?;
    let address = |c: &HookCall| Arc::as_ptr(&c.hook) as *const () as usize;
    let hook = address(call);
    let occurrence = chain[..position]
        .iter()
        .filter(|c| address(c) == hook)
        .count();
    Some((hook, occurrence))
}

impl ChainState {
    /// Asks every hook of `chain` that has no entry yet for its state for this sequence
    /// ([`crate::Hook::new_state`]); entries of earlier steps are kept as they are.
    pub fn attach(&mut self, chain: &[HookCall]) -> Result<()> {
        for (position, call) in chain.iter().enumerate() {
            let Some((hook, occurrence)) = identity(chain, position) else {
                continue;
            };
            if self.find(hook, occurrence).is_some() {
                continue;
            }
            let state = call.hook.new_state(&call.params)?.map(Mutex::new);
            self.entries.push(Entry {
                hook,
                occurrence,
                state,
            });
        }
        Ok(())
    }

    fn find(&self, hook: usize, occurrence: usize) -> Option<&Entry> {
        self.entries
            .iter()
            .find(|e| e.hook == hook && e.occurrence == occurrence)
    }

    /// The state of entry `position` of `chain`, if its hook keeps one.
    pub fn slot(&self, chain: &[HookCall], position: usize) -> Option<&Mutex<Box<dyn HookState>>> {
        let (hook, occurrence) = identity(chain, position)?;
        self.find(hook, occurrence)?.state.as_ref()
    }

    /// Whether any hook keeps state for this sequence.
    pub fn is_empty(&self) -> bool {
        self.entries.iter().all(|e| e.state.is_none())
    }

    /// Runs `f` on the first state of type `T` (for inspection by the engine and tests; hooks
    /// reach theirs through [`crate::HookRow::with_state`]).
    pub fn with<T: HookState, R>(&self, f: impl FnOnce(&mut T) -> R) -> Result<R> {
        let cell = self
            .entries
            .iter()
            .filter_map(|e| e.state.as_ref())
            .find(|cell| {
                let guard = lock(cell);
                let any: &dyn Any = guard.as_ref();
                any.is::<T>()
            });
        with_state(cell, "inspection", f)
    }

    pub fn allocated_bytes(&self) -> usize {
        self.states().map(|cell| lock(cell).allocated_bytes()).sum()
    }

    /// Copies every state (see [`HookState::fork`]).
    pub fn fork(&self) -> Result<Self> {
        let entries = self
            .entries
            .iter()
            .map(|e| {
                let state = match &e.state {
                    None => None,
                    Some(cell) => Some(Mutex::new(lock(cell).fork()?)),
                };
                Ok(Entry {
                    hook: e.hook,
                    occurrence: e.occurrence,
                    state,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { entries })
    }

    /// Cuts every state back to positions `0..len`.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        for cell in self.entries.iter_mut().filter_map(|e| e.state.as_mut()) {
            cell.get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .truncate(len)?;
        }
        Ok(())
    }

    fn states(&self) -> impl Iterator<Item = &Mutex<Box<dyn HookState>>> {
        self.entries.iter().filter_map(|e| e.state.as_ref())
    }
}

/// Locks a state, ignoring poisoning: a hook that panicked mid-step failed its batch, and the
/// sequences of a failed batch are dropped, so a poisoned state is never stepped again.
pub(crate) fn lock(cell: &Mutex<Box<dyn HookState>>) -> MutexGuard<'_, Box<dyn HookState>> {
    cell.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `f` on a row's state of type `T`: an error if the row has no state or one of another
/// type (a hook reading another hook's state is a bug, but must not crash the server).
pub(crate) fn with_state<T: HookState, R>(
    cell: Option<&Mutex<Box<dyn HookState>>>,
    hook: &str,
    f: impl FnOnce(&mut T) -> R,
) -> Result<R> {
    let cell = cell.ok_or_else(|| ModelError::Hook {
        hook: hook.to_string(),
        message: "the row has no state for this hook (its new_state returned None)".into(),
    })?;
    let mut guard = lock(cell);
    let any: &mut dyn Any = guard.as_mut();
    let state = any.downcast_mut::<T>().ok_or_else(|| ModelError::Hook {
        hook: hook.to_string(),
        message: "the row's state has another type than the hook asked for".into(),
    })?;
    Ok(f(state))
}
