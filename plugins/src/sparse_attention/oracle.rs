//! The oracle selection, for evaluation only: a hook that reads, per key/value head, the
//! current block and the blocks holding the most true attention mass for this very token (its
//! post-RoPE queries against every post-RoPE key, softmax per query head, summed per block,
//! averaged over the group). No gate can choose better at the same budget, so its perplexity
//! says how much of a sparse run's loss is the budget's and how much the gate's. It keeps
//! every key of the sequence in its state and scores all of them each step: slower than
//! dense, never timed.

use models::hooks::{HookParams, HookPoints};
use models::{Hook, HookRow, HookState, KeyBlocks, LogitsWanted, ModelConfig};

use super::gate::{dot, rope};
use super::select::Budget;

/// The oracle for a model of this shape, reading blocks of `block` keys.
#[derive(Debug)]
pub struct Oracle {
    inv_freq: Vec<f32>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block: usize,
    layers: usize,
}

/// Every post-RoPE key of a sequence, per layer: `(positions, h, d)`.
#[derive(Debug, Clone)]
struct AllKeys {
    layers: Vec<Vec<f32>>,
    width: usize,
}

impl HookState for AllKeys {
    fn allocated_bytes(&self) -> usize {
        self.layers.iter().map(Vec::capacity).sum::<usize>() * 4
    }

    fn fork(&self) -> models::Result<Box<dyn HookState>> {
        Ok(Box::new(self.clone()))
    }

    fn truncate(&mut self, len: usize) -> models::Result<()> {
        for l in &mut self.layers {
            l.truncate(len * self.width);
        }
        Ok(())
    }
}

impl Oracle {
    pub fn new(config: &ModelConfig, block: usize) -> Self {
        Self {
            inv_freq: models::rope::inverse_frequencies(config),
            heads: config.num_heads,
            kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
            block,
            layers: config.num_layers,
        }
    }

    /// True attention mass per block for a query `q` `(n_heads, d)` after RoPE over `keys`,
    /// per key/value head: `(h, blocks)`.
    fn block_mass(&self, q: &[f32], keys: &[f32]) -> Vec<Vec<f32>> {
        let (d, h) = (self.head_dim, self.kv_heads);
        let t = keys.len() / (h * d);
        let group = self.heads / h;
        let scale = 1.0 / (d as f32).sqrt();
        let blocks = t.div_ceil(self.block);
        let mut mass = vec![vec![0f32; blocks]; h];
        let mut scores = vec![0f32; t];
        for head in 0..self.heads {
            let kv = head / group;
            let qh = &q[head * d..(head + 1) * d];
            for (j, s) in scores.iter_mut().enumerate() {
                *s = dot(qh, &keys[(j * h + kv) * d..][..d]) * scale;
            }
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let total: f32 = scores.iter().map(|s| (s - max).exp()).sum();
            for (j, s) in scores.iter().enumerate() {
                mass[kv][j / self.block] += (s - max).exp() / total / group as f32;
            }
        }
        mass
    }
}

impl Hook for Oracle {
    fn name(&self) -> &str {
        "oracle"
    }

    fn points(&self) -> HookPoints {
        HookPoints {
            attention: true,
            ..HookPoints::default()
        }
    }

    fn new_state(&self, _params: &HookParams) -> models::Result<Option<Box<dyn HookState>>> {
        Ok(Some(Box::new(AllKeys {
            layers: vec![Vec::new(); self.layers],
            width: self.kv_heads * self.head_dim,
        })))
    }

    fn attention_blocks(
        &self,
        layer: usize,
        row: &HookRow<'_>,
        q: &candle_core::Tensor,
        k: &candle_core::Tensor,
        _slots: usize,
    ) -> models::Result<Option<KeyBlocks>> {
        let d = self.head_dim;
        let mut keys = k.flatten_all()?.to_vec1::<f32>()?;
        for (i, token) in keys.chunks_exact_mut(self.kv_heads * d).enumerate() {
            for head in token.chunks_exact_mut(d) {
                rope(head, &self.inv_freq, row.start_position + i);
            }
        }
        let decoding = row.tokens.len() == 1 && row.logits != LogitsWanted::None;
        let mut query = match decoding {
            true => q.flatten_all()?.to_vec1::<f32>()?,
            false => Vec::new(),
        };
        for head in query.chunks_exact_mut(d) {
            rope(head, &self.inv_freq, row.start_position);
        }
        let budget = row.params.downcast_ref::<Budget>().copied();
        row.with_state("oracle", |s: &mut AllKeys| {
            s.layers[layer].extend_from_slice(&keys);
            let Some(Budget::Tokens(budget)) = budget.filter(|_| decoding) else {
                return None;
            };
            let current = row.start_position / self.block;
            let mass = self.block_mass(&query, &s.layers[layer]);
            let per_kv_head = mass
                .iter()
                .map(|m| {
                    super::select::select(
                        &m[..current],
                        current,
                        Budget::Tokens(budget),
                        self.block,
                        false,
                    )
                })
                .collect();
            Some(KeyBlocks {
                block_size: self.block,
                per_kv_head,
            })
        })
    }
}
