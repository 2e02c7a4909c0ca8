//! The base model a plug-in must fit: its identity, shapes and device.

use candle_core::Device;
use models::{ModelConfig, Projection};
use serde::{Deserialize, Serialize};

/// What plug-ins are checked against at load, and where their tensors go.
#[derive(Debug, Clone)]
pub struct BaseModel {
    /// The served model's id (`model` in requests); plug-in names may not shadow it.
    pub id: String,
    pub config: ModelConfig,
    pub device: Device,
    /// The base tokenizer's identity ([`models::Tokenizer::identity`]), when the caller has
    /// the tokenizer: plug-ins that carry their own vocabulary (a memory decoder) must match it.
    pub tokenizer_hash: Option<String>,
    /// How the base model's KV caches hold keys and values; plug-ins with caches of their own
    /// (a memory decoder's) hold theirs the same way.
    pub kv_dtype: models::KvDtype,
}

impl BaseModel {
    /// `(out_features, in_features)` of a decoder projection, as in HF `nn.Linear`.
    pub fn projection_shape(&self, projection: Projection) -> (usize, usize) {
        let c = &self.config;
        let (hidden, q, kv) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        match projection {
            Projection::Q => (q, hidden),
            Projection::K | Projection::V => (kv, hidden),
            Projection::O => (hidden, q),
            Projection::Gate | Projection::Up => (c.intermediate_size, hidden),
            Projection::Down => (hidden, c.intermediate_size),
            Projection::LmHead => (c.vocab_size, hidden),
        }
    }
}

/// The base model a plug-in file was made for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseIdentity {
    pub architecture: String,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub vocab_size: usize,
}

impl BaseIdentity {
    pub fn of(base: &BaseModel) -> Self {
        let c = &base.config;
        Self {
            architecture: c.architecture.name().to_string(),
            hidden_size: c.hidden_size,
            num_layers: c.num_layers,
            vocab_size: c.vocab_size,
        }
    }
}

/// Checks a plug-in file's `type` and the base model it says it was made for: the part of
/// every config check that is the same for each kind.
pub fn check_made_for(
    name: &str,
    file_type: &str,
    expected_type: &str,
    made_for: &BaseIdentity,
    base: &BaseModel,
) -> crate::error::Result<()> {
    let bad = |m: String| Err(crate::error::PluginError::incompatible(name, m));
    if file_type != expected_type {
        return bad(format!(
            "config.json type is `{file_type}`, not `{expected_type}`"
        ));
    }
    let expected = BaseIdentity::of(base);
    if *made_for != expected {
        return bad(format!(
            "made for {made_for:?}, the base model is {expected:?}"
        ));
    }
    Ok(())
}
