//! The cluster on a NATS cluster (docs/CLUSTER.md, "Three nats-servers"):
//! three real nats-servers routed to each other with JetStream, every
//! bucket and stream in three copies, daemons each on a different server,
//! and servers or daemons going away while turns run.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use opencode_nats_bridge::config::{Config, Switch};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use crate::support::bridge::{test_config, Bridge};
use crate::support::cluster::NatsCluster;
use crate::support::fake_opencode::{
    echo_reply, paced_text_turn, words, FakeOpenCode, TurnInput, TurnScript,
};
use crate::support::nats::{client, is_terminal, subscribe_ready};

/// Bound on the cluster's JetStream becoming ready (a loaded machine).
const READY: Duration = Duration::from_secs(90);
/// Bound on one turn's terminal reply across a failover.
const TURN: Duration = Duration::from_secs(60);

/// A daemon of tenant `t`'s tests on node `url`, in front of `fake`.
fn config(url: &str, fake: &FakeOpenCode, host: &str) -> Config {
    let mut c = test_config(url, &fake.url(), None);
    c.service.host = Some(host.to_string());
    c.cluster.enabled = Switch::On;
    c.cluster.lease_ttl = Duration::from_secs(4);
    c.jetstream.jobs = Switch::On;
    c.jetstream.replicas = 3;
    c.jetstream.ack_wait = Duration::from_secs(5);
    c.jetstream.retry_delay = Duration::from_millis(500);
    c.jetstream.max_deliver = 50;
    c.validate().expect("valid");
    c
}

/// The echo, a word per delta `gap_ms` apart.
fn paced(gap_ms: u64) -> impl Fn(&TurnInput) -> TurnScript + Send + Sync + 'static {
    move |input| paced_text_turn(input, &words(&echo_reply(&input.text)), gap_ms)
}

/// Every reply of tenant `t`, by trace id, as heard.
#[derive(Clone, Default)]
struct Heard(Arc<Mutex<HashMap<String, Vec<Value>>>>);

impl Heard {
    async fn listen(c: &async_nats::Client) -> (Heard, JoinHandle<()>) {
        let mut sub = subscribe_ready(c, "opencode.reply.t.>").await;
        let heard = Heard::default();
        let h = heard.clone();
        let task = tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                if let Ok(v) = serde_json::from_slice::<Value>(&m.payload) {
                    let trace = v["trace_id"].as_str().unwrap_or_default().to_string();
                    h.0.lock().unwrap().entry(trace).or_default().push(v);
                }
            }
        });
        (heard, task)
    }

    fn terminals(&self, trace: &str) -> Vec<Value> {
        let g = self.0.lock().unwrap();
        g.get(trace)
            .map(|v| v.iter().filter(|r| is_terminal(r)).cloned().collect())
            .unwrap_or_default()
    }

    /// Waits at most `bound` for `trace`'s terminal reply.
    async fn wait_for(&self, trace: &str, bound: Duration) {
        let deadline = tokio::time::Instant::now() + bound;
        while self.terminals(trace).is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn replies(&self, trace: &str) -> usize {
        self.0.lock().unwrap().get(trace).map_or(0, Vec::len)
    }

    /// Waits until every trace has a terminal reply; panics naming those
    /// without after `bound`.
    async fn wait_all(&self, traces: &[String], bound: Duration) {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let missing: Vec<&String> = traces
                .iter()
                .filter(|t| self.terminals(t).is_empty())
                .collect();
            if missing.is_empty() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no terminal reply within {bound:?} for {} of {}: {missing:?}",
                missing.len(),
                traces.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A core prompt of tenant `t` whose replies go to `opencode.reply.t.<trace>`.
async fn prompt(c: &async_nats::Client, conversation: &str, trace: &str, text: &str) {
    let body =
        json!({"text": text, "trace_id": trace, "reply_to": format!("opencode.reply.t.{trace}")});
    c.publish(
        format!("opencode.prompt.t.{conversation}"),
        Bytes::from(body.to_string()),
    )
    .await
    .unwrap();
    c.flush().await.unwrap();
}

/// A durable job of tenant `t` (its replies on `opencode.reply.t.<trace>`),
/// published until the stream acknowledges it (a message id keeps a
/// retry from storing it twice).
async fn job(c: &async_nats::Client, conversation: &str, trace: &str, text: &str) {
    let js = jetstream::new(c.clone());
    let body = json!({"text": text, "trace_id": trace}).to_string();
    let deadline = tokio::time::Instant::now() + TURN;
    loop {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", trace);
        let subject = format!("opencode.job.t.{conversation}");
        if let Ok(ack) = js
            .publish_with_headers(subject, h, Bytes::from(body.clone()))
            .await
        {
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(5), ack).await {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {trace} never stored"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The state of `trace` from `opencode.turn.status.t`, asked up to three
/// times: right after a nats-server of the cluster died, the daemon may
/// still be opening the tenant's bucket while JetStream elects a leader,
/// and a client asks again as it would after any unanswered request.
async fn status(c: &async_nats::Client, trace: &str) -> Value {
    let body = json!({"trace_id": trace}).to_string();
    let mut last = String::new();
    for _ in 0..3 {
        let asked = tokio::time::timeout(
            Duration::from_secs(10),
            c.request("opencode.turn.status.t", Bytes::from(body.clone())),
        )
        .await;
        match asked {
            Ok(Ok(m)) => return serde_json::from_slice(&m.payload).unwrap(),
            Ok(Err(e)) => last = e.to_string(),
            Err(e) => last = e.to_string(),
        }
    }
    panic!("status never answered: {last}")
}

/// The node (its index) leading `stream`.
async fn leader(c: &async_nats::Client, stream: &str) -> usize {
    let js = jetstream::new(c.clone());
    let mut s = js.get_stream(stream).await.unwrap();
    let info = s.info().await.unwrap();
    let name = info
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("a leader");
    name.trim_start_matches('n')
        .parse()
        .expect("node name n<i>")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_whose_nats_server_dies_mid_turn_ends_the_turn_once_and_keeps_its_home() {
    let mut cluster = NatsCluster::start(3, READY).await;
    let (fa, fb) = (FakeOpenCode::start().await, FakeOpenCode::start().await);
    fa.set_script(paced(100));
    fb.set_script(paced(100));
    let a = Bridge::start(config(&cluster.url(0), &fa, "host-a")).await;
    let c = client(&cluster.url(2)).await;
    let (heard, _l) = Heard::listen(&c).await;
    // The conversation's home is A (the only daemon yet).
    prompt(&c, "k1", "warm", "warm up").await;
    heard.wait_all(&["warm".into()], TURN).await;
    let session = heard.terminals("warm")[0]["session_id"].clone();
    let b = Bridge::start(config(&cluster.url(1), &fb, "host-b")).await;
    // A turn of about two seconds; A's server dies after its first delta.
    let text = "a long answer to come with many words in it for the test";
    prompt(&c, "k1", "mid", text).await;
    let deadline = tokio::time::Instant::now() + TURN;
    while heard.replies("mid") == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the turn never began"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cluster.kill(0);
    // A reconnects to another server; the turn ends exactly once, heard
    // here, or (its final lost with the server) fetched from turn status.
    let until = tokio::time::Instant::now() + TURN;
    let terminal = loop {
        if let Some(t) = heard.terminals("mid").first().cloned() {
            break t;
        }
        let st = status(&c, "mid").await;
        if st["state"] == "done" {
            break st["terminal"].clone();
        }
        assert!(tokio::time::Instant::now() < until, "no terminal: {st}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(terminal["kind"], "final", "{terminal}");
    assert_eq!(terminal["content"], echo_reply(text).as_str());
    assert_eq!(terminal["session_id"], session, "A kept the turn");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        heard.terminals("mid").len() <= 1,
        "{:?}",
        heard.terminals("mid")
    );
    assert_eq!(fb.prompts().len(), 0, "B never ran it");
    // The conversation stays at home on A (same session), or moves once.
    let mut moved = 0;
    for i in 0..4 {
        let t = format!("after{i}");
        prompt(&c, "k1", &t, &format!("after {i}")).await;
        heard.wait_all(std::slice::from_ref(&t), TURN).await;
        let fin = heard.terminals(&t)[0].clone();
        assert_eq!(fin["kind"], "final", "{fin}");
        if fin["session_recreated"] == true {
            moved += 1;
        } else if moved == 0 {
            assert_eq!(fin["session_id"], session, "{fin}");
        }
    }
    assert!(moved <= 1, "moved {moved} times");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

// Known to fail (issue 24, open): on a loaded machine a conversation still
// got two homes when the leader was killed (a clean-clone CI run at 04:12,
// 14 of 18). Run it with `cargo test --test it -- --ignored nats_cluster`.
#[ignore = "known to fail under load: two homes after a leader kill (issue 24)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_conversations_leader_killed_every_new_conversation_gets_one_home() {
    let mut cluster = NatsCluster::start(3, READY).await;
    let (fa, fb) = (FakeOpenCode::start().await, FakeOpenCode::start().await);
    fa.set_script(paced(10));
    fb.set_script(paced(10));
    let a = Bridge::start(config(&cluster.url(0), &fa, "host-a")).await;
    let b = Bridge::start(config(&cluster.url(1), &fb, "host-b")).await;
    let probe = client(&cluster.url(2)).await;
    let dead = leader(&probe, "KV_opencode_bridge_conversations").await;
    let alive = (dead + 1) % 3;
    let c = client(&cluster.url(alive)).await;
    let (heard, _l) = Heard::listen(&c).await;
    cluster.kill(dead);
    // Twenty new conversations, three prompts each, one after another.
    let mut sessions: HashMap<String, HashSet<String>> = HashMap::new();
    for round in 0..3 {
        let traces: Vec<String> = (0..20).map(|i| format!("n{i}r{round}")).collect();
        for (i, t) in traces.iter().enumerate() {
            prompt(&c, &format!("n{i}"), t, &format!("{t} text")).await;
        }
        heard.wait_all(&traces, TURN).await;
        for (i, t) in traces.iter().enumerate() {
            let fin = &heard.terminals(t)[0];
            assert_eq!(fin["kind"], "final", "{fin}");
            sessions
                .entry(format!("n{i}"))
                .or_default()
                .insert(fin["session_id"].as_str().unwrap().to_string());
        }
    }
    let two: Vec<_> = sessions.iter().filter(|(_, s)| s.len() != 1).collect();
    assert!(two.is_empty(), "conversations with two homes: {two:?}");
    // Each conversation ran on one OpenCode only.
    let on = |f: &FakeOpenCode| -> HashSet<String> {
        f.turns()
            .iter()
            .map(|t| t.input.text.split('r').next().unwrap().to_string())
            .collect()
    };
    let both: Vec<_> = on(&fa).intersection(&on(&fb)).cloned().collect();
    assert!(both.is_empty(), "on both daemons: {both:?}");
    let new_leader = leader(&c, "KV_opencode_bridge_conversations").await;
    assert_ne!(new_leader, dead);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

// Known to fail now and then (issue 24, open): with the other cluster tests
// running beside it, a core prompt sometimes got no terminal (1 run in 8 on
// its branch, once more after the merge); alone it passes.
#[ignore = "known to fail now and then under load: a core prompt without a terminal (issue 24)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_daemon_loses_and_repeats_no_turn_of_50_conversations() {
    if std::env::var_os("SHOW_BRIDGE_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .try_init();
    }
    let cluster = NatsCluster::start(3, READY).await;
    let fake = FakeOpenCode::start().await;
    fake.set_script(paced(20));
    // Three daemons, one per server, in front of one OpenCode.
    let mut daemons: Vec<Option<Bridge>> = Vec::new();
    for i in 0..3 {
        daemons.push(Some(
            Bridge::start(config(&cluster.url(i), &fake, &format!("host-{i}"))).await,
        ));
    }
    let c = client(&cluster.url(0)).await;
    let (heard, _l) = Heard::listen(&c).await;
    // 50 conversations, half by jobs, half by prompts, each sending its
    // turns one after another while the daemons restart one by one.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent: Arc<Mutex<Vec<(String, bool)>>> = Arc::default();
    let mut load = Vec::new();
    for conv in 0..50 {
        let (c, heard, stop, sent) = (c.clone(), heard.clone(), stop.clone(), sent.clone());
        load.push(tokio::spawn(async move {
            let mut k = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = format!("r{conv}x{k}");
                let durable = conv % 2 == 0;
                sent.lock().unwrap().push((t.clone(), durable));
                if durable {
                    job(&c, &format!("r{conv}"), &t, &format!("{t} text")).await;
                } else {
                    prompt(&c, &format!("r{conv}"), &t, &format!("{t} text")).await;
                }
                heard.wait_for(&t, TURN).await;
                k += 1;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (i, d) in daemons.iter_mut().enumerate() {
        d.take().unwrap().stop().await.expect("a clean drain");
        tokio::time::sleep(Duration::from_millis(500)).await;
        *d = Some(Bridge::start(config(&cluster.url(i), &fake, &format!("host-{i}"))).await);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in load {
        l.await.expect("every conversation's turns ended");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let sent = sent.lock().unwrap().clone();
    assert!(sent.len() >= 150, "only {} turns", sent.len());
    let mut errors = Vec::new();
    for (t, durable) in &sent {
        let terms = heard.terminals(t);
        if terms.is_empty() {
            let st = status(&c, t).await;
            panic!(
                "{t} (job: {durable}): no terminal; {} replies; status {st}",
                heard.replies(t)
            );
        }
        assert_eq!(terms.len(), 1, "{t} (job: {durable}): {terms:?}");
        if terms[0]["kind"] != "final" {
            errors.push(terms[0].clone());
            continue;
        }
        assert_eq!(
            terms[0]["content"],
            echo_reply(&format!("{t} text")).as_str()
        );
    }
    // A core prompt may meet a draining daemon's last moment (typed and
    // retryable); a job never ends in an error here.
    assert!(errors.iter().all(|e| e["retryable"] == true), "{errors:?}");
    let job_errors: Vec<_> = errors
        .iter()
        .filter(|e| sent.iter().any(|(t, d)| *d && e["trace_id"] == t.as_str()))
        .collect();
    assert!(
        job_errors.is_empty(),
        "jobs ended in errors: {job_errors:?}"
    );
    // Every job's prompt reached OpenCode once.
    let prompts = fake.turns();
    for (t, durable) in sent.iter().filter(|(_, d)| *d) {
        let n = prompts
            .iter()
            .filter(|p| p.input.text == format!("{t} text"))
            .count();
        assert_eq!(n, 1, "job {t} (durable {durable}) prompted {n} times");
    }
    for d in daemons.into_iter().flatten() {
        d.stop().await.unwrap();
    }
}

/// Waits until a daemon answers `status` through `c` (after a restart of
/// its server, a daemon's reconnect may lag the client's).
async fn reachable(c: &async_nats::Client) {
    let deadline = tokio::time::Instant::now() + TURN;
    loop {
        let ask = c.request("opencode.bridge.status", Bytes::new());
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), ask).await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no daemon answers status"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Sends `text` on `conversation` until a `final` comes (a `session_busy`
/// while the cluster recovers is sent again); the final.
async fn until_final(
    c: &async_nats::Client,
    heard: &Heard,
    conversation: &str,
    trace: &str,
    bound: Duration,
) -> Value {
    let deadline = tokio::time::Instant::now() + bound;
    for k in 0.. {
        let t = format!("{trace}{k}");
        prompt(c, conversation, &t, &format!("{trace} text")).await;
        heard.wait_all(std::slice::from_ref(&t), TURN).await;
        let term = heard.terminals(&t)[0].clone();
        if term["kind"] == "final" {
            return term;
        }
        assert_eq!(term["code"], "session_busy", "{term}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "no final within {bound:?}: {term}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_on_a_server_cut_off_from_the_cluster_starts_no_second_home() {
    // Clients learn no other server: a daemon stays on the one it has.
    let mut cluster = NatsCluster::start_with(3, READY, "no_advertise: true").await;
    let (fa, fb) = (FakeOpenCode::start().await, FakeOpenCode::start().await);
    fa.set_script(paced(10));
    fb.set_script(paced(10));
    let b = Bridge::start(config(&cluster.url(1), &fb, "host-b")).await;
    let cb = client(&cluster.url(1)).await;
    let (heard_b, _lb) = Heard::listen(&cb).await;
    // The conversation's home is B, on the majority side.
    let first = until_final(&cb, &heard_b, "p1", "home", TURN).await;
    let session = first["session_id"].clone();
    let a = Bridge::start(config(&cluster.url(0), &fa, "host-a")).await;
    let ca = client(&cluster.url(0)).await;
    // Node 0 (A's) is cut off: restarted with no routes, on a route port
    // nobody dials. A and its clients stay on it.
    cluster.isolate(0);
    crate::support::nats::wait_connected(&ca, TURN).await;
    let (heard_a, _la) = Heard::listen(&ca).await;
    reachable(&ca).await;
    // The minority side cannot read the homes: it answers session_busy
    // (retryable) and runs nothing, for a conversation homed on B or one
    // it has never seen.
    for (conv, t) in [
        ("p1", "minority1"),
        ("q1", "minority2"),
        ("p1", "minority3"),
    ] {
        prompt(&ca, conv, t, &format!("{t} text")).await;
        heard_a.wait_all(&[t.to_string()], TURN).await;
        let term = &heard_a.terminals(t)[0];
        assert_eq!(term["kind"], "error", "{term}");
        assert_eq!(term["code"], "session_busy", "{term}");
        assert_eq!(term["retryable"], true, "{term}");
    }
    assert_eq!(fa.prompts().len(), 0, "the minority ran no turn");
    // The majority serves the conversation as before.
    let maj = until_final(&cb, &heard_b, "p1", "majority", TURN).await;
    assert_eq!(maj["session_id"], session, "{maj}");
    // Healed: node 0 routed again; the conversation is still B's, whoever
    // receives its prompt (A forwards it).
    cluster.restart(0);
    cluster.wait_jetstream(READY).await;
    crate::support::nats::wait_connected(&ca, TURN).await;
    reachable(&ca).await;
    let healed = until_final(&ca, &heard_a, "p1", "healed", Duration::from_secs(90)).await;
    assert_eq!(healed["session_id"], session, "{healed}");
    assert_ne!(healed["session_recreated"], true, "{healed}");
    assert_eq!(fa.prompts().len(), 0, "A never ran p1: {:?}", fa.prompts());
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

// Known to fail (issue 24, open): the account request may still be answered
// while two of three servers are down, and creating the first R3 bucket then
// times out and the daemon exits: the patience covers the account request
// only, not the buckets (a clean-clone CI run at 04:12).
#[ignore = "known to fail: the start's patience does not cover creating buckets (issue 24)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_requires_jetstream_waits_out_a_leader_election_at_start() {
    let mut cluster = NatsCluster::start(3, READY).await;
    let fake = FakeOpenCode::start().await;
    // Two of three down: node 0 has no JetStream quorum, so it answers no
    // JetStream request (as during a leader election).
    cluster.kill(1);
    cluster.kill(2);
    let mut cmd = tokio::process::Command::new(crate::support::daemon::BIN);
    cmd.arg("run")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("OPENCODE_BRIDGE__NATS__URL", cluster.url(0))
        .env("OPENCODE_BRIDGE__OPENCODE__BASE_URL", fake.url())
        .env("OPENCODE_BRIDGE__CLUSTER__ENABLED", "on")
        .env("OPENCODE_BRIDGE__JETSTREAM__REPLICAS", "3")
        .env("OPENCODE_BRIDGE__AGENT_PROTOCOL__ENABLED", "false")
        .env("RUST_LOG", "info");
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut log = crate::support::daemon::log_lines(&mut child);
    let mut seen = Vec::new();
    let asked_again = crate::support::daemon::wait_for_line(
        &mut log,
        &mut seen,
        "JetStream did not answer; asking again",
        Duration::from_secs(30),
    )
    .await;
    assert!(asked_again, "log:\n{}", seen.join("\n"));
    // Quorum again: the daemon starts instead of exiting.
    cluster.restart(1);
    let serving =
        crate::support::daemon::wait_for_line(&mut log, &mut seen, "is serving", READY).await;
    assert!(serving, "log:\n{}", seen.join("\n"));
    assert!(child.try_wait().unwrap().is_none(), "still running");
}
