//! `[jetstream] replicas` (docs/CLUSTER.md, "Three nats-servers"): every
//! bucket and stream the daemon creates gets that many copies; a cluster
//! that cannot place them stops the start with an error that says so; one
//! found with another count is used and reported.

use std::process::Stdio;
use std::time::Duration;

use async_nats::jetstream;
use serde_json::json;
use tokio::process::Command;

use crate::support::bridge::{request, terminal, test_config, Bridge};
use crate::support::cluster::NatsCluster;
use crate::support::daemon::{log_lines, spawn_serving, wait_for_line, BIN};
use crate::support::fake_opencode::{echo_reply, FakeOpenCode};
use crate::support::nats::{client, NatsServer};

/// The daemon binary on `nats_url` and `fake`, with `replicas`.
fn daemon(nats_url: &str, fake: &FakeOpenCode, replicas: usize) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("run")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("OPENCODE_BRIDGE__NATS__URL", nats_url)
        .env("OPENCODE_BRIDGE__OPENCODE__BASE_URL", fake.url())
        .env("OPENCODE_BRIDGE__CLUSTER__ENABLED", "on")
        .env("OPENCODE_BRIDGE__JETSTREAM__JOBS", "on")
        .env("OPENCODE_BRIDGE__JETSTREAM__REPLICAS", replicas.to_string())
        .env("OPENCODE_BRIDGE__AGENT_PROTOCOL__ENABLED", "false")
        .env("RUST_LOG", "info");
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_the_server_cannot_place_stop_the_start_with_a_clear_error() {
    let nats = NatsServer::start();
    let fake = FakeOpenCode::start().await;
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        daemon(&nats.url(), &fake, 3).output(),
    )
    .await
    .expect("the daemon stops at once")
    .expect("run the daemon");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it must not serve; log:\n{log}");
    assert!(
        log.contains("with 3 replicas: the cluster cannot place them")
            && log.contains("[jetstream] replicas"),
        "the error names the count and the key; log:\n{log}"
    );
    assert!(!log.contains("is serving"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_found_with_another_replica_count_is_used_and_reported() {
    let nats = NatsServer::start();
    let fake = FakeOpenCode::start().await;
    // The first daemon makes everything with one copy, then stops.
    let (mut first, _log) =
        spawn_serving(daemon(&nats.url(), &fake, 1), Duration::from_secs(30)).await;
    let pid = nix::unistd::Pid::from_raw(first.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let _ = first.wait().await;
    // The next asks for two: it serves on what exists and says so for each.
    let mut second = daemon(&nats.url(), &fake, 2)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the daemon");
    let mut log = log_lines(&mut second);
    let mut seen = Vec::new();
    let serving = wait_for_line(&mut log, &mut seen, "is serving", Duration::from_secs(30)).await;
    assert!(serving, "it serves; log:\n{}", seen.join("\n"));
    let c = client(&nats.url()).await;
    let r = request(
        &c,
        "opencode.prompt",
        r#"{"text":"still served"}"#,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(terminal(&r)["kind"], "final", "{r:?}");
    for name in [
        "opencode_bridge_conversations",
        "opencode_bridge_instances",
        "opencode_bridge_turns",
        "OPENCODE_JOBS",
    ] {
        assert!(
            seen.iter().any(|l| l.contains("another replica count")
                && l.contains(&format!("name=\"{name}\""))
                && l.contains("found=1")
                && l.contains("configured=2")),
            "{name} reported; log:\n{}",
            seen.join("\n")
        );
    }
    let js = jetstream::new(c.clone());
    let info = js
        .get_stream("KV_opencode_bridge_conversations")
        .await
        .unwrap();
    assert_eq!(info.cached_info().config.num_replicas, 1, "used as it is");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_three_node_cluster_every_bucket_and_stream_has_three_copies() {
    let cluster = NatsCluster::start(3, Duration::from_secs(60)).await;
    let fake = FakeOpenCode::start().await;
    let mut cfg = test_config(&cluster.url(1), &fake.url(), None);
    cfg.jetstream.replicas = 3;
    cfg.jetstream.replies_stream = "OPENCODE_REPLIES".into();
    cfg.limits.max_reply_bytes = 2048;
    cfg.validate().expect("valid");
    let bridge = Bridge::start(cfg).await;
    let c = client(&cluster.url(2)).await;
    // A final too long for one reply: its text goes to the finals bucket.
    let long = "x".repeat(4000);
    let payload = json!({"text": long}).to_string();
    let r = request(&c, "opencode.prompt", &payload, Duration::from_secs(30)).await;
    let fin = terminal(&r);
    assert_eq!(fin["kind"], "final", "{fin}");
    assert!(fin["content_object"].is_object(), "a large final: {fin}");
    assert!(echo_reply(&long).starts_with(fin["content"].as_str().unwrap()));
    let js = jetstream::new(c.clone());
    for stream in [
        "KV_opencode_bridge_conversations",
        "KV_opencode_bridge_instances",
        "KV_opencode_bridge_turns",
        "OBJ_opencode_bridge_finals",
        "OPENCODE_JOBS",
        "OPENCODE_REPLIES",
    ] {
        let s = js
            .get_stream(stream)
            .await
            .unwrap_or_else(|e| panic!("{stream}: {e}"));
        assert_eq!(s.cached_info().config.num_replicas, 3, "{stream}");
    }
    bridge.stop().await.unwrap();
}
