//! The vision side of a SmolVLM (Idefics3) checkpoint: a SigLIP vision transformer, pixel
//! shuffle and a linear connector, whose output replaces the embeddings of the prompt's image
//! tokens in the language model (Laurençon et al., "Building and better understanding
//! vision-language models", arXiv 2408.12637; SmolVLM, arXiv 2504.05299).
//!
//! - [`config`]: the checkpoint's `vision_config`, `scale_factor` and `image_token_id`.
//! - [`siglip`]: the encoder, patches to hidden states (Zhai et al., "Sigmoid loss for language
//!   image pre-training", arXiv 2303.15343; the vision tower only).
//! - [`connector`]: pixel shuffle (`scale_factor`^2 neighbouring patches into one token) and the
//!   projection to the language model's width.
//! - [`preprocess`]: RGB images to pixel values as Idefics3's processor makes them (no image
//!   splitting).
//! - [`splice`]: the embeddings hook that puts image features at the image tokens' positions,
//!   in every prefill chunking.
//!
//! Exactness against the `transformers` implementation on generated weights:
//! `models/tests/vision.rs` (fixture from `scripts/reference/idefics3_reference.py`).

pub mod config;
pub mod connector;
pub mod preprocess;
pub mod siglip;
pub mod splice;

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::error::{ModelError, Result};
use crate::loader::{SafetensorsSource, WeightSource};
use crate::Tokenizer;
pub use config::{ImageTokens, VisionConfig};
use connector::Connector;
pub use preprocess::ImageProcessor;
use siglip::SiglipEncoder;
pub use splice::{ImagePlacement, ImageSplice};

/// What serving a vision-language checkpoint needs beside its language model: the tower, the
/// image processor, and how one image is written into the prompt.
pub struct VisionModel {
    pub tower: VisionTower,
    pub processor: ImageProcessor,
}

impl VisionModel {
    /// The vision side of the checkpoint in `dir`, read through `source` (the one its language
    /// model was read through, so that shards already in memory are not read again), or `None`
    /// when it has none (its `config.json` is not an Idefics3 one).
    pub fn load(
        dir: &Path,
        source: &mut SafetensorsSource,
        text_hidden: usize,
    ) -> Result<Option<Self>> {
        if !config::is_idefics3(dir) {
            return Ok(None);
        }
        let tower = VisionTower::from_source(VisionConfig::read(dir)?, source, text_hidden)?;
        let processor = ImageProcessor::read(dir, tower.config().image_size as u32)?;
        Ok(Some(Self { tower, processor }))
    }

    /// A tower trained for a text-only language model (`server train vision`), read from its
    /// own folder `dir` and attached to that model: its `config.json` must name `tokenizer`'s
    /// identity, and each of its image tokens must be one token of `tokenizer`, the image token
    /// the config's `image_token_id`.
    pub fn attach(
        dir: &Path,
        device: &Device,
        text_hidden: usize,
        tokenizer: &Tokenizer,
    ) -> Result<Self> {
        if !config::is_idefics3(dir) {
            return Err(ModelError::Config(format!(
                "{}: no Idefics3 config.json, so no vision tower to attach",
                dir.display()
            )));
        }
        let config = VisionConfig::read(dir)?;
        config.check_tokenizer(tokenizer)?;
        let tower = VisionTower::load(dir, text_hidden, device)?;
        let processor = ImageProcessor::read(dir, tower.config().image_size as u32)?;
        Ok(Self { tower, processor })
    }

    /// One image's prompt text as Idefics3's processor writes it without splitting:
    /// `<fake_token_around_image><global-img>`, then `<image>` once per image token, then
    /// `<fake_token_around_image>` (or the tokens the config names instead).
    pub fn image_prompt(&self) -> String {
        let config = self.tower.config();
        config.image_tokens.text(config.tokens_per_image())
    }

    /// The features of `images` (8-bit RGB, `(rgb, width, height)`), in order, one row per
    /// image token: `(images * tokens_per_image, text_hidden)`.
    pub fn features(&self, images: &[(&[u8], u32, u32)]) -> Result<Tensor> {
        let device = self.tower.device();
        let pixels = images
            .iter()
            .map(|&(rgb, w, h)| self.processor.pixel_values(rgb, w, h, device))
            .collect::<Result<Vec<_>>>()?;
        let features = self.tower.encode(&Tensor::stack(&pixels, 0)?)?;
        let (n, t, hidden) = features.dims3()?;
        Ok(features.reshape((n * t, hidden))?)
    }
}

/// An image encoder: pixels in, one row of language-model embedding per image token out.
pub struct VisionTower {
    config: VisionConfig,
    encoder: SiglipEncoder,
    connector: Connector,
    device: Device,
}

impl VisionTower {
    /// The vision tower of the Idefics3 checkpoint in `dir` (its `config.json` and weights);
    /// `text_hidden` is the language model's width, which the connector projects to.
    pub fn load(dir: &Path, text_hidden: usize, device: &Device) -> Result<Self> {
        let mut source = SafetensorsSource::open(dir, device)?;
        Self::from_source(VisionConfig::read(dir)?, &mut source, text_hidden)
    }

    /// The tower `config` describes, its weights read through `source`.
    pub fn from_source(
        config: VisionConfig,
        source: &mut SafetensorsSource,
        text_hidden: usize,
    ) -> Result<Self> {
        let encoder = SiglipEncoder::load(source, &config)?;
        let connector = Connector::load(source, &config, text_hidden)?;
        Ok(Self {
            config,
            encoder,
            connector,
            device: source.device().clone(),
        })
    }

    pub fn config(&self) -> &VisionConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `pixels`: `(images, channels, image_size, image_size)`, already rescaled and
    /// normalised as the model's processor does. Returns `(images, tokens_per_image,
    /// text_hidden)`.
    pub fn encode(&self, pixels: &Tensor) -> Result<Tensor> {
        let hidden = self.encoder.forward(pixels)?;
        self.connector.forward(&hidden)
    }
}
