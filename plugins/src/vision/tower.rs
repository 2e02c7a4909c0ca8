//! A SigLIP vision encoder and Idefics3 connector with trainable weights: the same network as
//! `models::vision` serves (`SiglipEncoder`, `Connector`), written with operations that candle
//! can differentiate (the serving path uses candle's fused layer norm, which has no backward),
//! and saved under the Hugging Face Idefics3 names so that the server loads what training
//! wrote. A test pins the two forward passes together (`plugins/tests/vision.rs`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::train::{Result, TrainError};

const ENCODER: &str = "model.vision_model";
const CONNECTOR: &str = "model.connector.modality_projection.proj.weight";

/// The tower's sizes: the `vision_config` and `scale_factor` of the Idefics3 config it is
/// saved with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TowerShape {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub scale_factor: usize,
}

impl TowerShape {
    pub fn patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    /// Prompt tokens per image.
    pub fn tokens(&self) -> usize {
        self.patches() / self.scale_factor.pow(2)
    }

    /// The rules `models::vision::VisionConfig` checks when the server loads the tower.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(TrainError::BadOption(what));
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return bad(format!(
                "a width of {} does not split into {} heads",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.num_hidden_layers == 0 || self.intermediate_size == 0 {
            return bad("the tower needs at least one layer and a non-empty MLP".into());
        }
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return bad(format!(
                "a {}-pixel image is not a whole number of {}-pixel patches",
                self.image_size, self.patch_size
            ));
        }
        let side = self.image_size / self.patch_size;
        if self.scale_factor == 0 || !side.is_multiple_of(self.scale_factor) {
            return bad(format!(
                "{side} patches per side do not shuffle by a factor of {}",
                self.scale_factor
            ));
        }
        Ok(())
    }

    /// `vision_config` as `transformers`' `Idefics3VisionConfig` writes it.
    pub fn vision_config(&self) -> serde_json::Value {
        serde_json::json!({
            "model_type": "idefics3_vision",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_channels": 3,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": LAYER_NORM_EPS,
        })
    }
}

const LAYER_NORM_EPS: f64 = 1e-6;

/// The encoder and connector as named `Var`s.
pub struct TrainableTower {
    pub shape: TowerShape,
    text_hidden: usize,
    vars: Vec<(String, Var)>,
    index: HashMap<String, usize>,
}

impl TrainableTower {
    /// Fresh weights from `seed`: PyTorch's default initialisation (see `initial`).
    pub fn new(shape: TowerShape, text_hidden: usize, seed: u64) -> Result<Self> {
        shape.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let vars = names(&shape, text_hidden)
            .into_iter()
            .map(|(name, dims)| {
                let init = initial(&name, &dims, &mut rng)?;
                Ok((name, Var::from_tensor(&init)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::from_vars(shape, text_hidden, vars))
    }

    /// Weights saved by [`Self::save`] (to resume training).
    pub fn load(shape: TowerShape, text_hidden: usize, path: &Path) -> Result<Self> {
        shape.validate()?;
        let saved = candle_core::safetensors::load(path, &Device::Cpu)?;
        let vars = names(&shape, text_hidden)
            .into_iter()
            .map(|(name, dims)| {
                let t = saved.get(&name).ok_or_else(|| {
                    TrainError::BadOption(format!("{}: no tensor `{name}`", path.display()))
                })?;
                if t.dims() != dims.as_slice() {
                    return Err(TrainError::BadOption(format!(
                        "{}: `{name}` is {:?}, expected {dims:?}",
                        path.display(),
                        t.dims()
                    )));
                }
                Ok((name, Var::from_tensor(&t.to_dtype(DType::F32)?)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::from_vars(shape, text_hidden, vars))
    }

    fn from_vars(shape: TowerShape, text_hidden: usize, vars: Vec<(String, Var)>) -> Self {
        let index = vars
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
        Self {
            shape,
            text_hidden,
            vars,
            index,
        }
    }

    pub fn vars(&self) -> Vec<(String, Var)> {
        self.vars.clone()
    }

    /// Writes every weight to `path` (safetensors, f32, the Idefics3 names): a checkpoint.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.save_as(path, DType::F32)
    }

    /// Writes every weight to `path` as `dtype`.
    pub fn save_as(&self, path: &Path, dtype: DType) -> Result<()> {
        let tensors = self
            .vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().to_dtype(dtype)?)))
            .collect::<Result<HashMap<String, Tensor>>>()?;
        candle_core::safetensors::save(&tensors, path)?;
        Ok(())
    }

    /// Rounds every weight to f16 (and keeps it in f32): the served file holds f16 weights,
    /// half the size, and what is evaluated after this is exactly what is served.
    pub fn round_to_f16(&self) -> Result<()> {
        for (_, v) in &self.vars {
            v.set(&v.as_tensor().to_dtype(DType::F16)?.to_dtype(DType::F32)?)?;
        }
        Ok(())
    }

    fn get(&self, name: &str) -> Result<&Tensor> {
        self.index
            .get(name)
            .map(|&i| self.vars[i].1.as_tensor())
            .ok_or_else(|| TrainError::BadOption(format!("the tower has no weight `{name}`")))
    }

    /// `pixels` `(n, 3, size, size)` -> `(n, tokens, text_hidden)`: what the served tower
    /// computes, differentiably.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let x = self.encode(pixels)?;
        let shuffled = models::vision::connector::pixel_shuffle(&x, self.shape.scale_factor)?;
        linear(&shuffled, self.get(CONNECTOR)?, None)
    }

    /// The encoder alone: `(n, 3, size, size)` -> `(n, patches, hidden)`.
    pub fn encode(&self, pixels: &Tensor) -> Result<Tensor> {
        let s = self.shape;
        let (n, c, _, _) = pixels.dims4()?;
        let p = s.patch_size;
        let side = s.image_size / p;
        let patches = pixels
            .reshape((n, c, side, p, side, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((n, side * side, c * p * p))?;
        let e = |leaf: &str| self.get(&format!("{ENCODER}.embeddings.{leaf}"));
        let kernel = e("patch_embedding.weight")?.reshape((s.hidden_size, c * p * p))?;
        let mut x = linear(&patches, &kernel, Some(e("patch_embedding.bias")?))?
            .broadcast_add(e("position_embedding.weight")?)?;
        for l in 0..s.num_hidden_layers {
            x = self.layer(&x, &format!("{ENCODER}.encoder.layers.{l}"))?;
        }
        self.layer_norm(&x, &format!("{ENCODER}.post_layernorm"))
    }

    fn layer(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        let h = self.layer_norm(x, &format!("{name}.layer_norm1"))?;
        let x = (x + self.attention(&h, &format!("{name}.self_attn"))?)?;
        let h = self.layer_norm(&x, &format!("{name}.layer_norm2"))?;
        let h = self.projection(&h, &format!("{name}.mlp.fc1"))?.gelu()?;
        Ok((x + self.projection(&h, &format!("{name}.mlp.fc2"))?)?)
    }

    fn attention(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        let (n, len, hidden) = x.dims3()?;
        let heads = self.shape.num_attention_heads;
        let d = hidden / heads;
        let split = |leaf: &str| -> Result<Tensor> {
            Ok(self
                .projection(x, &format!("{name}.{leaf}"))?
                .reshape((n, len, heads, d))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (q, k, v) = (split("q_proj")?, split("k_proj")?, split("v_proj")?);
        let scores = (q.matmul(&k.transpose(2, 3)?.contiguous()?)? * (d as f64).powf(-0.5))?;
        let out = candle_nn::ops::softmax(&scores, D::Minus1)?
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((n, len, hidden))?;
        self.projection(&out, &format!("{name}.out_proj"))
    }

    fn projection(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        let w = self.get(&format!("{name}.weight"))?;
        linear(x, w, Some(self.get(&format!("{name}.bias"))?))
    }

    /// LayerNorm written out (candle's fused one has no backward).
    fn layer_norm(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + LAYER_NORM_EPS)?.sqrt()?)?;
        Ok(normed
            .broadcast_mul(self.get(&format!("{name}.weight"))?)?
            .broadcast_add(self.get(&format!("{name}.bias"))?)?)
    }

    /// The language model's width the connector projects to.
    pub fn text_hidden(&self) -> usize {
        self.text_hidden
    }
}

/// `x W^T + b` over the last dimension of `x` `(.., in)`.
fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.broadcast_matmul(&w.t()?)?;
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// Every weight's name and shape, in a fixed order.
fn names(s: &TowerShape, text_hidden: usize) -> Vec<(String, Vec<usize>)> {
    let (h, i, p) = (s.hidden_size, s.intermediate_size, s.patch_size);
    let emb = format!("{ENCODER}.embeddings");
    let mut out = vec![
        (format!("{emb}.patch_embedding.weight"), vec![h, 3, p, p]),
        (format!("{emb}.patch_embedding.bias"), vec![h]),
        (
            format!("{emb}.position_embedding.weight"),
            vec![s.patches(), h],
        ),
    ];
    for l in 0..s.num_hidden_layers {
        let name = format!("{ENCODER}.encoder.layers.{l}");
        for norm in ["layer_norm1", "layer_norm2"] {
            out.push((format!("{name}.{norm}.weight"), vec![h]));
            out.push((format!("{name}.{norm}.bias"), vec![h]));
        }
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            out.push((format!("{name}.self_attn.{proj}.weight"), vec![h, h]));
            out.push((format!("{name}.self_attn.{proj}.bias"), vec![h]));
        }
        out.push((format!("{name}.mlp.fc1.weight"), vec![i, h]));
        out.push((format!("{name}.mlp.fc1.bias"), vec![i]));
        out.push((format!("{name}.mlp.fc2.weight"), vec![h, i]));
        out.push((format!("{name}.mlp.fc2.bias"), vec![h]));
    }
    out.push((format!("{ENCODER}.post_layernorm.weight"), vec![h]));
    out.push((format!("{ENCODER}.post_layernorm.bias"), vec![h]));
    out.push((
        CONNECTOR.to_string(),
        vec![text_hidden, h * s.scale_factor.pow(2)],
    ));
    out
}

/// PyTorch's `nn.Linear` initialisation (uniform in `±1/sqrt(fan_in)`) for projections and the
/// patch kernel, the same spread for position embeddings, biases 0, norm weights 1.
fn initial(name: &str, dims: &[usize], rng: &mut ChaCha8Rng) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let fan_in: usize = dims.iter().skip(1).product();
    let values: Vec<f32> = if name.ends_with(".bias") {
        vec![0.0; n]
    } else if name.contains("layer_norm") || name.contains("layernorm") {
        vec![1.0; n]
    } else {
        let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
        (0..n).map(|_| rng.random_range(-bound..bound)).collect()
    };
    Ok(Tensor::from_vec(values, dims, &Device::Cpu)?)
}
