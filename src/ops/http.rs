//! A tiny HTTP/1.1 responder for `[metrics] listen`: `GET /metrics`
//! (Prometheus text) and `GET /healthz` (200 `ok`, or 503 and the reason).
//! One request per connection, bounded in size, time and concurrency; no
//! authentication, so it belongs on loopback.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::status::Health;

/// Bound on the request head.
const MAX_HEAD: usize = 8 * 1024;
/// Bound on reading a request and writing its answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 16;

/// Serves until `cancel`.
/// The loopback listener of `[metrics] listen`.
pub async fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

pub async fn serve(listener: TcpListener, health: Arc<Health>, cancel: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving metrics on http://{addr}/metrics");
    }
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                debug!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "too many metrics connections; closing one");
            continue;
        };
        let health = health.clone();
        tokio::spawn(async move {
            if tokio::time::timeout(IO_TIMEOUT, answer(stream, &health))
                .await
                .is_err()
            {
                debug!(%peer, "metrics request timed out");
            }
            drop(slot);
        });
    }
}

async fn answer(mut stream: TcpStream, health: &Health) {
    let Some(head) = read_head(&mut stream).await else {
        return;
    };
    let line = String::from_utf8_lossy(&head);
    let mut words = line.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        let status = "405 Method Not Allowed";
        respond(
            &mut stream,
            status,
            "text/plain",
            "GET or HEAD\n",
            head_only,
        )
        .await;
        return;
    }
    let (status, kind, body) = route(path, health);
    respond(&mut stream, status, kind, &body, head_only).await
}

/// The request head, up to the blank line; `None` when the client left or
/// sent too much (answered 431).
async fn read_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > MAX_HEAD {
            let status = "431 Request Header Fields Too Large";
            respond(stream, status, "text/plain", "", false).await;
            return None;
        }
    }
    Some(head)
}

/// Status, content type and body of a GET of `path`.
fn route(path: &str, health: &Health) -> (&'static str, &'static str, String) {
    match path {
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            health.prometheus(),
        ),
        "/healthz" => match health.check() {
            Ok(()) => ("200 OK", "text/plain", "ok\n".into()),
            Err(why) => ("503 Service Unavailable", "text/plain", format!("{why}\n")),
        },
        "/" => (
            "200 OK",
            "text/plain",
            "opencode-nats-bridge: /metrics /healthz\n".into(),
        ),
        _ => ("404 Not Found", "text/plain", "not found\n".into()),
    }
}

async fn respond(stream: &mut TcpStream, status: &str, kind: &str, body: &str, head_only: bool) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    if !head_only {
        let _ = stream.write_all(body.as_bytes()).await;
    }
    let _ = stream.shutdown().await;
}
