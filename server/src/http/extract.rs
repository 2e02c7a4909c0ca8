//! The JSON body extractor every POST route uses, so that malformed JSON, a wrong type or an
//! unsupported field is answered with our OpenAI-shaped 400 (naming the field) instead of
//! axum's plain-text rejection.
//!
//! Parsing happens in two steps: bytes to a `serde_json::Value` (a syntax error is
//! [`ErrorKind::InvalidJson`]), then [`Screen::screen`] removes fields that are accepted but
//! have no effect and rejects those that would change the output but are not implemented,
//! then the typed request is deserialized with `deny_unknown_fields` through
//! `serde_path_to_error`, so a type error names the path (`messages[0].content`).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::error::{ApiError, ErrorKind};

/// A request type's policy for fields beyond its own: which are harmless and dropped, which
/// are refused with a message. Runs on the raw JSON object before typed deserialization.
pub trait Screen {
    fn screen(_body: &mut Map<String, Value>) -> Result<(), ApiError> {
        Ok(())
    }
}

/// A JSON body, parsed and screened; see the module documentation.
#[derive(Debug, Clone)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Screen,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            // `body_limit` answers oversize bodies before this; an axum limit would land here.
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(ErrorKind::PayloadTooLarge, "request body is too large")
            } else {
                ApiError::new(ErrorKind::InvalidJson, rejection.body_text())
            }
        })?;
        parse(&bytes).map(ApiJson)
    }
}

/// Parses, screens and deserializes one request body.
pub fn parse<T: DeserializeOwned + Screen>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut value: Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            ErrorKind::InvalidJson,
            format!("the request body is not valid JSON: {e}"),
        )
    })?;
    match value.as_object_mut() {
        Some(object) => T::screen(object)?,
        None => {
            return Err(ApiError::new(
                ErrorKind::InvalidJson,
                "the request body must be a JSON object",
            ))
        }
    }
    serde_path_to_error::deserialize(value).map_err(type_error)
}

/// Turns a typed-deserialization error into a 400 naming the field.
fn type_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let inner = e.inner().to_string();
    let param = e.path().to_string();
    // serde_path_to_error already ends the path with the unknown field's name.
    if inner.starts_with("unknown field `") {
        return ApiError::unsupported(
            param.clone(),
            format!("`{param}` is not supported by this server ({inner})"),
        );
    }
    match param.as_str() {
        "." => ApiError::new(ErrorKind::InvalidParameter, inner),
        _ => ApiError::invalid(param.clone(), format!("{param}: {inner}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Probe {
        #[allow(dead_code)]
        n: Option<u32>,
        #[allow(dead_code)]
        inner: Option<Vec<Inner>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        #[allow(dead_code)]
        x: u32,
    }

    impl Screen for Probe {}

    #[test]
    fn syntax_error_is_invalid_json() {
        let e = parse::<Probe>(b"{\"n\": ").unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidJson);
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
    }

    #[test]
    fn non_object_is_invalid_json() {
        let e = parse::<Probe>(b"[1]").unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidJson);
    }

    #[test]
    fn wrong_type_names_the_nested_path() {
        let e = parse::<Probe>(br#"{"inner": [{"x": "a"}]}"#).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidParameter);
        assert_eq!(e.param.as_deref(), Some("inner[0].x"));
        assert!(e.message.contains("invalid type"), "{}", e.message);
    }

    #[test]
    fn unknown_field_is_unsupported_and_named() {
        let e = parse::<Probe>(br#"{"best_of": 3}"#).unwrap_err();
        assert_eq!(e.kind, ErrorKind::UnsupportedParameter);
        assert_eq!(e.param.as_deref(), Some("best_of"));
        let e = parse::<Probe>(br#"{"inner": [{"x": 1, "y": 2}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("inner[0].y"));
    }
}
