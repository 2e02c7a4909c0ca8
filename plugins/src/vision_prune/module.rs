//! LVPruning's decision module: after the pruning layer, each image token asks the
//! instruction whether it is needed. The image tokens' hidden states are the queries of a
//! cross-attention whose keys and values are the instruction's hidden states; the image
//! token's own state plus what it read goes through an MLP to one keep logit.
//!
//! With [image][question] order the model's causal attention never lets an image token see
//! the question; the module is the look-ahead that makes the choice language-guided. Both
//! inputs are RMS-normalised without a learned scale first (the residual stream's scale grows
//! with depth and differs between models). Sizes follow the research notes' proposal for a
//! 576-wide model: inner width 256, 4 heads, about 0.6M weights.

use candle_core::{DType, Device, Tensor, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// The weights file beside `config.json`.
pub const WEIGHTS_FILE: &str = "decision.safetensors";

/// The module's size, recorded in `config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleShape {
    /// Width of the cross-attention and of the MLP.
    pub inner_size: usize,
    pub num_heads: usize,
}

impl Default for ModuleShape {
    fn default() -> Self {
        Self {
            inner_size: 256,
            num_heads: 4,
        }
    }
}

impl ModuleShape {
    /// Why this shape cannot be built, if it cannot.
    pub fn problem(&self) -> Option<String> {
        let (w, h) = (self.inner_size, self.num_heads);
        (w == 0 || h == 0 || w % h != 0)
            .then(|| format!("inner_size {w} must be a positive multiple of num_heads {h}"))
    }

    /// Every weight's name and shape for a model of width `hidden`, in a fixed order.
    pub fn weights(&self, hidden: usize) -> Vec<(&'static str, Vec<usize>)> {
        let w = self.inner_size;
        vec![
            ("query.weight", vec![w, hidden]),
            ("key.weight", vec![w, hidden]),
            ("value.weight", vec![w, hidden]),
            ("output.weight", vec![w, w]),
            ("input.weight", vec![w, hidden]),
            ("fc1.weight", vec![w, w]),
            ("fc1.bias", vec![w]),
            ("fc2.weight", vec![1, w]),
            ("fc2.bias", vec![1]),
        ]
    }

    /// Seeded initial weights: uniform within `1/sqrt(fan_in)` (PyTorch's default), biases 0
    /// except the keep logit's, which starts at `logit(keep)` so that the first sampled
    /// decisions keep about the target fraction.
    pub fn initial(
        &self,
        hidden: usize,
        keep: f32,
        seed: u64,
    ) -> candle_core::Result<Vec<(String, Tensor)>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        self.weights(hidden)
            .into_iter()
            .map(|(name, dims)| {
                let n: usize = dims.iter().product();
                let values: Vec<f32> = match name {
                    "fc2.bias" => vec![(keep / (1.0 - keep).max(1e-6)).ln()],
                    _ if name.ends_with(".bias") => vec![0.0; n],
                    _ => {
                        let bound = 1.0 / (dims[1] as f32).sqrt();
                        (0..n).map(|_| rng.random_range(-bound..bound)).collect()
                    }
                };
                Ok((
                    name.to_string(),
                    Tensor::from_vec(values, dims, &Device::Cpu)?,
                ))
            })
            .collect()
    }
}

/// A decision module's weights (f32), from a file or a trainer's variables.
#[derive(Debug, Clone)]
pub struct DecisionModule {
    shape: ModuleShape,
    weights: Vec<(String, Tensor)>,
}

impl DecisionModule {
    /// `weights` in [`ModuleShape::weights`]'s order and shapes (the caller checked them).
    pub fn new(shape: ModuleShape, weights: Vec<(String, Tensor)>) -> Self {
        Self { shape, weights }
    }

    pub fn shape(&self) -> ModuleShape {
        self.shape
    }

    pub fn weights(&self) -> &[(String, Tensor)] {
        &self.weights
    }

    fn get(&self, name: &str) -> candle_core::Result<&Tensor> {
        self.weights
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
            .ok_or_else(|| candle_core::Error::Msg(format!("decision module has no `{name}`")))
    }

    /// Keep logits of image tokens `image` `(v, hidden)` given the instruction `text`
    /// `(t, hidden)` (hidden states after the pruning layer, any float dtype): `(v,)` f32,
    /// higher is keep. With no instruction (`t` = 0) the image tokens are judged alone.
    pub fn logits(&self, image: &Tensor, text: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = self.get("query.weight")?.dtype();
        let image = unit_rms(&image.to_dtype(dtype)?)?;
        let mut z = linear(&image, self.get("input.weight")?)?; // (v, inner)
        if text.dim(0)? > 0 {
            let text = unit_rms(&text.to_dtype(dtype)?)?;
            let read = self.cross_attention(&image, &text)?;
            z = (z + linear(&read, self.get("output.weight")?)?)?;
        }
        let hidden = linear(&z, self.get("fc1.weight")?)?
            .broadcast_add(self.get("fc1.bias")?)?
            .silu()?;
        linear(&hidden, self.get("fc2.weight")?)?
            .broadcast_add(self.get("fc2.bias")?)?
            .squeeze(1)
    }

    /// [`Self::logits`] for one row's hidden states `h` `(t, hidden)`: its tokens at offsets
    /// `images` judged against those at `instruction`; `(v,)`.
    pub fn row_logits(
        &self,
        h: &Tensor,
        images: &[usize],
        instruction: &[usize],
    ) -> candle_core::Result<Tensor> {
        self.logits(&rows(h, images)?, &rows(h, instruction)?)
    }

    /// [`Self::row_logits`] indexed by offset over the row's first `len` tokens (`-inf` at
    /// every offset not in `images`), as `choose::keep_top` ranks them.
    pub fn scores(
        &self,
        h: &Tensor,
        len: usize,
        images: &[usize],
        instruction: &[usize],
    ) -> candle_core::Result<Vec<f32>> {
        let logits = self.row_logits(h, images, instruction)?.to_vec1::<f32>()?;
        let mut scores = vec![f32::NEG_INFINITY; len];
        for (&i, l) in images.iter().zip(logits) {
            scores[i] = l;
        }
        Ok(scores)
    }

    /// Multi-head attention from `image` `(v, hidden)` to `text` `(t, hidden)`:
    /// `(v, inner)`.
    fn cross_attention(&self, image: &Tensor, text: &Tensor) -> candle_core::Result<Tensor> {
        let (heads, width) = (self.shape.num_heads, self.shape.inner_size);
        let d = width / heads;
        let split = |x: Tensor| -> candle_core::Result<Tensor> {
            let n = x.dim(0)?;
            x.reshape((n, heads, d))?.transpose(0, 1)?.contiguous() // (heads, n, d)
        };
        let q = split(linear(image, self.get("query.weight")?)?)?;
        let k = split(linear(text, self.get("key.weight")?)?)?;
        let v = split(linear(text, self.get("value.weight")?)?)?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?; // (heads, v, t)
        let read = candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&v)?; // (heads, v, d)
        read.transpose(0, 1)?.reshape((image.dim(0)?, width))
    }

    /// The weights moved to `device`.
    pub fn to_device(&self, device: &Device) -> candle_core::Result<Self> {
        let weights = self
            .weights
            .iter()
            .map(|(n, t)| Ok((n.clone(), t.to_device(device)?.to_dtype(DType::F32)?)))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self::new(self.shape, weights))
    }
}

/// Rows `offsets` of `h` `(t, hidden)`.
fn rows(h: &Tensor, offsets: &[usize]) -> candle_core::Result<Tensor> {
    let index: Vec<u32> = offsets.iter().map(|&i| i as u32).collect();
    h.index_select(&Tensor::new(index, h.device())?, 0)
}

/// `x / sqrt(mean(x^2) + 1e-6)` over the last dimension.
fn unit_rms(x: &Tensor) -> candle_core::Result<Tensor> {
    let inv = x
        .sqr()?
        .mean_keepdim(D::Minus1)?
        .affine(1.0, 1e-6)?
        .sqrt()?
        .recip()?;
    x.broadcast_mul(&inv)
}

/// `x W^T`: `(n, in)` -> `(n, out)`.
fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.matmul(&w.t()?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn module(seed: u64) -> DecisionModule {
        let shape = ModuleShape {
            inner_size: 8,
            num_heads: 2,
        };
        DecisionModule::new(shape, shape.initial(12, 0.25, seed).unwrap())
    }

    fn states(n: usize, seed: u64) -> Tensor {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f32> = (0..n * 12).map(|_| rng.random_range(-3.0..3.0)).collect();
        Tensor::from_vec(v, (n, 12), &Device::Cpu).unwrap()
    }

    #[test]
    fn logits_start_near_the_target_and_depend_on_the_instruction() {
        let m = module(0);
        let (image, text) = (states(5, 1), states(3, 2));
        let logits = m.logits(&image, &text).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(logits.len(), 5);
        let other = m
            .logits(&image, &states(3, 3))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_ne!(
            logits, other,
            "another instruction must change the decisions"
        );
        let alone = m
            .logits(&image, &states(0, 0))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_ne!(logits, alone);
        // The bias starts at logit(0.25) = -1.1; the rest is a small random perturbation.
        let mean = logits.iter().sum::<f32>() / 5.0;
        assert!((mean + 1.1).abs() < 1.0, "mean logit {mean}");
    }

    #[test]
    fn each_image_token_is_judged_on_its_own() {
        let m = module(4);
        let (image, text) = (states(4, 5), states(3, 6));
        let all = m.logits(&image, &text).unwrap().to_vec1::<f32>().unwrap();
        for (i, whole) in all.iter().enumerate() {
            let one = m.logits(&image.narrow(0, i, 1).unwrap(), &text).unwrap();
            let one = one.to_vec1::<f32>().unwrap()[0];
            assert!((one - whole).abs() < 1e-5, "token {i}: {one} vs {whole}");
        }
    }

    #[test]
    fn shapes_that_cannot_split_into_heads_are_named() {
        let bad = ModuleShape {
            inner_size: 10,
            num_heads: 4,
        };
        assert!(bad.problem().unwrap().contains("multiple of num_heads 4"));
        assert_eq!(ModuleShape::default().problem(), None);
    }
}
