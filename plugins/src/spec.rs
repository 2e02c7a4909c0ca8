//! One entry of a request's `plugins` list, as it arrives on the wire.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::kinds::PluginKind;

/// `{"type": "lora", "name": "sql", "scale": 0.5}`: the plug-in's type and registered name,
/// and every other field as that plug-in type's per-request parameters (checked by the
/// plug-in, so an unknown or out-of-range parameter is an error naming it). The type is
/// parsed here, at the wire edge: an unknown one fails deserialization, naming the known ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PluginSpec {
    #[serde(rename = "type")]
    pub kind: PluginKind,
    /// Required for kinds loaded from files; a built-in kind is named by its type alone.
    #[serde(default)]
    pub name: String,
    #[serde(flatten)]
    pub params: Map<String, Value>,
}

impl PluginSpec {
    /// A spec with default parameters (what `"model": "<adapter>"` selects).
    pub fn named(kind: PluginKind, name: &str) -> Self {
        Self {
            kind,
            name: name.to_string(),
            params: Map::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_type_is_parsed_once_here_and_the_rest_are_parameters() {
        let spec: PluginSpec =
            serde_json::from_value(json!({"type": "steer", "name": "v", "scale": 2})).unwrap();
        assert_eq!(spec.kind, PluginKind::Steer);
        assert_eq!(
            spec.params,
            json!({"scale": 2}).as_object().unwrap().clone()
        );
        assert_eq!(
            serde_json::to_value(&spec).unwrap(),
            json!({"type": "steer", "name": "v", "scale": 2})
        );
        let e = serde_json::from_value::<PluginSpec>(json!({"type": "lorra", "name": "v"}));
        let e = e.unwrap_err().to_string();
        assert!(e.contains("unknown plug-in type `lorra`"), "{e}");
    }
}
