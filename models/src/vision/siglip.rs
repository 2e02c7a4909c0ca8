//! SigLIP's vision transformer as Idefics3 uses it: non-overlapping patches embedded by a
//! strided convolution (here its equivalent matmul over flattened patches), learned position
//! embeddings, pre-norm encoder layers (multi-head self-attention over all patches, a GELU
//! MLP), and a final layer norm. Full-size images only: patch `i` takes position embedding `i`
//! (the bucketing of `Idefics3VisionEmbeddings` gives exactly that when no patch is padding).

use candle_core::{Module, Tensor, D};
use candle_nn::{LayerNorm, Linear};

use super::config::VisionConfig;
use crate::error::Result;
use crate::loader::SafetensorsSource;

const PREFIX: &str = "model.vision_model";

/// The encoder: `(images, channels, size, size)` pixels to `(images, patches, hidden)`.
pub struct SiglipEncoder {
    /// The convolution's kernel as `(hidden, channels * patch * patch)`, with its bias.
    patch_embedding: Linear,
    /// `(patches, hidden)`.
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    patch_size: usize,
    num_heads: usize,
}

struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl SiglipEncoder {
    pub fn load(source: &mut SafetensorsSource, config: &VisionConfig) -> Result<Self> {
        let (h, c, p) = (config.hidden_size, config.num_channels, config.patch_size);
        let patches = config.patches_per_side().pow(2);
        let name = |leaf: &str| format!("{PREFIX}.embeddings.{leaf}");
        let kernel = source.tensor(&name("patch_embedding.weight"), &[h, c, p, p])?;
        let bias = source.tensor(&name("patch_embedding.bias"), &[h])?;
        let patch_embedding = Linear::new(kernel.reshape((h, c * p * p))?, Some(bias));
        let position_embedding =
            source.tensor(&name("position_embedding.weight"), &[patches, h])?;
        let layers = (0..config.num_layers)
            .map(|i| EncoderLayer::load(source, config, &format!("{PREFIX}.encoder.layers.{i}")))
            .collect::<Result<Vec<_>>>()?;
        let post_layernorm = layer_norm(source, config, &format!("{PREFIX}.post_layernorm"))?;
        Ok(Self {
            patch_embedding,
            position_embedding,
            layers,
            post_layernorm,
            patch_size: p,
            num_heads: config.num_heads,
        })
    }

    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let mut x = self
            .patch_embedding
            .forward(&patches(pixels, self.patch_size)?)?
            .broadcast_add(&self.position_embedding)?;
        for layer in &self.layers {
            x = layer.forward(&x, self.num_heads)?;
        }
        Ok(self.post_layernorm.forward(&x)?)
    }
}

/// `(n, c, H, W)` pixels as `(n, patches, c * p * p)`: patches in row-major order, each
/// flattened channel-first as the convolution's kernel is.
fn patches(pixels: &Tensor, p: usize) -> Result<Tensor> {
    let (n, c, height, width) = pixels.dims4()?;
    let (rows, cols) = (height / p, width / p);
    Ok(pixels
        .reshape((n, c, rows, p, cols, p))?
        .permute((0, 2, 4, 1, 3, 5))?
        .contiguous()?
        .reshape((n, rows * cols, c * p * p))?)
}

impl EncoderLayer {
    fn load(source: &mut SafetensorsSource, config: &VisionConfig, name: &str) -> Result<Self> {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let mut linear = |leaf: &str, out: usize, inp: usize| -> Result<Linear> {
            let w = source.tensor(&format!("{name}.{leaf}.weight"), &[out, inp])?;
            let b = source.tensor(&format!("{name}.{leaf}.bias"), &[out])?;
            Ok(Linear::new(w, Some(b)))
        };
        let (q_proj, k_proj) = (
            linear("self_attn.q_proj", h, h)?,
            linear("self_attn.k_proj", h, h)?,
        );
        let (v_proj, out_proj) = (
            linear("self_attn.v_proj", h, h)?,
            linear("self_attn.out_proj", h, h)?,
        );
        let (fc1, fc2) = (linear("mlp.fc1", i, h)?, linear("mlp.fc2", h, i)?);
        Ok(Self {
            layer_norm1: layer_norm(source, config, &format!("{name}.layer_norm1"))?,
            q_proj,
            k_proj,
            v_proj,
            out_proj,
            layer_norm2: layer_norm(source, config, &format!("{name}.layer_norm2"))?,
            fc1,
            fc2,
        })
    }

    /// `x`: `(n, patches, hidden)`.
    fn forward(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
        let h = self.layer_norm1.forward(x)?;
        let x = (x + self.attention(&h, heads)?)?;
        let h = self.layer_norm2.forward(&x)?;
        // gelu_pytorch_tanh: candle's `gelu` is the same tanh approximation.
        let h = self.fc2.forward(&self.fc1.forward(&h)?.gelu()?)?;
        Ok((x + h)?)
    }

    /// Every patch attends to every patch of its image.
    fn attention(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
        let (n, len, hidden) = x.dims3()?;
        let d = hidden / heads;
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((n, len, heads, d))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split(self.q_proj.forward(x)?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let scores = (q.matmul(&k.transpose(2, 3)?.contiguous()?)? * (d as f64).powf(-0.5))?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((n, len, hidden))?;
        Ok(self.out_proj.forward(&out)?)
    }
}

fn layer_norm(
    source: &mut SafetensorsSource,
    config: &VisionConfig,
    name: &str,
) -> Result<LayerNorm> {
    let h = config.hidden_size;
    let w = source.tensor(&format!("{name}.weight"), &[h])?;
    let b = source.tensor(&format!("{name}.bias"), &[h])?;
    Ok(LayerNorm::new(w, b, config.layer_norm_eps))
}
