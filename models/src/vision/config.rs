//! The vision half of an Idefics3 `config.json`.

use std::path::Path;

use serde::Deserialize;

use crate::error::{ModelError, Result};

/// SigLIP's `vision_config` plus the connector's and the prompt's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    /// Side of the (square) image the encoder takes, in pixels.
    pub image_size: usize,
    /// Side of a patch, in pixels.
    pub patch_size: usize,
    pub num_channels: usize,
    pub layer_norm_eps: f64,
    /// Pixel shuffle's factor: `scale_factor`^2 neighbouring patches become one image token.
    pub scale_factor: usize,
    /// The prompt token whose embedding an image feature replaces.
    pub image_token_id: u32,
}

#[derive(Deserialize)]
struct HfIdefics3 {
    model_type: String,
    vision_config: HfVision,
    scale_factor: usize,
    image_token_id: u32,
}

#[derive(Deserialize)]
struct HfVision {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    image_size: usize,
    patch_size: usize,
    #[serde(default = "three")]
    num_channels: usize,
    #[serde(default = "siglip_eps")]
    layer_norm_eps: f64,
    #[serde(default = "gelu_tanh")]
    hidden_act: String,
}

fn three() -> usize {
    3
}
fn siglip_eps() -> f64 {
    1e-6
}
fn gelu_tanh() -> String {
    "gelu_pytorch_tanh".into()
}

/// Whether `dir/config.json` names an Idefics3 (SmolVLM) model.
pub fn is_idefics3(dir: &Path) -> bool {
    #[derive(Deserialize)]
    struct ModelType {
        model_type: Option<String>,
    }
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<ModelType>(&text).ok())
        .and_then(|c| c.model_type)
        .is_some_and(|t| t == "idefics3")
}

impl VisionConfig {
    /// Reads `dir/config.json`, which must be an Idefics3 (SmolVLM) config.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        let hf: HfIdefics3 = serde_json::from_str(&text).map_err(|e| ModelError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if hf.model_type != "idefics3" {
            return Err(ModelError::Config(format!(
                "{}: model_type {:?} has no vision tower this server reads (idefics3 does)",
                path.display(),
                hf.model_type
            )));
        }
        let v = hf.vision_config;
        if v.hidden_act != "gelu_pytorch_tanh" {
            return Err(ModelError::Config(format!(
                "vision hidden_act {:?} is not supported (gelu_pytorch_tanh is)",
                v.hidden_act
            )));
        }
        let config = Self {
            hidden_size: v.hidden_size,
            intermediate_size: v.intermediate_size,
            num_layers: v.num_hidden_layers,
            num_heads: v.num_attention_heads,
            image_size: v.image_size,
            patch_size: v.patch_size,
            num_channels: v.num_channels,
            layer_norm_eps: v.layer_norm_eps,
            scale_factor: hf.scale_factor,
            image_token_id: hf.image_token_id,
        };
        config.validate()?;
        Ok(config)
    }

    /// Patches along one side of the image.
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Image tokens one image becomes in the prompt (64 for SmolVLM-256M).
    pub fn tokens_per_image(&self) -> usize {
        (self.patches_per_side() / self.scale_factor).pow(2)
    }

    fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(ModelError::Config(format!("vision_config: {what}")));
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return bad(format!(
                "image_size {} is not a whole number of {}-pixel patches",
                self.image_size, self.patch_size
            ));
        }
        let side = self.patches_per_side();
        if self.scale_factor == 0 || !side.is_multiple_of(self.scale_factor) {
            return bad(format!(
                "{side} patches per side do not shuffle by scale_factor {}",
                self.scale_factor
            ));
        }
        if self.num_heads == 0 || !self.hidden_size.is_multiple_of(self.num_heads) {
            return bad(format!(
                "hidden_size {} does not split into {} heads",
                self.hidden_size, self.num_heads
            ));
        }
        Ok(())
    }
}
