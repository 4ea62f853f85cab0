//! Discovery and health of in-process bridges on a real nats-server (and
//! the fake OpenCode): the micro service (`$SRV.PING/INFO/STATS`, the
//! `status` endpoint), heartbeats, the Prometheus endpoint, and W3C trace
//! context echoed on replies.

use std::net::SocketAddr;
use std::time::Duration;

use async_nats::HeaderMap;
use futures::StreamExt;
use opencode_nats_bridge::config::Config;
use serde_json::Value;

use crate::support::bridge::{
    assert_well_formed, request, request_with_headers, test_config, Bridge,
};
use crate::support::fake_opencode::{echo_reply, FakeOpenCode};
use crate::support::nats::{client, collect_until_terminal, subscribe_ready, NatsServer};
use crate::support::ops::{free_port, gather, http_get, sample};

const TURN: Duration = Duration::from_secs(10);
/// How long a scatter-gather listens.
const GATHER: Duration = Duration::from_millis(700);

async fn rig(
    hosts: &[&str],
    tweak: impl Fn(&mut Config),
) -> (NatsServer, FakeOpenCode, Vec<Bridge>, async_nats::Client) {
    let nats = NatsServer::start();
    let fake = FakeOpenCode::start().await;
    let mut bridges = Vec::new();
    for host in hosts {
        let mut cfg = test_config(&nats.url(), &fake.url(), None);
        cfg.service.host = Some(host.to_string());
        tweak(&mut cfg);
        cfg.validate().unwrap();
        bridges.push(Bridge::start(cfg).await);
    }
    let c = client(&nats.url()).await;
    (nats, fake, bridges, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_ping_info_and_stats_list_every_instance() {
    let (_nats, _fake, bridges, c) = rig(&["one", "two"], |_| {}).await;

    let pongs = gather(&c, "$SRV.PING.opencode-bridge", GATHER).await;
    assert_eq!(pongs.len(), 2, "{pongs:#?}");
    for p in &pongs {
        assert_eq!(p["type"], "io.nats.micro.v1.ping_response");
        assert_eq!(p["name"], "opencode-bridge");
        assert_eq!(p["version"], env!("CARGO_PKG_VERSION"));
    }
    let mut hosts: Vec<&str> = pongs
        .iter()
        .map(|p| p["metadata"]["host"].as_str().unwrap())
        .collect();
    hosts.sort();
    assert_eq!(hosts, ["one", "two"]);
    assert_ne!(pongs[0]["id"], pongs[1]["id"]);
    // Every service on the bus answers the bare verb, ours included.
    assert_eq!(gather(&c, "$SRV.PING", GATHER).await.len(), 2);

    // One instance by id.
    let id = pongs[0]["id"].as_str().unwrap();
    let one = gather(&c, &format!("$SRV.INFO.opencode-bridge.{id}"), GATHER).await;
    assert_eq!(one.len(), 1, "{one:#?}");
    let endpoints = one[0]["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 1, "{one:#?}");
    assert_eq!(endpoints[0]["name"], "status");
    assert_eq!(endpoints[0]["subject"], "opencode.bridge.status");
    // Its own queue group: every instance answers a status request.
    assert_eq!(endpoints[0]["queue_group"], id);

    let stats = gather(&c, "$SRV.STATS.opencode-bridge", GATHER).await;
    assert_eq!(stats.len(), 2, "{stats:#?}");
    for s in &stats {
        let data = &s["endpoints"][0]["data"];
        assert_eq!(data["instance"], s["id"], "{s}");
        assert_eq!(data["healthy"], true, "{s}");
        assert!(data["turns"]["started"].is_u64(), "{s}");
    }

    // The status endpoint, plain request-reply: both answer.
    let status = gather(&c, "opencode.bridge.status", GATHER).await;
    assert_eq!(status.len(), 2, "{status:#?}");

    // A stopped daemon leaves the service.
    let mut bridges = bridges;
    bridges.pop().unwrap().stop().await.unwrap();
    let pongs = gather(&c, "$SRV.PING.opencode-bridge", GATHER).await;
    assert_eq!(pongs.len(), 1, "{pongs:#?}");
    assert_eq!(pongs[0]["metadata"]["host"], "one");
    for b in bridges {
        b.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_counts_turns_in_flight_and_done() {
    let (_nats, _fake, bridges, c) = rig(&["solo"], |_| {}).await;
    let inbox = c.new_inbox();
    let mut sub = subscribe_ready(&c, inbox.clone()).await;
    c.publish_with_reply("opencode.prompt.status.test", inbox, "[slow] count".into())
        .await
        .unwrap();
    tokio::time::timeout(TURN, sub.next())
        .await
        .expect("a first reply");
    let s = gather(&c, "opencode.bridge.status", GATHER).await;
    assert_eq!(s.len(), 1, "{s:#?}");
    assert_eq!(s[0]["host"], "solo");
    assert_eq!(s[0]["turns_in_flight"], 1, "{}", s[0]);
    assert_eq!(s[0]["conversations"], 1, "{}", s[0]);
    assert_eq!(s[0]["prompt_subject"], "opencode.prompt");
    collect_until_terminal(&mut sub, TURN).await;

    let r = request(&c, "opencode.prompt", "[error401] no", TURN).await;
    assert_eq!(r.last().unwrap().1["code"], "provider_error");
    let s = gather(&c, "opencode.bridge.status", GATHER).await;
    let t = &s[0]["turns"];
    assert_eq!(s[0]["turns_in_flight"], 0, "{}", s[0]);
    assert_eq!(s[0]["conversations"], 0, "{}", s[0]);
    // The conversation is still known (idle), the one-off prompt is not one.
    assert_eq!(s[0]["conversations_known"], 1, "{}", s[0]);
    assert_eq!(t["started"], 2, "{t}");
    assert_eq!(t["completed"], 1, "{t}");
    assert_eq!(t["failed"]["provider_error"], 1, "{t}");
    for b in bridges {
        b.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_shows_completed_and_failed_turns() {
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let (_nats, _fake, bridges, c) = rig(&["metered"], |cfg| cfg.metrics.listen = Some(addr)).await;

    let (code, body) = http_get(addr, "/healthz").await;
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let (code, before) = http_get(addr, "/metrics").await;
    assert_eq!(code, 200);
    assert_eq!(
        sample(&before, "opencode_bridge_turns_started_total"),
        Some(0.0)
    );
    assert_eq!(
        sample(&before, "opencode_bridge_opencode_connected"),
        Some(1.0)
    );
    assert_eq!(sample(&before, "opencode_bridge_nats_connected"), Some(1.0));
    assert!(
        before.contains("opencode_bridge_info{version=\""),
        "{before}"
    );

    let r = request(&c, "opencode.prompt", "count the words here", TURN).await;
    assert_well_formed(&r);
    let deltas = r.iter().filter(|(_, v)| v["kind"] == "delta").count() as f64;
    let r = request(&c, "opencode.prompt", "[error401] no", TURN).await;
    assert_eq!(r.last().unwrap().1["kind"], "error");

    let (_, m) = http_get(addr, "/metrics").await;
    let get = |k: &str| sample(&m, k).unwrap_or_else(|| panic!("no {k} in\n{m}"));
    assert_eq!(get("opencode_bridge_turns_started_total"), 2.0);
    assert_eq!(get("opencode_bridge_turns_completed_total"), 1.0);
    assert_eq!(
        get("opencode_bridge_turns_failed_total{code=\"provider_error\"}"),
        1.0
    );
    assert_eq!(
        get("opencode_bridge_turns_failed_total{code=\"timeout\"}"),
        0.0
    );
    assert_eq!(get("opencode_bridge_turns_in_flight"), 0.0);
    assert_eq!(get("opencode_bridge_replies_total{kind=\"delta\"}"), deltas);
    assert_eq!(get("opencode_bridge_replies_total{kind=\"final\"}"), 1.0);
    assert_eq!(get("opencode_bridge_replies_total{kind=\"error\"}"), 1.0);
    assert_eq!(get("opencode_bridge_turn_duration_seconds_count"), 2.0);
    assert_eq!(
        get("opencode_bridge_turn_duration_seconds_bucket{le=\"+Inf\"}"),
        2.0
    );
    assert_eq!(
        get("opencode_bridge_time_to_first_token_seconds_count"),
        1.0
    );
    assert!(get("opencode_bridge_time_to_first_token_seconds_sum") > 0.0);
    assert!(get("opencode_bridge_opencode_events_total") > 0.0);
    assert_eq!(get("opencode_bridge_nats_reconnects_total"), 0.0);

    let (code, _) = http_get(addr, "/nope").await;
    assert_eq!(code, 404);
    for b in bridges {
        b.stop().await.unwrap();
    }
    // The listener is gone with the daemon.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_is_echoed_as_a_child_span_on_every_reply() {
    let (_nats, _fake, bridges, c) = rig(&["traced"], |_| {}).await;
    let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    for name in ["traceparent", "Traceparent"] {
        let mut h = HeaderMap::new();
        h.insert(name, parent);
        let r = request_with_headers(&c, "opencode.prompt", h, "trace me", TURN).await;
        assert_well_formed(&r);
        assert_eq!(r.last().unwrap().1["content"], echo_reply("trace me"));
        let echoed: Vec<String> = r
            .iter()
            .map(|(h, _)| {
                h.as_ref()
                    .and_then(|h| h.get("traceparent"))
                    .map(|v| v.as_str().to_string())
                    .unwrap_or_else(|| panic!("a reply without traceparent: {r:#?}"))
            })
            .collect();
        let first = &echoed[0];
        assert!(
            echoed.iter().all(|e| e == first),
            "one span per turn: {echoed:?}"
        );
        let parts: Vec<&str> = first.split('-').collect();
        assert_eq!(parts.len(), 4, "{first}");
        assert_eq!(parts[0], "00");
        assert_eq!(parts[1], "0af7651916cd43dd8448eb211c80319c", "same trace");
        assert_ne!(parts[2], "b7ad6b7169203331", "the turn's own span");
        assert_eq!(parts[2].len(), 16);
        assert_eq!(parts[3], "01");
    }

    // An invalid one is ignored (the specification says so), and a prompt
    // without one gets no header.
    let mut h = HeaderMap::new();
    h.insert("traceparent", "00-not-a-trace-01");
    let r = request_with_headers(&c, "opencode.prompt", h, "bad trace", TURN).await;
    let r2 = request(&c, "opencode.prompt", "no trace", TURN).await;
    for (h, _) in r.iter().chain(r2.iter()) {
        assert!(h.as_ref().unwrap().get("traceparent").is_none());
    }
    // A refused prompt carries it too.
    let mut h = HeaderMap::new();
    h.insert("traceparent", parent);
    let r = request_with_headers(&c, "opencode.prompt", h, "{\"text\": 42}", TURN).await;
    assert_eq!(r[0].1["code"], "bad_request");
    let t = r[0]
        .0
        .as_ref()
        .unwrap()
        .get("traceparent")
        .unwrap()
        .as_str();
    assert!(t.starts_with("00-0af7651916cd43dd8448eb211c80319c-"), "{t}");
    for b in bridges {
        b.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_carry_the_status_and_a_last_one_says_stopping() {
    let nats = NatsServer::start();
    let fake = FakeOpenCode::start().await;
    let c = client(&nats.url()).await;
    let mut hb = subscribe_ready(&c, "opencode.bridge.heartbeat.>").await;
    let mut cfg = test_config(&nats.url(), &fake.url(), None);
    cfg.service.host = Some("Build-01.example.com".into());
    cfg.service.heartbeat_interval = Duration::from_millis(200);
    let bridge = Bridge::start(cfg).await;

    let mut beats = Vec::new();
    while beats.len() < 3 {
        let m = tokio::time::timeout(Duration::from_secs(5), hb.next())
            .await
            .expect("a heartbeat within 5s")
            .unwrap();
        assert_eq!(
            m.subject.as_str(),
            "opencode.bridge.heartbeat.build-01-example-com"
        );
        beats.push(serde_json::from_slice::<Value>(&m.payload).unwrap());
    }
    for b in &beats {
        assert_eq!(b["host"], "Build-01.example.com");
        assert_eq!(b["stopping"], false);
    }
    bridge.stop().await.unwrap();
    let mut last = None;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(2), hb.next()).await {
        last = Some(serde_json::from_slice::<Value>(&m.payload).unwrap());
    }
    let last = last.expect("a last heartbeat");
    assert_eq!(last["stopping"], true, "{last}");
}
