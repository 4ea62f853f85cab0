//! The bridge against the fake OpenCode (`support/fake_opencode.rs`): each
//! test has its own nats-server, fake OpenCode and in-process bridge, and
//! asserts on what a NATS subscriber receives (and, where that is the
//! point, on the fake's request log).

use std::time::{Duration, Instant};

use async_nats::{Client, HeaderMap, Subscriber};
use bytes::Bytes;
use futures::StreamExt;
use opencode_nats_bridge::config::ReplyHeaders;
use serde_json::{json, Value};

use crate::support::bridge::{
    assert_well_formed, delta_text, request, request_with_headers, terminal, test_config, Bridge,
};
use crate::support::fake_opencode::{
    self as fake, api_error, ev, FakeOpenCode, FakeOptions, Step, TurnBuilder, TurnScript,
};
use crate::support::nats::{
    barrier, client, collect_until_terminal, subscribe_ready, NatsServer, Reply,
};
use crate::support::rig::{Rig, PASSWORD};

/// Bound on one turn's replies.
const TURN: Duration = Duration::from_secs(10);

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

fn owned(words: &[String]) -> Vec<&str> {
    words.iter().map(String::as_str).collect()
}

// 1 -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_turn_deltas_add_up_to_the_final() {
    let deltas = [
        "Hello ",
        "from ",
        "the ",
        "fake ",
        "OpenCode, ",
        "héllo ✓ ",
        "done.",
    ];
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
    assert_eq!(
        of_kind(&replies, "delta").len(),
        deltas.len(),
        "one reply per delta"
    );
    assert_eq!(fin["model"], "fake/m1");
    assert_eq!(fin["agent"], "build");
    assert_eq!(fin["finish"], "stop");
    assert_eq!(
        fin["usage"],
        json!({"input": fake::TOKENS_INPUT, "output": fake::TOKENS_OUTPUT,
               "reasoning": fake::TOKENS_REASONING, "cache_read": fake::TOKENS_CACHE_READ,
               "cache_write": 0})
    );
    assert!(
        (fin["cost"].as_f64().unwrap() - 0.0125).abs() < 1e-9,
        "{fin}"
    );
    // The script sleeps 15 ms per delta.
    assert!(fin["duration_ms"].as_u64().unwrap() >= 90, "{fin}");
    assert!(fin["session_id"].as_str().unwrap().starts_with("ses_"));
    assert!(fin.get("conversation").is_none(), "a one-off prompt: {fin}");
    // Headers on every reply (checked in detail by assert_well_formed).
    for (h, v) in &replies {
        let h = h.as_ref().expect("headers");
        assert_eq!(
            h.get("Reply-Kind").unwrap().as_str(),
            v["kind"].as_str().unwrap()
        );
    }
    // What the fake saw: one session titled for a one-off (deleted after the
    // terminal reply), one prompt with the text, every call in the
    // configured directory.
    let created = rig.fake.requests_to("POST", "/session");
    let created: Vec<_> = created.iter().filter(|r| r.path == "/session").collect();
    assert_eq!(created.len(), 1);
    let title = created[0].json()["title"].as_str().unwrap().to_string();
    assert!(title.starts_with("nats:one-off "), "{title}");
    assert!(
        rig.fake.sessions().is_empty(),
        "the one-off session was deleted"
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lean_reply_headers_leave_streamed_replies_with_the_trace_id_only() {
    let thinking = ["Let me ", "think."];
    let answer = ["The answer ", "is ", "42."];
    let rig = Rig::start(
        move |input| fake::reasoning_turn(input, &thinking, &answer),
        |c| c.subjects.reply_headers = ReplyHeaders::Lean,
    )
    .await;
    let mut h = HeaderMap::new();
    h.insert("Trace-Id", "lean-1");
    let replies = request_with_headers(&rig.client, "opencode.prompt", h, "Answer?", TURN).await;
    assert_eq!(terminal(&replies)["kind"], "final", "{replies:#?}");
    assert_eq!(delta_text(&replies), answer.concat());
    let mut streamed = 0;
    for (i, (h, v)) in replies.iter().enumerate() {
        let h = h.as_ref().expect("every reply has headers");
        assert_eq!(v["seq"], i as u64, "{v}");
        assert_eq!(h.get("Trace-Id").map(|v| v.as_str()), Some("lean-1"));
        let kind = v["kind"].as_str().unwrap();
        if kind == "delta" || kind == "reasoning" {
            streamed += 1;
            for name in ["Reply-Kind", "Reply-Seq", "Nats-Msg-Id"] {
                assert!(h.get(name).is_none(), "{kind} reply {i} has {name}");
            }
        } else {
            assert_eq!(h.get("Reply-Kind").map(|v| v.as_str()), Some(kind));
            assert_eq!(
                h.get("Reply-Seq").map(|v| v.as_str().to_string()),
                Some(i.to_string())
            );
            assert_eq!(
                h.get("Nats-Msg-Id").map(|v| v.as_str().to_string()),
                Some(format!("lean-1-{i}"))
            );
        }
    }
    assert_eq!(streamed, thinking.len() + answer.len(), "{replies:#?}");
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
                fake::error_turn(input, api_error(401, "Incorrect API key provided", false))
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
            // Room for the later prompts to arrive while this one runs.
            t.sleep_ms(300);
            let a = t.assistant();
            t.text(&a, &owned(&w));
            t.finish(&a, "stop");
            t.end();
            t.build()
        },
        |c| c.turn.conversation_queue = 1,
    )
    .await;
    // Every reply of the three prompts on one subscription: its order is
    // the order the bridge published in.
    let mut all = subscribe_ready(&rig.client, "fifo.>").await;
    for name in ["first", "second", "third"] {
        let payload = json!({"text": name, "trace_id": format!("fifo-{name}"),
                             "reply_to": format!("fifo.{name}")});
        publish(
            &rig.client,
            "opencode.prompt.fifo",
            HeaderMap::new(),
            payload.to_string(),
        )
        .await;
    }
    let mut got: Vec<(String, Reply)> = Vec::new();
    let deadline = tokio::time::Instant::now() + TURN;
    while got
        .iter()
        .filter(|(_, (_, v))| v["kind"] == "final" || v["kind"] == "error")
        .count()
        < 3
    {
        let m = tokio::time::timeout_at(deadline, all.next())
            .await
            .unwrap_or_else(|_| panic!("three terminal replies within {TURN:?}: {got:#?}"))
            .expect("subscription open");
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        got.push((m.subject.to_string(), (m.headers.clone(), v)));
    }
    let of = |name: &str| -> Vec<Reply> {
        got.iter()
            .filter(|(s, _)| s == &format!("fifo.{name}"))
            .map(|(_, r)| r.clone())
            .collect()
    };
    let pos = |name: &str, kind: &str| {
        got.iter()
            .position(|(s, (_, v))| s == &format!("fifo.{name}") && v["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} for {name}: {got:#?}"))
    };
    let (r1, r2, r3) = (of("first"), of("second"), of("third"));
    for r in [&r1, &r2, &r3] {
        assert_well_formed(r);
        assert!(r.iter().all(|(_, v)| v["conversation"] == "fifo"));
    }
    // The third found one running and one queued: refused at once, before
    // the first turn published anything.
    assert_eq!(kinds(&r3), ["error"], "{r3:#?}");
    assert_eq!(terminal(&r3)["code"], "session_busy");
    assert_eq!(terminal(&r3)["retryable"], true);
    assert_eq!(pos("third", "error"), 0, "{got:#?}");
    // The second ran after the first, in order.
    let (f1, f2) = (terminal(&r1), terminal(&r2));
    assert_eq!(f1["kind"], "final", "{r1:#?}");
    assert_eq!(f2["kind"], "final", "{r2:#?}");
    assert!(f1["content"].as_str().unwrap().starts_with("first-1 "));
    assert!(f2["content"].as_str().unwrap().starts_with("second-1 "));
    let first_of_second = got.iter().position(|(s, _)| s == "fifo.second").unwrap();
    assert!(
        pos("first", "final") < first_of_second,
        "the second turn's first reply follows the first's final: {got:#?}"
    );
    assert_eq!(f1["session_id"], f2["session_id"]);
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
    assert!(
        titles.contains(&"nats:slack.C042".to_string()),
        "{titles:?}"
    );
    assert!(
        titles.contains(&"nats:matrix.room9".to_string()),
        "{titles:?}"
    );
    rig.stop().await;
}

// 9 -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_injection_is_refused_and_never_published() {
    let rig = Rig::start(fake::default_script, |_| {}).await;
    let spy_conn = client(&rig.nats.url()).await;
    let mut spy = subscribe_ready(&spy_conn, ">").await;
    let bad = ["x.*", "x.>", ">", "*", "a b", "a..b", "$SYS.evil"];
    // (reply subject or None, field, value): each prompt once request style
    // (its own reply subject `inj.in.<n>`) and once with no reply subject
    // (the error then goes to opencode.reply.<a valid trace id>).
    let mut sent = Vec::new();
    for field in ["trace_id", "conversation", "reply_to"] {
        for value in bad {
            // A valid trace id beside the bad field (unless it is the bad one).
            let payload = if field == "trace_id" {
                json!({"text": "hi", "trace_id": value})
            } else {
                json!({"text": "hi", field: value, "trace_id": "inj-ok"})
            }
            .to_string();
            let inbox = format!("inj.in.{}", sent.len());
            rig.client
                .publish_with_reply("opencode.prompt", inbox.clone(), payload.clone().into())
                .await
                .unwrap();
            sent.push((Some(inbox), field, value));
            publish(&rig.client, "opencode.prompt", HeaderMap::new(), payload).await;
            sent.push((None, field, value));
        }
    }
    // Headers too.
    for (name, value) in [("Trace-Id", "h.*"), ("Conversation", "c.>")] {
        let mut h = HeaderMap::new();
        h.insert(name, value);
        let inbox = format!("inj.in.{}", sent.len());
        rig.client
            .publish_with_reply_and_headers("opencode.prompt", inbox.clone(), h, "hi".into())
            .await
            .unwrap();
        sent.push((Some(inbox), "header", value));
    }
    rig.client.flush().await.unwrap();
    // A good prompt, as a marker that everything before it was handled.
    let r = rig.ask("opencode.prompt", "after the attack").await;
    assert_eq!(terminal(&r)["kind"], "final");

    // Everything the spy saw: prompts, replies on inboxes, errors on
    // opencode.reply.<valid id>; never a subject made of the bad text.
    let mut seen = drain_subjects(&mut spy, Duration::from_millis(300)).await;
    // The daemon's own JetStream traffic (turn states in KV, escaped keys)
    // is not a reply.
    seen.retain(|(s, _)| !["$KV.", "$JS.", "$O."].iter().any(|p| s.starts_with(p)));
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
            !subject.contains(['*', '>', ' '])
                && !subject.contains("..")
                && !subject.starts_with('$'),
            "{subject:?}"
        );
        if body["kind"] == "error" {
            assert_eq!(body["code"], "bad_request", "{subject}: {body}");
            assert_eq!(body["retryable"], false, "{subject}: {body}");
            if let Some(trace) = subject.strip_prefix("opencode.reply.") {
                assert_eq!(body["trace_id"], trace, "{body}");
            } else {
                assert!(
                    subject.starts_with("inj.in.") || subject.starts_with("_INBOX."),
                    "{subject}: {body}"
                );
            }
        }
    }
    let errors: Vec<&(String, Value)> = seen.iter().filter(|(_, b)| b["kind"] == "error").collect();
    assert_eq!(
        errors.len(),
        sent.len(),
        "one error per bad prompt: {seen:#?}"
    );
    for (inbox, field, value) in &sent {
        let Some(inbox) = inbox else { continue };
        let mine: Vec<_> = errors.iter().filter(|(s, _)| s == inbox).collect();
        assert_eq!(mine.len(), 1, "{field}={value:?}: {seen:#?}");
        let body = &mine[0].1;
        assert_eq!(body["seq"], 0);
        if *field != "header" {
            assert!(
                body["error"].as_str().unwrap().contains(field),
                "{field}={value:?}: {body}"
            );
        }
        if *field == "conversation" || *field == "reply_to" {
            assert_eq!(body["trace_id"], "inj-ok", "{body}");
        }
    }
    assert_eq!(
        rig.fake.prompts().len(),
        1,
        "only the good prompt reached OpenCode"
    );
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
            t.tool(&a, "call_dup", "bash", &json!({"command": "true"}), Ok(""));
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
            t.part_end(
                &a,
                &p,
                &[before.concat(), lost.concat(), after.concat()].concat(),
            );
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
    let r = request(
        &c,
        "opencode.prompt",
        "anyone there?",
        Duration::from_secs(35),
    )
    .await;
    assert_well_formed(&r);
    assert_eq!(kinds(&r), ["error"], "{r:#?}");
    let e = terminal(&r);
    assert_eq!(e["code"], "opencode_unavailable", "{e}");
    assert_eq!(e["retryable"], true);
    // The reply says what failed, never where OpenCode is (the log has it).
    let msg = e["error"].as_str().unwrap();
    assert!(!msg.contains("127.0.0.1") && !msg.contains("http"), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(35));
    // Also for a conversation (the session map is empty: OpenCode was down
    // at start).
    let r = request(
        &c,
        "opencode.prompt.conv.x",
        "and now?",
        Duration::from_secs(35),
    )
    .await;
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
    let aborts = rig
        .fake
        .requests_to("POST", &format!("/session/{sid}/abort"));
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
    let subject = "opencode.prompt.shut";
    let mut sub = send_request(&rig.client, subject, HeaderMap::new(), "slow one").await;
    // A second prompt of the conversation waits in its queue.
    let mut queued = send_request(&rig.client, subject, HeaderMap::new(), "queued one").await;
    // The server has both prompts (and sent them to the bridge) before the
    // bridge drains: a prompt reaching the server after the drain's UNSUB
    // would be lost by core NATS, not by the bridge.
    barrier(&rig.client).await;
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
    assert_eq!(delta_text(&r), "Starting... ");
    let q = collect_until_terminal(&mut queued, TURN).await;
    assert_well_formed(&q);
    assert_eq!(kinds(&q), ["error"], "{q:#?}");
    assert_eq!(terminal(&q)["code"], "shutting_down");
    let (res, took) = stopping.await.unwrap();
    res.expect("stop() returns Ok");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let aborts: Vec<_> = rig
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/abort"))
        .collect();
    assert_eq!(aborts.len(), 1, "the running turn was aborted in OpenCode");
    assert_eq!(
        rig.fake.prompts().len(),
        1,
        "the queued prompt never started"
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_retries_keep_the_turn_alive() {
    let rig = Rig::start(
        |input| {
            let mut t = TurnBuilder::new(input);
            let sid = t.sid.clone();
            t.begin();
            let a = t.assistant();
            // OpenCode retrying a 5xx: only retry statuses for 2.4 s, longer
            // than idle_timeout, then the answer.
            for attempt in 1..=4 {
                t.sleep_ms(600);
                t.emit(ev::retry(&sid, attempt, "Upstream overloaded"));
            }
            t.text(&a, &["Got ", "there."]);
            t.finish(&a, "stop");
            t.end();
            t.build()
        },
        |c| {
            c.turn.idle_timeout = Duration::from_secs(1);
            // Four retries, under the limit (first_hour.rs tests the limit).
            c.turn.provider_retry_limit = 5;
        },
    )
    .await;
    let r = rig.ask("opencode.prompt", "retry please").await;
    let fin = terminal(&r);
    assert_eq!(fin["kind"], "final", "{r:#?}");
    assert_eq!(fin["content"], "Got there.");
    rig.stop().await;
}

// More: situations the real OpenCode cannot be made to produce on cue. ------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_turn_ends_while_the_stream_is_down() {
    let rig = Rig::start(
        |input| {
            let mut t = TurnBuilder::new(input);
            t.begin();
            let a = t.assistant();
            let p = t.part_start(&a, "text");
            t.delta(&a, &p, "Before ");
            t.sleep_ms(50);
            t.push(Step::DropStreams);
            // The rest of the turn, idle included, while nobody listens.
            t.delta(&a, &p, "the gap, ");
            t.delta(&a, &p, "and after.");
            t.part_end(&a, &p, "Before the gap, and after.");
            t.finish(&a, "stop");
            t.end();
            t.build()
        },
        |_| {},
    )
    .await;
    let r = rig.ask("opencode.prompt", "end in the dark").await;
    let fin = terminal(&r);
    assert_eq!(fin["kind"], "final", "{r:#?}");
    assert_eq!(fin["content"], "Before the gap, and after.");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_is_replaced_and_the_turn_completes() {
    let rig = Rig::start(
        |input| {
            let mut t = TurnBuilder::new(input);
            t.begin();
            let a = t.assistant();
            let p = t.part_start(&a, "text");
            t.delta(&a, &p, "Alive, ");
            t.push(Step::Stall(true));
            // Held on the stalled connection; the bridge gives up on it
            // after stream_stall_timeout and connects again.
            t.delta(&a, &p, "stalled, ");
            t.sleep_ms(1200);
            t.delta(&a, &p, "alive again.");
            t.part_end(&a, &p, "Alive, stalled, alive again.");
            t.finish(&a, "stop");
            t.end();
            t.build()
        },
        |c| c.opencode.stream_stall_timeout = Duration::from_millis(500),
    )
    .await;
    let r = rig.ask("opencode.prompt", "stall").await;
    let fin = terminal(&r);
    assert_eq!(fin["kind"], "final", "{r:#?}");
    assert_eq!(fin["content"], "Alive, stalled, alive again.");
    assert!(rig.fake.streams_opened() >= 2, "the bridge reconnected");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_turn_that_falls_behind_catches_up_over_http() {
    let w: Vec<String> = (0..400).map(|i| format!("w{i} ")).collect();
    let full = w.concat();
    let rig = Rig::start(
        move |input| fake::text_turn(input, &owned(&w)),
        |c| c.turn.event_buffer = 4,
    )
    .await;
    let r = rig.ask("opencode.prompt", "a burst").await;
    let fin = terminal(&r);
    assert_eq!(fin["kind"], "final", "{r:#?}");
    assert_eq!(fin["content"], full.as_str());
    assert_eq!(delta_text(&r), full);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_session_is_recreated() {
    let rig = Rig::start(fake::default_script, |_| {}).await;
    let r1 = rig.ask("opencode.prompt.gone", "first").await;
    let sid1 = terminal(&r1)["session_id"].as_str().unwrap().to_string();
    assert!(rig.fake.remove_session(&sid1));
    let r2 = rig.ask("opencode.prompt.gone", "second").await;
    let fin = terminal(&r2);
    assert_eq!(fin["kind"], "final", "{r2:#?}");
    assert_eq!(fin["content"], fake::echo_reply("second").as_str());
    assert_eq!(fin["session_recreated"], true);
    assert_ne!(fin["session_id"], sid1.as_str());
    // And the third turn uses the new session without fuss.
    let r3 = rig.ask("opencode.prompt.gone", "third").await;
    assert_eq!(terminal(&r3)["session_id"], fin["session_id"]);
    assert!(terminal(&r3).get("session_recreated").is_none());
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_are_found_again_after_a_restart() {
    let nats = NatsServer::start();
    let fake = FakeOpenCode::start_with(FakeOptions {
        password: Some(PASSWORD.into()),
        ..FakeOptions::default()
    })
    .await;
    // Left by an earlier run of the bridge (and one that is not ours).
    let old = fake.add_session("nats:team.ops");
    fake.add_session("someone else's session");
    let bridge = Bridge::start(test_config(&nats.url(), &fake.url(), Some(PASSWORD))).await;
    let c = client(&nats.url()).await;
    let r = request(&c, "opencode.prompt.team.ops", "back again", TURN).await;
    assert_well_formed(&r);
    assert_eq!(terminal(&r)["kind"], "final", "{r:#?}");
    assert_eq!(terminal(&r)["session_id"], old.as_str());
    assert!(fake
        .requests_to("POST", "/session")
        .iter()
        .all(|r| r.path != "/session"));
    bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_not_retryable() {
    let nats = NatsServer::start();
    let fake = FakeOpenCode::start_with(FakeOptions {
        password: Some(PASSWORD.into()),
        ..FakeOptions::default()
    })
    .await;
    let mut cfg = test_config(&nats.url(), &fake.url(), Some("not-the-password"));
    cfg.opencode.request_timeout = Duration::from_secs(2);
    let bridge = Bridge::start(cfg).await;
    let c = client(&nats.url()).await;
    let r = request(&c, "opencode.prompt", "let me in", TURN).await;
    assert_well_formed(&r);
    let e = terminal(&r);
    assert_eq!(e["kind"], "error", "{r:#?}");
    assert_eq!(e["code"], "opencode_error", "{e}");
    assert_eq!(e["retryable"], false, "{e}");
    assert!(!e["error"].as_str().unwrap().contains("not-the-password"));
    assert!(fake.prompts().is_empty());
    bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn questions_are_rejected() {
    let rig = Rig::start(
        |input| {
            let mut t = TurnBuilder::new(input);
            let sid = t.sid.clone();
            t.begin();
            let a1 = t.assistant();
            let args = json!({"questions": [{"question": "Which?", "header": "Pick",
                              "options": [{"label": "A", "description": "a"}], "multiple": false}]});
            let p = t.tool_start(&a1, "call_q", "question", &args);
            t.emit(json!({"type": "question.asked", "properties": {
                "id": "que_fake1", "sessionID": sid, "questions": args["questions"],
                "tool": {"messageID": a1, "callID": "call_q"}}}));
            t.push(Step::WaitForRequest {
                method: "POST".into(),
                path: "/question/que_fake1/reject".into(),
                timeout: Duration::from_secs(5),
            });
            t.emit(json!({"type": "question.rejected", "properties": {
                "sessionID": sid, "requestID": "que_fake1"}}));
            t.tool_end(&a1, &p, "call_q", "question", &args, Err("The user dismissed this question"));
            t.finish(&a1, "tool-calls");
            let a2 = t.assistant();
            t.text(&a2, &["I will ", "pick A."]);
            t.finish(&a2, "stop");
            t.end();
            t.build()
        },
        |_| {},
    )
    .await;
    let r = rig.ask("opencode.prompt", "ask me").await;
    let fin = terminal(&r);
    assert_eq!(fin["kind"], "final", "{r:#?}");
    assert_eq!(fin["content"], "I will pick A.");
    assert!(
        fin["notes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n.as_str().unwrap().contains("question")),
        "{fin}"
    );
    assert_eq!(
        rig.fake
            .requests_to("POST", "/question/que_fake1/reject")
            .len(),
        1
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_event_at_all_hits_the_first_event_deadline() {
    let rig = Rig::start(
        |_| TurnScript::new().sleep_ms(10_000),
        |c| c.turn.first_event_timeout = Duration::from_secs(1),
    )
    .await;
    let r = rig.ask("opencode.prompt", "hello?").await;
    let e = terminal(&r);
    assert_eq!(kinds(&r), ["error"], "{r:#?}");
    assert_eq!(e["code"], "timeout");
    assert!(
        e["error"].as_str().unwrap().contains("first_event_timeout"),
        "{e}"
    );
    let sid = e["session_id"].as_str().unwrap();
    assert_eq!(
        rig.fake
            .requests_to("POST", &format!("/session/{sid}/abort"))
            .len(),
        1
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_session_and_model_are_passed_through() {
    let nats = NatsServer::start();
    let fake = FakeOpenCode::start_with(FakeOptions {
        password: Some(PASSWORD.into()),
        providers: vec![
            ("fake".into(), vec!["m1".into()]),
            ("other".into(), vec!["m2".into()]),
        ],
        ..FakeOptions::default()
    })
    .await;
    let bridge = Bridge::start(test_config(&nats.url(), &fake.url(), Some(PASSWORD))).await;
    let client = client(&nats.url()).await;
    let rig = Rig {
        nats,
        fake,
        bridge: Some(bridge),
        client,
    };
    let sid = rig.fake.add_session("made by hand");
    let payload = json!({"text": "use this one", "session_id": sid, "model": "other/m2",
                         "agent": "plan", "system": "be brief", "tools": {"bash": false}});
    let r = rig.ask("opencode.prompt", &payload.to_string()).await;
    let fin = terminal(&r);
    assert_eq!(fin["kind"], "final", "{r:#?}");
    assert_eq!(fin["session_id"], sid.as_str());
    assert_eq!(fin["model"], "other/m2");
    let body = rig.fake.prompts()[0].json();
    assert_eq!(
        body["model"],
        json!({"providerID": "other", "modelID": "m2"})
    );
    assert_eq!(body["agent"], "plan");
    assert_eq!(body["system"], "be brief");
    assert_eq!(body["tools"], json!({"bash": false}));
    // A model OpenCode does not have is refused before prompting.
    for model in ["fake/nope", "nobody/m1"] {
        let payload = json!({"text": "x", "model": model});
        let r = rig.ask("opencode.prompt", &payload.to_string()).await;
        assert_eq!(terminal(&r)["code"], "bad_request", "{model}: {r:#?}");
    }
    assert_eq!(rig.fake.prompts().len(), 1);
    // An unknown session is the caller's mistake.
    let payload = json!({"text": "x", "session_id": "ses_doesnotexist"});
    let r = rig.ask("opencode.prompt", &payload.to_string()).await;
    assert_eq!(terminal(&r)["code"], "bad_request", "{r:#?}");
    rig.stop().await;
}

/// After a turn times out, the bridge aborts the session and ends the turn
/// at once; OpenCode's abort events (`session.error MessageAbortedError`,
/// idles) arrive a moment later, while the conversation's next prompt is
/// already running. They must not end that next turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_abort_of_the_previous_turn_does_not_fail_the_next() {
    let nats = NatsServer::start();
    let fake = FakeOpenCode::start_with(FakeOptions {
        password: Some(PASSWORD.into()),
        abort_delay: Duration::from_millis(150),
        ..FakeOptions::default()
    })
    .await;
    fake.set_script(|input| {
        if input.text.contains("[hang]") {
            fake::hang_turn(input, Duration::from_millis(200), Duration::from_secs(20))
        } else {
            let mut t = TurnBuilder::new(input);
            t.gap_ms(50);
            t.begin();
            // The model takes a moment before the answer message exists:
            // the abort events of the previous turn land in this window.
            t.sleep_ms(500);
            let a = t.assistant();
            t.text(&a, &["Second ", "turn ", "is ", "fine."]);
            t.finish(&a, "stop");
            t.end();
            t.build()
        }
    });
    let mut cfg = test_config(&nats.url(), &fake.url(), Some(PASSWORD));
    cfg.turn.idle_timeout = Duration::from_secs(1);
    let bridge = Bridge::start(cfg).await;
    let c = client(&nats.url()).await;
    let mut s1 = send_request(&c, "opencode.prompt.late", HeaderMap::new(), "[hang] one").await;
    let mut s2 = send_request(&c, "opencode.prompt.late", HeaderMap::new(), "two").await;
    let r1 = collect_until_terminal(&mut s1, TURN).await;
    assert_eq!(terminal(&r1)["code"], "timeout", "{r1:#?}");
    let r2 = collect_until_terminal(&mut s2, TURN).await;
    assert_well_formed(&r2);
    let fin = terminal(&r2);
    assert_eq!(fin["kind"], "final", "{r2:#?}");
    assert_eq!(fin["content"], "Second turn is fine.");
    bridge.stop().await.unwrap();
}

/// The stream drops while `prompt_async` is in flight and OpenCode runs the
/// whole (short) turn in that gap: the turn must still be read from the
/// message list once the stream is back, not wait for a deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_lost_in_a_reconnect_around_the_204_is_recovered() {
    let rig = Rig::start(
        |input| {
            let mut t = TurnBuilder::new(input);
            t.push(Step::DropStreams);
            t.begin();
            let a = t.assistant();
            t.text(&a, &["Done ", "in the gap."]);
            t.finish(&a, "stop");
            t.end();
            // The bridge is connected again before the 204.
            t.push(Step::WaitForStream(Duration::from_secs(5)));
            t.sleep_ms(100);
            t.push(Step::Respond);
            t.build()
        },
        |c| {
            c.turn.first_event_timeout = Duration::from_secs(4);
            c.turn.idle_timeout = Duration::from_secs(4);
        },
    )
    .await;
    let r = rig.ask("opencode.prompt", "blink").await;
    let fin = terminal(&r);
    assert_eq!(fin["kind"], "final", "{r:#?}");
    assert_eq!(fin["content"], "Done in the gap.");
    rig.stop().await;
}

/// A final longer than the server's `max_payload` cannot be published as
/// is; the turn must still end with a terminal reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_longer_than_max_payload_still_ends_the_turn() {
    let nats = NatsServer::start_with_config("max_payload: 65536\n");
    let fake = FakeOpenCode::start_with(FakeOptions {
        password: Some(PASSWORD.into()),
        ..FakeOptions::default()
    })
    .await;
    let chunk = "0123456789abcdef".repeat(64); // 1 KiB
    let deltas: Vec<String> = (0..100).map(|_| chunk.clone()).collect();
    fake.set_script(move |input| fake::text_turn(input, &owned(&deltas)));
    let bridge = Bridge::start(test_config(&nats.url(), &fake.url(), Some(PASSWORD))).await;
    let c = client(&nats.url()).await;
    let r = request(&c, "opencode.prompt", "a long one", TURN).await;
    // Every delta fits.
    for (_, v) in &r {
        assert!(serde_json::to_vec(v).unwrap().len() <= 65536);
    }
    // The final keeps the longest prefix that fits, and says so.
    let last = terminal(&r);
    assert_eq!(last["kind"], "final", "{:?}", kinds(&r));
    assert_eq!(last["content_truncated"], true);
    let whole = delta_text(&r);
    assert_eq!(whole.len(), 100 * 1024);
    let content = last["content"].as_str().unwrap();
    assert!(whole.starts_with(content));
    assert!(
        content.len() > 60_000,
        "cut by the real size: {}",
        content.len()
    );
    bridge.stop().await.unwrap();
}

/// A final is cut only when its real encoding does not fit: 300 KB of plain
/// text goes whole under the default limits (it used to be cut at ~87 KB,
/// the worst case of six escaped bytes per byte).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_plain_answer_arrives_whole_in_the_final() {
    let chunk = "0123456789abcdef".repeat(64); // 1 KiB
    let deltas: Vec<String> = (0..300).map(|_| chunk.clone()).collect();
    let rig = Rig::start(move |input| fake::text_turn(input, &owned(&deltas)), |_| {}).await;
    let r = rig.ask("opencode.prompt", "a long one").await;
    let fin = terminal(&r);
    assert_eq!(fin["kind"], "final", "{:?}", kinds(&r));
    assert!(fin.get("content_truncated").is_none(), "{}", fin["notes"]);
    assert_eq!(fin["content"].as_str().unwrap().len(), 300 * 1024);
    rig.stop().await;
}

/// `"stream": {"coalesce_ms": N}`: the text of a part merged and sent at
/// most every N ms (the first at once), whole in the end; `"stream":
/// "final"`: the terminal reply only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_chooses_the_pace_of_the_text() {
    // 400 deltas, 5 ms apart: about 2 s of text.
    let words: Vec<String> = (0..400).map(|i| format!("w{i} ")).collect();
    let whole = words.concat();
    let rig = Rig::start(
        move |input| fake::paced_text_turn(input, &words, 5),
        |c| {
            c.tenancy
                .stream
                .insert("quiet".into(), serde_json::json!("final"));
        },
    )
    .await;
    let started = Instant::now();
    let r = rig
        .ask(
            "opencode.prompt",
            r#"{"text":"talk","stream":{"coalesce_ms":500}}"#,
        )
        .await;
    let took = started.elapsed();
    let fin = terminal(&r);
    assert_eq!(fin["kind"], "final", "{r:#?}");
    assert_eq!(fin["content"], whole.as_str());
    let deltas = of_kind(&r, "delta");
    // At most one per 500 ms, plus the first and what is left at the end.
    let bound = (took.as_millis() / 500) as usize + 2;
    assert!(
        !deltas.is_empty() && deltas.len() <= bound,
        "{} delta replies in {took:?}",
        deltas.len()
    );
    assert_eq!(
        delta_text(&r),
        whole,
        "the merged deltas add up to the final"
    );

    // (Not `ask`: its check that the deltas add up to the final does not
    // hold when no delta is sent.)
    let r = request(
        &rig.client,
        "opencode.prompt",
        r#"{"text":"talk","stream":"final"}"#,
        TURN,
    )
    .await;
    assert_eq!(kinds(&r), ["final"], "{r:#?}");
    assert_eq!(terminal(&r)["seq"], 0);
    assert_eq!(terminal(&r)["content"], whole.as_str());

    // A tenant's default pace (`[tenancy.stream] quiet = "final"`) applies
    // when its prompt does not say; its own "stream" wins.
    let quiet = "opencode.prompt.quiet.c1";
    let r = request(&rig.client, quiet, r#"{"text":"talk"}"#, TURN).await;
    assert_eq!(kinds(&r), ["final"], "{r:#?}");
    assert_eq!(terminal(&r)["content"], whole.as_str());
    let r = rig.ask(quiet, r#"{"text":"talk","stream":"full"}"#).await;
    assert_eq!(of_kind(&r, "delta").len(), 400, "{r:#?}");

    let r = rig
        .ask("opencode.prompt", r#"{"text":"talk","stream":"fast"}"#)
        .await;
    assert_eq!(terminal(&r)["code"], "bad_request", "{r:#?}");
    rig.stop().await;
}
