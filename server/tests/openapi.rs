//! The OpenAPI document (`server::http::openapi`): structurally valid OpenAPI 3.1, listing
//! exactly the routes and methods `app()` serves (a new route without documentation fails
//! here), with the error statuses and codes of the operation table, served without a key.
//! Whether replies conform to it is checked by schemathesis in the end-to-end tests.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::Router;
use models::sampling::MAX_TOP_LOGPROBS;
use serde_json::Value;
use server::engine::fake::{FakeConfig, FakeEngine};
use server::http::auth::KeyTable;
use server::http::openapi::{document, Access, OPERATIONS};
use server::http::state::MAX_N;
use server::http::{app, AppState, EngineSlot, HttpConfig};

mod common;

use common::{get, send};

fn doc() -> Value {
    serde_json::to_value(document()).expect("the document serializes")
}

fn fake_app(http: HttpConfig) -> Router {
    let fake = Arc::new(FakeEngine::new(FakeConfig::default()));
    app(AppState::new(EngineSlot::ready(fake), http).expect("state"))
}

const METHODS: [&str; 7] = ["get", "post", "put", "delete", "patch", "head", "options"];

/// (path, method) of every operation in the document.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_object().expect("paths");
    paths
        .iter()
        .flat_map(|(path, item)| {
            METHODS
                .iter()
                .filter(|m| item.get(**m).is_some())
                .map(move |m| (path.clone(), m.to_string()))
        })
        .collect()
}

/// Every `$ref` in `value`.
fn refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get("$ref") {
                out.push(r);
            }
            map.values().for_each(|v| refs(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

#[test]
fn document_is_structurally_valid_openapi_3_1() {
    let doc = doc();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["info"]["title"], "graft");
    assert!(doc["info"]["version"].is_string());
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("a $ref outside the component schemas: {r}"));
        assert!(schemas.contains_key(name), "dangling $ref {r}");
    }
    let mut ids = BTreeSet::new();
    for (path, method) in documented(&doc) {
        let op = &doc["paths"][&path][&method];
        let id = op["operationId"].as_str().expect("operationId");
        assert!(ids.insert(id.to_string()), "operationId {id} twice");
        let responses = op["responses"].as_object().expect("responses");
        assert!(responses.contains_key("200"), "{method} {path} has no 200");
        for (status, response) in responses {
            assert!(
                status.parse::<u16>().is_ok(),
                "{method} {path}: status {status}"
            );
            assert!(
                response["description"].is_string(),
                "{method} {path} {status}"
            );
            assert!(
                response["content"]
                    .as_object()
                    .is_some_and(|c| !c.is_empty()),
                "{method} {path} {status} has no content"
            );
            assert!(response["headers"]["x-request-id"].is_object());
        }
        // Every `{param}` in the path is declared as a path parameter.
        for param in path.split('/').filter_map(|s| s.strip_prefix('{')) {
            let name = param.trim_end_matches('}');
            let declared = op["parameters"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p["name"] == name && p["in"] == "path"));
            assert!(declared, "{method} {path}: `{name}` is not declared");
        }
    }
    let bearer = &doc["components"]["securitySchemes"]["bearer"];
    assert_eq!(bearer["type"], "http");
    assert_eq!(bearer["scheme"], "bearer");
}

#[test]
fn the_operation_table_and_the_document_list_the_same_operations() {
    let from_table: BTreeSet<(String, String)> = OPERATIONS
        .iter()
        .map(|o| (o.path.to_string(), o.method.to_string()))
        .collect();
    assert_eq!(
        from_table.len(),
        OPERATIONS.len(),
        "an operation listed twice"
    );
    assert_eq!(documented(&doc()), from_table);
}

/// The path of every `.route("…", …)` in the router's source: axum cannot list its routes, so
/// the source is where a new one shows up.
fn routes_in_source() -> BTreeSet<String> {
    let source = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/http/mod.rs"))
        .expect("the router's source");
    source
        .split(".route(")
        .skip(1)
        .map(|rest| {
            let rest = rest.trim_start();
            let path = rest.strip_prefix('"').expect("a route path literal");
            path[..path.find('"').expect("closing quote")].to_string()
        })
        .collect()
}

/// The methods `app()` answers on `path` with something else than 405.
async fn served_methods(app: &Router, path: &str) -> BTreeSet<String> {
    let concrete = path.replace("{name}", "probe");
    let mut served = BTreeSet::new();
    for method in ["get", "post", "put", "delete", "patch"] {
        let request = Request::builder()
            .method(Method::from_bytes(method.to_uppercase().as_bytes()).expect("method"))
            .uri(&concrete)
            .body(Body::empty())
            .expect("request");
        let answer = send(app, request).await;
        if answer.status == StatusCode::NOT_FOUND {
            let code = &answer.json()["error"]["code"];
            assert_ne!(code, "not_found", "{method} {path}: no such route");
        }
        if answer.status != StatusCode::METHOD_NOT_ALLOWED {
            served.insert(method.to_string());
        }
    }
    served
}

#[tokio::test]
async fn every_route_and_method_app_serves_is_documented_and_nothing_else() {
    let doc = doc();
    let paths: BTreeSet<String> = doc["paths"]
        .as_object()
        .expect("paths")
        .keys()
        .cloned()
        .collect();
    assert_eq!(routes_in_source(), paths, "routes in app() vs the document");
    let app = fake_app(HttpConfig::default());
    let mut by_path: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (path, method) in documented(&doc) {
        by_path.entry(path).or_default().insert(method);
    }
    for (path, methods) in by_path {
        assert_eq!(served_methods(&app, &path).await, methods, "{path}");
    }
}

#[test]
fn errors_list_the_codes_of_their_status_with_retry_after_on_429() {
    let doc = doc();
    let chat = &doc["paths"]["/v1/chat/completions"]["post"]["responses"];
    let codes = |status: &str| -> Vec<String> {
        let narrowed = &chat[status]["content"]["application/json"]["schema"]["allOf"][1];
        narrowed["properties"]["error"]["properties"]["code"]["enum"]
            .as_array()
            .expect("codes")
            .iter()
            .map(|c| c.as_str().expect("code").to_string())
            .collect()
    };
    for code in ["invalid_json", "invalid_value", "context_length_exceeded"] {
        assert!(codes("400").contains(&code.to_string()), "{code}");
    }
    assert_eq!(codes("408"), ["request_timeout"]);
    assert_eq!(codes("429"), ["rate_limit_exceeded", "queue_full"]);
    assert!(chat["429"]["headers"]["retry-after"].is_object());
    assert!(chat["400"]["headers"].get("retry-after").is_none());
    let ok = &chat["200"]["content"];
    assert!(ok["application/json"]["schema"]["$ref"].is_string());
    // Each event, as clients and schemathesis parse the stream ({data, event}), not a string.
    let event = &ok["text/event-stream"]["schema"];
    assert!(
        event["$ref"]
            .as_str()
            .is_some_and(|r| r.ends_with("/SseEvent")),
        "{event}"
    );
    let sse = &doc["components"]["schemas"]["SseEvent"];
    assert_eq!(sse["required"], serde_json::json!(["data"]), "{sse}");
}

#[test]
fn keyed_operations_take_an_optional_bearer_key_and_open_ones_none() {
    let doc = doc();
    for op in OPERATIONS {
        let security = &doc["paths"][op.path][op.method]["security"];
        let requirements = security.as_array().expect("security");
        let bearer = requirements.iter().any(|r| r.get("bearer").is_some());
        assert_eq!(
            bearer,
            op.access != Access::Open,
            "{} {}",
            op.method,
            op.path
        );
        assert!(
            requirements
                .iter()
                .any(|r| r.as_object().is_some_and(|o| o.is_empty())),
            "keys are optional: {} {}",
            op.method,
            op.path
        );
    }
}

#[tokio::test]
async fn openapi_json_is_served_without_a_key() {
    let http = HttpConfig {
        api_keys: KeyTable::parse("secret\n").expect("keys"),
        ..HttpConfig::default()
    };
    let app = fake_app(http);
    let answer = send(&app, get("/openapi.json")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json(), doc());
    let models = send(&app, get("/v1/models")).await;
    models.error(StatusCode::UNAUTHORIZED, "invalid_api_key");
}

#[test]
fn documented_bounds_are_the_validators_limits() {
    let doc = doc();
    let schemas = &doc["components"]["schemas"];
    for request in ["ChatRequest", "CompletionRequest"] {
        let props = &schemas[request]["properties"];
        assert_eq!(props["n"]["maximum"], MAX_N, "{request}");
    }
    let chat = &schemas["ChatRequest"]["properties"];
    assert_eq!(chat["top_logprobs"]["maximum"], MAX_TOP_LOGPROBS);
    let completion = &schemas["CompletionRequest"]["properties"];
    assert_eq!(completion["logprobs"]["maximum"], MAX_TOP_LOGPROBS);
}

#[test]
fn the_plugin_type_schema_is_the_enum_of_the_kinds_tables_names() {
    let names: Vec<&str> = plugins::KINDS.iter().map(|row| row.name).collect();
    let doc = doc();
    let schema = &doc["components"]["schemas"]["PluginKind"];
    assert_eq!(schema["enum"], serde_json::json!(names), "{schema}");
}
