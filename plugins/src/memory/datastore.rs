//! The kNN-LM datastore of a domain corpus (Khandelwal et al.; Memory Decoder §3.1): for every
//! position of the corpus, key = the base model's hidden state at the input of its last
//! block's MLP (after `post_attention_layernorm`, the reference's `model_layer_to_capture`),
//! value = the token that follows.
//!
//! Keys come from the serving decoder itself ([`Llama::forward`], quantized weights and all),
//! read by a hook on the last layer's gate projection, whose input is exactly that hidden
//! state; no logits are computed. Stored as `datastore.safetensors`: `keys` `(n, hidden)` f32
//! and `values` `(n,)` u32.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{Device, Tensor};
use models::{Hook, HookCall, HookGroup, HookPoints, Llama, ModelError, Projection};

use crate::train::{Progress, Result, TrainError};

pub const DATASTORE_FILE: &str = "datastore.safetensors";

/// Keys and values, row-major.
#[derive(Debug, Clone)]
pub struct Datastore {
    /// `(len, dim)`.
    pub keys: Vec<f32>,
    pub values: Vec<u32>,
    pub dim: usize,
}

/// What a memory with shared layers reads: the base's hidden state after its shared layers for
/// every token of every block, blocks one after another (`(Σ block lengths, hidden)`).
#[derive(Debug, Clone)]
pub struct SharedInputs {
    pub rows: Vec<f32>,
    pub dim: usize,
}

pub const INPUTS_FILE: &str = "inputs.safetensors";

impl Datastore {
    /// Runs `model` over `blocks` (`batch` blocks per step, each from position 0) and keeps a
    /// key for every block position that has a next token. With the blocks of
    /// [`super::corpus::Corpus::blocks`] key `i` is the stream's position `i`. With
    /// `shared_layers > 0` also keeps, for every token, the hidden state after base layer
    /// `shared_layers - 1`: the inputs of a memory that shares those layers.
    pub fn build(
        model: &Llama,
        blocks: &[(usize, &[u32])],
        batch: usize,
        shared_layers: usize,
        progress: &mut dyn Progress,
    ) -> Result<(Self, Option<SharedInputs>)> {
        let dim = model.config.hidden_size;
        let (mut keys, mut values, mut inputs) = (Vec::new(), Vec::new(), Vec::new());
        progress.phase("datastore", blocks.iter().map(|b| b.1.len()).sum());
        for group in blocks.chunks(batch.max(1)) {
            let group: Vec<&[u32]> = group.iter().map(|b| b.1).collect();
            let captured = capture(model, &group, shared_layers)?;
            for (block, (key, input)) in group.iter().zip(captured) {
                let n = block.len() - 1;
                keys.extend(key.narrow(0, 0, n)?.flatten_all()?.to_vec1::<f32>()?);
                values.extend_from_slice(&block[1..]);
                if let Some(x) = input {
                    inputs.extend(x.flatten_all()?.to_vec1::<f32>()?);
                }
                progress.advance(block.len());
            }
        }
        let shared = (shared_layers > 0).then_some(SharedInputs { rows: inputs, dim });
        Ok((Self { keys, values, dim }, shared))
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let keys = Tensor::from_slice(&self.keys, (self.len(), self.dim), &Device::Cpu)?;
        let values = Tensor::from_slice(&self.values, self.len(), &Device::Cpu)?;
        let tensors = HashMap::from([("keys".to_string(), keys), ("values".into(), values)]);
        candle_core::safetensors::save(&tensors, path)?;
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Self> {
        let bad = |m: String| TrainError::BadOption(format!("{}: {m}", path.display()));
        let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)?;
        let mut take = |name: &str| {
            tensors
                .remove(name)
                .ok_or_else(|| bad(format!("no `{name}` tensor")))
        };
        let (keys, values) = (take("keys")?, take("values")?);
        let (n, dim) = keys.dims2()?;
        if values.dims1()? != n {
            return Err(bad(format!("{n} keys but {} values", values.dims1()?)));
        }
        Ok(Self {
            keys: keys.flatten_all()?.to_vec1()?,
            values: values.to_vec1()?,
            dim,
        })
    }
}

/// The hidden state at the input of the last block's MLP for every token of every block, each
/// block run from position 0 on a fresh cache, and with `shared_layers > 0` the hidden state
/// after base layer `shared_layers - 1`: one `(block len, hidden)` tensor (or two) per block.
pub fn capture(
    model: &Llama,
    blocks: &[&[u32]],
    shared_layers: usize,
) -> Result<Vec<(Tensor, Option<Tensor>)>> {
    let hook = Arc::new(Capture {
        mlp_layer: model.config.num_layers - 1,
        residual_layer: shared_layers.checked_sub(1),
        mlp_input: Mutex::new(None),
        residual: Mutex::new(None),
    });
    let hooks = [HookCall::bare(hook.clone())];
    crate::train::prefill(model, blocks, &hooks)?;
    let take =
        |cell: &Mutex<Option<Tensor>>| cell.lock().unwrap_or_else(PoisonError::into_inner).take();
    let keys = take(&hook.mlp_input)
        .ok_or_else(|| TrainError::BadOption("the forward pass gave no MLP inputs".into()))?;
    let residual = take(&hook.residual);
    if hook.residual_layer.is_some() && residual.is_none() {
        return Err(TrainError::BadOption(
            "the forward pass gave no hidden states".into(),
        ));
    }
    let mut out = Vec::with_capacity(blocks.len());
    let mut at = 0;
    for block in blocks {
        let part = |t: &Tensor| t.narrow(0, at, block.len());
        out.push((part(&keys)?, residual.as_ref().map(part).transpose()?));
        at += block.len();
    }
    Ok(out)
}

/// Keeps the input of the last layer's gate projection (`(group tokens, hidden)`, the
/// normalized hidden state the MLP reads) and, when asked, one layer's output.
struct Capture {
    mlp_layer: usize,
    residual_layer: Option<usize>,
    mlp_input: Mutex<Option<Tensor>>,
    residual: Mutex<Option<Tensor>>,
}

impl Hook for Capture {
    fn name(&self) -> &str {
        "datastore keys"
    }

    fn points(&self) -> HookPoints {
        HookPoints {
            linear: true,
            residual: self.residual_layer.is_some(),
            ..HookPoints::default()
        }
    }

    fn targets(&self, layer: usize, projection: Projection) -> bool {
        layer == self.mlp_layer && projection == Projection::Gate
    }

    fn linear_delta(
        &self,
        _layer: usize,
        _projection: Projection,
        _group: &HookGroup<'_>,
        x: &Tensor,
    ) -> models::Result<Option<Tensor>> {
        let x = x.copy().map_err(ModelError::from)?;
        *self
            .mlp_input
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(x);
        Ok(None)
    }

    fn residual(
        &self,
        layer: usize,
        _group: &HookGroup<'_>,
        h: &Tensor,
    ) -> models::Result<Option<Tensor>> {
        if Some(layer) == self.residual_layer {
            let h = h.copy().map_err(ModelError::from)?;
            *self.residual.lock().unwrap_or_else(PoisonError::into_inner) = Some(h);
        }
        Ok(None)
    }
}

impl SharedInputs {
    pub fn save(&self, path: &Path) -> Result<()> {
        let n = self.rows.len() / self.dim.max(1);
        let t = Tensor::from_slice(&self.rows, (n, self.dim), &Device::Cpu)?;
        candle_core::safetensors::save(&HashMap::from([("inputs".to_string(), t)]), path)?;
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Self> {
        let mut t = candle_core::safetensors::load(path, &Device::Cpu)?;
        let x = t.remove("inputs").ok_or_else(|| {
            TrainError::BadOption(format!("{}: no `inputs` tensor", path.display()))
        })?;
        let (_, dim) = x.dims2()?;
        Ok(Self {
            rows: x.flatten_all()?.to_vec1()?,
            dim,
        })
    }
}
