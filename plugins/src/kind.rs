//! The plug-in types a request or the registry can name.

use std::fmt;

use crate::error::{PluginError, Result};

/// A plug-in type, as written in requests (`"type": "lora"`) and in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(
    feature = "openapi",
    derive(utoipa::ToSchema),
    schema(rename_all = "lowercase")
)]
pub enum PluginKind {
    /// A LoRA adapter in the PEFT format.
    Lora,
    /// A steering vector (llama.cpp control-vector GGUF).
    Steer,
    /// A learned steering controller (config.json + model.safetensors).
    Controller,
}

impl PluginKind {
    pub const ALL: [PluginKind; 3] = [PluginKind::Lora, PluginKind::Steer, PluginKind::Controller];

    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| PluginError::UnknownType(name.to_string()))
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Lora => "lora",
            Self::Steer => "steer",
            Self::Controller => "controller",
        }
    }

    /// The known type names, for error messages.
    pub fn known() -> String {
        Self::ALL.map(Self::name).join(", ")
    }
}

impl fmt::Display for PluginKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_types_are_named() {
        for k in PluginKind::ALL {
            assert_eq!(PluginKind::parse(k.name()).unwrap(), k);
        }
        let err = PluginKind::parse("lorra").unwrap_err().to_string();
        assert!(err.contains("`lorra`") && err.contains("lora"), "{err}");
    }
}
