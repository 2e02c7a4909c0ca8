//! Groups batch rows by the hooks in their chains, once per step and hook point.
//!
//! For chain position `p`, rows whose `p`-th hook is the same object form one group, so each
//! hook runs once per step for all its rows, and each row sees its hooks in its own chain
//! order. With no hooks in the batch every plan is empty and the forward pass does no hook
//! work at all.

use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::batch::RowInfo;
use crate::error::Result;
use crate::hooks::{Hook, HookGroup, HookPoints};

/// One hook and the rows it is called for.
pub(crate) struct PlannedGroup<'a> {
    pub hook: Arc<dyn Hook>,
    pub group: HookGroup<'a>,
    /// Active-row slots (indices into the entry layout) of the group's rows.
    pub slots: Vec<usize>,
    /// Indices of the group's entries in the stacked tensor; `None` when the group holds
    /// every entry in order, so the tensor is passed as is.
    pub index: Option<Tensor>,
    /// The same indices on the host, for [`PlannedGroup::replace`] (no device read-back).
    entries: Vec<u32>,
}

/// Builds the groups for one hook point. `active` lists batch rows in entry order and
/// `lengths[i]` is the number of entries (tokens or logit positions) of `active[i]`.
pub(crate) fn plan<'a>(
    rows: &[RowInfo<'a>],
    active: &[usize],
    lengths: &[usize],
    point: fn(&HookPoints) -> bool,
    device: &Device,
) -> Result<Vec<PlannedGroup<'a>>> {
    let depth = active
        .iter()
        .map(|&r| rows[r].hooks.len())
        .max()
        .unwrap_or(0);
    let mut groups: Vec<PlannedGroup<'a>> = Vec::new();
    for p in 0..depth {
        let first_new = groups.len();
        for (slot, &r) in active.iter().enumerate() {
            let row = rows[r];
            let Some(call) = row.hooks.get(p) else {
                continue;
            };
            if !point(&call.hook.points()) {
                continue;
            }
            let Some(hook_row) = row.hook_row(p) else {
                continue;
            };
            let existing = groups[first_new..]
                .iter_mut()
                .find(|g| Arc::ptr_eq(&g.hook, &call.hook));
            match existing {
                Some(g) => {
                    g.group.rows.push(hook_row);
                    g.group.lengths.push(lengths[slot]);
                    g.slots.push(slot);
                }
                None => groups.push(PlannedGroup {
                    hook: call.hook.clone(),
                    group: HookGroup {
                        rows: vec![hook_row],
                        lengths: vec![lengths[slot]],
                        step_rows: active.len(),
                    },
                    slots: vec![slot],
                    index: None,
                    entries: Vec::new(),
                }),
            }
        }
    }
    let offsets = prefix_sums(lengths);
    for g in groups.iter_mut() {
        let covers_all = g.slots.len() == active.len();
        if !covers_all {
            let idx: Vec<u32> = g
                .slots
                .iter()
                .flat_map(|&s| (offsets[s]..offsets[s] + lengths[s]).map(|i| i as u32))
                .collect();
            g.index = Some(Tensor::new(idx.as_slice(), device)?);
            g.entries = idx;
        }
    }
    Ok(groups)
}

fn prefix_sums(lengths: &[usize]) -> Vec<usize> {
    let mut acc = 0;
    lengths
        .iter()
        .map(|&l| {
            let o = acc;
            acc += l;
            o
        })
        .collect()
}

impl PlannedGroup<'_> {
    /// The group's entries of `x` (`(entries, d)`).
    pub fn gather(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match &self.index {
            None => x.clone(),
            Some(idx) => x.index_select(idx, 0)?,
        })
    }

    /// `y` with the group's entries increased by `delta`.
    pub fn add(&self, y: &Tensor, delta: &Tensor) -> Result<Tensor> {
        Ok(match &self.index {
            None => (y + delta)?,
            Some(idx) => y.index_add(idx, delta, 0)?,
        })
    }

    /// `x` with the group's entries replaced by `new`, exactly: every entry is copied from
    /// either `x` or `new` (adding `new - old` would round, so a row's result would depend on
    /// whether its group held every row of the step).
    pub fn replace(&self, x: &Tensor, new: &Tensor) -> Result<Tensor> {
        if self.index.is_none() {
            return Ok(new.clone());
        }
        let n = x.dim(0)?;
        // Entry i of the result is row source[i] of [x; new].
        let mut source: Vec<u32> = (0..n as u32).collect();
        for (j, &i) in self.entries.iter().enumerate() {
            source[i as usize] = (n + j) as u32;
        }
        let source = Tensor::new(source.as_slice(), x.device())?;
        Ok(Tensor::cat(&[x, new], 0)?.index_select(&source, 0)?)
    }
}
