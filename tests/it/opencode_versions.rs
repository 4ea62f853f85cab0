//! OpenCode versions (docs/COMPATIBILITY.md): a server the bridge cannot
//! drive is refused at start with one message (exit 78 from the binary),
//! not a cascade of 404s; the version is read again after a reconnect.
//!
//! The servers here are a few lines of HTTP that answer what an OpenCode of
//! that version (or something else) would answer on the routes the bridge
//! reads first. The real versions run in `.ci/compat`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::support::bridge::{test_config, Bridge};
use crate::support::http::{handler, HttpServer, Request, Response};
use crate::support::nats::{client, NatsServer};
use crate::support::ops::{command, BIN};
use opencode_nats_bridge::app;

/// What the stand-in server answers.
#[derive(Clone)]
struct Shape {
    /// `GET /global/health` `version`; `None`: 404 there.
    version: Option<String>,
    /// The v1 routes answer (else 404 everywhere but the health).
    v1: bool,
}

struct StandIn {
    server: HttpServer,
    shape: Arc<Mutex<Shape>>,
    /// `METHOD /path` of every request.
    seen: Arc<Mutex<Vec<String>>>,
    /// The open `/event` streams (dropping them cuts the connections).
    streams: Arc<Mutex<Vec<mpsc::Sender<Bytes>>>>,
}

impl StandIn {
    async fn start(version: Option<&str>, v1: bool) -> StandIn {
        let shape = Arc::new(Mutex::new(Shape {
            version: version.map(str::to_string),
            v1,
        }));
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let streams: Arc<Mutex<Vec<mpsc::Sender<Bytes>>>> = Arc::default();
        let (sh, se, st) = (shape.clone(), seen.clone(), streams.clone());
        let server = HttpServer::start(handler(move |req: Request| {
            let shape = sh.lock().unwrap().clone();
            se.lock()
                .unwrap()
                .push(format!("{} {}", req.method, req.path()));
            let streams = st.clone();
            async move { answer(&shape, &req, &streams) }
        }))
        .await;
        StandIn {
            server,
            shape,
            seen,
            streams,
        }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

fn answer(shape: &Shape, req: &Request, streams: &Mutex<Vec<mpsc::Sender<Bytes>>>) -> Response {
    let not_found = || Response::json(404, &json!({"name": "NotFoundError"}));
    match (req.method.as_str(), req.path()) {
        ("GET", "/global/health") => match &shape.version {
            Some(v) => Response::json(200, &json!({"healthy": true, "version": v})),
            None => not_found(),
        },
        _ if !shape.v1 => not_found(),
        ("GET", "/event") => {
            let (tx, resp) = Response::sse();
            let connected = json!({"id": "evt_1", "type": "server.connected", "properties": {}});
            let _ = tx.try_send(Bytes::from(format!("data: {connected}\n\n")));
            streams.lock().unwrap().push(tx);
            resp
        }
        ("GET", "/session/status") => Response::json(200, &json!({})),
        ("GET", "/session") | ("GET", "/agent") => Response::json(200, &json!([])),
        ("GET", "/config/providers") => {
            Response::json(200, &json!({"providers": [], "default": {}}))
        }
        _ => not_found(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_the_bridge_cannot_drive_is_refused_at_start_with_one_message() {
    let nats = NatsServer::start();
    let cases = [
        (Some("2.0.0"), false, "2.x removed the v1 HTTP routes"),
        (Some("1.15.0"), true, "upgrade to 1.15.5 or newer"),
        (Some("1.14.42"), true, "upgrade to 1.15.5 or newer"),
        (Some("1.18.34"), false, "has no GET /session/status"),
        (Some("v2-preview"), false, "has no GET /session/status"),
        (None, false, "not an OpenCode server the bridge can drive"),
    ];
    for (version, v1, needle) in cases {
        let oc = StandIn::start(version, v1).await;
        let cfg = test_config(&nats.url(), &oc.server.url(), None);
        let run = app::run(cfg, std::future::pending(), None);
        let err = tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .expect("the bridge gives up at once")
            .expect_err("the bridge refuses to start");
        let msg = err.to_string();
        assert!(err.is_config(), "{version:?}: a config problem: {msg}");
        assert!(
            msg.contains(needle),
            "{version:?}: {msg:?} lacks {needle:?}"
        );
        // One look, not a cascade: the health and at most the v1 probe.
        let seen = oc.seen();
        assert!(
            seen.iter()
                .all(|r| r == "GET /global/health" || r == "GET /session/status"),
            "{version:?}: {seen:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_exits_78_naming_the_fix() {
    let nats = NatsServer::start();
    let oc = StandIn::start(Some("1.15.4"), true).await;
    let out = command(&["run"])
        .env("OPENCODE_BRIDGE__NATS__URL", nats.url())
        .env("OPENCODE_BRIDGE__OPENCODE__BASE_URL", oc.server.url())
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("the daemon exits at once")
        .expect("run the daemon");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{BIN}: {stderr}");
    assert!(stderr.contains("upgrade to 1.15.5 or newer"), "{stderr}");
}

async fn status(c: &async_nats::Client) -> Value {
    let msg = tokio::time::timeout(
        Duration::from_secs(10),
        c.request("opencode.bridge.status", Bytes::new()),
    )
    .await
    .expect("a status answer")
    .expect("status request");
    serde_json::from_slice(&msg.payload).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_version_is_read_again_after_a_reconnect() {
    let nats = NatsServer::start();
    let oc = StandIn::start(Some("1.17.19"), true).await;
    let mut cfg = test_config(&nats.url(), &oc.server.url(), None);
    cfg.opencode.reconnect_min = Duration::from_millis(50);
    cfg.opencode.reconnect_max = Duration::from_millis(200);
    let bridge = Bridge::start(cfg).await;
    let c = client(&nats.url()).await;
    let s = status(&c).await;
    assert_eq!(s["opencode_version"], "1.17.19", "{s}");

    // The server is replaced by a newer one under the running daemon.
    oc.shape.lock().unwrap().version = Some("1.18.34".into());
    oc.streams.lock().unwrap().clear();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut s = status(&c).await;
    while s["opencode_version"] != "1.18.34" && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        s = status(&c).await;
    }
    assert_eq!(s["opencode_version"], "1.18.34", "{s}");

    // Then by a 2.x: the daemon says it is unhealthy, and why.
    oc.shape.lock().unwrap().version = Some("2.0.0".into());
    oc.streams.lock().unwrap().clear();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut s = status(&c).await;
    while s["opencode_version"] != "2.0.0" && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        s = status(&c).await;
    }
    assert_eq!(s["opencode_version"], "2.0.0", "{s}");
    assert_eq!(s["healthy"], false, "{s}");
    assert!(
        s["problem"].as_str().unwrap_or_default().contains("2.x"),
        "{s}"
    );
    bridge.stop().await.unwrap();
}
