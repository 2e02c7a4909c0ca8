//! One entry of a request's `plugins` list, as it arrives on the wire.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `{"type": "lora", "name": "sql", "scale": 0.5}`: the plug-in's type and registered name,
/// and every other field as that plug-in type's per-request parameters (checked by the
/// plug-in, so an unknown or out-of-range parameter is an error naming it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PluginSpec {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    #[serde(flatten)]
    pub params: Map<String, Value>,
}

impl PluginSpec {
    /// A spec with default parameters (what `"model": "<adapter>"` selects).
    pub fn named(kind: &str, name: &str) -> Self {
        Self {
            kind: kind.to_string(),
            name: name.to_string(),
            params: Map::new(),
        }
    }
}
