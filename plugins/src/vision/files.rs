//! The folder `server train vision` writes and `server serve --vision` reads: an Idefics3
//! `config.json` (the `text_config` of the language model it was trained for, whose weights it
//! does not hold, its `vision_config`, `scale_factor`, `image_token_id`, and a `graft` block
//! naming the image tokens and that model's tokenizer),
//! `model.safetensors` (the encoder and connector under Idefics3's names, in f16) and
//! `preprocessor_config.json` (Idefics3's image processor settings, no splitting).

use std::path::Path;

use models::vision::ImageProcessor;

use super::prompt::ImageTokens;
use super::tower::{TowerShape, TrainableTower};
use crate::train::{Result, TrainError};

pub const WEIGHTS_FILE: &str = "model.safetensors";

/// What the `graft` block of `config.json` records.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TowerInfo {
    pub image_tokens: ImageTokens,
    /// The language model's tokenizer identity (`models::Tokenizer::identity`).
    pub tokenizer: String,
    pub text_hidden_size: usize,
}

/// The processor the tower was trained behind: images resized straight to the encoder's side.
pub fn processor(image_size: usize) -> ImageProcessor {
    ImageProcessor {
        longest_edge: image_size as u32,
        ..ImageProcessor::smolvlm(image_size as u32)
    }
}

/// Reads a folder [`write`] wrote back as a trainable tower (f32), with its config, for work
/// on top of a trained tower (`server train vision-prune`).
pub fn read(
    dir: &Path,
    text_hidden: usize,
) -> Result<(TrainableTower, models::vision::VisionConfig)> {
    let config = models::vision::VisionConfig::read(dir)?;
    let shape = TowerShape {
        hidden_size: config.hidden_size,
        intermediate_size: config.intermediate_size,
        num_hidden_layers: config.num_layers,
        num_attention_heads: config.num_heads,
        image_size: config.image_size,
        patch_size: config.patch_size,
        scale_factor: config.scale_factor,
    };
    let tower = TrainableTower::load(shape, text_hidden, &dir.join(WEIGHTS_FILE))?;
    Ok((tower, config))
}

/// Writes the folder into `dir`: `text_config` is the language model's `config.json` (its
/// shape, for readers of the Idefics3 config), `training` what the run records about itself.
pub fn write(
    dir: &Path,
    tower: &TrainableTower,
    image_id: u32,
    info: &TowerInfo,
    text_config: serde_json::Value,
    training: serde_json::Value,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    let s = tower.shape;
    let config = serde_json::json!({
        "model_type": "idefics3",
        "architectures": ["Idefics3ForConditionalGeneration"],
        "text_config": text_config,
        "vision_config": s.vision_config(),
        "scale_factor": s.scale_factor,
        "image_token_id": image_id,
        "graft": { "type": "vision_tower", "info": info, "training": training },
    });
    let p = processor(s.image_size);
    let preprocessor = serde_json::json!({
        "image_processor_type": "Idefics3ImageProcessor",
        "do_image_splitting": false,
        "size": { "longest_edge": p.longest_edge },
        "max_image_size": { "longest_edge": p.image_size },
        "rescale_factor": p.rescale_factor,
        "image_mean": p.mean,
        "image_std": p.std,
    });
    for (name, value) in [
        ("config.json", config),
        ("preprocessor_config.json", preprocessor),
    ] {
        let path = dir.join(name);
        let text = serde_json::to_string_pretty(&value)
            .map_err(|e| TrainError::BadOption(e.to_string()))?;
        std::fs::write(&path, text).map_err(|e| TrainError::io(&path, e))?;
    }
    tower.save_as(&dir.join(WEIGHTS_FILE), candle_core::DType::F16)
}
