//! The cluster on NATS (docs/CLUSTER.md): several daemons on one real
//! nats-server with JetStream, each on its own fake OpenCode or sharing
//! one. A conversation keeps one home; its turns never overlap; a stopped
//! or killed home is taken over; the daemon never drops a prompt at
//! `max_in_flight`.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use opencode_nats_bridge::config::Config;
use serde_json::{json, Value};
use tokio::process::{Child, Command};

use crate::support::bridge::{assert_well_formed, request, terminal, test_config, Bridge};
use crate::support::daemon::{spawn_serving, BIN};
use crate::support::fake_opencode::{
    echo_reply, paced_text_turn, FakeOpenCode, TurnInput, TurnScript,
};
use crate::support::nats::{client, is_terminal, subscribe_ready, NatsServer, Reply};

/// Bound on one turn's replies.
const TURN: Duration = Duration::from_secs(20);

fn config(
    nats: &NatsServer,
    fake: &FakeOpenCode,
    host: &str,
    tweak: impl FnOnce(&mut Config),
) -> Config {
    let mut c = test_config(&nats.url(), &fake.url(), None);
    c.service.host = Some(host.to_string());
    tweak(&mut c);
    c.validate().expect("valid config");
    c
}

/// A turn of five deltas 40 ms apart: long enough for turns to overlap if
/// anything let them.
fn paced(input: &TurnInput) -> TurnScript {
    let words: Vec<String> = (1..=5).map(|i| format!("w{i} ")).collect();
    paced_text_turn(input, &words, 40)
}

async fn ask(c: &async_nats::Client, subject: &str, text: &str) -> Value {
    let r = request(c, subject, &json!({"text": text}).to_string(), TURN).await;
    assert_well_formed(&r);
    terminal(&r).clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_keeps_one_home_and_one_session_across_two_daemons() {
    let nats = NatsServer::start();
    let (fa, fb) = (FakeOpenCode::start().await, FakeOpenCode::start().await);
    let a = Bridge::start(config(&nats, &fa, "host-a", |_| {})).await;
    let b = Bridge::start(config(&nats, &fb, "host-b", |_| {})).await;
    let c = client(&nats.url()).await;
    let mut sessions = HashSet::new();
    for i in 0..10 {
        let text = format!("turn {i}");
        let fin = ask(&c, "opencode.prompt.chat.c1", &text).await;
        assert_eq!(fin["kind"], "final", "{fin}");
        assert_eq!(fin["content"], echo_reply(&text).as_str());
        assert_ne!(fin["session_recreated"], true, "{fin}");
        sessions.insert(fin["session_id"].as_str().unwrap().to_string());
    }
    assert_eq!(sessions.len(), 1, "one session: {sessions:?}");
    // The queue group spread the ten prompts over both daemons (all ten on
    // one has a chance of 2 in 1024); every turn ran on one OpenCode.
    let (na, nb) = (fa.prompts().len(), fb.prompts().len());
    assert!(
        (na, nb) == (10, 0) || (na, nb) == (0, 10),
        "prompts per OpenCode: {na} and {nb}"
    );
    // Another conversation may live elsewhere; each keeps its own home.
    let fin = ask(&c, "opencode.prompt.chat.c2", "other").await;
    assert_eq!(fin["kind"], "final");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// Whether any two turns' delta streams overlapped on the fake.
fn overlapping(fake: &FakeOpenCode) -> Vec<(usize, usize)> {
    let w = fake.delta_windows();
    let mut out = Vec::new();
    for i in 0..w.len() {
        for j in i + 1..w.len() {
            if w[i].0 <= w[j].1 && w[j].0 <= w[i].1 {
                out.push((i, j));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_on_one_opencode_never_run_two_turns_of_a_conversation_at_once() {
    let nats = NatsServer::start();
    let fake = FakeOpenCode::start().await;
    fake.set_script(paced);
    let a = Bridge::start(config(&nats, &fake, "host-a", |_| {})).await;
    let b = Bridge::start(config(&nats, &fake, "host-b", |_| {})).await;
    let c = client(&nats.url()).await;
    let mut sub = subscribe_ready(&c, "chat.replies.>").await;
    const N: usize = 8;
    for i in 0..N {
        let payload = json!({"text": format!("p{i}"), "trace_id": format!("t{i}")});
        c.publish_with_reply(
            "opencode.prompt.chat.shared",
            format!("chat.replies.{i}"),
            Bytes::from(payload.to_string()),
        )
        .await
        .unwrap();
    }
    c.flush().await.unwrap();
    let mut finals = 0;
    let deadline = tokio::time::Instant::now() + TURN;
    while finals < N {
        let m = tokio::time::timeout_at(deadline, sub.next())
            .await
            .unwrap_or_else(|_| panic!("only {finals} of {N} turns ended"))
            .unwrap();
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        if is_terminal(&v) {
            assert_eq!(v["kind"], "final", "{v}");
            finals += 1;
        }
    }
    assert_eq!(fake.turns().len(), N);
    assert_eq!(
        overlapping(&fake),
        vec![],
        "turns of one conversation overlapped"
    );
    let sessions: HashSet<String> = fake.prompts().iter().map(|r| r.path.clone()).collect();
    assert_eq!(sessions.len(), 1, "one session: {sessions:?}");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_hands_the_conversation_over_at_once() {
    let nats = NatsServer::start();
    let shared = FakeOpenCode::start().await;
    let own = FakeOpenCode::start().await;
    // A long lease: only the hand-back can make the next prompt quick.
    let long = |c: &mut Config| c.cluster.lease_ttl = Duration::from_secs(300);
    let a = Bridge::start(config(&nats, &shared, "host-a", long)).await;
    let c = client(&nats.url()).await;
    let first = ask(&c, "opencode.prompt.chat.h1", "first").await;
    assert_eq!(first["kind"], "final", "{first}");
    let first_own = ask(&c, "opencode.prompt.chat.h2", "first").await;
    assert_eq!(first_own["kind"], "final", "{first_own}");
    // B shares A's OpenCode; C has its own.
    let b = Bridge::start(config(&nats, &shared, "host-b", long)).await;
    a.stop().await.unwrap();
    let next = ask(&c, "opencode.prompt.chat.h1", "second").await;
    assert_eq!(next["kind"], "final", "{next}");
    assert_eq!(
        next["session_id"], first["session_id"],
        "the same OpenCode continues the session"
    );
    assert_ne!(next["session_recreated"], true);
    b.stop().await.unwrap();
    // B handed h2 back too (it never served it: A's release stands); C,
    // on another OpenCode, starts a new session and says so.
    let cc = Bridge::start(config(&nats, &own, "host-c", long)).await;
    let moved = ask(&c, "opencode.prompt.chat.h2", "third").await;
    assert_eq!(moved["kind"], "final", "{moved}");
    assert_ne!(moved["session_id"], first_own["session_id"]);
    assert_eq!(moved["session_recreated"], true, "{moved}");
    let notes = moved["notes"].to_string();
    assert!(
        notes.contains("host-a"),
        "the note names the lost host: {notes}"
    );
    assert_eq!(own.prompts().len(), 1);
    cc.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_prompts_at_max_in_flight_one_each_get_one_terminal_reply() {
    let nats = NatsServer::start();
    let fake = FakeOpenCode::start().await;
    fake.set_script(paced);
    let bridge = Bridge::start(config(&nats, &fake, "host-a", |c| {
        c.turn.max_in_flight = 1;
        c.turn.max_waiting = 4;
    }))
    .await;
    let c = client(&nats.url()).await;
    let mut sub = subscribe_ready(&c, "burst.>").await;
    for i in 0..30 {
        let payload = json!({"text": format!("b{i}"), "trace_id": format!("b{i}")});
        c.publish_with_reply(
            format!("opencode.prompt.load.{i}"),
            format!("burst.{i}"),
            Bytes::from(payload.to_string()),
        )
        .await
        .unwrap();
    }
    c.flush().await.unwrap();
    let mut terminals: std::collections::HashMap<String, Vec<Value>> = Default::default();
    let deadline = tokio::time::Instant::now() + TURN;
    while terminals.values().map(Vec::len).sum::<usize>() < 30 {
        let m = tokio::time::timeout_at(deadline, sub.next())
            .await
            .unwrap_or_else(|_| panic!("terminal replies so far: {}", terminals.len()))
            .unwrap();
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        if is_terminal(&v) {
            terminals.entry(m.subject.to_string()).or_default().push(v);
        }
    }
    // A little longer: nothing more may come.
    let extra = tokio::time::timeout(Duration::from_millis(500), sub.next()).await;
    assert!(
        extra.is_err()
            || !is_terminal(&serde_json::from_slice(&extra.unwrap().unwrap().payload).unwrap())
    );
    assert_eq!(terminals.len(), 30, "every prompt answered once");
    let (mut finals, mut overloaded) = (0, 0);
    for (subject, v) in &terminals {
        assert_eq!(v.len(), 1, "{subject}: {v:?}");
        match (v[0]["kind"].as_str(), v[0]["code"].as_str()) {
            (Some("final"), _) => finals += 1,
            (Some("error"), Some("overloaded")) => {
                assert_eq!(v[0]["retryable"], true);
                overloaded += 1
            }
            other => panic!("{subject}: {other:?} {v:?}"),
        }
    }
    assert!(
        finals >= 5,
        "one running and four waiting are served: {finals}"
    );
    assert!(overloaded >= 1, "the rest are told at once: {overloaded}");
    let m = c
        .request("opencode.bridge.status", Bytes::new())
        .await
        .unwrap();
    let status: Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(status["nats_dropped_messages"], 0, "{status}");
    bridge.stop().await.unwrap();
}

/// The daemon binary on a fake OpenCode, as its own process.
struct Proc {
    child: Child,
    _log: tokio::sync::mpsc::UnboundedReceiver<String>,
}

async fn spawn_daemon(nats: &NatsServer, fake: &FakeOpenCode, host: &str, lease: &str) -> Proc {
    let mut cmd = Command::new(BIN);
    cmd.arg("run")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("OPENCODE_BRIDGE__NATS__URL", nats.url())
        .env("OPENCODE_BRIDGE__OPENCODE__BASE_URL", fake.url())
        .env("OPENCODE_BRIDGE__SERVICE__HOST", host)
        .env("OPENCODE_BRIDGE__CLUSTER__LEASE_TTL", lease)
        .env("OPENCODE_BRIDGE__AGENT_PROTOCOL__ENABLED", "false")
        .env("RUST_LOG", "info");
    let (child, _log) = spawn_serving(cmd, Duration::from_secs(30)).await;
    Proc { child, _log }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_home_is_taken_over_by_the_survivor_within_the_lease() {
    let nats = NatsServer::start();
    let (fa, fb) = (FakeOpenCode::start().await, FakeOpenCode::start().await);
    let mut a = spawn_daemon(&nats, &fa, "host-a", "3s").await;
    let c = client(&nats.url()).await;
    let first = ask(&c, "opencode.prompt.chat.k1", "before").await;
    assert_eq!(first["kind"], "final", "{first}");
    assert_eq!(fa.prompts().len(), 1);
    let _b = spawn_daemon(&nats, &fb, "host-b", "3s").await;
    kill(Pid::from_raw(a.child.id().unwrap() as i32), Signal::SIGKILL).unwrap();
    let _ = a.child.wait().await;
    // A's lease is still there for up to 3 s; B waits it out, takes the
    // conversation over, and says the session could not follow.
    let r: Vec<Reply> = request(&c, "opencode.prompt.chat.k1", r#"{"text":"after"}"#, TURN).await;
    let fin = terminal(&r);
    assert_eq!(fin["kind"], "final", "{fin}");
    assert_eq!(fin["content"], echo_reply("after").as_str());
    assert_eq!(fin["session_recreated"], true, "{fin}");
    assert!(fin["notes"].to_string().contains("host-a"), "{fin}");
    assert_eq!(fb.prompts().len(), 1, "the survivor served it");
    // And keeps it: the next turn continues B's new session.
    let again = ask(&c, "opencode.prompt.chat.k1", "again").await;
    assert_eq!(again["session_id"], fin["session_id"]);
    assert_ne!(again["session_recreated"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_keeps_its_context_across_two_daemons_on_two_real_opencodes() {
    use crate::support::fake_llm::{self, FakeLlm};
    use crate::support::real_opencode::{default_config, RealOpenCode};
    let nats = NatsServer::start();
    let llm = FakeLlm::start().await;
    let mut bridges = Vec::new();
    let mut servers = Vec::new();
    for host in ["host-a", "host-b"] {
        let oc = RealOpenCode::start_with_config(default_config(&llm.base_url())).await;
        let mut cfg = test_config(&nats.url(), oc.base_url(), Some(oc.password()));
        cfg.opencode.directory = Some(oc.directory().to_path_buf());
        cfg.service.host = Some(host.into());
        bridges.push(Bridge::start(cfg).await);
        servers.push(oc);
    }
    let c = client(&nats.url()).await;
    let first = "Remember the word quince-cluster";
    let mut turns = vec![first.to_string()];
    turns.extend((2..=5).map(|i| format!("turn {i}")));
    let mut sessions = HashSet::new();
    for text in &turns {
        let r = request(
            &c,
            "opencode.prompt.chat.ctx",
            text,
            Duration::from_secs(60),
        )
        .await;
        assert_well_formed(&r);
        let fin = terminal(&r);
        assert_eq!(fin["kind"], "final", "{r:#?}");
        assert_eq!(fin["content"], fake_llm::text_reply(text));
        sessions.insert(fin["session_id"].to_string());
    }
    // Whichever daemon took it, the LLM sees the first turn.
    let r = request(
        &c,
        "opencode.prompt.chat.ctx",
        "[recall] what was first?",
        Duration::from_secs(60),
    )
    .await;
    let fin = terminal(&r);
    assert_eq!(fin["kind"], "final", "{r:#?}");
    assert_eq!(fin["content"], fake_llm::recall_reply(first));
    sessions.insert(fin["session_id"].to_string());
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    for b in bridges {
        b.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_home_on_a_shared_opencode_is_continued_in_the_same_session() {
    let nats = NatsServer::start();
    let shared = FakeOpenCode::start().await;
    let mut a = spawn_daemon(&nats, &shared, "host-a", "3s").await;
    let c = client(&nats.url()).await;
    let first = ask(&c, "opencode.prompt.chat.s1", "before").await;
    assert_eq!(first["kind"], "final", "{first}");
    let _b = spawn_daemon(&nats, &shared, "host-b", "3s").await;
    kill(Pid::from_raw(a.child.id().unwrap() as i32), Signal::SIGKILL).unwrap();
    let _ = a.child.wait().await;
    let fin = ask(&c, "opencode.prompt.chat.s1", "after").await;
    assert_eq!(fin["kind"], "final", "{fin}");
    assert_eq!(fin["content"], echo_reply("after").as_str());
    assert_eq!(
        fin["session_id"], first["session_id"],
        "the session continues"
    );
    assert_ne!(fin["session_recreated"], true, "{fin}");
    assert_eq!(shared.prompts().len(), 2);
}

/// With `deploy/nats-server.conf` as shipped (each user its own
/// permissions, strict tenancy): a tenant's request-style prompts reach it
/// whichever daemon takes them, the forwarded ones included (the home
/// publishes on the tenant's inbox, which it never received itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_requests_are_answered_under_the_shipped_permissions() {
    use crate::ops_nats_permissions::{conf, password, request as ask_as, user};
    let nats = NatsServer::start_with_config(&conf());
    let fake = FakeOpenCode::start().await;
    let mut bridges = Vec::new();
    for host in ["host-a", "host-b"] {
        let mut c = test_config(&nats.url(), &fake.url(), None);
        c.nats.user = Some("bridge".into());
        c.nats.password = Some(password("bridge"));
        c.nats.inbox_prefix = "_INBOX.bridge".into();
        c.tenancy.strict = true;
        c.service.host = Some(host.into());
        c.validate().unwrap();
        bridges.push(Bridge::start(c).await);
    }
    let (discord, _errors) = user(&nats.url(), "discord").await;
    let mut sessions = HashSet::new();
    for i in 0..8 {
        let text = format!("turn {i}");
        let r = ask_as(
            &discord,
            "opencode.prompt.discord.D1",
            &json!({"text": text}).to_string(),
            TURN,
        )
        .await;
        let fin = terminal(&r);
        assert_eq!(fin["kind"], "final", "turn {i}: {r:#?}");
        assert_eq!(fin["content"], echo_reply(&text).as_str());
        sessions.insert(fin["session_id"].to_string());
    }
    assert_eq!(sessions.len(), 1);
    for b in bridges {
        b.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_with_the_same_instance_id_on_another_host_does_not_start() {
    let nats = NatsServer::start();
    let fake = FakeOpenCode::start().await;
    let twin = |c: &mut Config| c.cluster.instance_id = Some("twin".into());
    let a = Bridge::start(config(&nats, &fake, "host-a", twin)).await;
    let cfg = config(&nats, &fake, "host-b", twin);
    let r = tokio::time::timeout(
        TURN,
        opencode_nats_bridge::app::run(cfg, std::future::pending(), None),
    )
    .await
    .expect("the twin gives up at once");
    let e = r.expect_err("the twin must not start").to_string();
    assert!(
        e.contains("\"twin\" is in use") && e.contains("host-a"),
        "{e}"
    );
    // The same host (a restart) is fine.
    a.stop().await.unwrap();
    let again = Bridge::start(config(&nats, &fake, "host-a", twin)).await;
    again.stop().await.unwrap();
}
