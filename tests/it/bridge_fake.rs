//! The bridge against the fake OpenCode (`support/fake_opencode.rs`): each
//! test has its own nats-server, fake OpenCode and in-process bridge, and
//! asserts on what a NATS subscriber receives (and, where that is the
//! point, on the fake's request log).

use std::time::{Duration, Instant};

use async_nats::{Client, HeaderMap, Subscriber};
use bytes::Bytes;
use futures::StreamExt;
use opencode_nats_bridge::config::Config;
use serde_json::{json, Value};

use crate::support::bridge::{
    assert_well_formed, delta_text, request, request_with_headers, terminal, test_config, Bridge,
};
use crate::support::fake_opencode::{
    self as fake, api_error, ev, FakeOpenCode, FakeOptions, Step, TurnBuilder, TurnInput,
    TurnScript,
};
use crate::support::nats::{client, collect_until_terminal, subscribe_ready, NatsServer, Reply};

/// Bound on one turn's replies.
const TURN: Duration = Duration::from_secs(10);
const PASSWORD: &str = "fake-secret";

struct Rig {
    nats: NatsServer,
    fake: FakeOpenCode,
    bridge: Option<Bridge>,
    client: Client,
}

impl Rig {
    /// NATS + the fake (password [`PASSWORD`]) scripted by `script` + the
    /// bridge with `test_config`, adjusted by `tweak`.
    async fn start(
        script: impl Fn(&TurnInput) -> TurnScript + Send + Sync + 'static,
        tweak: impl FnOnce(&mut Config),
    ) -> Rig {
        let nats = NatsServer::start();
        let fake = FakeOpenCode::start_with(FakeOptions {
            password: Some(PASSWORD.into()),
            ..FakeOptions::default()
        })
        .await;
        fake.set_script(script);
        let mut cfg = test_config(&nats.url(), &fake.url(), Some(PASSWORD));
        tweak(&mut cfg);
        cfg.validate().expect("tweaked config is valid");
        let bridge = Bridge::start(cfg).await;
        let client = client(&nats.url()).await;
        Rig {
            nats,
            fake,
            bridge: Some(bridge),
            client,
        }
    }

    async fn ask(&self, subject: &str, payload: &str) -> Vec<Reply> {
        let r = request(&self.client, subject, payload, TURN).await;
        assert_well_formed(&r);
        r
    }

    async fn stop(mut self) {
        if let Some(b) = self.bridge.take() {
            b.stop().await.expect("the bridge stops cleanly");
        }
        assert_eq!(
            self.fake.unauthorized(),
            0,
            "every call carried the credentials"
        );
    }
}

fn kinds(replies: &[Reply]) -> Vec<String> {
    replies
        .iter()
        .map(|(_, v)| v["kind"].as_str().unwrap_or("?").to_string())
        .collect()
}

fn of_kind<'a>(replies: &'a [Reply], kind: &str) -> Vec<&'a Value> {
    replies
        .iter()
        .filter(|(_, v)| v["kind"] == kind)
        .map(|(_, v)| v)
        .collect()
}

fn concat(replies: &[Reply], kind: &str) -> String {
    of_kind(replies, kind)
        .iter()
        .map(|v| v["content"].as_str().unwrap_or_default())
        .collect()
}

/// Publishes `payload` with a NATS reply inbox and returns the inbox's
/// subscription (already registered at the server).
async fn send_request(
    client: &Client,
    subject: &str,
    headers: HeaderMap,
    payload: impl Into<Bytes>,
) -> Subscriber {
    let inbox = client.new_inbox();
    let sub = subscribe_ready(client, inbox.clone()).await;
    client
        .publish_with_reply_and_headers(subject.to_string(), inbox, headers, payload.into())
        .await
        .expect("publish prompt");
    client.flush().await.expect("flush");
    sub
}

/// Publishes without a reply subject.
async fn publish(client: &Client, subject: &str, headers: HeaderMap, payload: impl Into<Bytes>) {
    client
        .publish_with_headers(subject.to_string(), headers, payload.into())
        .await
        .expect("publish prompt");
    client.flush().await.expect("flush");
}

/// Collects one turn with the arrival time of each reply.
async fn collect_timed(sub: &mut Subscriber, timeout: Duration) -> Vec<(Instant, Value)> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(Some(m)) => {
                let v: Value = serde_json::from_slice(&m.payload).unwrap_or(Value::Null);
                let done = matches!(v["kind"].as_str(), Some("final" | "error"));
                got.push((Instant::now(), v));
                if done {
                    return got;
                }
            }
            other => panic!("no terminal reply within {timeout:?} ({other:?}); got {got:#?}"),
        }
    }
}

fn owned(words: &[String]) -> Vec<&str> {
    words.iter().map(String::as_str).collect()
}

// 1 -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_turn_deltas_add_up_to_the_final() {
    let deltas = ["Hello ", "from ", "the ", "fake ", "OpenCode, ", "héllo ✓ ", "done."];
    let rig = Rig::start(
        move |input| {
            let mut t = TurnBuilder::new(input);
            t.gap_ms(15);
            t.cost = 0.0125;
            t.begin();
            let a = t.assistant();
            t.text(&a, &deltas);
            t.finish(&a, "stop");
            t.end();
            t.build()
        },
        |c| c.opencode.directory = Some("/tmp/fake-project".into()),
    )
    .await;
    let replies = rig.ask("opencode.prompt", "Say hello").await;
    let fin = terminal(&replies);
    assert_eq!(fin["kind"], "final", "{replies:#?}");
    let full = deltas.concat();
    assert_eq!(fin["content"], full.as_str());
    assert_eq!(delta_text(&replies), full);
    assert_eq!(of_kind(&replies, "delta").len(), deltas.len(), "one reply per delta");
    assert_eq!(fin["model"], "fake/m1");
    assert_eq!(fin["agent"], "build");
    assert_eq!(fin["finish"], "stop");
    assert_eq!(
        fin["usage"],
        json!({"input": fake::TOKENS_INPUT, "output": fake::TOKENS_OUTPUT,
               "reasoning": fake::TOKENS_REASONING, "cache_read": fake::TOKENS_CACHE_READ,
               "cache_write": 0})
    );
    assert!((fin["cost"].as_f64().unwrap() - 0.0125).abs() < 1e-9, "{fin}");
    // The script sleeps 15 ms per delta.
    assert!(fin["duration_ms"].as_u64().unwrap() >= 90, "{fin}");
    assert!(fin["session_id"].as_str().unwrap().starts_with("ses_"));
    assert!(fin.get("conversation").is_none(), "a one-off prompt: {fin}");
    // Headers on every reply (checked in detail by assert_well_formed).
    for (h, v) in &replies {
        let h = h.as_ref().expect("headers");
        assert_eq!(h.get("Reply-Kind").unwrap().as_str(), v["kind"].as_str().unwrap());
    }
    // What the fake saw: one session titled for a one-off, one prompt with
    // the text, every call in the configured directory.
    let sessions = rig.fake.sessions();
    assert_eq!(sessions.len(), 1);
    assert!(
        sessions[0].title.starts_with("nats:one-off "),
        "{}",
        sessions[0].title
    );
    let prompts = rig.fake.prompts();
    assert_eq!(prompts.len(), 1);
    assert_eq!(
        prompts[0].json()["parts"],
        json!([{"type": "text", "text": "Say hello"}])
    );
    for r in rig.fake.requests() {
        assert_eq!(
            r.directory.as_deref(),
            Some("/tmp/fake-project"),
            "{} {}",
            r.method,
            r.path
        );
    }
    rig.stop().await;
}

// 2 -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasoning_is_published_apart_from_the_answer() {
    let thinking = ["Let me ", "think ", "about ", "this."];
    let answer = ["The answer ", "is ", "42."];
    let rig = Rig::start(
        move |input| fake::reasoning_turn(input, &thinking, &answer),
        |_| {},
    )
    .await;
    let replies = rig.ask("opencode.prompt", "What is the answer?").await;
    let fin = terminal(&replies);
    assert_eq!(fin["kind"], "final", "{replies:#?}");
    assert_eq!(concat(&replies, "reasoning"), thinking.concat());
    assert_eq!(of_kind(&replies, "reasoning").len(), thinking.len());
    assert_eq!(delta_text(&replies), answer.concat());
    assert_eq!(fin["content"], answer.concat().as_str());
    for v in of_kind(&replies, "delta") {
        assert!(!v["content"].as_str().unwrap().contains("think"), "{v}");
    }
    assert!(!fin["content"].as_str().unwrap().contains("think"));
    // Reasoning comes before the answer text.
    let k = kinds(&replies);
    let last_reasoning = k.iter().rposition(|k| k == "reasoning").unwrap();
    let first_delta = k.iter().position(|k| k == "delta").unwrap();
    assert!(last_reasoning < first_delta, "{k:?}");
    rig.stop().await;
}

// 3 -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_and_results_once_per_call() {
    let rig = Rig::start(
        |input| {
            fake::tool_turn(
                input,
                &[
                    (
                        "call_a",
                        "bash",
                        json!({"command": "echo one", "description": "first"}),
                        "one\n",
                    ),
                    (
                        "call_b",
                        "read",
                        json!({"filePath": "/etc/hostname"}),
                        "fakehost\n",
                    ),
                ],
                &["Both ", "tools ", "ran."],
            )
        },
        |_| {},
    )
    .await;
    let replies = rig.ask("opencode.prompt", "run two tools").await;
    let fin = terminal(&replies);
    assert_eq!(fin["kind"], "final", "{replies:#?}");
    assert_eq!(fin["content"], "Both tools ran.");
    let calls = of_kind(&replies, "tool_call");
    let results = of_kind(&replies, "tool_result");
    assert_eq!(calls.len(), 2, "{replies:#?}");
    assert_eq!(results.len(), 2, "{replies:#?}");
    let expect = [
        ("call_a", "bash", json!({"command": "echo one", "description": "first"}), "one\n"),
        ("call_b", "read", json!({"filePath": "/etc/hostname"}), "fakehost\n"),
    ];
    for (call_id, tool, args, output) in expect {
        let pos = |kind: &str| {
            replies
                .iter()
                .position(|(_, v)| v["kind"] == kind && v["call_id"] == call_id)
                .unwrap_or_else(|| panic!("no {kind} for {call_id}: {replies:#?}"))
        };
        let (c, r) = (pos("tool_call"), pos("tool_result"));
        assert!(c < r, "the call comes before its result");
        assert_eq!(replies[c].1["tool"], tool);
        assert_eq!(replies[c].1["args"], args);
        assert_eq!(replies[r].1["tool"], tool);
        assert_eq!(replies[r].1["success"], true);
        assert_eq!(replies[r].1["result"], output);
    }
    rig.stop().await;
}

// 4 -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_errors_map_to_provider_error() {
    let rig = Rig::start(
        |input| {
            if input.text.contains("401") {
                fake::error_turn(
                    input,
                    api_error(401, "Incorrect API key provided", false),
                )
            } else {
                fake::error_turn(input, api_error(503, "Upstream overloaded", true))
            }
        },
        |_| {},
    )
    .await;
    let replies = rig.ask("opencode.prompt", "fail with 401").await;
    assert_eq!(kinds(&replies), ["error"], "{replies:#?}");
    let e = terminal(&replies);
    assert_eq!(e["code"], "provider_error");
    assert_eq!(e["retryable"], false);
    assert!(
        e["error"].as_str().unwrap().contains("Incorrect API key"),
        "{e}"
    );

    let replies = rig.ask("opencode.prompt", "fail with 503").await;
    assert_eq!(kinds(&replies), ["error"], "{replies:#?}");
    let e = terminal(&replies);
    assert_eq!(e["code"], "provider_error");
    assert_eq!(e["retryable"], true);
    assert!(
        e["error"].as_str().unwrap().contains("Upstream overloaded"),
        "{e}"
    );
    rig.stop().await;
}

// 5 -------------------------------------------------------------------------

fn labelled(label: &str) -> Vec<String> {
    (1..=10).map(|i| format!("{label}-{i} ")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_conversations_do_not_cross_talk() {
    let rig = Rig::start(
        |input| {
            let label = if input.text.contains("alpha") {
                "alpha"
            } else {
                "bravo"
            };
            let w = labelled(label);
            let mut t = TurnBuilder::new(input);
            t.gap_ms(20);
            t.begin();
            let a = t.assistant();
            t.text(&a, &owned(&w));
            t.finish(&a, "stop");
            t.end();
            t.build()
        },
        |_| {},
    )
    .await;
    let (ra, rb) = tokio::join!(
        request(&rig.client, "opencode.prompt.a", "talk alpha", TURN),
        request(&rig.client, "opencode.prompt.b", "talk bravo", TURN),
    );
    for (replies, label, conv) in [(&ra, "alpha", "a"), (&rb, "bravo", "b")] {
        assert_well_formed(replies);
        let fin = terminal(replies);
        assert_eq!(fin["kind"], "final", "{replies:#?}");
        assert_eq!(fin["content"], labelled(label).concat().as_str());
        for (_, v) in replies.iter() {
            assert_eq!(v["conversation"], conv, "{v}");
            if v["kind"] == "delta" {
                assert!(v["content"].as_str().unwrap().starts_with(label), "{v}");
            }
        }
    }
    assert_ne!(terminal(&ra)["session_id"], terminal(&rb)["session_id"]);
    // The two turns really ran at the same time on the fake's stream.
    let turns = rig.fake.turns();
    assert_eq!(turns.len(), 2);
    let (t0, t1) = (&turns[0], &turns[1]);
    assert!(
        t0.first_emitted("message.part.delta").unwrap()
            < t1.last_emitted("message.part.delta").unwrap()
            && t1.first_emitted("message.part.delta").unwrap()
                < t0.last_emitted("message.part.delta").unwrap(),
        "the turns' deltas interleave"
    );
    let mut titles: Vec<String> = rig.fake.sessions().into_iter().map(|s| s.title).collect();
    titles.sort();
    assert_eq!(titles, ["nats:a", "nats:b"]);
    rig.stop().await;
}

// 6 -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_conversation_queues_in_fifo_and_refuses_beyond() {
    let rig = Rig::start(
        |input| {
            let w: Vec<String> = (1..=8).map(|i| format!("{}-{i} ", input.text)).collect();
            let mut t = TurnBuilder::new(input);
            t.gap_ms(60);
            t.begin();
            let a = t.assistant();
            t.text(&a, &owned(&w));
            t.finish(&a, "stop");
            t.end();
            t.build()
        },
        |c| c.turn.conversation_queue = 1,
    )
    .await;
    let subject = "opencode.prompt.fifo";
    let mut s1 = send_request(&rig.client, subject, HeaderMap::new(), "first").await;
    let mut s2 = send_request(&rig.client, subject, HeaderMap::new(), "second").await;
    let mut s3 = send_request(&rig.client, subject, HeaderMap::new(), "third").await;

    // The third finds one running and one queued: refused at once.
    let r3 = collect_timed(&mut s3, TURN).await;
    assert_eq!(r3.len(), 1, "{r3:#?}");
    assert_eq!(r3[0].1["kind"], "error");
    assert_eq!(r3[0].1["code"], "session_busy");
    assert_eq!(r3[0].1["retryable"], true);
    assert_eq!(r3[0].1["conversation"], "fifo");
    assert!(
        rig.fake
            .turns()
            .iter()
            .all(|t| t.input.text == "first" && t.last_emitted("session.idle").is_none()),
        "at most the first reached OpenCode, and it is still running"
    );

    let (r1, r2) = tokio::join!(collect_timed(&mut s1, TURN), collect_timed(&mut s2, TURN));
    let (f1, f2) = (r1.last().unwrap(), r2.last().unwrap());
    assert_eq!(f1.1["kind"], "final", "{r1:#?}");
    assert_eq!(f2.1["kind"], "final", "{r2:#?}");
    assert!(f1.1["content"].as_str().unwrap().starts_with("first-1 "));
    assert!(f2.1["content"].as_str().unwrap().starts_with("second-1 "));
    assert!(
        f1.0 <= r2[0].0,
        "the second turn's first reply follows the first's final"
    );
    assert!(r3[0].0 < r1[0].0, "the refusal came before the first's first reply");
    assert_eq!(f1.1["session_id"], f2.1["session_id"]);
    // OpenCode never had two prompts at once for the session.
    let turns = rig.fake.turns();
    assert_eq!(turns.len(), 2, "the refused prompt never reached OpenCode");
    assert_eq!(turns[0].input.text, "first");
    assert_eq!(turns[1].input.text, "second");
    let first_done = turns[0].last_emitted("session.idle").expect("first ended");
    assert!(
        turns[1].received_at > first_done,
        "the second prompt_async came after the first turn was over"
    );
    drop(s3);
    rig.stop().await;
}

// 7 -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_prompts_get_one_bad_request_each() {
    let rig = Rig::start(fake::default_script, |c| c.limits.max_prompt_bytes = 256).await;
    let big = format!(r#"{{"text": "{}"}}"#, "x".repeat(300));
    let cases: Vec<(&str, Bytes)> = vec![
        ("empty payload", Bytes::new()),
        ("invalid JSON", Bytes::from_static(b"{oops")),
        ("invalid UTF-8", Bytes::from_static(b"\xff\xfe\xfd hello")),
        ("text is a number", Bytes::from_static(br#"{"text": 42}"#)),
        ("text is empty", Bytes::from_static(br#"{"text": ""}"#)),
        ("no text", Bytes::from_static(b"{}")),
        ("too big", Bytes::from(big)),
        (
            "bad model",
            Bytes::from_static(br#"{"text": "hi", "model": "nomodel"}"#),
        ),
    ];
    for (what, payload) in cases {
        let mut sub = send_request(&rig.client, "opencode.prompt", HeaderMap::new(), payload).await;
        let replies = collect_until_terminal(&mut sub, TURN).await;
        assert_eq!(kinds(&replies), ["error"], "{what}: {replies:#?}");
        assert_well_formed(&replies);
        let e = terminal(&replies);
        assert_eq!(e["code"], "bad_request", "{what}: {e}");
        assert_eq!(e["retryable"], false, "{what}: {e}");
        assert!(!e["error"].as_str().unwrap().is_empty(), "{what}");
    }
    // The reasons name the problem.
    let mut sub = send_request(
        &rig.client,
        "opencode.prompt",
        HeaderMap::new(),
        format!(r#"{{"text": "{}"}}"#, "y".repeat(300)),
    )
    .await;
    let e = collect_until_terminal(&mut sub, TURN).await;
    assert!(
        terminal(&e)["error"]
            .as_str()
            .unwrap()
            .contains("max_prompt_bytes"),
        "{e:#?}"
    );
    // Nothing reached OpenCode, and the daemon still serves.
    assert!(rig.fake.prompts().is_empty());
    let replies = rig.ask("opencode.prompt", "still there?").await;
    assert_eq!(terminal(&replies)["kind"], "final", "{replies:#?}");
    assert_eq!(
        terminal(&replies)["content"],
        fake::echo_reply("still there?").as_str()
    );
    rig.stop().await;
}

// 8 -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_are_routed_as_documented() {
    let rig = Rig::start(fake::default_script, |_| {}).await;
    let c = &rig.client;

    // Request style: the inbox.
    let r = rig.ask("opencode.prompt", "via inbox").await;
    assert_eq!(terminal(&r)["kind"], "final");

    // No inbox, reply_to.
    let mut sub = subscribe_ready(c, "my.replies.x").await;
    publish(
        c,
        "opencode.prompt",
        HeaderMap::new(),
        r#"{"text": "via reply_to", "reply_to": "my.replies.x", "trace_id": "t-rt"}"#,
    )
    .await;
    let r = collect_until_terminal(&mut sub, TURN).await;
    assert_well_formed(&r);
    assert_eq!(terminal(&r)["kind"], "final", "{r:#?}");
    assert_eq!(terminal(&r)["trace_id"], "t-rt");

    // Neither: <reply_prefix>.<trace_id>.
    let mut sub = subscribe_ready(c, "opencode.reply.t-route-1").await;
    publish(
        c,
        "opencode.prompt",
        HeaderMap::new(),
        r#"{"text": "via prefix", "trace_id": "t-route-1"}"#,
    )
    .await;
    let r = collect_until_terminal(&mut sub, TURN).await;
    assert_well_formed(&r);
    assert_eq!(terminal(&r)["kind"], "final", "{r:#?}");
    assert_eq!(
        terminal(&r)["content"],
        fake::echo_reply("via prefix").as_str()
    );

    // Plain text, no headers, no inbox: a generated trace id names the
    // subject.
    let mut any = subscribe_ready(c, "opencode.reply.>").await;
    publish(c, "opencode.prompt", HeaderMap::new(), "plain and alone").await;
    let m = tokio::time::timeout(TURN, any.next())
        .await
        .expect("a reply under opencode.reply.>")
        .expect("subscription open");
    let first: Value = serde_json::from_slice(&m.payload).unwrap();
    let trace = first["trace_id"].as_str().unwrap().to_string();
    assert!(uuid::Uuid::parse_str(&trace).is_ok(), "{trace}");
    assert_eq!(m.subject.as_str(), format!("opencode.reply.{trace}"));
    let mut rest = vec![(m.headers.clone(), first)];
    rest.extend(collect_until_terminal(&mut any, TURN).await);
    assert_well_formed(&rest);
    assert_eq!(
        terminal(&rest)["content"],
        fake::echo_reply("plain and alone").as_str()
    );
    drop(any);

    // Trace-Id header on a plain-text prompt.
    let mut h = HeaderMap::new();
    h.insert("Trace-Id", "hdr-trace-7");
    let r = request_with_headers(c, "opencode.prompt", h, "with a header", TURN).await;
    assert_well_formed(&r);
    assert!(r.iter().all(|(_, v)| v["trace_id"] == "hdr-trace-7"));

    // The subject tail names the conversation.
    let r = rig.ask("opencode.prompt.slack.C042", "from slack").await;
    assert_eq!(terminal(&r)["kind"], "final");
    assert!(r.iter().all(|(_, v)| v["conversation"] == "slack.C042"));

    // The Conversation header too.
    let mut h = HeaderMap::new();
    h.insert("Conversation", "matrix.room9");
    let r = request_with_headers(c, "opencode.prompt", h, "from matrix", TURN).await;
    assert_well_formed(&r);
    assert!(r.iter().all(|(_, v)| v["conversation"] == "matrix.room9"));

    let titles: Vec<String> = rig.fake.sessions().into_iter().map(|s| s.title).collect();
    assert!(titles.contains(&"nats:slack.C042".to_string()), "{titles:?}");
    assert!(titles.contains(&"nats:matrix.room9".to_string()), "{titles:?}");
    rig.stop().await;
}

// 9 -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_injection_is_refused_and_never_published() {
    let rig = Rig::start(fake::default_script, |_| {}).await;
    let spy_conn = client(&rig.nats.url()).await;
    let mut spy = subscribe_ready(&spy_conn, ">").await;
    let bad = ["x.*", "x.>", ">", "a b", "a..b", "$SYS.evil", "*"];
    let mut expected_errors = 0;
    for field in ["trace_id", "conversation", "reply_to"] {
        for value in bad {
            // A valid trace id beside the bad field (unless it is the bad one).
            let payload = if field == "trace_id" {
                json!({"text": "hi", "trace_id": value})
            } else {
                json!({"text": "hi", field: value, "trace_id": "inj-ok"})
            }
            .to_string();
            // Request style: the error comes back on the inbox.
            let mut sub = send_request(
                &rig.client,
                "opencode.prompt",
                HeaderMap::new(),
                payload.clone(),
            )
            .await;
            let r = collect_until_terminal(&mut sub, TURN).await;
            assert_eq!(kinds(&r), ["error"], "{field}={value:?}: {r:#?}");
            assert_well_formed(&r);
            assert_eq!(terminal(&r)["code"], "bad_request");
            assert!(
                terminal(&r)["error"].as_str().unwrap().contains(field),
                "{field}={value:?}: {r:#?}"
            );
            if field != "trace_id" {
                assert_eq!(terminal(&r)["trace_id"], "inj-ok");
            }
            expected_errors += 1;
            drop(sub);
            // No inbox: the error goes to <reply_prefix>.<a valid trace id>.
            publish(&rig.client, "opencode.prompt", HeaderMap::new(), payload).await;
            expected_errors += 1;
        }
    }
    // Headers too.
    for (name, value) in [("Trace-Id", "h.*"), ("Conversation", "c.>")] {
        let mut h = HeaderMap::new();
        h.insert(name, value);
        let r = request_with_headers(&rig.client, "opencode.prompt", h, "hi", TURN).await;
        assert_eq!(kinds(&r), ["error"], "{name}={value}: {r:#?}");
        assert_eq!(terminal(&r)["code"], "bad_request");
        expected_errors += 1;
    }
    // A good prompt, as a marker that everything before it was handled.
    let r = rig.ask("opencode.prompt", "after the attack").await;
    assert_eq!(terminal(&r)["kind"], "final");

    // Everything the spy saw: prompts, inbox replies, and errors on
    // opencode.reply.<valid id>; never a subject made of the bad text.
    let seen = drain_subjects(&mut spy, Duration::from_millis(500)).await;
    let mut errors = 0;
    for (subject, body) in &seen {
        for value in bad {
            if value.len() > 1 {
                assert!(
                    !subject.contains(value),
                    "published on {subject:?} ({value:?}): {body}"
                );
            }
        }
        assert!(
            !subject.contains(['*', '>', ' ']) && !subject.contains("..") && !subject.starts_with('$'),
            "{subject:?}"
        );
        if body["kind"] == "error" {
            assert_eq!(body["code"], "bad_request", "{subject}: {body}");
            errors += 1;
            if subject.starts_with("opencode.reply.") {
                let trace = body["trace_id"].as_str().unwrap();
                assert_eq!(subject, &format!("opencode.reply.{trace}"));
            } else {
                assert!(subject.starts_with("_INBOX."), "{subject}: {body}");
            }
        }
    }
    assert_eq!(errors, expected_errors, "one error per bad prompt: {seen:#?}");
    assert!(rig.fake.prompts().len() == 1, "only the good prompt reached OpenCode");
    rig.stop().await;
}

async fn drain_subjects(sub: &mut Subscriber, quiet: Duration) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(quiet, sub.next()).await {
        let v = serde_json::from_slice(&m.payload)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&m.payload).into_owned()));
        out.push((m.subject.to_string(), v));
    }
    out
}

// 10 ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_before_the_204_are_not_lost() {
    let deltas = ["Early ", "bird ", "gets ", "the ", "worm."];
    let rig = Rig::start(
        move |input| {
            let mut script = fake::text_turn(input, &deltas);
            // The whole turn is on the stream before the 204, which comes
            // 300 ms later.
            script.steps.push(Step::Sleep(Duration::from_millis(300)));
            script.steps.push(Step::Respond);
            script
        },
        |_| {},
    )
    .await;
    let replies = rig.ask("opencode.prompt", "be early").await;
    let fin = terminal(&replies);
    assert_eq!(fin["kind"], "final", "{replies:#?}");
    assert_eq!(fin["content"], deltas.concat().as_str());
    assert_eq!(of_kind(&replies, "delta").len(), deltas.len());
    let t = &rig.fake.turns()[0];
    assert!(
        t.last_emitted("session.idle").unwrap() < t.responded_at.unwrap(),
        "the fake really sent the turn before the 204"
    );
    rig.stop().await;
}

// 11 ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_updates_do_not_duplicate_text() {
    let rig = Rig::start(
        |input| {
            let mut t = TurnBuilder::new(input);
            t.begin();
            let a = t.assistant();
            t.reasoning(&a, &["Hmm, ", "let me see."]);
            t.tool(
                &a,
                "call_dup",
                "bash",
                &json!({"command": "true"}),
                Ok(""),
            );
            t.text(&a, &["Twice ", "sent, ", "once ", "shown."]);
            t.finish(&a, "stop");
            t.end();
            t.build().duplicate_updates()
        },
        |_| {},
    )
    .await;
    let replies = rig.ask("opencode.prompt", "duplicates").await;
    let fin = terminal(&replies);
    assert_eq!(fin["kind"], "final", "{replies:#?}");
    assert_eq!(fin["content"], "Twice sent, once shown.");
    assert_eq!(delta_text(&replies), "Twice sent, once shown.");
    assert_eq!(concat(&replies, "reasoning"), "Hmm, let me see.");
    assert_eq!(of_kind(&replies, "tool_call").len(), 1, "{replies:#?}");
    assert_eq!(of_kind(&replies, "tool_result").len(), 1, "{replies:#?}");
    rig.stop().await;
}

// 12 ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stray_idle_does_not_end_the_turn_early() {
    let rig = Rig::start(
        |input| {
            let first = input.nth_in_session == 0;
            let mut t = TurnBuilder::new(input);
            let sid = t.sid.clone();
            if !first {
                // A late idle of the previous turn, right after the prompt.
                t.push(Step::EmitOnly(ev::status(&sid, "idle")));
                t.push(Step::EmitOnly(ev::session_idle(&sid)));
                t.sleep_ms(250);
            }
            t.begin();
            if !first {
                // And another once this turn's user message exists.
                t.push(Step::EmitOnly(ev::session_idle(&sid)));
                t.sleep_ms(250);
            }
            let a = t.assistant();
            let text = if first {
                vec!["First ", "answer."]
            } else {
                vec!["Second ", "answer, ", "complete."]
            };
            t.text(&a, &text);
            t.finish(&a, "stop");
            t.end();
            t.build()
        },
        |_| {},
    )
    .await;
    let r1 = rig.ask("opencode.prompt.stray", "one").await;
    assert_eq!(terminal(&r1)["content"], "First answer.", "{r1:#?}");
    let r2 = rig.ask("opencode.prompt.stray", "two").await;
    let fin = terminal(&r2);
    assert_eq!(fin["kind"], "final", "{r2:#?}");
    assert_eq!(fin["content"], "Second answer, complete.");
    assert_eq!(delta_text(&r2), "Second answer, complete.");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_before_completion_still_ends_correctly() {
    let rig = Rig::start(
        |input| {
            let mut t = TurnBuilder::new(input);
            let sid = t.sid.clone();
            t.begin();
            let a = t.assistant();
            t.text(&a, &["Idle ", "came ", "first."]);
            let start = ev::step_finish(&sid, &a, "stop", t.cost);
            t.emit(start);
            // Idle before the message is marked completed (as OpenCode does
            // on errors), completion 150 ms later, then idle again.
            for e in ev::idle(&sid) {
                t.emit(e);
            }
            t.sleep_ms(150);
            let info = t.completed_info(&a, "stop");
            t.emit(ev::message_updated(&sid, info));
            for e in ev::idle(&sid) {
                t.emit(e);
            }
            t.build()
        },
        |_| {},
    )
    .await;
    let r = rig.ask("opencode.prompt", "idle first").await;
    let fin = terminal(&r);
    assert_eq!(fin["kind"], "final", "{r:#?}");
    assert_eq!(fin["content"], "Idle came first.");
    assert_eq!(fin["finish"], "stop");
    rig.stop().await;
}

// 13 ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_requests_are_rejected_and_the_turn_ends_once() {
    let rig = Rig::start(
        |input| {
            let mut t = TurnBuilder::new(input);
            let sid = t.sid.clone();
            t.begin();
            let a1 = t.assistant();
            let args = json!({"command": "rm -rf /tmp/x", "description": "clean"});
            let p = t.tool_start(&a1, "call_perm", "bash", &args);
            t.emit(ev::permission_asked(
                &sid,
                "per_fake1",
                "bash",
                &["rm -rf /tmp/x"],
                &a1,
                "call_perm",
            ));
            t.push(Step::WaitForRequest {
                method: "POST".into(),
                path: "/permission/per_fake1/reply".into(),
                timeout: Duration::from_secs(5),
            });
            t.emit(ev::permission_replied(&sid, "per_fake1", "reject"));
            t.tool_end(
                &a1,
                &p,
                "call_perm",
                "bash",
                &args,
                Err("The user rejected permission to use this specific tool call."),
            );
            t.finish(&a1, "tool-calls");
            let a2 = t.assistant();
            t.text(&a2, &["I was not ", "allowed to run it."]);
            t.finish(&a2, "stop");
            t.end();
            t.build()
        },
        |_| {},
    )
    .await;
    let r = rig.ask("opencode.prompt", "clean up").await;
    let fin = terminal(&r);
    assert_eq!(fin["kind"], "final", "{r:#?}");
    assert_eq!(fin["content"], "I was not allowed to run it.");
    let notes = fin["notes"].as_array().expect("notes");
    assert!(
        notes
            .iter()
            .any(|n| n.as_str().unwrap().contains("permission `bash`")),
        "{fin}"
    );
    assert_eq!(of_kind(&r, "tool_call").len(), 1);
    let res = of_kind(&r, "tool_result");
    assert_eq!(res.len(), 1);
    assert_eq!(res[0]["success"], false);
    assert!(res[0]["result"].as_str().unwrap().contains("rejected"));
    let replies = rig.fake.requests_to("POST", "/permission/per_fake1/reply");
    assert_eq!(replies.len(), 1, "one permission reply");
    assert_eq!(replies[0].json(), json!({"reply": "reject"}));
    rig.stop().await;
}

// 14 ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_stream_mid_turn_loses_and_duplicates_nothing() {
    let before = ["One ", "two ", "three "];
    let lost = ["four ", "five "];
    let after = ["six ", "seven ", "eight."];
    let full = [before.concat(), lost.concat(), after.concat()].concat();
    let rig = Rig::start(
        move |input| {
            let mut t = TurnBuilder::new(input);
            t.begin();
            let a = t.assistant();
            let p = t.part_start(&a, "text");
            for d in before {
                t.delta(&a, &p, d);
            }
            t.sleep_ms(50);
            t.push(Step::DropStreams);
            // Sent while nobody listens: only the message list has them.
            for d in lost {
                t.delta(&a, &p, d);
            }
            t.push(Step::WaitForStream(Duration::from_secs(5)));
            t.sleep_ms(100);
            for d in after {
                t.delta(&a, &p, d);
            }
            t.part_end(&a, &p, &[before.concat(), lost.concat(), after.concat()].concat());
            t.finish(&a, "stop");
            t.end();
            t.build()
        },
        |_| {},
    )
    .await;
    let r = rig.ask("opencode.prompt", "survive a cut").await;
    let fin = terminal(&r);
    assert_eq!(fin["kind"], "final", "{r:#?}");
    assert_eq!(fin["content"], full.as_str());
    assert_eq!(delta_text(&r), full);
    assert!(rig.fake.streams_opened() >= 2, "the bridge reconnected");
    rig.stop().await;
}

// 15 ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opencode_unreachable_is_a_retryable_error() {
    let nats = NatsServer::start();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut cfg = test_config(
        &nats.url(),
        &format!("http://127.0.0.1:{closed}"),
        Some(PASSWORD),
    );
    cfg.opencode.request_timeout = Duration::from_secs(2);
    cfg.opencode.connect_timeout = Duration::from_secs(1);
    let bridge = Bridge::start(cfg).await;
    let c = client(&nats.url()).await;
    let started = Instant::now();
    let r = request(&c, "opencode.prompt", "anyone there?", Duration::from_secs(35)).await;
    assert_well_formed(&r);
    assert_eq!(kinds(&r), ["error"], "{r:#?}");
    let e = terminal(&r);
    assert_eq!(e["code"], "opencode_unavailable", "{e}");
    assert_eq!(e["retryable"], true);
    assert!(started.elapsed() < Duration::from_secs(35));
    // Also for a conversation (the session map is empty: OpenCode was down
    // at start).
    let r = request(&c, "opencode.prompt.conv.x", "and now?", Duration::from_secs(35)).await;
    assert_eq!(terminal(&r)["code"], "opencode_unavailable", "{r:#?}");
    bridge.stop().await.unwrap();
}

// 16 ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idle_deadline_aborts_a_silent_turn() {
    let rig = Rig::start(
        |input| fake::hang_turn(input, Duration::from_millis(200), Duration::from_secs(20)),
        |c| c.turn.idle_timeout = Duration::from_secs(1),
    )
    .await;
    let started = Instant::now();
    let r = rig.ask("opencode.prompt", "then silence").await;
    let e = terminal(&r);
    assert_eq!(e["kind"], "error", "{r:#?}");
    assert_eq!(e["code"], "timeout");
    assert_eq!(e["retryable"], true);
    assert!(e["error"].as_str().unwrap().contains("idle_timeout"), "{e}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // What was streamed before the silence was published.
    assert_eq!(delta_text(&r), "Starting... ");
    let sid = e["session_id"].as_str().unwrap();
    let aborts = rig.fake.requests_to("POST", &format!("/session/{sid}/abort"));
    assert_eq!(aborts.len(), 1, "the session was aborted");
    rig.stop().await;
}

// 17 ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_ends_a_slow_turn_with_shutting_down() {
    let mut rig = Rig::start(
        |input| fake::hang_turn(input, Duration::from_millis(200), Duration::from_secs(20)),
        |c| c.shutdown.grace = Duration::from_millis(500),
    )
    .await;
    let mut sub = send_request(&rig.client, "opencode.prompt", HeaderMap::new(), "slow one").await;
    rig.fake
        .wait_until("the turn started", Duration::from_secs(5), |f| {
            f.turns()
                .first()
                .is_some_and(|t| t.first_emitted("message.part.delta").is_some())
        })
        .await;
    let bridge = rig.bridge.take().unwrap();
    let stopping = tokio::spawn(async move {
        let t = Instant::now();
        (bridge.stop().await, t.elapsed())
    });
    let r = collect_until_terminal(&mut sub, TURN).await;
    assert_well_formed(&r);
    let e = terminal(&r);
    assert_eq!(e["kind"], "error", "{r:#?}");
    assert_eq!(e["code"], "shutting_down", "{e}");
    assert_eq!(e["retryable"], true);
    let (res, took) = stopping.await.unwrap();
    res.expect("stop() returns Ok");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(
        rig.fake.requests_to("POST", "/session/").iter().filter(|r| r.path.ends_with("/abort")).count(),
        1,
        "the turn was aborted in OpenCode"
    );
    rig.stop().await;
}
