//! Helpers of the `ops_*` tests: run the binary's client commands with a
//! bounded wait, plain HTTP GETs, request-many over NATS.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use async_nats::Client;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_opencode-nats-bridge");

/// What a finished command left.
#[derive(Debug)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// The binary with `args`, without any `OPENCODE_BRIDGE__*` variable of
/// the test's environment, stdout and stderr piped.
pub fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("OPENCODE_BRIDGE") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Runs `cmd` to its end (writing `stdin` if given); panics after `limit`.
pub async fn run(mut cmd: Command, stdin: Option<&str>, limit: Duration) -> Output {
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().expect("spawn the binary");
    if let Some(text) = stdin {
        let mut w = child.stdin.take().unwrap();
        w.write_all(text.as_bytes()).await.unwrap();
        drop(w);
    }
    finish(child, limit).await
}

/// Waits for `child` and collects its output; panics after `limit`.
pub async fn finish(child: Child, limit: Duration) -> Output {
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("the command did not finish within {limit:?}"))
        .expect("wait for the command");
    Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `opencode-nats-bridge <args>`, bounded by `limit`.
pub async fn cli(args: &[&str], limit: Duration) -> Output {
    run(command(args), None, limit).await
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("probe a free port")
        .port()
}

/// `GET path` over HTTP/1.1; the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.unwrap();
        String::from_utf8(raw).unwrap()
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .expect("an HTTP answer within 10s");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (status, body.to_string())
}

/// The value of an unlabelled sample (or one with exactly `labels`) in
/// Prometheus text.
pub fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == name_and_labels).then(|| v.parse().ok())?
    })
}

/// Sends a request that several responders answer; collects JSON answers
/// for `wait`.
pub async fn gather(client: &Client, subject: &str, wait: Duration) -> Vec<Value> {
    // Subscribed on the connection that sends the request, so the server
    // has the subscription before any answer (no barrier: a user may lack
    // the right to publish to its own inbox).
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply(subject.to_string(), inbox, Bytes::new())
        .await
        .unwrap();
    client.flush().await.unwrap();
    let deadline = tokio::time::Instant::now() + wait;
    let mut got = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout_at(deadline, sub.next()).await {
        got.push(serde_json::from_slice(&m.payload).unwrap_or(Value::Null));
    }
    got
}
