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
    /// How one image is written into the prompt.
    pub image_tokens: ImageTokens,
    /// A tower trained for another model's language model (`server train vision`) names that
    /// model's tokenizer identity (`Tokenizer::identity`), checked when it is attached.
    pub tokenizer: Option<String>,
}

/// The three special tokens an image is written with: `around` it, a `global` view marker,
/// then `image` once per image token (Idefics3's processor without splitting). SmolVLM's
/// tokenizer has its own; a tower trained for a text-only model borrows rare special tokens
/// of that model's tokenizer and names them in its `config.json` (`graft.info.image_tokens`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct ImageTokens {
    pub around: String,
    pub global: String,
    pub image: String,
}

impl ImageTokens {
    /// SmolVLM's: `<fake_token_around_image>`, `<global-img>`, `<image>`.
    pub fn smolvlm() -> Self {
        Self {
            around: "<fake_token_around_image>".into(),
            global: "<global-img>".into(),
            image: "<image>".into(),
        }
    }

    /// One image of `tokens` image tokens, as prompt text.
    pub fn text(&self, tokens: usize) -> String {
        format!(
            "{a}{g}{}{a}",
            self.image.repeat(tokens),
            a = self.around,
            g = self.global
        )
    }
}

#[derive(Deserialize)]
struct HfIdefics3 {
    model_type: String,
    vision_config: HfVision,
    scale_factor: usize,
    image_token_id: u32,
    #[serde(default)]
    graft: Option<GraftBlock>,
}

/// What `server train vision` adds to the config of a tower it trained.
#[derive(Deserialize)]
struct GraftBlock {
    info: GraftInfo,
}

#[derive(Deserialize)]
struct GraftInfo {
    image_tokens: ImageTokens,
    tokenizer: String,
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
            image_tokens: hf
                .graft
                .as_ref()
                .map_or_else(ImageTokens::smolvlm, |g| g.info.image_tokens.clone()),
            tokenizer: hf.graft.map(|g| g.info.tokenizer),
        };
        config.validate()?;
        Ok(config)
    }

    /// A tower trained for a text-only model fits `tokenizer` only if it names that
    /// tokenizer's identity and its image tokens are single tokens of it.
    pub fn check_tokenizer(&self, tokenizer: &crate::Tokenizer) -> Result<()> {
        let identity = tokenizer.identity();
        match &self.tokenizer {
            Some(trained) if *trained == identity => {}
            Some(trained) => {
                return Err(ModelError::Config(format!(
                "the vision tower was trained for tokenizer {trained}, the model's is {identity}"
            )))
            }
            None => {
                return Err(ModelError::Config(
                    "the vision tower names no tokenizer (config.json `graft.info.tokenizer`): \
                     it is not one `server train vision` wrote"
                        .into(),
                ))
            }
        }
        let t = &self.image_tokens;
        for piece in [&t.around, &t.global, &t.image] {
            let ids = tokenizer.encode(piece, true).unwrap_or_default();
            let expected = (piece == &t.image).then_some(self.image_token_id);
            if ids.len() != 1 || expected.is_some_and(|id| ids[0] != id) {
                return Err(ModelError::Config(format!(
                    "image token `{piece}` is not {} of the model's tokenizer",
                    match expected {
                        Some(id) => format!("token {id}"),
                        None => "one token".into(),
                    }
                )));
            }
        }
        Ok(())
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
