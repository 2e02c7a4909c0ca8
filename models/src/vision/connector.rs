//! Idefics3's connector: pixel shuffle, then a linear projection (no bias) to the language
//! model's width. Pixel shuffle trades resolution for width: each `r x r` square of patches
//! becomes one token of `r * r` times the width, so an image of `s x s` patches costs
//! `(s / r)^2` prompt tokens (SmolVLM-256M: 32 x 32 patches, r = 4, 64 tokens).

use candle_core::{Module, Tensor};
use candle_nn::Linear;

use super::config::VisionConfig;
use crate::error::Result;
use crate::loader::SafetensorsSource;

pub struct Connector {
    /// `(text_hidden, vision_hidden * r * r)`.
    proj: Linear,
    scale_factor: usize,
}

impl Connector {
    pub fn load(
        source: &mut SafetensorsSource,
        config: &VisionConfig,
        text_hidden: usize,
    ) -> Result<Self> {
        let wide = config.hidden_size * config.scale_factor.pow(2);
        let w = source.tensor(
            "model.connector.modality_projection.proj.weight",
            &[text_hidden, wide],
        )?;
        Ok(Self {
            proj: Linear::new(w, None),
            scale_factor: config.scale_factor,
        })
    }

    /// `x`: `(n, patches, hidden)` from the encoder; returns `(n, patches / r^2, text_hidden)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.proj
            .forward(&pixel_shuffle(x, self.scale_factor)?)
            .map_err(Into::into)
    }
}

/// `Idefics3Connector.pixel_shuffle`, step for step: on a row-major `side x side` grid of
/// patches, token `(i, j)` of the `(side / r)^2` output concatenates, for each of the `r` rows
/// `i r + a`, the `r` patches `j r .. j r + r` of that row.
pub fn pixel_shuffle(x: &Tensor, r: usize) -> Result<Tensor> {
    let (n, seq, hidden) = x.dims3()?;
    let side = (seq as f64).sqrt() as usize;
    let x = x
        .reshape((n, side, side / r, hidden * r))?
        .permute((0, 2, 1, 3))?
        .contiguous()?
        .reshape((n, side / r, side / r, hidden * r * r))?
        .permute((0, 2, 1, 3))?
        .contiguous()?;
    Ok(x.reshape((n, seq / (r * r), hidden * r * r))?)
}
