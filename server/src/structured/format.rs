//! `response_format` as clients send it: `{"type": "text"}`, `{"type": "json_object"}`, or
//! `{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}`.

use serde::Deserialize;
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

/// What the output must be.
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResponseFormat {
    // Struct variants (not unit ones), so that `deny_unknown_fields` refuses extra fields.
    Text {},
    /// Any JSON object.
    JsonObject {},
    /// A JSON value valid against `json_schema.schema` (any JSON value when no schema is given).
    JsonSchema {
        json_schema: JsonSchemaFormat,
    },
}

#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JsonSchemaFormat {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[schema(value_type = Option<Object>)]
    #[serde(default)]
    pub schema: Option<Map<String, Value>>,
    /// Enforced either way: the output always follows the schema.
    #[serde(default)]
    pub strict: Option<bool>,
}

impl ResponseFormat {
    /// The JSON schema to enforce; `None` for text.
    pub fn schema(&self) -> Option<Value> {
        match self {
            Self::Text {} => None,
            Self::JsonObject {} => Some(json!({"type": "object"})),
            Self::JsonSchema { json_schema } => Some(match &json_schema.schema {
                Some(schema) => Value::Object(schema.clone()),
                None => json!({}),
            }),
        }
    }
}
