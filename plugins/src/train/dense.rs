//! [`DenseLlama`]: the base model as plain f32 tensors with a full-sequence forward pass that
//! candle can differentiate, for training plug-ins offline.
//!
//! It follows the serving decoder (`models::llama`, itself transformers'
//! `modeling_llama.py`) operation for operation, and departs from it only where the serving
//! path has no gradient: every projection is a dense matrix (`Linear::dense_weight`, so a
//! quantized checkpoint trains against its dequantized weights), RMSNorm is written out
//! (`x * (mean(x^2) + eps)^-1/2 * w`; candle's fused `rms_norm` has no backward), RoPE is the
//! half-split `rotate_half` form on the serving model's own tables, and attention runs over a
//! right-padded batch `(b, t)` with an explicit causal mask instead of per-row KV caches
//! (right padding needs no other mask: a real token never attends to the padding after it).
//! Every operation used has a backward in candle 0.11 (`backprop.rs`): matmul, index_select,
//! narrow, cat, broadcast add/mul, exp, sqr, sqrt, recip, silu, max/sum reductions;
//! `candle_nn::ops::softmax` is built from those (not the fused `softmax_last_dim`). Frozen
//! projections are the exception: on the CPU they run through `frozen_matmul`, a custom op
//! whose backward gives only the activations a gradient (candle's own matmul backward also
//! computes the unused weight gradient, which made a default-model step 7x slower).
//!
//! LoRA deltas `s * (x A^T) B^T` are added to the targeted projections' outputs exactly where
//! the serving hook adds them ([`LoraFactors`]); the base weights are plain tensors, never
//! `Var`s, so gradients reach only the factors. Tests pin this forward to the serving one:
//! equal logits within 1e-4 with and without an adapter (`plugins/tests/train.rs`).

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor, Var, D};
use models::rope::Rope;
use models::{Llama, ModelConfig, Projection};

use super::{Batch, Result, TrainError};
use crate::lora::{slot, ALL_PROJECTIONS, SUPPORTED_MODULES};

/// A projection `y = x W^T (+ b)`, frozen unless its weight is a trained `Var`'s tensor.
#[derive(Debug, Clone)]
struct Dense {
    /// `(out, in)`, f32.
    weight: Tensor,
    /// `(out,)`: q/k/v of Qwen2.
    bias: Option<Tensor>,
    trainable: bool,
}

impl Dense {
    fn of(linear: &models::linear::Linear, device: &Device) -> Result<Self> {
        Ok(Self {
            weight: linear.dense_weight()?.to_device(device)?,
            bias: linear.bias().map(|b| b.to_device(device)).transpose()?,
            trainable: false,
        })
    }

    /// `x`: `(n, in)` -> `(n, out)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match self.trainable {
            true => x.matmul(&self.weight.t()?)?,
            false => frozen_matmul(x, &self.weight)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

#[derive(Debug, Clone)]
struct DenseLayer {
    input_norm: Tensor,
    post_attention_norm: Tensor,
    /// Indexed like [`ALL_PROJECTIONS`].
    projections: Vec<Dense>,
}

/// One adapted projection's factors: `A` `(r, in)` and `B` `(out, r)`, as PEFT stores them.
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub a: Tensor,
    pub b: Tensor,
}

/// The LoRA factors a forward pass adds: `s * (x A^T) B^T` on each adapted projection, with
/// one scaling `s` (`alpha / r`, or `alpha / sqrt(r)` with rsLoRA) for all of them. The
/// factors may be `Var`s (training) or plain tensors (a loaded adapter).
#[derive(Debug, Clone)]
pub struct LoraFactors {
    scaling: f64,
    /// Indexed by [`crate::lora::slot`].
    modules: Vec<Option<LoraPair>>,
}

impl LoraFactors {
    pub fn new(num_layers: usize, scaling: f64) -> Self {
        Self {
            scaling,
            modules: vec![None; num_layers * ALL_PROJECTIONS.len()],
        }
    }

    /// Adds (or replaces) the factors of one projection.
    pub fn insert(&mut self, layer: usize, projection: Projection, pair: LoraPair) -> Result<()> {
        let entry = slot(layer, projection).and_then(|s| self.modules.get_mut(s));
        match entry {
            Some(e) => {
                *e = Some(pair);
                Ok(())
            }
            None => Err(TrainError::BadOption(format!(
                "LoRA factors for layer {layer} {}: the model has {} layers and LoRA applies \
                 to {}",
                projection.hf_name(),
                self.modules.len() / ALL_PROJECTIONS.len(),
                SUPPORTED_MODULES.join(", ")
            ))),
        }
    }

    pub fn get(&self, layer: usize, projection: Projection) -> Option<&LoraPair> {
        slot(layer, projection).and_then(|s| self.modules.get(s)?.as_ref())
    }

    pub fn scaling(&self) -> f64 {
        self.scaling
    }

    /// Every adapted projection, in layer order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, Projection, &LoraPair)> {
        self.modules.iter().enumerate().filter_map(|(s, m)| {
            let pair = m.as_ref()?;
            Some((
                s / ALL_PROJECTIONS.len(),
                ALL_PROJECTIONS[s % ALL_PROJECTIONS.len()],
                pair,
            ))
        })
    }
}

/// The base model as dense f32 tensors, with a differentiable forward over padded batches.
#[derive(Debug, Clone)]
pub struct DenseLlama {
    pub config: ModelConfig,
    /// `(vocab, hidden)`.
    embed: Tensor,
    layers: Vec<DenseLayer>,
    norm: Tensor,
    /// `(vocab, hidden)`; the embedding itself when the model ties them.
    lm_head: Tensor,
    rope: Rope,
    device: Device,
}

/// What every layer of one forward pass shares.
struct Pass<'a> {
    b: usize,
    t: usize,
    /// `(t, head_dim / 2)` each.
    cos: Tensor,
    sin: Tensor,
    /// `(t, t)`: 0 on and below the diagonal, -inf above.
    mask: Tensor,
    /// `(b, 1, t, t)`: how much each query may read each key, multiplying its attention
    /// weights before they are renormalised; `None`: every key in full.
    key_keep: Option<Tensor>,
    lora: Option<&'a LoraFactors>,
}

impl DenseLlama {
    /// Dequantizes every weight of `model` to f32 on `device`; `max_positions` bounds the
    /// sequence length a forward pass accepts.
    pub fn from_llama(model: &Llama, max_positions: usize, device: &Device) -> Result<Self> {
        let cfg = model.config.clone();
        let layers = model
            .layers
            .iter()
            .map(|l| {
                let (a, m) = (&l.attn, &l.mlp);
                let projections = [&a.q, &a.k, &a.v, &a.o, &m.gate, &m.up, &m.down]
                    .into_iter()
                    .map(|lin| Dense::of(lin, device))
                    .collect::<Result<Vec<_>>>()?;
                Ok(DenseLayer {
                    input_norm: l.input_norm.to_device(device)?,
                    post_attention_norm: l.post_attention_norm.to_device(device)?,
                    projections,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed = model.embed_tokens.dense_weight()?.to_device(device)?;
        let lm_head = match cfg.tie_word_embeddings {
            true => embed.clone(),
            false => model.lm_head.dense_weight()?.to_device(device)?,
        };
        let max_positions = max_positions.min(cfg.max_position_embeddings);
        Ok(Self {
            rope: Rope::new(&cfg, max_positions, device)?,
            config: cfg,
            embed,
            layers,
            norm: model.norm.to_device(device)?,
            lm_head,
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A model made of base layers `base_layers` (in that order) of `model`, with the base's
    /// embeddings and LM head (frozen) and every layer weight and norm, and the final norm,
    /// trainable: returns it with its trainable parameters under their Hugging Face names (the
    /// new model's layer numbering). A memory decoder starts from this.
    pub fn trainable_subset(
        model: &Llama,
        base_layers: &[usize],
        max_positions: usize,
        device: &Device,
    ) -> Result<(Self, Vec<(String, Var)>)> {
        let mut dense = Self::from_llama(model, max_positions, device)?;
        let mut picked = Vec::with_capacity(base_layers.len());
        for &l in base_layers {
            let layer = dense.layers.get(l).cloned().ok_or_else(|| {
                TrainError::BadOption(format!(
                    "base layer {l} does not exist (the model has {})",
                    dense.layers.len()
                ))
            })?;
            picked.push(layer);
        }
        let mut vars = Vec::new();
        let mut train = |name: String, t: &mut Tensor| -> Result<()> {
            let var = Var::from_tensor(t)?;
            *t = var.as_tensor().clone();
            vars.push((name, var));
            Ok(())
        };
        for (i, layer) in picked.iter_mut().enumerate() {
            let prefix = format!("model.layers.{i}");
            train(
                format!("{prefix}.input_layernorm.weight"),
                &mut layer.input_norm,
            )?;
            let post = format!("{prefix}.post_attention_layernorm.weight");
            train(post, &mut layer.post_attention_norm)?;
            for (p, dense) in ALL_PROJECTIONS.iter().zip(layer.projections.iter_mut()) {
                let path = crate::lora::module_path(i, *p);
                train(format!("{path}.weight"), &mut dense.weight)?;
                if let Some(b) = dense.bias.as_mut() {
                    train(format!("{path}.bias"), b)?;
                }
                dense.trainable = true;
            }
        }
        train("model.norm.weight".into(), &mut dense.norm)?;
        dense.layers = picked;
        dense.config.num_layers = base_layers.len();
        Ok((dense, vars))
    }

    /// Every weight under its Hugging Face name, as a checkpoint holds them.
    pub fn named_weights(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![
            ("model.embed_tokens.weight".to_string(), self.embed.clone()),
            ("model.norm.weight".into(), self.norm.clone()),
        ];
        if !self.config.tie_word_embeddings {
            out.push(("lm_head.weight".into(), self.lm_head.clone()));
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let prefix = format!("model.layers.{i}");
            out.push((
                format!("{prefix}.input_layernorm.weight"),
                layer.input_norm.clone(),
            ));
            out.push((
                format!("{prefix}.post_attention_layernorm.weight"),
                layer.post_attention_norm.clone(),
            ));
            for (p, dense) in ALL_PROJECTIONS.iter().zip(&layer.projections) {
                let path = crate::lora::module_path(i, *p);
                out.push((format!("{path}.weight"), dense.weight.clone()));
                if let Some(b) = &dense.bias {
                    out.push((format!("{path}.bias"), b.clone()));
                }
            }
        }
        out
    }

    /// The longest sequence a forward pass accepts.
    pub fn max_positions(&self) -> usize {
        self.rope.max_positions()
    }

    /// Logits at every position: `ids` `(b, t)` u32 -> `(b, t, vocab)` f32.
    pub fn forward(&self, ids: &Tensor, lora: Option<&LoraFactors>) -> Result<Tensor> {
        let h = self.hidden(ids, lora)?;
        let (b, t, hidden) = h.dims3()?;
        let logits = self.head(&h.reshape((b * t, hidden))?)?; // (b * t, vocab)
        Ok(logits.reshape((b, t, self.config.vocab_size))?)
    }

    /// LM-head logits of final hidden states: `(n, hidden)` -> `(n, vocab)`.
    pub fn head(&self, h: &Tensor) -> Result<Tensor> {
        frozen_matmul(h, &self.lm_head)
    }

    /// Mean cross-entropy of the batch's target tokens (a scalar); prompt and padding
    /// positions never reach the LM head.
    pub fn completion_loss(&self, batch: &Batch, lora: Option<&LoraFactors>) -> Result<Tensor> {
        let h = self.hidden(&batch.ids, lora)?;
        let h = h.flatten_to(1)?.index_select(&batch.positions, 0)?; // (n, hidden)
        let logits = self.head(&h)?; // (n, vocab)
        Ok(candle_nn::loss::cross_entropy(&logits, &batch.targets)?)
    }

    /// Input embeddings of `ids` `(n,)` u32 -> `(n, hidden)`: what an image feature replaces.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.embed.index_select(ids, 0)?)
    }

    /// Hidden states after the final norm: `ids` `(b, t)` -> `(b, t, hidden)`.
    pub fn hidden(&self, ids: &Tensor, lora: Option<&LoraFactors>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let x = self.embed.index_select(&ids.flatten_all()?, 0)?; // (b * t, hidden)
        self.hidden_from(&x.reshape((b, t, self.config.hidden_size))?, lora)
    }

    /// [`Self::hidden`] from given inputs to layer 0 instead of token embeddings (a memory
    /// decoder reading the base's hidden states): `x` `(b, t, hidden)` -> `(b, t, hidden)`.
    pub fn hidden_from(&self, x: &Tensor, lora: Option<&LoraFactors>) -> Result<Tensor> {
        let x = self.run_layers(x, 0..self.layers.len(), None, lora)?;
        self.final_norm(&x)
    }

    /// The residual stream after `layers` (a range of layer indices) from the stream `x`
    /// `(b, t, hidden)` before the first of them -> `(b, t, hidden)`.
    ///
    /// `key_keep` `(b, t)`, in [0, 1]: how much every later token may read each token's keys
    /// in these layers (each query's attention weights are multiplied by it and renormalised;
    /// a token always reads itself). With 0s and 1s this is what pruning tokens after the
    /// layer before `layers` does at serving time, for every token that stays (LVPruning's
    /// training masks); in between, decisions stay differentiable.
    pub fn run_layers(
        &self,
        x: &Tensor,
        layers: std::ops::Range<usize>,
        key_keep: Option<&Tensor>,
        lora: Option<&LoraFactors>,
    ) -> Result<Tensor> {
        let (b, t, hidden) = x.dims3()?;
        if t > self.max_positions() {
            return Err(models::ModelError::ContextOverflow {
                position: t,
                context: self.max_positions(),
            }
            .into());
        }
        let positions = Tensor::arange(0u32, t as u32, &self.device)?;
        let (cos, sin) = self.rope.tables(&positions)?;
        let pass = Pass {
            b,
            t,
            cos,
            sin,
            mask: causal_mask(t, &self.device)?,
            key_keep: key_keep.map(|k| reads_of(k, t)).transpose()?,
            lora,
        };
        let mut x = x.reshape((b * t, hidden))?;
        for l in layers {
            let layer = self
                .layers
                .get(l)
                .ok_or_else(|| TrainError::BadOption(format!("the model has no layer {l}")))?;
            x = self.layer_forward(l, layer, &x, &pass)?;
        }
        Ok(x.reshape((b, t, hidden))?)
    }

    /// The final RMSNorm: `(b, t, hidden)` -> same shape.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(x, &self.norm, self.config.rms_norm_eps)
    }

    /// One pre-norm block: `x` `(b * t, hidden)` -> same shape.
    fn layer_forward(
        &self,
        l: usize,
        layer: &DenseLayer,
        x: &Tensor,
        pass: &Pass,
    ) -> Result<Tensor> {
        let eps = self.config.rms_norm_eps;
        let h = rms_norm(x, &layer.input_norm, eps)?;
        let attn = self.attention(l, layer, &h, pass)?;
        let x = (x + project(l, Projection::O, layer, &attn, pass.lora)?)?;
        let h = rms_norm(&x, &layer.post_attention_norm, eps)?;
        let gate = project(l, Projection::Gate, layer, &h, pass.lora)?;
        let up = project(l, Projection::Up, layer, &h, pass.lora)?;
        let act = (gate.silu()? * up)?; // (b * t, intermediate)
        Ok((&x + project(l, Projection::Down, layer, &act, pass.lora)?)?)
    }

    /// Causal grouped-query attention: `h` `(b * t, hidden)` -> `(b * t, heads * head_dim)`.
    fn attention(&self, l: usize, layer: &DenseLayer, h: &Tensor, pass: &Pass) -> Result<Tensor> {
        let cfg = &self.config;
        let (b, t, d) = (pass.b, pass.t, cfg.head_dim);
        let (nh, nkv) = (cfg.num_heads, cfg.num_kv_heads);
        let heads = |p: Projection, n: usize| -> Result<Tensor> {
            let y = project(l, p, layer, h, pass.lora)?;
            Ok(y.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()?) // (b, n, t, d)
        };
        let q = rotate(&heads(Projection::Q, nh)?, &pass.cos, &pass.sin)?;
        let k = rotate(&heads(Projection::K, nkv)?, &pass.cos, &pass.sin)?;
        let v = heads(Projection::V, nkv)?;
        // Query head i reads KV head i / group (HF `repeat_kv`): stacking a group's query
        // heads along the rows lets each KV head serve its whole group in one matmul.
        let g = nh / nkv;
        let q = q.reshape((b, nkv, g * t, d))?;
        let k_t = k.transpose(2, 3)?.contiguous()?; // (b, nkv, d, t)
        let scores = (q.matmul(&k_t)? * (1.0 / (d as f64).sqrt()))?; // (b, nkv, g * t, t)
        let scores = scores.reshape((b, nh, t, t))?.broadcast_add(&pass.mask)?;
        let mut probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        if let Some(reads) = &pass.key_keep {
            let kept = probs.broadcast_mul(reads)?;
            probs = kept.broadcast_div(&kept.sum_keepdim(D::Minus1)?)?;
        }
        let out = probs.reshape((b, nkv, g * t, t))?.matmul(&v)?; // (b, nkv, g * t, d)
        let out = out.reshape((b, nh, t, d))?.transpose(1, 2)?; // (b, t, nh, d)
        Ok(out.reshape((b * t, nh * d))?)
    }
}

/// A frozen projection plus the LoRA delta on it, if any: `x` `(n, in)` -> `(n, out)`.
fn project(
    l: usize,
    p: Projection,
    layer: &DenseLayer,
    x: &Tensor,
    lora: Option<&LoraFactors>,
) -> Result<Tensor> {
    let dense = slot(0, p)
        .and_then(|i| layer.projections.get(i))
        .ok_or_else(|| {
            TrainError::BadOption(format!("{} is not a layer projection", p.hf_name()))
        })?;
    let y = dense.forward(x)?;
    let Some((factors, pair)) = lora.and_then(|f| Some((f, f.get(l, p)?))) else {
        return Ok(y);
    };
    let delta = x.matmul(&pair.a.t()?)?.matmul(&pair.b.t()?)?; // (n, r) then (n, out)
    Ok((y + (delta * factors.scaling)?)?)
}

/// `x W^T` for a frozen `W` `(out, in)`: `x` `(n, in)` -> `(n, out)`.
///
/// candle's matmul backward computes the gradient of both operands whether or not anything
/// needs it, so a plain `x.matmul(W^T)` would compute (and allocate, and sum into a zeroed
/// buffer) a weight-sized gradient for every projection on every step: a third of a step's
/// matmul work, and on the default model over a GB of memory traffic, all thrown away. On the
/// CPU this op runs the same matmul forward and gives only `x` a gradient (`grad W`).
fn frozen_matmul(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return Ok(x.matmul(&weight.t()?)?);
    }
    Ok(x.contiguous()?.apply_op1(FrozenMatmul {
        weight: weight.clone(),
    })?)
}

struct FrozenMatmul {
    /// `(out, in)`, never a `Var`.
    weight: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("frozen-matmul needs a contiguous input".into())
        })?;
        let x = storage.as_slice::<f32>()?;
        // A copy of the input and of the output: small next to the matmul's n * in * out.
        let x = Tensor::from_slice(&x[start..end], layout.shape(), &Device::Cpu)?;
        let y = x.matmul(&self.weight.t()?)?; // (n, out)
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_y.matmul(&self.weight)?)) // (n, out) @ (out, in)
    }
}

/// `x * (mean(x^2) + eps)^-1/2 * w` over the last dimension.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let inv = x
        .sqr()?
        .mean_keepdim(D::Minus1)?
        .affine(1.0, eps as f64)?
        .sqrt()?
        .recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(w)?)
}

/// Half-split RoPE (`x * cos + rotate_half(x) * sin`): `x` `(b, heads, t, d)`, tables
/// `(t, d / 2)`.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let first = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let second = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Ok(Tensor::cat(&[first, second], D::Minus1)?)
}

/// `(b, 1, t, t)` weights of each query's reads from `keep` `(b, t)`: `keep[key]`, and 1 on
/// the diagonal.
fn reads_of(keep: &Tensor, t: usize) -> Result<Tensor> {
    let (b, _) = keep.dims2()?;
    let eye = Tensor::eye(t, keep.dtype(), keep.device())?; // (t, t)
    let keys = keep.unsqueeze(1)?.broadcast_as((b, t, t))?; // query rows, key columns
    let reads =
        (keys.broadcast_mul(&(1.0 - &eye)?)? + eye.unsqueeze(0)?.broadcast_as((b, t, t))?)?;
    Ok(reads.unsqueeze(1)?)
}

/// `(t, t)`: 0 where a query may attend (key position <= query position), -inf elsewhere.
fn causal_mask(t: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|q| (0..t).map(move |k| if k <= q { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Ok(Tensor::from_vec(mask, (t, t), device)?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn grid(rows: usize, cols: usize, k: f32) -> Tensor {
        let v: Vec<f32> = (0..rows * cols).map(|i| (i as f32 * k).sin()).collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    #[test]
    fn the_frozen_matmul_matches_a_plain_matmul_forward_and_backward() {
        let x = Var::from_tensor(&grid(5, 4, 0.7)).unwrap();
        let w = grid(3, 4, 1.3);
        let frozen = frozen_matmul(&x, &w).unwrap();
        let plain = x.matmul(&w.t().unwrap()).unwrap();
        let diff = |a: &Tensor, b: &Tensor| -> f32 {
            let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
            d.max(0).unwrap().to_scalar().unwrap()
        };
        assert!(diff(&frozen, &plain) < 1e-6);
        // A loss whose gradient differs per entry, so a transposed gradient would show.
        let weights = grid(5, 3, 0.31);
        let grad = |y: &Tensor| {
            let loss = (y.sqr().unwrap() * &weights).unwrap().sum_all().unwrap();
            loss.backward().unwrap().get(&x).unwrap().clone()
        };
        let (g_frozen, g_plain) = (grad(&frozen), grad(&plain));
        assert!(
            g_plain
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.1
        );
        assert!(diff(&g_frozen, &g_plain) < 1e-5, "{g_frozen} vs {g_plain}");
    }
}
