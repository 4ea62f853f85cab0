//! Turn states (issue 12, "Results can be fetched again") and whole finals
//! (issue 15) on a real nats-server with JetStream: a terminal reply nobody
//! heard is fetched again on `opencode.turn.status`; a tenant reads only
//! its own turns; a 2 MB answer arrives whole through the CLI; the replies
//! stream replays a turn.

use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use serde_json::{json, Value};

use crate::ops_nats_permissions::{conf, user, violation};
use crate::support::bridge::terminal;
use crate::support::fake_opencode::{echo_reply, text_turn};
use crate::support::nats::{client, collect_until_terminal, subscribe_ready, NatsServer};
use crate::support::ops::cli;
use crate::support::rig::{Rig, TURN};

/// Bound on one CLI run.
const CLI: Duration = Duration::from_secs(60);

/// One turn state request; the answer.
async fn ask(c: &async_nats::Client, subject: &str, request: Value) -> Value {
    let m = tokio::time::timeout(
        Duration::from_secs(5),
        c.request(subject.to_string(), request.to_string().into()),
    )
    .await
    .expect("an answer within 5s")
    .expect("an answer");
    serde_json::from_slice(&m.payload).unwrap()
}

/// Asks until the state is `state` (bounded by [`TURN`]); the answer.
async fn until_state(c: &async_nats::Client, subject: &str, trace: &str, state: &str) -> Value {
    let deadline = tokio::time::Instant::now() + TURN;
    loop {
        let a = ask(c, subject, json!({"trace_id": trace})).await;
        if a["state"] == state {
            return a;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{trace} never {state}: {a}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_reply_nobody_heard_is_fetched_again() {
    let rig = Rig::start(crate::support::fake_opencode::default_script, |_| {}).await;
    let c = &rig.client;
    let status = "opencode.turn.status";

    // Heard: the state holds the very terminal reply that was published.
    let mut sub = subscribe_ready(c, "opencode.reply.watch.a").await;
    let p = json!({"text": "heard", "trace_id": "tr-heard", "reply_to": "opencode.reply.watch.a"});
    c.publish("opencode.prompt", p.to_string().into())
        .await
        .unwrap();
    let r = collect_until_terminal(&mut sub, TURN).await;
    let a = until_state(c, status, "tr-heard", "done").await;
    assert_eq!(&a["terminal"], terminal(&r));
    assert_eq!(a["trace_id"], "tr-heard");

    // Nobody listening on the reply subject.
    let p = json!({"text": "unheard", "trace_id": "tr-unheard"});
    c.publish_with_reply("opencode.prompt", "_INBOX.nobody.1", p.to_string().into())
        .await
        .unwrap();
    let a = until_state(c, status, "tr-unheard", "done").await;
    assert_eq!(a["terminal"]["kind"], "final", "{a}");
    assert_eq!(a["terminal"]["content"], echo_reply("unheard"));
    assert_eq!(a["terminal"]["trace_id"], "tr-unheard");

    // The client's connection closes during a (slow) turn.
    let gone = client(&rig.nats.url()).await;
    let inbox = gone.new_inbox();
    let _sub = subscribe_ready(&gone, inbox.clone()).await;
    let p = json!({"text": "[slow] bye", "trace_id": "tr-gone"});
    gone.publish_with_reply("opencode.prompt", inbox, p.to_string().into())
        .await
        .unwrap();
    gone.flush().await.unwrap();
    until_state(c, status, "tr-gone", "running").await;
    drop(_sub);
    gone.drain().await.unwrap();
    let a = until_state(c, status, "tr-gone", "done").await;
    assert_eq!(a["terminal"]["kind"], "final", "{a}");
    assert!(a["terminal"]["content"]
        .as_str()
        .unwrap()
        .ends_with("slow-20 "));

    // Never seen; and a bad request.
    let a = ask(c, status, json!({"trace_id": "tr-never"})).await;
    assert_eq!(a, json!({"trace_id": "tr-never", "state": "unknown"}));
    let a = ask(c, status, json!({"nope": 1})).await;
    assert_eq!(a["code"], "bad_request", "{a}");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_and_running_are_seen_for_a_slow_turn() {
    let rig = Rig::start(crate::support::fake_opencode::default_script, |_| {}).await;
    let c = &rig.client;
    let status = "opencode.turn.status";
    for (t, text) in [("tr-first", "[slow] one"), ("tr-second", "[slow] two")] {
        let p = json!({"text": text, "trace_id": t, "conversation": "c1"});
        c.publish("opencode.prompt", p.to_string().into())
            .await
            .unwrap();
    }
    c.flush().await.unwrap();
    until_state(c, status, "tr-first", "running").await;
    let a = ask(c, status, json!({"trace_id": "tr-second"})).await;
    assert_eq!(a["state"], "queued", "{a}");
    assert!(a.get("terminal").is_none());
    until_state(c, status, "tr-second", "running").await;
    let a = ask(c, status, json!({"trace_id": "tr-first"})).await;
    assert_eq!(a["state"], "done", "{a}");
    until_state(c, status, "tr-second", "done").await;
    rig.stop().await;
}

/// Tenant `discord` asks for a trace id of `slack`'s: it reads exactly like
/// an unknown one, and nothing of slack's reply is in the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_reads_only_its_own_turns() {
    let rig = Rig::start(crate::support::fake_opencode::default_script, |_| {}).await;
    let c = &rig.client;
    let p = json!({"text": "slack-secret-42", "trace_id": "shared-trace"});
    c.publish_with_reply(
        "opencode.prompt.slack.C1",
        "_INBOX.nobody.2",
        p.to_string().into(),
    )
    .await
    .unwrap();
    let mine = until_state(c, "opencode.turn.status.slack", "shared-trace", "done").await;
    assert!(mine.to_string().contains("slack-secret-42"));

    let theirs = ask(
        c,
        "opencode.turn.status.discord",
        json!({"trace_id": "shared-trace"}),
    )
    .await;
    assert_eq!(
        theirs,
        json!({"trace_id": "shared-trace", "state": "unknown"})
    );
    let never = ask(
        c,
        "opencode.turn.status.discord",
        json!({"trace_id": "never-was"}),
    )
    .await;
    assert_eq!(never["state"], "unknown");
    // Naming another tenant is the operator's.
    let sneaky = ask(
        c,
        "opencode.turn.status.discord",
        json!({"trace_id": "shared-trace", "tenant": "slack"}),
    )
    .await;
    assert_eq!(sneaky["code"], "bad_request", "{sneaky}");
    assert!(!sneaky.to_string().contains("slack-secret"));
    // The operator reads any tenant's turn; the bare key is its own.
    let op = ask(
        c,
        "opencode.turn.status",
        json!({"trace_id": "shared-trace", "tenant": "slack"}),
    )
    .await;
    assert_eq!(op, mine);
    let op = ask(
        c,
        "opencode.turn.status",
        json!({"trace_id": "shared-trace"}),
    )
    .await;
    assert_eq!(op["state"], "unknown");
    rig.stop().await;
}

/// deploy/nats-server.conf: a tenant asks only on its own subject.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_permissions_keep_tenants_off_the_operators_turn_status() {
    let nats = NatsServer::start_with_config(&conf());
    let (discord, mut errors) = user(&nats.url(), "discord").await;
    for subject in ["opencode.turn.status", "opencode.turn.status.slack"] {
        discord
            .publish(subject, r#"{"trace_id":"x"}"#.into())
            .await
            .unwrap();
        violation(&mut errors, subject).await;
    }
    discord
        .publish("opencode.turn.status.discord", r#"{"trace_id":"x"}"#.into())
        .await
        .unwrap();
    discord.flush().await.unwrap();
    let extra = tokio::time::timeout(Duration::from_millis(500), errors.recv()).await;
    assert!(extra.is_err(), "its own subject is allowed: {extra:?}");
}

/// The CLI's `turn`: the state, then the terminal reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_turn_prints_the_state_and_the_terminal_reply() {
    let rig = Rig::start(crate::support::fake_opencode::default_script, |_| {}).await;
    let url = rig.nats.url();
    let p = json!({"text": "via cli", "trace_id": "tr-cli"});
    rig.client
        .publish("opencode.prompt.team", p.to_string().into())
        .await
        .unwrap();
    until_state(&rig.client, "opencode.turn.status.team", "tr-cli", "done").await;
    let out = cli(
        &["turn", "--server", &url, "--tenant", "team", "tr-cli"],
        CLI,
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let mut lines = out.stdout.lines();
    assert_eq!(lines.next(), Some("done"));
    let t: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(t["kind"], "final");
    assert_eq!(t["content"], echo_reply("via cli"));
    let out = cli(&["turn", "--server", &url, "tr-cli"], CLI).await;
    assert_eq!(out.stdout.trim(), "unknown", "the operator's own key");
    let out = cli(&["turn", "--server", &url, "--json", "nope"], CLI).await;
    let a: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(a["state"], "unknown");
    rig.stop().await;
}

/// 2 MB of text in 32 deltas.
fn two_megabytes() -> Vec<String> {
    (0..32)
        .map(|i| {
            format!(
                "{i:02}{}\n",
                "abcdefghijklmnopqrstuvwxyz0123456789".repeat(1820)
            )
        })
        .collect()
}

async fn large_rig(tweak: impl FnOnce(&mut opencode_nats_bridge::config::Config)) -> Rig {
    let deltas = two_megabytes();
    Rig::start(
        move |input| {
            let refs: Vec<&str> = deltas.iter().map(String::as_str).collect();
            text_turn(input, &refs)
        },
        tweak,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_megabyte_answer_arrives_whole_through_the_cli() {
    let whole: String = two_megabytes().concat();
    assert!(whole.len() > 2_000_000);
    let rig = large_rig(|_| {}).await;
    let url = rig.nats.url();

    // The final alone: cut, its whole text fetched from the object store.
    let out = cli(&["prompt", "--server", &url, "--final-only", "long"], CLI).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout.len(), whole.len(), "{}", out.stderr);
    assert!(out.stdout == whole);

    // Streamed: the deltas carry it, the cut final adds nothing.
    let out = cli(&["prompt", "--server", &url, "long"], CLI).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stdout == whole,
        "{} bytes; {}",
        out.stdout.len(),
        out.stderr
    );
    assert!(!out.stderr.contains("lost"), "{}", out.stderr);

    // On the wire: cut, named, and the object holds the whole text.
    let out = cli(
        &["prompt", "--server", &url, "--final-only", "--json", "long"],
        CLI,
    )
    .await;
    let fin: Value = serde_json::from_str(out.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(fin["content_truncated"], true);
    assert!(whole.starts_with(fin["content"].as_str().unwrap()));
    let obj = &fin["content_object"];
    assert_eq!(obj["bucket"], "opencode_bridge_finals");
    let js = jetstream::new(rig.client.clone());
    let store = js
        .get_object_store(obj["bucket"].as_str().unwrap())
        .await
        .unwrap();
    let mut o = store.get(obj["name"].as_str().unwrap()).await.unwrap();
    let mut got = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut o, &mut got)
        .await
        .unwrap();
    assert!(got == whole.as_bytes());
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_turn_states_a_two_megabyte_final_is_cut_as_before() {
    let whole: String = two_megabytes().concat();
    let rig = large_rig(|c| {
        c.cluster.enabled = opencode_nats_bridge::config::Switch::Off;
        c.jetstream.jobs = opencode_nats_bridge::config::Switch::Off;
    })
    .await;
    let url = rig.nats.url();
    let out = cli(
        &["prompt", "--server", &url, "--final-only", "--json", "long"],
        CLI,
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let fin: Value = serde_json::from_str(out.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(fin["content_truncated"], true);
    assert!(fin.get("content_object").is_none(), "{fin}");
    let cut = fin["content"].as_str().unwrap();
    assert!(
        cut.len() > 400_000 && cut.len() < whole.len(),
        "{}",
        cut.len()
    );
    assert!(whole.starts_with(cut));
    rig.stop().await;
}

/// `[jetstream] replies_stream`: a whole turn replayed by its subject.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replies_stream_replays_a_whole_turn() {
    let rig = Rig::start(crate::support::fake_opencode::default_script, |c| {
        c.jetstream.replies_stream = "OPENCODE_REPLIES".into();
    })
    .await;
    let c = &rig.client;
    let subject = "opencode.reply.tr-replay";
    let mut sub = subscribe_ready(c, subject).await;
    let p = json!({"text": "replay me", "trace_id": "tr-replay"});
    c.publish("opencode.prompt", p.to_string().into())
        .await
        .unwrap();
    let live = collect_until_terminal(&mut sub, TURN).await;
    let js = jetstream::new(c.clone());
    let stream = js.get_stream("OPENCODE_REPLIES").await.unwrap();
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: subject.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut msgs = consumer.messages().await.unwrap();
    let mut replayed = Vec::new();
    while replayed.len() < live.len() {
        let m = tokio::time::timeout(Duration::from_secs(5), msgs.next())
            .await
            .expect("the stream has the whole turn")
            .unwrap()
            .unwrap();
        replayed.push(serde_json::from_slice::<Value>(&m.payload).unwrap());
    }
    let live: Vec<Value> = live.into_iter().map(|(_, v)| v).collect();
    assert_eq!(replayed, live);
    assert_eq!(replayed.last().unwrap()["kind"], "final");
    rig.stop().await;
}
