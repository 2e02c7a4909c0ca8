//! The memory decoder's training targets: for every position of the corpus, the kNN-LM
//! distribution of its datastore key over the other keys (the reference's `saveKNNMulti.py`
//! with `--ignore_first`), stored sparsely as `(token, probability)` pairs.
//!
//! `targets.safetensors`: `ids` `(n, k)` u32 and `probs` `(n, k)` f32, most probable first,
//! padded with probability 0 where fewer than `k` distinct tokens were found.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::datastore::Datastore;
use super::knn::{distribution, recall, search, search_hnsw, HnswParams};
use crate::train::{Progress, Result, TrainError};

pub const TARGETS_FILE: &str = "targets.safetensors";

/// Sparse kNN distributions, one row of `k` entries per corpus position.
#[derive(Debug, Clone, PartialEq)]
pub struct KnnTargets {
    pub k: usize,
    pub ids: Vec<u32>,
    pub probs: Vec<f32>,
}

impl KnnTargets {
    /// Searches the datastore with its own keys (`k` neighbours each, itself excluded;
    /// through an HNSW graph unless `exact`) and turns each neighbourhood into its kNN
    /// distribution at temperature `tau`. Returns the targets and, for HNSW, its recall@k
    /// measured on 256 queries ([`super::knn::recall`]).
    pub fn build(
        store: &Datastore,
        k: usize,
        tau: f32,
        exact: bool,
        progress: &mut dyn Progress,
    ) -> Result<(Self, Option<f64>)> {
        let neighbours = match exact {
            true => search(store, &store.keys, k, Some(0), progress)?,
            false => search_hnsw(
                store,
                &store.keys,
                k,
                Some(0),
                HnswParams::default(),
                progress,
            )?,
        };
        let recall = match exact {
            true => None,
            false => Some(recall(store, &neighbours, 256)?),
        };
        let (mut ids, mut probs) = (Vec::new(), Vec::new());
        for found in &neighbours.per_query {
            let p = distribution(found, &store.values, tau);
            for i in 0..k {
                let (id, prob) = p.get(i).copied().unwrap_or((0, 0.0));
                ids.push(id);
                probs.push(prob);
            }
        }
        Ok((Self { k, ids, probs }, recall))
    }

    pub fn len(&self) -> usize {
        self.ids.len() / self.k.max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Rows `start..start + n` as tensors `(n, k)`: ids and probabilities.
    pub fn rows(&self, positions: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
        let k = self.k;
        let mut ids = Vec::with_capacity(positions.len() * k);
        let mut probs = Vec::with_capacity(positions.len() * k);
        for &p in positions {
            ids.extend_from_slice(&self.ids[p * k..(p + 1) * k]);
            probs.extend_from_slice(&self.probs[p * k..(p + 1) * k]);
        }
        let n = positions.len();
        Ok((
            Tensor::from_vec(ids, (n, k), device)?,
            Tensor::from_vec(probs, (n, k), device)?,
        ))
    }

    /// `Σ p log p` of a position's distribution (the constant that turns the training's
    /// cross-entropy term into the KL divergence it reports).
    pub fn neg_entropy(&self, position: usize) -> f32 {
        let k = self.k;
        self.probs[position * k..(position + 1) * k]
            .iter()
            .filter(|&&p| p > 0.0)
            .map(|&p| p * p.ln())
            .sum()
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let n = self.len();
        let tensors = HashMap::from([
            (
                "ids".to_string(),
                Tensor::from_slice(&self.ids, (n, self.k), &Device::Cpu)?,
            ),
            (
                "probs".into(),
                Tensor::from_slice(&self.probs, (n, self.k), &Device::Cpu)?,
            ),
        ]);
        candle_core::safetensors::save(&tensors, path)?;
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Self> {
        let bad = |m: String| TrainError::BadOption(format!("{}: {m}", path.display()));
        let mut t = candle_core::safetensors::load(path, &Device::Cpu)?;
        let ids = t
            .remove("ids")
            .ok_or_else(|| bad("no `ids` tensor".into()))?;
        let probs = t
            .remove("probs")
            .ok_or_else(|| bad("no `probs` tensor".into()))?;
        if ids.dims() != probs.dims() {
            return Err(bad("`ids` and `probs` differ in shape".into()));
        }
        let (_, k) = ids.dims2()?;
        Ok(Self {
            k,
            ids: ids.flatten_all()?.to_vec1()?,
            probs: probs.flatten_all()?.to_vec1()?,
        })
    }
}
