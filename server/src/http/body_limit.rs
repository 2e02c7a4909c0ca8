//! The request body limit (`max_body_bytes`), answered with a 413 the client can read.
//!
//! Runs on every route, just inside `observe`: the body is read here, up to the limit, and
//! handed on as bytes (every route that takes a body parses it whole as JSON anyway). A body
//! over the limit is answered 413 in our error shape, but only after the rest of it has been
//! read and thrown away (at most [`DISCARD_BYTES`], for at most [`DISCARD_TIME`]): a client
//! that sends its whole body before reading the reply (Python's `http.client`, anything
//! without `Expect: 100-continue`) would otherwise have the connection reset under it while
//! still sending, and see a reset instead of the 413. A client that sent
//! `Expect: 100-continue` with a length over the limit is answered at once, before it sends
//! the body (reading it would ask for it). Past the discard bounds the 413 goes out with
//! `Connection: close`.

use std::time::Duration;

use axum::body::{Body, BodyDataStream, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use super::error::{ApiError, ErrorKind};
use super::state::AppState;

/// The most bytes of a refused body read and thrown away so that the 413 reaches its client.
pub const DISCARD_BYTES: usize = 64 * 1024 * 1024;

/// The longest a refused body is read for, so a client trickling one cannot hold the reply.
pub const DISCARD_TIME: Duration = Duration::from_secs(10);

/// Reads the body up to the limit and passes it on, or answers 413.
pub async fn limit_body(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let limit = state.config.max_body_bytes;
    let (parts, body) = req.into_parts();
    let mut stream = body.into_data_stream();
    let announced = content_length(&parts.headers);
    if announced.is_some_and(|n| n > limit) {
        // Too large to read through, or not sent yet: answer before the body comes.
        if expects_continue(&parts.headers) || announced.is_some_and(|n| n > DISCARD_BYTES) {
            return too_large(limit, false);
        }
        let drained = discard(stream).await;
        return too_large(limit, drained);
    }
    match read_up_to(&mut stream, limit).await {
        Ok(Some(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(None) => {
            let drained = discard(stream).await;
            too_large(limit, drained)
        }
        Err(e) => ApiError::new(
            ErrorKind::InvalidJson,
            format!("cannot read the request body: {e}"),
        )
        .into_response(),
    }
}

/// The whole body if it has at most `limit` bytes, `None` as soon as it has more.
async fn read_up_to(
    stream: &mut BodyDataStream,
    limit: usize,
) -> Result<Option<Bytes>, axum::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if body.len() + chunk.len() > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(Bytes::from(body)))
}

/// Reads the rest of a refused body and throws it away; `true` if it ended within the
/// bounds (the connection can then stay open).
async fn discard(mut stream: BodyDataStream) -> bool {
    let drain = async {
        let mut read = 0usize;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(chunk) => read = read.saturating_add(chunk.len()),
                Err(_) => return false,
            }
            if read > DISCARD_BYTES {
                return false;
            }
        }
        true
    };
    tokio::time::timeout(DISCARD_TIME, drain)
        .await
        .unwrap_or(false)
}

fn content_length(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
}

/// The 413 in our error shape; `Connection: close` when the body was not read to its end.
fn too_large(limit: usize, drained: bool) -> Response {
    let mut response = ApiError::new(
        ErrorKind::PayloadTooLarge,
        format!("the request body is larger than the limit of {limit} bytes (max_body_bytes)"),
    )
    .into_response();
    if !drained {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}
