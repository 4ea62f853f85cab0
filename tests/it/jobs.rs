//! Durable jobs (docs/CLUSTER.md, "Durable jobs"; issue 12): a real
//! nats-server with JetStream, the fake OpenCode, the bridge in-process or
//! as the real binary. Each test asserts which terminal reply a job gets
//! (exactly one), and the fake OpenCode's request log shows how often it
//! was prompted.

use std::process::Stdio;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::Client;
use futures::{FutureExt, StreamExt};
use opencode_nats_bridge::config::{Config, Switch};
use serde_json::{json, Value};
use tokio::process::{Child, Command};

use crate::support::bridge::{delta_text, test_config, Bridge};
use crate::support::daemon::{spawn_serving, BIN};
use crate::support::fake_opencode::{echo_reply, paced_text_turn, FakeOpenCode};
use crate::support::nats::{client, collect_until_terminal, subscribe_ready, NatsServer, Reply};

/// Bound on a job's end, redeliveries included: far beyond what any of
/// these jobs needs (a few `ack_wait`s of 3 s).
const JOB: Duration = Duration::from_secs(45);

/// The test config with jobs on and short JetStream timers.
fn job_config(nats: &NatsServer, fake: &FakeOpenCode, tweak: impl FnOnce(&mut Config)) -> Config {
    let mut c = test_config(&nats.url(), &fake.url(), None);
    c.jetstream.jobs = Switch::On;
    c.jetstream.ack_wait = Duration::from_secs(3);
    c.jetstream.retry_delay = Duration::from_millis(300);
    tweak(&mut c);
    c.validate().expect("valid");
    c
}

/// Publishes a job and waits for JetStream to store it.
async fn publish_job(client: &Client, subject: &str, payload: Value) -> u64 {
    jetstream::new(client.clone())
        .publish(subject.to_string(), payload.to_string().into())
        .await
        .expect("publish a job")
        .await
        .expect("the job is stored")
        .sequence
}

fn kind(r: &Reply) -> &str {
    r.1["kind"].as_str().unwrap_or("")
}

fn terminals(replies: &[Reply]) -> Vec<&Value> {
    replies
        .iter()
        .filter(|r| matches!(kind(r), "final" | "error"))
        .map(|r| &r.1)
        .collect()
}

/// The shared consumer, as the server sees it: (jobs waiting for a
/// delivery, jobs delivered and not settled).
async fn consumer_state(client: &Client) -> (u64, usize) {
    let js = jetstream::new(client.clone());
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_stream("OPENCODE_JOBS")
        .await
        .unwrap()
        .get_consumer("opencode_bridge")
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    (info.num_pending, info.num_ack_pending)
}

#[tokio::test]
async fn a_job_published_while_no_daemon_runs_is_served_when_one_starts() {
    let nats = NatsServer::start();
    let fake = FakeOpenCode::start().await;
    let c = client(&nats.url()).await;
    // A first daemon made the stream and its consumer, then stopped.
    Bridge::start(job_config(&nats, &fake, |_| {}))
        .await
        .stop()
        .await
        .unwrap();
    let mut replies = subscribe_ready(&c, "opencode.reply.j1").await;
    publish_job(&c, "opencode.job", json!({"text": "hi", "trace_id": "j1"})).await;
    assert_eq!(fake.prompts().len(), 0, "nobody serves it yet");
    assert_eq!(
        consumer_state(&c).await,
        (1, 0),
        "the job waits in the stream"
    );

    let bridge = Bridge::start(job_config(&nats, &fake, |_| {})).await;
    let got = collect_until_terminal(&mut replies, JOB).await;
    let t = terminals(&got);
    assert_eq!(t.len(), 1, "{got:#?}");
    assert_eq!(t[0]["kind"], "final", "{got:#?}");
    assert_eq!(t[0]["content"], echo_reply("hi"));
    assert_eq!(delta_text(&got), echo_reply("hi"));
    assert_eq!(fake.prompts().len(), 1);
    // Acknowledged after the final: nothing left in the stream.
    let deadline = tokio::time::Instant::now() + JOB;
    while consumer_state(&c).await != (0, 0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the job was never acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bridge.stop().await.unwrap();
}

#[tokio::test]
async fn a_bad_job_gets_bad_request_and_is_not_delivered_again() {
    let nats = NatsServer::start();
    let fake = FakeOpenCode::start().await;
    let bridge = Bridge::start(job_config(&nats, &fake, |_| {})).await;
    let c = client(&nats.url()).await;
    let mut replies = subscribe_ready(&c, "opencode.reply.bad1").await;
    publish_job(
        &c,
        "opencode.job",
        json!({"trace_id": "bad1", "txt": "typo"}),
    )
    .await;
    let got = collect_until_terminal(&mut replies, JOB).await;
    let t = terminals(&got);
    assert_eq!(t.len(), 1, "{got:#?}");
    assert_eq!(t[0]["kind"], "error");
    assert_eq!(t[0]["code"], "bad_request");
    assert_eq!(t[0]["retryable"], false);
    // Terminated: past two ack_waits, no second delivery and no reply.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(consumer_state(&c).await, (0, 0));
    let more: Vec<_> = std::iter::from_fn(|| replies.next().now_or_never().flatten()).collect();
    assert!(more.is_empty(), "delivered again: {more:?}");
    assert_eq!(fake.prompts().len(), 0);
    bridge.stop().await.unwrap();
}

#[tokio::test]
async fn a_tenant_job_cannot_reach_another_tenants_conversation() {
    let nats = NatsServer::start();
    let fake = FakeOpenCode::start().await;
    let bridge = Bridge::start(job_config(&nats, &fake, |_| {})).await;
    let c = client(&nats.url()).await;
    let mut victim = subscribe_ready(&c, "opencode.reply.slack.>").await;
    let mut own = subscribe_ready(&c, "opencode.reply.discord.>").await;
    let attacks = [
        json!({"text": "x", "trace_id": "a1", "conversation": "slack.C1"}),
        json!({"text": "x", "trace_id": "a2", "reply_to": "opencode.reply.slack.C1"}),
        json!({"text": "x", "trace_id": "a3", "reply_to": "opencode.job.slack.C1"}),
    ];
    for attack in attacks {
        publish_job(&c, "opencode.job.discord", attack.clone()).await;
        let got = collect_until_terminal(&mut own, JOB).await;
        let t = terminals(&got);
        assert_eq!(t.len(), 1, "{attack}: {got:#?}");
        assert_eq!(t[0]["code"], "forbidden", "{attack}: {got:#?}");
        assert_eq!(t[0]["trace_id"], attack["trace_id"]);
    }
    assert!(
        victim.next().now_or_never().is_none(),
        "a reply reached the victim's space"
    );
    assert_eq!(fake.prompts().len(), 0);
    assert_eq!(consumer_state(&c).await, (0, 0), "each was terminated");
    bridge.stop().await.unwrap();
}

#[tokio::test]
async fn a_job_that_never_finds_opencode_ends_undeliverable_after_max_deliver() {
    let nats = NatsServer::start();
    let fake = FakeOpenCode::start().await;
    let bridge = Bridge::start(job_config(&nats, &fake, |c| {
        c.jetstream.max_deliver = 3;
        c.opencode.connect_timeout = Duration::from_millis(500);
    }))
    .await;
    // OpenCode goes away for good.
    drop(fake);
    let c = client(&nats.url()).await;
    let mut replies = subscribe_ready(&c, "opencode.reply.u1").await;
    publish_job(&c, "opencode.job", json!({"text": "hi", "trace_id": "u1"})).await;
    let got = collect_until_terminal(&mut replies, JOB).await;
    // The first two deliveries answered nothing; the third says why it
    // gives up.
    assert_eq!(got.len(), 1, "{got:#?}");
    let t = &got[0].1;
    assert_eq!(t["kind"], "error");
    assert_eq!(t["code"], "undeliverable", "{t}");
    assert_eq!(t["retryable"], false);
    assert!(t["error"].as_str().unwrap().contains("3 times"), "{t}");
    assert_eq!(consumer_state(&c).await, (0, 0));
    bridge.stop().await.unwrap();
}

/// The daemon binary on the fake OpenCode, with jobs on; its log lines.
async fn spawn_daemon(
    nats_url: &str,
    fake_url: &str,
) -> (Child, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let mut cmd = Command::new(BIN);
    cmd.arg("run")
        .env_remove("OPENCODE_BRIDGE__NATS__URL")
        .env("OPENCODE_BRIDGE__NATS__URL", nats_url)
        .env("OPENCODE_BRIDGE__OPENCODE__BASE_URL", fake_url)
        .env("OPENCODE_BRIDGE__JETSTREAM__JOBS", "on")
        .env("OPENCODE_BRIDGE__JETSTREAM__ACK_WAIT", "3s")
        .env("OPENCODE_BRIDGE__AGENT_PROTOCOL__ENABLED", "false")
        .env("RUST_LOG", "info");
    spawn_serving(cmd, Duration::from_secs(30)).await
}

#[tokio::test]
async fn a_daemon_killed_mid_job_the_job_finishes_once_on_another() {
    let nats = NatsServer::start();
    let fake = FakeOpenCode::start().await;
    let c = client(&nats.url()).await;
    // 40 deltas 100 ms apart: the daemon dies in the middle.
    fake.set_script(|input| {
        let deltas: Vec<String> = (1..=40).map(|i| format!("slow-{i} ")).collect();
        paced_text_turn(input, &deltas, 100)
    });
    let (mut doomed, _log) = spawn_daemon(&nats.url(), &fake.url()).await;
    let mut replies = subscribe_ready(&c, "opencode.reply.k1").await;
    publish_job(&c, "opencode.job", json!({"text": "go", "trace_id": "k1"})).await;
    let first = tokio::time::timeout(JOB, replies.next())
        .await
        .expect("the job started")
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&first.payload).unwrap()["kind"],
        "delta"
    );
    // The survivor starts before the kill (its session map does not know
    // the job's one-off session), then the first daemon dies.
    let survivor = Bridge::start(job_config(&nats, &fake, |_| {})).await;
    doomed.start_kill().unwrap();
    doomed.wait().await.unwrap();
    assert!(
        fake.sessions().iter().any(|s| s.busy),
        "the turn was still running at OpenCode when its daemon died"
    );

    let got = collect_until_terminal(&mut replies, JOB).await;
    let t = terminals(&got);
    assert_eq!(t.len(), 1, "{got:#?}");
    assert_eq!(t[0]["kind"], "final", "{got:#?}");
    let expected: String = (1..=40).map(|i| format!("slow-{i} ")).collect();
    assert_eq!(t[0]["content"], expected);
    assert_eq!(fake.prompts().len(), 1, "the survivor did not prompt again");
    // Nothing after it, even past another ack_wait.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(replies.next().now_or_never().is_none());
    assert_eq!(consumer_state(&c).await, (0, 0));
    survivor.stop().await.unwrap();
}

#[tokio::test]
async fn prompt_job_through_the_cli() {
    let nats = NatsServer::start();
    let fake = FakeOpenCode::start().await;
    let bridge = Bridge::start(job_config(&nats, &fake, |_| {})).await;
    let out = Command::new(BIN)
        .args(["prompt", "--job", "--server", &nats.url(), "hello", "jobs"])
        .env_remove("OPENCODE_BRIDGE__NATS__URL")
        .stdin(Stdio::null())
        .output();
    let out = tokio::time::timeout(JOB, out).await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(stdout.trim_end(), echo_reply("hello jobs"), "{stderr}");
    assert!(stderr.contains("job stored"), "{stderr}");
    assert_eq!(fake.prompts().len(), 1);
    bridge.stop().await.unwrap();
}

/// Jobs of a conversation at home on one daemon run there, whichever daemon
/// pulls them: the puller forwards the job, the home runs and settles it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_a_conversation_run_at_its_home_whoever_pulls_them() {
    let nats = NatsServer::start();
    let (fa, fb) = (FakeOpenCode::start().await, FakeOpenCode::start().await);
    let c = client(&nats.url()).await;
    // A alone first: the conversation's home is A.
    let a = Bridge::start(job_config(&nats, &fa, |_| {})).await;
    let mut sub = subscribe_ready(&c, "opencode.reply.>").await;
    publish_job(
        &c,
        "opencode.job.chat.home",
        json!({"text": "first", "trace_id": "h0"}),
    )
    .await;
    let r = collect_until_terminal(&mut sub, JOB).await;
    assert_eq!(terminals(&r)[0]["kind"], "final", "{r:#?}");
    let b = Bridge::start(job_config(&nats, &fb, |_| {})).await;
    const N: usize = 8;
    for i in 1..=N {
        let payload = json!({"text": format!("job {i}"), "trace_id": format!("h{i}")});
        publish_job(&c, "opencode.job.chat.home", payload).await;
    }
    let mut finals = std::collections::HashMap::new();
    let deadline = tokio::time::Instant::now() + JOB;
    while finals.len() < N {
        let m = tokio::time::timeout_at(deadline, sub.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {N} jobs ended", finals.len()))
            .unwrap();
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        if matches!(v["kind"].as_str(), Some("final" | "error")) {
            assert_eq!(v["kind"], "final", "{v}");
            let again = finals.insert(v["trace_id"].as_str().unwrap().to_string(), v.clone());
            assert!(again.is_none(), "two terminal replies for {v}");
        }
    }
    for i in 1..=N {
        assert_eq!(
            finals[&format!("h{i}")]["content"],
            echo_reply(&format!("job {i}")).as_str()
        );
    }
    assert_eq!(
        fa.prompts().len(),
        N + 1,
        "every job ran at the conversation's home"
    );
    assert_eq!(fb.prompts().len(), 0);
    // Every job was settled: nothing waits or is unacknowledged.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(consumer_state(&c).await, (0, 0));
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// A reply subject is never a JetStream API, KV, job or instance subject:
/// a reply published there with the bridge's permissions would delete a
/// stream, forge a job or a forwarded prompt. Not even in lax mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_subject_cannot_reach_jetstream_jobs_or_other_daemons() {
    let nats = NatsServer::start();
    let fake = FakeOpenCode::start().await;
    let bridge = Bridge::start(job_config(&nats, &fake, |_| {})).await;
    let c = client(&nats.url()).await;
    let mut sub = subscribe_ready(&c, "opencode.reply.attacker.>").await;
    for (i, target) in [
        "$JS.API.STREAM.DELETE.OPENCODE_JOBS",
        "$KV.opencode_bridge_conversations.c_x",
        "opencode.job.victim.C1",
        "opencode.bridge.instance.any.prompt",
        "opencode.turn.status.victim",
    ]
    .into_iter()
    .enumerate()
    {
        let trace = format!("r{i}");
        let payload = json!({"text": "hi", "reply_to": target, "trace_id": trace});
        c.publish("opencode.prompt.attacker", payload.to_string().into())
            .await
            .unwrap();
        let r = collect_until_terminal(&mut sub, JOB).await;
        let last = &r.last().unwrap().1;
        assert_eq!(last["trace_id"], trace.as_str());
        // `$` subjects are not even valid reply subjects (`bad_request`);
        // the rest are the bridge's own (`forbidden`).
        let want = if target.starts_with('$') {
            "bad_request"
        } else {
            "forbidden"
        };
        assert_eq!(last["code"], want, "{target}: {r:#?}");
    }
    // The stream is still there, with nothing in it; OpenCode saw nothing.
    assert_eq!(consumer_state(&c).await, (0, 0));
    assert!(fake.prompts().is_empty());
    bridge.stop().await.unwrap();
}
