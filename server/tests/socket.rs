//! The router over a real TCP socket, for what only a connection shows: a client that sends a
//! refused body whole before reading (Python's `http.client` does) must still read its 413.
//! Requests are written by hand, byte for byte, so nothing in a client library hides what the
//! server did with the connection.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use serde_json::Value;
use server::engine::fake::FakeEngine;
use server::http::{app, AppState, EngineSlot, HttpConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Far more than the kernel buffers on both ends of a loopback connection hold (a few MiB
/// each), so a server that stops reading makes the client's write fail, not just wait.
const HUGE: usize = 32 * 1024 * 1024;

const LIMIT: usize = 1024;

async fn serve(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    address
}

fn limited_app() -> Router {
    let http = HttpConfig {
        max_body_bytes: LIMIT,
        ..HttpConfig::default()
    };
    let state = AppState::new(EngineSlot::ready(Arc::new(FakeEngine::default())), http);
    app(state.unwrap())
}

/// A response read to the end of the connection: status code, head and body.
struct Reply {
    status: u16,
    head: String,
    body: Vec<u8>,
}

/// Sends `head` and then `body` in full, as `http.client` does, then reads the reply to the
/// end of the connection. Panics with the I/O error if the connection was reset.
async fn exchange(address: SocketAddr, head: &str, body: impl Iterator<Item = Vec<u8>>) -> Reply {
    let mut socket = TcpStream::connect(address).await.unwrap();
    socket.write_all(head.as_bytes()).await.unwrap();
    for piece in body {
        socket
            .write_all(&piece)
            .await
            .unwrap_or_else(|e| panic!("the server stopped reading the body: {e}"));
    }
    let mut raw = Vec::new();
    socket
        .read_to_end(&mut raw)
        .await
        .unwrap_or_else(|e| panic!("the reply was lost: {e}"));
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete head in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    Reply {
        status,
        head,
        body: raw[split + 4..].to_vec(),
    }
}

fn assert_413_in_our_shape(reply: &Reply) {
    assert_eq!(reply.status, 413, "{}", reply.head);
    let body: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(body["error"]["code"], "payload_too_large", "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(&format!("{LIMIT} bytes")), "{message}");
}

/// 1 MiB pieces adding up to `total` bytes.
fn pieces(total: usize) -> impl Iterator<Item = Vec<u8>> {
    const PIECE: usize = 1 << 20;
    (0..total / PIECE).map(|_| vec![b'x'; PIECE])
}

#[tokio::test]
async fn regression_an_oversize_body_sent_whole_gets_the_413_not_a_reset() {
    let address = serve(limited_app()).await;
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n\
         content-length: {HUGE}\r\nconnection: close\r\n\r\n"
    );
    assert_413_in_our_shape(&exchange(address, &head, pieces(HUGE)).await);
}

#[tokio::test]
async fn regression_an_oversize_chunked_body_sent_whole_gets_the_413_not_a_reset() {
    let address = serve(limited_app()).await;
    let head = "POST /v1/completions HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n\
                transfer-encoding: chunked\r\nconnection: close\r\n\r\n";
    let chunked = pieces(HUGE)
        .map(|piece| {
            let mut chunk = format!("{:x}\r\n", piece.len()).into_bytes();
            chunk.extend_from_slice(&piece);
            chunk.extend_from_slice(b"\r\n");
            chunk
        })
        .chain(std::iter::once(b"0\r\n\r\n".to_vec()));
    assert_413_in_our_shape(&exchange(address, head, chunked).await);
}

#[tokio::test]
async fn an_oversize_body_announced_with_expect_continue_is_refused_before_it_is_sent() {
    let address = serve(limited_app()).await;
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n\
         content-length: {HUGE}\r\nexpect: 100-continue\r\n\r\n"
    );
    let reply = exchange(address, &head, std::iter::empty()).await;
    assert!(
        reply.head.starts_with("HTTP/1.1 413"),
        "no 100 Continue first: {}",
        reply.head
    );
    assert!(reply.head.contains("connection: close"), "{}", reply.head);
    assert_413_in_our_shape(&reply);
}

#[tokio::test]
async fn a_refused_body_read_to_its_end_leaves_the_connection_open() {
    let address = serve(limited_app()).await;
    let mut socket = TcpStream::connect(address).await.unwrap();
    let too_big = vec![b'x'; 4 * LIMIT];
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: test\r\ncontent-length: {}\r\n\r\n",
        too_big.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(&too_big).await.unwrap();
    socket
        .write_all(b"GET /health HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    socket.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert_eq!(text.matches("HTTP/1.1 ").count(), 2, "{text}");
    assert!(text.contains("HTTP/1.1 200"), "{text}");
}
