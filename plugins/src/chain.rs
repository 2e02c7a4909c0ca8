//! A request's resolved plug-in chain.

use models::HookCall;
use serde::Serialize;

use crate::kinds::PluginKind;

/// What a response echoes for one plug-in of its chain, so the client knows exactly what ran.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ChainEntry {
    #[serde(rename = "type")]
    pub kind: PluginKind,
    pub name: String,
    /// The plug-in's content hash (`sha256:<hex>`), as `GET /v1/plugins` lists it.
    pub hash: String,
}

/// The hook calls the forward pass runs for a request's rows, in request order, and their
/// echo. The calls hold the plug-ins themselves: a request keeps the version it resolved even
/// if the plug-in is replaced or unloaded while it runs.
#[derive(Debug, Clone, Default)]
pub struct Chain {
    pub calls: Vec<HookCall>,
    pub entries: Vec<ChainEntry>,
}

impl Chain {
    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }
}
