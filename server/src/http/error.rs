//! Every error the HTTP layer answers with, and the one table that maps each kind to its HTTP
//! status and its OpenAI error body `{"error":{"message","type","param","code"}}`.
//!
//! JSON replies ([`IntoResponse`]) and the error event of a stream that fails half-way
//! ([`ApiError::body`]) both go through [`ErrorKind::spec`], so a client sees the same `type`
//! and `code` whichever way an error reaches it (TGI's status table, meilisearch's code table).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use plugins::PluginError;

use super::replies::{ErrorBody, ErrorObject};
use crate::engine::EngineError;
use crate::tools::ToolError;

/// Seconds a client is asked to wait after a 429 before retrying; the queue drains at the
/// speed of generation, so a short fixed hint beats a computed one that would be wrong anyway.
pub const RETRY_AFTER_SECONDS: u64 = 1;

/// What went wrong, independent of the message; decides status, `type` and `code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The body is not JSON at all.
    InvalidJson,
    /// A field is missing, has the wrong type or is out of range.
    InvalidParameter,
    /// A field that would change the output but that graft does not implement.
    UnsupportedParameter,
    /// Prompt plus `max_tokens` exceed the model's context.
    ContextLengthExceeded,
    ModelNotFound,
    /// A request or route names a plug-in that is not registered.
    PluginNotFound,
    /// `POST /v1/plugins` with a name already taken.
    PluginExists,
    /// Loading a plug-in would exceed the plug-in memory budget and every resident one is in
    /// use; retry when requests finish.
    PluginMemoryExhausted,
    /// An evicted plug-in's files changed on disk since it was registered; only an explicit
    /// replace may change what its name serves.
    PluginChanged,
    RouteNotFound,
    MethodNotAllowed,
    PayloadTooLarge,
    Unauthorized,
    /// The API key may not use the requested model.
    ModelNotAllowed,
    /// The API key may not run a requested plug-in.
    PluginNotAllowed,
    /// Loading, replacing or unloading plug-ins needs an admin key.
    AdminRequired,
    /// The API key is over one of its limits (its 429, unlike the overload 429 `QueueFull`).
    RateLimited,
    /// The generation ran past `request_timeout` and was cancelled.
    RequestTimeout,
    /// The engine's waiting queue is full.
    QueueFull,
    ModelLoading,
    ShuttingDown,
    Internal,
}

impl ErrorKind {
    /// The table: HTTP status, OpenAI `type`, OpenAI `code`.
    pub fn spec(self) -> (StatusCode, &'static str, &'static str) {
        use ErrorKind::*;
        const INVALID: &str = "invalid_request_error";
        const FORBIDDEN: &str = "permission_error";
        match self {
            InvalidJson => (StatusCode::BAD_REQUEST, INVALID, "invalid_json"),
            InvalidParameter => (StatusCode::BAD_REQUEST, INVALID, "invalid_value"),
            UnsupportedParameter => (StatusCode::BAD_REQUEST, INVALID, "unsupported_parameter"),
            ContextLengthExceeded => (StatusCode::BAD_REQUEST, INVALID, "context_length_exceeded"),
            ModelNotFound => (StatusCode::NOT_FOUND, INVALID, "model_not_found"),
            PluginNotFound => (StatusCode::NOT_FOUND, INVALID, "plugin_not_found"),
            PluginExists => (StatusCode::CONFLICT, INVALID, "plugin_exists"),
            PluginMemoryExhausted => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "plugin_memory_exhausted",
            ),
            PluginChanged => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "plugin_changed",
            ),
            RouteNotFound => (StatusCode::NOT_FOUND, INVALID, "not_found"),
            MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                INVALID,
                "method_not_allowed",
            ),
            PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, INVALID, "payload_too_large"),
            Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid_api_key",
            ),
            ModelNotAllowed => (StatusCode::FORBIDDEN, FORBIDDEN, "model_not_allowed"),
            PluginNotAllowed => (StatusCode::FORBIDDEN, FORBIDDEN, "plugin_not_allowed"),
            AdminRequired => (StatusCode::FORBIDDEN, FORBIDDEN, "admin_required"),
            RateLimited => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "rate_limit_exceeded",
            ),
            RequestTimeout => (
                StatusCode::REQUEST_TIMEOUT,
                "timeout_error",
                "request_timeout",
            ),
            QueueFull => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "queue_full",
            ),
            ModelLoading => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "model_loading",
            ),
            ShuttingDown => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "shutting_down",
            ),
            Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal_error",
            ),
        }
    }
}

/// An error on its way to the client: its kind, a message for people and the request field
/// it concerns (`param`), if any.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    pub param: Option<String>,
}

/// Runs `f` on tokio's blocking pool (file reads, hashing), off the threads that stream
/// responses; a task that panicked or was cancelled is a 500 naming `what`.
pub async fn on_blocking_pool<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        // The join error carries the panic's message: the log gets it, the client does not.
        tracing::error!(error = %e, "{what} failed");
        ApiError::new(
            ErrorKind::Internal,
            format!("{what} failed; the server log has the details"),
        )
    })
}

/// The answer to a handler that panicked (tower-http's `CatchPanicLayer` calls it): a 500 in
/// our error shape that says nothing of the panic, which the log records. The connection and
/// the server survive either way; without this the client got no reply at all.
pub fn panicked(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let said = plugins::panic_message(panic.as_ref());
    tracing::error!(panic = %said, "request handler panicked");
    ApiError::new(
        ErrorKind::Internal,
        "internal error while handling the request; the server log has the details",
    )
    .into_response()
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            param: None,
        }
    }

    /// A 400 about one field.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidParameter, message).with_param(param)
    }

    /// A 400 for a field graft does not implement.
    pub fn unsupported(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::UnsupportedParameter, message).with_param(param)
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn status(&self) -> StatusCode {
        self.kind.spec().0
    }

    /// The OpenAI error body, for JSON replies and stream error events alike.
    pub fn payload(&self) -> ErrorBody {
        let (_, kind, code) = self.kind.spec();
        ErrorBody {
            error: ErrorObject {
                message: self.message.clone(),
                kind,
                param: self.param.clone(),
                code,
            },
        }
    }

    /// [`Self::payload`] as JSON.
    pub fn body(&self) -> Value {
        json!(self.payload())
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let message = e.to_string();
        match e {
            EngineError::QueueFull { .. } => Self::new(ErrorKind::QueueFull, message),
            EngineError::ShuttingDown => Self::new(ErrorKind::ShuttingDown, message),
            // The client's messages are what the template rejected, and a client without a
            // template can still use /v1/completions: both are the request's problem.
            EngineError::NoChatTemplate | EngineError::Template(_) => {
                Self::invalid("messages", message)
            }
            EngineError::EmptyPrompt => Self::invalid("prompt", message),
            EngineError::Tokenizer(_)
            | EngineError::NonFiniteLogits(_)
            | EngineError::PluginState(_)
            | EngineError::Internal(_) => Self::new(ErrorKind::Internal, message),
        }
    }
}

impl From<ToolError> for ApiError {
    fn from(e: ToolError) -> Self {
        ApiError::invalid(e.param, e.message)
    }
}

impl From<PluginError> for ApiError {
    fn from(e: PluginError) -> Self {
        let message = e.to_string();
        let kind = match e {
            PluginError::NotFound(_) => ErrorKind::PluginNotFound,
            PluginError::AlreadyLoaded(_) => ErrorKind::PluginExists,
            PluginError::OverBudget { .. } => ErrorKind::PluginMemoryExhausted,
            PluginError::Changed { .. } => ErrorKind::PluginChanged,
            PluginError::Tensor(_) => ErrorKind::Internal,
            PluginError::UnknownType(_)
            | PluginError::WrongType { .. }
            | PluginError::BadParameter { .. }
            | PluginError::BadName { .. }
            | PluginError::BuiltIn(_)
            | PluginError::NameRequired(_)
            | PluginError::BadFile { .. }
            | PluginError::Missing(_)
            | PluginError::Incompatible { .. }
            | PluginError::BadWeights { .. }
            | PluginError::OutsideDir { .. }
            | PluginError::NoPluginDir => ErrorKind::InvalidParameter,
        };
        Self::new(kind, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), Json(self.payload())).into_response();
        // Every "not now" answer says when to come back; a draining server's clients retry
        // elsewhere or after the restart.
        if matches!(
            self.kind,
            ErrorKind::QueueFull
                | ErrorKind::PluginMemoryExhausted
                | ErrorKind::ModelLoading
                | ErrorKind::ShuttingDown
        ) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regression_a_handler_panic_is_a_500_that_does_not_echo_the_panic() {
        let response = panicked(Box::new("index out of bounds: secret detail".to_string()));
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = futures::executor::block_on(axum::body::to_bytes(response.into_body(), 1 << 16))
            .unwrap();
        let text = String::from_utf8_lossy(&body);
        assert!(
            text.contains("internal_error") && !text.contains("secret"),
            "{text}"
        );
    }

    #[test]
    fn body_has_the_four_openai_fields() {
        let e = ApiError::invalid("temperature", "temperature must be in 0..=2");
        let body = e.body();
        assert_eq!(body["error"]["message"], "temperature must be in 0..=2");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["param"], "temperature");
        assert_eq!(body["error"]["code"], "invalid_value");
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn param_is_null_when_absent() {
        let body = ApiError::new(ErrorKind::ModelLoading, "loading").body();
        assert!(body["error"]["param"].is_null());
    }

    #[test]
    fn queue_full_is_429_with_retry_after() {
        let e: ApiError = EngineError::QueueFull { capacity: 3 }.into();
        let response = e.into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn regression_loading_and_shutting_down_are_503_with_retry_after() {
        for kind in [ErrorKind::ModelLoading, ErrorKind::ShuttingDown] {
            let response = ApiError::new(kind, "not now").into_response();
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(response.headers()[header::RETRY_AFTER], "1", "{kind:?}");
        }
    }

    #[test]
    fn engine_errors_map_to_their_kinds() {
        let kind = |e: EngineError| ApiError::from(e).kind;
        assert_eq!(kind(EngineError::ShuttingDown), ErrorKind::ShuttingDown);
        assert_eq!(
            kind(EngineError::NoChatTemplate),
            ErrorKind::InvalidParameter
        );
        assert_eq!(kind(EngineError::Internal("x".into())), ErrorKind::Internal);
    }

    #[test]
    fn plugin_errors_map_to_404_409_503_and_400() {
        let status = |e: PluginError| ApiError::from(e).status();
        assert_eq!(
            status(PluginError::NotFound("a".into())),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            status(PluginError::AlreadyLoaded("a".into())),
            StatusCode::CONFLICT
        );
        let over = PluginError::OverBudget {
            name: "a".into(),
            needed: 2,
            free: 1,
            budget: 3,
        };
        assert_eq!(status(over), StatusCode::SERVICE_UNAVAILABLE);
        let changed = PluginError::Changed {
            name: "a".into(),
            registered: "sha256:1".into(),
            found: "sha256:2".into(),
        };
        assert_eq!(status(changed), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(status(PluginError::NoPluginDir), StatusCode::BAD_REQUEST);
    }
}
