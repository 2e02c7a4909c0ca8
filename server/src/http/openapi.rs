//! The OpenAPI 3.1 document of the HTTP API, served at GET /openapi.json. It is open like
//! /health (no API key): it describes the API, nothing about the deployment or its keys.
//!
//! Request and response schemas are derived with utoipa from the types the handlers parse
//! ([`wire`](super::wire)) and serialize ([`replies`](super::replies)); each handler's
//! `#[utoipa::path]` gives its request body and success reply. Error replies come from
//! [`OPERATIONS`]: for every status an operation can answer with, the OpenAI error body
//! narrowed to the `type`s and `code`s that status carries there, taken from the one error
//! table ([`ErrorKind::spec`]). The same table says which operations take the bearer key.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use axum::Json;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::schema::{AllOf, ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Content, Header, OpenApi as Document, Ref, RefOr, Response};
use utoipa::{Modify, OpenApi};

use super::error::ErrorKind::{self, *};
use super::replies::{ChatCompletionChunk, ErrorBody, TextCompletionChunk};
use super::REQUEST_ID_HEADER;

/// Who may call an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No key, even with keys configured.
    Open,
    /// Any configured key (nothing when none is configured).
    Key,
    /// A key with `admin = true` (anyone when no key is configured).
    Admin,
}

/// One operation of the API: its route, who may call it and the errors it can answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OperationSpec {
    /// Lower case, as OpenAPI writes it.
    pub method: &'static str,
    pub path: &'static str,
    pub access: Access,
    pub errors: &'static [ErrorKind],
}

/// A generation: everything from parsing to the engine.
const GENERATE: &[ErrorKind] = &[
    InvalidJson,
    InvalidParameter,
    UnsupportedParameter,
    PayloadTooLarge,
    ContextLengthExceeded,
    Unauthorized,
    ModelNotAllowed,
    PluginNotAllowed,
    ModelNotFound,
    PluginNotFound,
    RequestTimeout,
    RateLimited,
    QueueFull,
    Internal,
    ModelLoading,
    ShuttingDown,
    PluginMemoryExhausted,
    PluginChanged,
];
const TOKENS: &[ErrorKind] = &[
    InvalidJson,
    InvalidParameter,
    UnsupportedParameter,
    PayloadTooLarge,
    Unauthorized,
    ModelNotAllowed,
    ModelNotFound,
    RateLimited,
    Internal,
    ModelLoading,
    ShuttingDown,
];
const KEYED_READ: &[ErrorKind] = &[Unauthorized, RateLimited, ModelLoading, ShuttingDown];

/// The table: every operation `app()` serves.
pub const OPERATIONS: &[OperationSpec] = &[
    OperationSpec {
        method: "post",
        path: "/v1/chat/completions",
        access: Access::Key,
        errors: GENERATE,
    },
    OperationSpec {
        method: "post",
        path: "/v1/completions",
        access: Access::Key,
        errors: GENERATE,
    },
    OperationSpec {
        method: "post",
        path: "/v1/embeddings",
        access: Access::Key,
        errors: GENERATE,
    },
    OperationSpec {
        method: "post",
        path: "/v1/responses",
        access: Access::Key,
        errors: GENERATE,
    },
    OperationSpec {
        method: "get",
        path: "/v1/models",
        access: Access::Key,
        errors: KEYED_READ,
    },
    OperationSpec {
        method: "get",
        path: "/v1/plugins",
        access: Access::Key,
        errors: KEYED_READ,
    },
    OperationSpec {
        method: "post",
        path: "/v1/plugins",
        access: Access::Admin,
        errors: &[
            InvalidJson,
            InvalidParameter,
            UnsupportedParameter,
            PayloadTooLarge,
            Unauthorized,
            AdminRequired,
            PluginExists,
            RateLimited,
            Internal,
            ModelLoading,
            ShuttingDown,
            PluginMemoryExhausted,
        ],
    },
    OperationSpec {
        method: "delete",
        path: "/v1/plugins/{name}",
        access: Access::Admin,
        errors: &[
            Unauthorized,
            AdminRequired,
            PluginNotFound,
            RateLimited,
            ModelLoading,
            ShuttingDown,
        ],
    },
    // vLLM's LoRA endpoints answer their own errors in vLLM's shape (documented on the
    // operations); these are the ones the middleware in front of them answers.
    OperationSpec {
        method: "post",
        path: "/v1/load_lora_adapter",
        access: Access::Admin,
        errors: &[PayloadTooLarge, Unauthorized, AdminRequired, RateLimited],
    },
    OperationSpec {
        method: "post",
        path: "/v1/unload_lora_adapter",
        access: Access::Admin,
        errors: &[PayloadTooLarge, Unauthorized, AdminRequired, RateLimited],
    },
    OperationSpec {
        method: "post",
        path: "/tokenize",
        access: Access::Key,
        errors: TOKENS,
    },
    OperationSpec {
        method: "post",
        path: "/detokenize",
        access: Access::Key,
        errors: TOKENS,
    },
    OperationSpec {
        method: "get",
        path: "/health",
        access: Access::Open,
        errors: &[ModelLoading, ShuttingDown],
    },
    OperationSpec {
        method: "get",
        path: "/live",
        access: Access::Open,
        errors: &[],
    },
    OperationSpec {
        method: "get",
        path: "/metrics",
        access: Access::Open,
        errors: &[],
    },
    OperationSpec {
        method: "get",
        path: "/openapi.json",
        access: Access::Open,
        errors: &[],
    },
];

/// The name of the bearer security scheme in the document.
const BEARER: &str = "bearer";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "graft",
        description = "graft's OpenAI-compatible API (chat and legacy completions, models) with \
            vLLM's /tokenize and /detokenize, the plug-in registry, and operations routes. \
            Every reply carries an `x-request-id` header; every error is OpenAI's \
            `{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`. An unknown route is \
            404 `not_found`, a known route with another method 405 `method_not_allowed`."
    ),
    paths(
        super::chat::chat_completions,
        super::completions::completions,
        super::responses::create_response,
        super::embeddings::embeddings,
        super::routes::models,
        super::plugin_api::list,
        super::plugin_api::load,
        super::plugin_api::unload,
        super::vllm_lora::load,
        super::vllm_lora::unload,
        super::tokenize::tokenize,
        super::tokenize::detokenize,
        super::routes::health,
        super::routes::live,
        super::routes::metrics,
        openapi_json,
    ),
    components(schemas(ChatCompletionChunk, TextCompletionChunk, ErrorBody)),
    modifiers(&FromTable)
)]
pub struct ApiDoc;

/// The document, built once.
pub fn document() -> &'static Document {
    static DOCUMENT: LazyLock<Document> = LazyLock::new(ApiDoc::openapi);
    &DOCUMENT
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json", body = Object)),
)]
pub async fn openapi_json() -> Json<&'static Document> {
    Json(document())
}

/// Adds what [`OPERATIONS`] says to the derived document: errors, security, the request id.
struct FromTable;

impl Modify for FromTable {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Default::default);
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some(
                "An API key, needed only when the server is started with `--api-key` or \
                 `--api-key-file`; POST and DELETE on /v1/plugins then need an admin key.",
            ))
            .build();
        components
            .security_schemes
            .insert(BEARER.into(), SecurityScheme::Http(scheme));
        for (path, item) in doc.paths.paths.iter_mut() {
            for (method, slot) in operations_mut(item) {
                let Some(op) = slot.as_mut() else { continue };
                let spec = OPERATIONS
                    .iter()
                    .find(|s| s.path == path && s.method == method);
                if let Some(spec) = spec {
                    op.security = Some(security(spec.access));
                    add_errors(op, spec.errors);
                }
                for response in op.responses.responses.values_mut() {
                    if let RefOr::T(response) = response {
                        response
                            .headers
                            .insert(REQUEST_ID_HEADER.to_string(), request_id_header());
                    }
                }
            }
        }
    }
}

/// The operations of a path item, by lower-case method.
pub fn operations_mut(item: &mut PathItem) -> [(&'static str, &mut Option<Operation>); 7] {
    [
        ("get", &mut item.get),
        ("post", &mut item.post),
        ("put", &mut item.put),
        ("delete", &mut item.delete),
        ("patch", &mut item.patch),
        ("head", &mut item.head),
        ("options", &mut item.options),
    ]
}

/// A bearer key, or nothing: keys are optional (`{}` is "no key needed").
fn security(access: Access) -> Vec<SecurityRequirement> {
    match access {
        Access::Open => vec![SecurityRequirement::default()],
        Access::Key | Access::Admin => vec![
            SecurityRequirement::new(BEARER, Vec::<String>::new()),
            SecurityRequirement::default(),
        ],
    }
}

fn request_id_header() -> Header {
    let mut header = Header::new(ObjectBuilder::new().schema_type(Type::String));
    header.description = Some("This request's id, also the suffix of completion ids".into());
    header
}

/// One response per status among `errors`, each listing the codes it can carry.
fn add_errors(op: &mut Operation, errors: &[ErrorKind]) {
    let mut by_status: BTreeMap<u16, Vec<ErrorKind>> = BTreeMap::new();
    for &kind in errors {
        by_status
            .entry(kind.spec().0.as_u16())
            .or_default()
            .push(kind);
    }
    for (status, kinds) in by_status {
        op.responses
            .responses
            .insert(status.to_string(), RefOr::T(error_response(&kinds)));
    }
}

/// The error body narrowed to `kinds`' `type`s and `code`s (all of one status).
fn error_response(kinds: &[ErrorKind]) -> Response {
    let mut types: Vec<&str> = kinds.iter().map(|k| k.spec().1).collect();
    types.dedup();
    let codes: Vec<&str> = kinds.iter().map(|k| k.spec().2).collect();
    let reason = kinds
        .first()
        .and_then(|k| k.spec().0.canonical_reason())
        .unwrap_or("Error");
    let list = codes
        .iter()
        .map(|c| format!("`{c}`"))
        .collect::<Vec<_>>()
        .join(", ");
    let narrowed = ObjectBuilder::new().property(
        "error",
        ObjectBuilder::new()
            .property("type", string_enum(&types))
            .property("code", string_enum(&codes)),
    );
    let schema = AllOf::builder()
        .item(Ref::from_schema_name("ErrorBody"))
        .item(narrowed)
        .build();
    let mut response = Response::new(format!("{reason}: {list}"));
    response.content.insert(
        "application/json".into(),
        Content::new(Some(Schema::AllOf(schema))),
    );
    let retry = [QueueFull, RateLimited, PluginMemoryExhausted];
    if kinds.iter().any(|k| retry.contains(k)) {
        let mut header = Header::new(ObjectBuilder::new().schema_type(Type::Integer));
        header.description = Some(
            "Seconds to wait before retrying (queue_full, rate_limit_exceeded, \
             plugin_memory_exhausted)"
                .into(),
        );
        response.headers.insert("retry-after".into(), header);
    }
    response
}

fn string_enum(values: &[&str]) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values.iter().copied()))
}
