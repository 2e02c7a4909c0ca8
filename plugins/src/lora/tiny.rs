//! Seeded random PEFT adapters written to disk, for tests: the real loader reads them, and
//! [`TinyAdapter::merge_into`] gives the same adapter as merged weights, an independent way
//! to compute what the adapted model must output.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use models::tiny::TinyModel;
use models::{ModelConfig, Projection};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::{module_path, CONFIG_FILE, WEIGHTS_FILE};
use crate::base::BaseModel;
use crate::error::Result;

/// An adapter's config (as JSON) and its PEFT-named f32 tensors.
#[derive(Debug, Clone)]
pub struct TinyAdapter {
    pub config: Value,
    pub tensors: HashMap<String, Tensor>,
}

pub use super::ALL_PROJECTIONS;

impl TinyAdapter {
    /// Rank-`r` factors with entries uniform in `±spread` on `projections` of every layer of
    /// `config`. Both factors are non-zero (PEFT initialises B to zero; a test adapter must
    /// change the output).
    pub fn random(
        config: &ModelConfig,
        r: usize,
        alpha: f64,
        projections: &[Projection],
        seed: u64,
    ) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let base = BaseModel {
            id: String::new(),
            config: config.clone(),
            device: Device::Cpu,
            tokenizer_hash: None,
            kv_dtype: models::KvDtype::F32,
        };
        let mut tensors = HashMap::new();
        for layer in 0..config.num_layers {
            for &p in projections {
                let (out, inp) = base.projection_shape(p);
                let path = module_path(layer, p);
                let mut draw = |rows: usize, cols: usize| {
                    let spread = 1.0 / (cols as f32).sqrt();
                    let v: Vec<f32> = (0..rows * cols)
                        .map(|_| spread * (rng.random::<f32>() * 2.0 - 1.0))
                        .collect();
                    // bf16-exact values, as in PEFT's bf16 files: the CPU path stores factors
                    // in bf16, so it then equals the merged float weights up to summation order.
                    Tensor::from_vec(v, (rows, cols), &Device::Cpu)?
                        .to_dtype(candle_core::DType::BF16)?
                        .to_dtype(candle_core::DType::F32)
                };
                tensors.insert(
                    format!("base_model.model.{path}.lora_A.weight"),
                    draw(r, inp)?,
                );
                tensors.insert(
                    format!("base_model.model.{path}.lora_B.weight"),
                    draw(out, r)?,
                );
            }
        }
        let targets: Vec<&str> = projections.iter().map(|p| p.hf_name()).collect();
        let config = json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
            "target_modules": targets, "lora_dropout": 0.0, "bias": "none",
            "use_rslora": false, "use_dora": false, "modules_to_save": null,
            "fan_in_fan_out": false, "base_model_name_or_path": "tiny",
        });
        Ok(Self { config, tensors })
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(
            dir.join(CONFIG_FILE),
            serde_json::to_vec_pretty(&self.config)?,
        )?;
        candle_core::safetensors::save(&self.tensors, dir.join(WEIGHTS_FILE))
            .map_err(std::io::Error::other)
    }

    /// The model with `W += scale * s * B A` merged into every adapted projection, with
    /// `s = alpha / r` (or `alpha / sqrt(r)` when the config says `use_rslora`).
    pub fn merge_into(&self, model: &TinyModel, scale: f64) -> Result<TinyModel> {
        let r = self.config["r"].as_f64().unwrap_or(1.0);
        let alpha = self.config["lora_alpha"].as_f64().unwrap_or(r);
        let s = match self.config["use_rslora"].as_bool() {
            Some(true) => alpha / r.sqrt(),
            _ => alpha / r,
        } * scale;
        let mut merged = model.clone();
        for (name, a) in &self.tensors {
            let Some(path) = name.strip_suffix(".lora_A.weight") else {
                continue;
            };
            let b = &self.tensors[&format!("{path}.lora_B.weight")];
            let weight = format!("{}.weight", path.trim_start_matches("base_model.model."));
            let w = &merged.tensors[&weight];
            let updated = (w + (b.matmul(a)? * s)?)?;
            merged.tensors.insert(weight, updated);
        }
        Ok(merged)
    }
}
