//! Model hyper-parameters: the one runtime `ModelConfig` both loaders produce.
//!
//! Hugging Face `config.json` files deserialize into [`HfConfig`] (field names as in
//! `transformers`), GGUF metadata is read by `loader::gguf`; both end in a validated
//! [`ModelConfig`] with no optional fields left to interpret at run time.

use serde::Deserialize;

use crate::error::{ModelError, Result};

/// The Llama-family variants the decoder runs. They differ only in details the config
/// captures (q/k/v bias for Qwen2), so one decoder serves all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "llama" => Ok(Self::Llama),
            "mistral" => Ok(Self::Mistral),
            "qwen2" => Ok(Self::Qwen2),
            other => Err(ModelError::UnsupportedArchitecture(other.to_string())),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
        }
    }
}

/// Llama 3.1's frequency-dependent RoPE scaling ("rope_type": "llama3").
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

/// How RoPE inverse frequencies are derived beyond `rope_theta`.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    Llama3(Llama3RopeScaling),
    /// Per-frequency divisors stored in the checkpoint (GGUF `rope_freqs.weight`, which
    /// llama.cpp's converter precomputes for Llama 3 scaling).
    Factors(Vec<f32>),
}

/// Validated runtime hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q, k and v projections carry a bias (Qwen2).
    pub attention_bias: bool,
}

impl ModelConfig {
    /// The `config.json` of a Hugging Face checkpoint of this architecture and shape (what
    /// [`crate::loader::SafetensorsSource`] reads back).
    pub fn hf_json(&self) -> serde_json::Value {
        serde_json::json!({
            "model_type": self.architecture.name(),
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
        })
    }

    /// Query heads that share one key/value head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Checks the relations the decoder relies on, so a bad checkpoint fails at load time.
    pub fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(ModelError::Config(m));
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.num_layers == 0 {
            return fail("heads, kv heads and layers must be positive".into());
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return fail(format!(
                "{} attention heads are not a multiple of {} key/value heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return fail(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if let RopeScaling::Factors(f) = &self.rope_scaling {
            if f.len() != self.head_dim / 2 {
                return fail(format!(
                    "rope_freqs has {} entries, expected head_dim/2 = {}",
                    f.len(),
                    self.head_dim / 2
                ));
            }
        }
        Ok(())
    }

    /// Bytes of KV cache one token occupies in f32 (keys and values of every layer); a model
    /// whose caches hold f16 says its own (`Llama::kv_bytes_per_token`).
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * std::mem::size_of::<f32>()
    }
}

#[derive(Debug, Deserialize)]
struct HfRopeScaling {
    #[serde(alias = "type")]
    rope_type: String,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<usize>,
}

/// A Hugging Face `config.json` of a Llama-family model.
#[derive(Debug, Deserialize)]
pub struct HfConfig {
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    /// Absent from configs that transformers 5 writes, which keep it in `rope_parameters`.
    rope_theta: Option<f32>,
    rope_scaling: Option<HfRopeScaling>,
    rope_parameters: Option<HfRopeParameters>,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub attention_bias: Option<bool>,
}

fn default_rms_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f32 {
    10_000.0
}

/// transformers 5's `rope_parameters` (it replaced `rope_theta` and `rope_scaling`).
#[derive(Debug, Deserialize)]
struct HfRopeParameters {
    rope_theta: Option<f32>,
    #[serde(flatten)]
    scaling: HfRopeScaling,
}
fn default_max_positions() -> usize {
    4096
}

impl HfConfig {
    pub fn into_config(self) -> Result<ModelConfig> {
        let architecture = Architecture::parse(&self.model_type)?;
        let (rope_theta, parameters) = match self.rope_parameters {
            Some(p) => (p.rope_theta, Some(p.scaling)),
            None => (None, None),
        };
        let rope_theta = self
            .rope_theta
            .or(rope_theta)
            .unwrap_or_else(default_rope_theta);
        let rope_scaling = match self.rope_scaling.or(parameters) {
            None => RopeScaling::None,
            Some(s) if s.rope_type == "llama3" => RopeScaling::Llama3(Llama3RopeScaling {
                factor: s.factor.unwrap_or(8.0),
                low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                original_max_position_embeddings: s
                    .original_max_position_embeddings
                    .unwrap_or(8192),
            }),
            Some(s) if s.rope_type == "default" => RopeScaling::None,
            Some(s) => {
                return Err(ModelError::Config(format!(
                    "rope_scaling type `{}` is not supported (supported: llama3)",
                    s.rope_type
                )))
            }
        };
        let config = ModelConfig {
            architecture,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads.max(1)),
            vocab_size: self.vocab_size,
            rms_norm_eps: self.rms_norm_eps as f32,
            rope_theta,
            rope_scaling,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            attention_bias: self
                .attention_bias
                .unwrap_or(architecture == Architecture::Qwen2),
        };
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_config_with_llama3_scaling_parses() {
        let json = r#"{"model_type":"llama","hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
            "vocab_size":100,"rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3",
            "factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
            "original_max_position_embeddings":8192}}"#;
        let cfg: HfConfig = serde_json::from_str(json).expect("parse");
        let cfg = cfg.into_config().expect("valid");
        assert_eq!(cfg.head_dim, 16);
        assert_eq!(cfg.group_size(), 2);
        assert!(matches!(cfg.rope_scaling, RopeScaling::Llama3(s) if s.factor == 8.0));
        assert!(!cfg.attention_bias);
    }

    /// transformers 5 writes `rope_parameters` instead of `rope_theta` and `rope_scaling`.
    #[test]
    fn rope_parameters_give_theta_and_scaling() {
        let json = r#"{"model_type":"llama","hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"vocab_size":100,
            "rope_parameters":{"rope_theta":100000.0,"rope_type":"default"}}"#;
        let cfg: HfConfig = serde_json::from_str(json).expect("parse");
        let cfg = cfg.into_config().expect("valid");
        assert_eq!(cfg.rope_theta, 100_000.0);
        assert!(matches!(cfg.rope_scaling, RopeScaling::None));
        let json = json.replace(
            r#""rope_type":"default""#,
            r#""rope_type":"llama3","factor":4.0"#,
        );
        let cfg: HfConfig = serde_json::from_str(&json).expect("parse");
        let cfg = cfg.into_config().expect("valid");
        assert!(matches!(cfg.rope_scaling, RopeScaling::Llama3(s) if s.factor == 4.0));
    }

    #[test]
    fn qwen2_defaults_to_qkv_bias() {
        let json = r#"{"model_type":"qwen2","hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"vocab_size":100}"#;
        let cfg: HfConfig = serde_json::from_str(json).expect("parse");
        assert!(cfg.into_config().expect("valid").attention_bias);
    }

    #[test]
    fn heads_not_multiple_of_kv_heads_is_rejected() {
        let json = r#"{"model_type":"llama","hidden_size":60,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":5,"num_key_value_heads":2,"vocab_size":100}"#;
        let cfg: HfConfig = serde_json::from_str(json).expect("parse");
        let err = cfg.into_config().expect_err("must fail");
        assert!(err.to_string().contains("5 attention heads"), "{err}");
    }

    #[test]
    fn unknown_architecture_is_named() {
        let err = Architecture::parse("gpt_neox").expect_err("must fail");
        assert!(err.to_string().contains("gpt_neox"));
    }
}
