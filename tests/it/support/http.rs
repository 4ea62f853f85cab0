//! A small, hand-rolled HTTP/1.1 server for tests, on `127.0.0.1:0`.
//!
//! Built directly on [`tokio::net::TcpListener`] (no hyper, no axum) so that a
//! test controls every byte that goes on the wire: fake LLMs, fake OpenCode
//! servers with byte-exact SSE bodies, stalls, dropped connections, 5xx.
//!
//! * Requests: request line, headers, and a body framed by `Content-Length` or
//!   `Transfer-Encoding: chunked` (decoded). `Expect: 100-continue` is honoured.
//! * Connections are kept alive: one connection serves requests one after the
//!   other until the client closes it, sends `Connection: close`, or a response
//!   ends the connection ([`Response::Hangup`], [`Response::Raw`], an aborted
//!   stream).
//! * Responses (see [`Response`]):
//!   - [`Response::Full`]: a body with `Content-Length`;
//!   - [`Response::Stream`]: `Transfer-Encoding: chunked`, one HTTP chunk per
//!     [`Bytes`] received from the channel, flushed at once, so an SSE body can
//!     be written byte-exact and split anywhere. The channel closing ends the
//!     body cleanly; sending an *empty* `Bytes` ([`ABORT`]) drops the
//!     connection on the spot, without the terminating chunk;
//!   - [`Response::Raw`]: the handler writes the bytes of the whole response
//!     itself (status line included); the connection closes afterwards;
//!   - [`Response::Hangup`]: the connection is closed without any response.
//! * Dropping the [`HttpServer`] aborts the accept loop and every connection.
//!
//! ```ignore
//! let server = HttpServer::start(handler(|req: Request| async move {
//!     if req.path() == "/event" {
//!         let (tx, resp) = Response::stream(200, &[("content-type", "text/event-stream")]);
//!         tokio::spawn(async move {
//!             let _ = tx.send(Bytes::from_static(b"data: {}\n\n")).await;
//!         });
//!         resp
//!     } else {
//!         Response::json(404, &serde_json::json!({"error": "nope"}))
//!     }
//! }));
//! let url = server.url(); // "http://127.0.0.1:PORT"
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

/// Largest request head (request line + headers) accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024 * 1024;
/// A connection that sends nothing for this long while a request is being read
/// (or between keep-alive requests) is closed.
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// Send this (an empty chunk) on a [`Response::Stream`] channel to drop the
/// connection abruptly: no terminating `0\r\n\r\n`, the client sees an EOF in
/// the middle of the body.
pub const ABORT: Bytes = Bytes::new();

/// The handler: called once per request; its future yields the response.
pub type Handler = Arc<dyn Fn(Request) -> BoxFuture<'static, Response> + Send + Sync>;

/// Wraps an `async` closure into a [`Handler`].
pub fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send + 'static,
{
    Arc::new(move |req| Box::pin(f(req)))
}

/// One parsed request.
#[derive(Debug, Clone)]
pub struct Request {
    /// `GET`, `POST`, ... as sent.
    pub method: String,
    /// The request target as sent: path and query, e.g. `/event?directory=%2Ftmp`.
    pub target: String,
    /// `HTTP/1.1` or `HTTP/1.0`.
    pub version: String,
    /// Headers in the order received; names as sent (compare case-insensitively,
    /// or use [`Request::header`]).
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked if it came chunked.
    pub body: Bytes,
    /// The client's address.
    pub peer: SocketAddr,
    /// 1-based index of this request on its connection (1 = first request).
    pub nth_on_connection: u64,
    /// Identifies the connection (unique per server, from 1).
    pub connection_id: u64,
}

impl Request {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The path without the query string.
    pub fn path(&self) -> &str {
        self.target.split_once('?').map_or(&self.target, |(p, _)| p)
    }

    /// The raw query string (without `?`), if any.
    pub fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }

    /// A query parameter, percent-decoded (`+` is a space).
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query()?.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k) == name).then(|| percent_decode(v))
        })
    }

    /// The body parsed as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> serde_json::Result<T> {
        serde_json::from_slice(&self.body)
    }

    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// What the handler answers.
#[derive(Debug)]
pub enum Response {
    /// A complete response; `Content-Length` is added unless given.
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: Bytes,
    },
    /// A streamed response with `Transfer-Encoding: chunked` (added for you; do
    /// not set `Content-Length`). Each non-empty `Bytes` becomes one chunk,
    /// written and flushed immediately. Closing the channel (dropping every
    /// sender) ends the response cleanly and the connection stays usable; an
    /// empty `Bytes` ([`ABORT`]) drops the connection mid-body. When the client
    /// goes away (EOF or error on its side, noticed even while the body
    /// stalls), the receiver is dropped: `tx.closed()` resolves and `send`
    /// fails, so a test can assert that a client closed its stream.
    Stream {
        status: u16,
        headers: Vec<(String, String)>,
        body: mpsc::Receiver<Bytes>,
    },
    /// Bytes written to the socket verbatim (the handler writes the status line
    /// and headers itself); the connection is closed when the channel closes.
    /// For malformed responses, `Connection: close` bodies, partial heads...
    Raw(mpsc::Receiver<Bytes>),
    /// Close the connection without writing anything.
    Hangup,
}

impl Response {
    /// A full response with the given headers.
    pub fn full(status: u16, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Response {
        Response::Full {
            status,
            headers: owned_headers(headers),
            body: body.into(),
        }
    }

    /// `application/json` body.
    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        Response::full(
            status,
            &[("content-type", "application/json")],
            serde_json::to_vec(value).expect("serialize json"),
        )
    }

    /// `text/plain` body.
    pub fn text(status: u16, body: impl Into<String>) -> Response {
        Response::full(
            status,
            &[("content-type", "text/plain; charset=utf-8")],
            body.into(),
        )
    }

    /// No body (`Content-Length: 0`).
    pub fn empty(status: u16) -> Response {
        Response::full(status, &[], Bytes::new())
    }

    /// A streamed response and the sender that feeds its body (capacity 64).
    pub fn stream(status: u16, headers: &[(&str, &str)]) -> (mpsc::Sender<Bytes>, Response) {
        let (tx, rx) = mpsc::channel(64);
        (
            tx,
            Response::Stream {
                status,
                headers: owned_headers(headers),
                body: rx,
            },
        )
    }

    /// A `text/event-stream` response (with `cache-control: no-cache`).
    pub fn sse() -> (mpsc::Sender<Bytes>, Response) {
        Response::stream(
            200,
            &[
                ("content-type", "text/event-stream"),
                ("cache-control", "no-cache"),
            ],
        )
    }

    /// A raw response and the sender that feeds the socket.
    pub fn raw() -> (mpsc::Sender<Bytes>, Response) {
        let (tx, rx) = mpsc::channel(64);
        (tx, Response::Raw(rx))
    }
}

fn owned_headers(headers: &[(&str, &str)]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A running server; dropping it stops it (accept loop and connections).
pub struct HttpServer {
    addr: SocketAddr,
    accept: JoinHandle<()>,
    connections: Arc<AtomicU64>,
}

impl HttpServer {
    /// Binds `127.0.0.1:0` and serves `handler` on it.
    pub async fn start(handler: Handler) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let connections = Arc::new(AtomicU64::new(0));
        let counter = connections.clone();
        let accept = tokio::spawn(async move {
            // Owned here: when the accept task is aborted, the set is dropped,
            // which aborts every connection task.
            let mut tasks = JoinSet::new();
            loop {
                while tasks.try_join_next().is_some() {}
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let id = counter.fetch_add(1, Ordering::SeqCst) + 1;
                let handler = handler.clone();
                tasks.spawn(async move {
                    let _ = serve_connection(stream, peer, id, handler).await;
                });
            }
        });
        HttpServer {
            addr,
            accept,
            connections,
        }
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many connections were accepted so far.
    pub fn connections_accepted(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Why a connection ended early; only used to stop the loop.
#[derive(Debug)]
enum ConnEnd {
    Closed,
    Io,
    Malformed(&'static str),
}

impl From<std::io::Error> for ConnEnd {
    fn from(_: std::io::Error) -> Self {
        ConnEnd::Io
    }
}

async fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    connection_id: u64,
    handler: Handler,
) -> Result<(), ConnEnd> {
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut nth = 0u64;
    loop {
        nth += 1;
        let req = match read_request(&mut stream, &mut buf, peer, connection_id, nth).await {
            Ok(req) => req,
            Err(ConnEnd::Malformed(why)) => {
                let body = format!("bad request: {why}\n");
                let head = format!(
                    "HTTP/1.1 400 Bad Request\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                stream.write_all(head.as_bytes()).await?;
                stream.write_all(body.as_bytes()).await?;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let close_after = wants_close(&req);
        let head_only = req.method.eq_ignore_ascii_case("HEAD");
        match handler(req).await {
            Response::Full {
                status,
                headers,
                body,
            } => {
                let mut head = status_line(status);
                let has_len = headers
                    .iter()
                    .any(|(k, _)| k.eq_ignore_ascii_case("content-length"));
                push_headers(&mut head, &headers);
                if !has_len {
                    head.push_str(&format!("content-length: {}\r\n", body.len()));
                }
                if close_after {
                    head.push_str("connection: close\r\n");
                }
                head.push_str("\r\n");
                stream.write_all(head.as_bytes()).await?;
                if !head_only {
                    stream.write_all(&body).await?;
                }
                stream.flush().await?;
            }
            Response::Stream {
                status,
                headers,
                mut body,
            } => {
                let mut head = status_line(status);
                push_headers(&mut head, &headers);
                head.push_str("transfer-encoding: chunked\r\n");
                if close_after {
                    head.push_str("connection: close\r\n");
                }
                head.push_str("\r\n");
                stream.write_all(head.as_bytes()).await?;
                stream.flush().await?;
                loop {
                    // Watch the client too: when it goes away while the body
                    // stalls, drop the receiver now so the sender learns it.
                    let chunk = tokio::select! {
                        chunk = body.recv() => chunk,
                        read = stream.read_buf(&mut buf) => match read {
                            Ok(0) | Err(_) => return Err(ConnEnd::Closed),
                            // Pipelined bytes of the next request: kept in `buf`.
                            Ok(_) if buf.len() > MAX_HEAD + MAX_BODY => return Err(ConnEnd::Closed),
                            Ok(_) => continue,
                        },
                    };
                    let Some(chunk) = chunk else { break };
                    if chunk.is_empty() {
                        // ABORT: drop the connection mid-body.
                        return Ok(());
                    }
                    let mut framed = BytesMut::with_capacity(chunk.len() + 16);
                    framed.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                    framed.extend_from_slice(&chunk);
                    framed.extend_from_slice(b"\r\n");
                    stream.write_all(&framed).await?;
                    stream.flush().await?;
                }
                stream.write_all(b"0\r\n\r\n").await?;
                stream.flush().await?;
            }
            Response::Raw(mut body) => {
                while let Some(chunk) = body.recv().await {
                    stream.write_all(&chunk).await?;
                    stream.flush().await?;
                }
                let _ = stream.shutdown().await;
                return Ok(());
            }
            Response::Hangup => return Ok(()),
        }
        if close_after {
            let _ = stream.shutdown().await;
            return Ok(());
        }
    }
}

fn wants_close(req: &Request) -> bool {
    let conn = req.header("connection").unwrap_or("").to_ascii_lowercase();
    if req.version.eq_ignore_ascii_case("HTTP/1.0") {
        !conn.contains("keep-alive")
    } else {
        conn.split(',').any(|t| t.trim() == "close")
    }
}

fn status_line(status: u16) -> String {
    format!("HTTP/1.1 {status} {}\r\n", reason(status))
}

fn push_headers(head: &mut String, headers: &[(String, String)]) {
    for (k, v) in headers {
        head.push_str(k);
        head.push_str(": ");
        head.push_str(v);
        head.push_str("\r\n");
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

/// Reads more bytes into `buf`; `Closed` on EOF, bounded by [`READ_TIMEOUT`].
async fn fill(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<(), ConnEnd> {
    match tokio::time::timeout(READ_TIMEOUT, stream.read_buf(buf)).await {
        Err(_) => Err(ConnEnd::Closed),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(0)) => Err(ConnEnd::Closed),
        Ok(Ok(_)) => Ok(()),
    }
}

/// Reads one CRLF- (or LF-) terminated line, without its terminator.
async fn read_line(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    limit: usize,
) -> Result<String, ConnEnd> {
    loop {
        if let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line = buf.split_to(pos + 1);
            let line = &line[..pos];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            return String::from_utf8(line.to_vec()).map_err(|_| ConnEnd::Malformed("utf-8"));
        }
        if buf.len() > limit {
            return Err(ConnEnd::Malformed("line too long"));
        }
        fill(stream, buf).await?;
    }
}

async fn read_exact_into(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    n: usize,
) -> Result<Bytes, ConnEnd> {
    while buf.len() < n {
        fill(stream, buf).await?;
    }
    Ok(buf.split_to(n).freeze())
}

async fn read_request(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    peer: SocketAddr,
    connection_id: u64,
    nth_on_connection: u64,
) -> Result<Request, ConnEnd> {
    // Tolerate stray empty lines between requests (RFC 9112 section 2.2).
    let request_line = loop {
        let line = read_line(stream, buf, MAX_HEAD).await?;
        if !line.is_empty() {
            break line;
        }
    };
    let mut parts = request_line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(ConnEnd::Malformed("request line"));
    };
    let (method, target, version) = (method.to_string(), target.to_string(), version.to_string());

    let mut headers = Vec::new();
    let mut head_size = request_line.len();
    loop {
        let line = read_line(stream, buf, MAX_HEAD).await?;
        if line.is_empty() {
            break;
        }
        head_size += line.len();
        if head_size > MAX_HEAD {
            return Err(ConnEnd::Malformed("head too large"));
        }
        let Some((k, v)) = line.split_once(':') else {
            return Err(ConnEnd::Malformed("header line"));
        };
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }

    let mut req = Request {
        method,
        target,
        version,
        headers,
        body: Bytes::new(),
        peer,
        nth_on_connection,
        connection_id,
    };

    if req
        .header("expect")
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
    {
        stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
        stream.flush().await?;
    }

    let chunked = req
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        let mut body = BytesMut::new();
        loop {
            let size_line = read_line(stream, buf, 1024).await?;
            let size_hex = size_line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_hex, 16)
                .map_err(|_| ConnEnd::Malformed("chunk size"))?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !read_line(stream, buf, MAX_HEAD).await?.is_empty() {}
                break;
            }
            if body.len() + size > MAX_BODY {
                return Err(ConnEnd::Malformed("body too large"));
            }
            let data = read_exact_into(stream, buf, size).await?;
            body.extend_from_slice(&data);
            let crlf = read_line(stream, buf, 2).await?;
            if !crlf.is_empty() {
                return Err(ConnEnd::Malformed("chunk terminator"));
            }
        }
        req.body = body.freeze();
    } else if let Some(len) = req.header("content-length") {
        let len: usize = len
            .trim()
            .parse()
            .map_err(|_| ConnEnd::Malformed("content-length"))?;
        if len > MAX_BODY {
            return Err(ConnEnd::Malformed("body too large"));
        }
        req.body = read_exact_into(stream, buf, len).await?;
    }
    // Any pipelined bytes stay in `buf` for the next request.
    Ok(req)
}

/// Percent-decodes a URL component (`+` becomes a space).
pub fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Echoes method, target and body; `/sse` streams three chunks, `/abort`
    /// streams one then drops, `/hangup` closes at once.
    async fn server() -> HttpServer {
        HttpServer::start(handler(|req: Request| async move {
            match req.path() {
                "/sse" => {
                    let (tx, resp) = Response::sse();
                    tokio::spawn(async move {
                        for c in ["data: a\r", "\n\r\n", "data: b\n\n"] {
                            let _ = tx.send(Bytes::from(c)).await;
                        }
                    });
                    resp
                }
                "/abort" => {
                    let (tx, resp) = Response::sse();
                    tokio::spawn(async move {
                        let _ = tx.send(Bytes::from("data: partial")).await;
                        let _ = tx.send(ABORT).await;
                    });
                    resp
                }
                "/hangup" => Response::Hangup,
                _ => Response::text(
                    200,
                    format!(
                        "{} {} q={:?} #{} {}",
                        req.method,
                        req.path(),
                        req.query_param("x"),
                        req.nth_on_connection,
                        req.text()
                    ),
                ),
            }
        }))
        .await
    }

    async fn read_until(stream: &mut TcpStream, needle: &str) -> String {
        let mut got = Vec::new();
        let fut = async {
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&got).contains(needle) {
                let n = stream.read(&mut buf).await.expect("read");
                assert!(
                    n > 0,
                    "eof before {needle:?}: {}",
                    String::from_utf8_lossy(&got)
                );
                got.extend_from_slice(&buf[..n]);
            }
        };
        tokio::time::timeout(Duration::from_secs(5), fut)
            .await
            .expect("timed out reading");
        String::from_utf8_lossy(&got).into_owned()
    }

    #[tokio::test]
    async fn keep_alive_and_chunked_request_bodies() {
        let server = server().await;
        let mut s = TcpStream::connect(server.addr()).await.unwrap();
        s.write_all(b"POST /a?x=1%202 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello")
            .await
            .unwrap();
        let first = read_until(&mut s, "hello").await;
        assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{first}");
        assert!(
            first.ends_with("POST /a q=Some(\"1 2\") #1 hello"),
            "{first}"
        );
        s.write_all(
            b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
        let second = read_until(&mut s, "abcde").await;
        assert!(second.ends_with("POST /b q=None #2 abcde"), "{second}");
        assert_eq!(server.connections_accepted(), 1);
    }

    #[tokio::test]
    async fn streams_chunks_byte_exact_and_aborts() {
        let server = server().await;
        let client = reqwest::Client::new();
        let resp = client
            .get(format!("{}/sse", server.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        assert_eq!(resp.text().await.unwrap(), "data: a\r\n\r\ndata: b\n\n");

        let resp = client
            .get(format!("{}/abort", server.url()))
            .send()
            .await
            .unwrap();
        assert!(resp.bytes().await.is_err(), "an aborted body is an error");

        let err = client.get(format!("{}/hangup", server.url())).send().await;
        assert!(err.is_err(), "a hangup is an error");
    }

    #[tokio::test]
    async fn a_client_leaving_a_stalled_stream_is_noticed() {
        let (closed_tx, mut closed_rx) = mpsc::channel::<()>(1);
        let server = HttpServer::start(handler(move |_req: Request| {
            let closed_tx = closed_tx.clone();
            async move {
                let (tx, resp) = Response::sse();
                tokio::spawn(async move {
                    let _ = tx.send(Bytes::from("data: first\n\n")).await;
                    tx.closed().await; // stall until the client leaves
                    let _ = closed_tx.send(()).await;
                });
                resp
            }
        }))
        .await;
        let mut s = TcpStream::connect(server.addr()).await.unwrap();
        s.write_all(b"GET /event HTTP/1.1\r\n\r\n").await.unwrap();
        read_until(&mut s, "data: first").await;
        drop(s);
        tokio::time::timeout(Duration::from_secs(5), closed_rx.recv())
            .await
            .expect("the sender saw the client leave")
            .unwrap();
    }
}
