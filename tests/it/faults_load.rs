//! Load and fault injection against the fake OpenCode
//! (`support/fake_opencode.rs`): each test has its own nats-server, fake
//! OpenCode and in-process bridge, and asserts on what NATS subscribers
//! receive (and on the fake's request log where that is the point).
//!
//! - load, no cross-talk, no drops
//!   (`two_hundred_concurrent_conversations_get_their_own_answers`);
//! - a burst of turns reuses the bounded connection pool
//!   (`a_burst_of_turns_reuses_the_bounded_connection_pool`);
//! - a caller that never reads its replies, as a server-side and a
//!   client-side slow consumer (`a_slow_reply_subscriber_does_not_stall_other_turns`);
//! - garbage on the event stream
//!   (`bad_data_from_opencode_is_skipped_and_the_turn_still_ends_once`);
//! - the completion signal never comes, only heartbeats (PEERS #1)
//!   (`heartbeats_only_after_the_prompt_end_the_turn_by_its_deadline`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Subscriber;
use bytes::Bytes;
use futures::StreamExt;
use opencode_nats_bridge::config::Config;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::support::bridge::{assert_well_formed, delta_text, request, terminal};
use crate::support::fake_opencode::{
    self as fake, ev, FakeOpenCode, Step, TurnBuilder, TurnInput, TurnScript,
};
use crate::support::nats::{
    collect_until_terminal, is_terminal, subscribe_ready, Reply, AFTER_TERMINAL,
};
use crate::support::rig::Rig;

fn of_kind<'a>(replies: &'a [Reply], kind: &str) -> Vec<&'a Value> {
    replies
        .iter()
        .filter(|(_, v)| v["kind"] == kind)
        .map(|(_, v)| v)
        .collect()
}

fn delta_contents(replies: &[Reply]) -> Vec<String> {
    of_kind(replies, "delta")
        .iter()
        .map(|v| v["content"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn owned(words: &[String]) -> Vec<&str> {
    words.iter().map(String::as_str).collect()
}

fn to_reply(msg: async_nats::Message) -> Reply {
    let body = serde_json::from_slice(&msg.payload)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&msg.payload).into_owned()));
    (msg.headers, body)
}

/// The text of the text parts of `session`'s assistant messages, as the
/// fake's message list holds it (what `final.content` must be).
fn listed_answer(fake: &FakeOpenCode, session: &str) -> String {
    fake.messages(session)
        .iter()
        .filter(|m| m["info"]["role"] == "assistant")
        .flat_map(|m| m["parts"].as_array().cloned().unwrap_or_default())
        .filter(|p| p["type"] == "text")
        .map(|p| p["text"].as_str().unwrap_or_default().to_string())
        .collect()
}

// 1. Load ---------------------------------------------------------------------

const LOAD_TURNS: usize = 200;
const LOAD_DELTAS: usize = 20;

/// The deltas of conversation `i`: each names `i` (and its position).
fn load_deltas(i: usize) -> Vec<String> {
    (0..LOAD_DELTAS).map(|k| format!("<c{i}:{k}> ")).collect()
}

/// Every `<cN:` marker in `text` names conversation `i`.
fn only_mentions(text: &str, i: usize) -> bool {
    text.split("<c").skip(1).all(|rest| {
        rest.split_once(':')
            .and_then(|(n, _)| n.parse::<usize>().ok())
            == Some(i)
    })
}

/// Reads `sub` until `n` distinct subjects got a terminal reply (panics
/// with what is missing after `timeout`), then [`AFTER_TERMINAL`] more.
async fn collect_turns(
    sub: &mut Subscriber,
    n: usize,
    timeout: Duration,
) -> HashMap<String, Vec<Reply>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut by_subject: HashMap<String, Vec<Reply>> = HashMap::new();
    let mut ended = 0;
    while ended < n {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(Some(msg)) => {
                let subject = msg.subject.to_string();
                let reply = to_reply(msg);
                if is_terminal(&reply.1) {
                    ended += 1;
                }
                by_subject.entry(subject).or_default().push(reply);
            }
            Ok(None) => panic!("reply subscription closed"),
            Err(_) => {
                let mut open: Vec<(&String, usize)> = by_subject
                    .iter()
                    .filter(|(_, r)| !r.iter().any(|(_, v)| is_terminal(v)))
                    .map(|(s, r)| (s, r.len()))
                    .collect();
                open.sort();
                panic!(
                    "only {ended} of {n} turns ended within {timeout:?}; {} subjects got replies; \
                     without a terminal reply (subject, replies): {open:?}",
                    by_subject.len()
                );
            }
        }
    }
    let grace = tokio::time::Instant::now() + AFTER_TERMINAL;
    while let Ok(Some(msg)) = tokio::time::timeout_at(grace, sub.next()).await {
        let subject = msg.subject.to_string();
        by_subject.entry(subject).or_default().push(to_reply(msg));
    }
    by_subject
}

/// Publishes `n` prompts of tenant `tenant`, one conversation each:
/// prompt `i` says `"<tenant> i"` on `opencode.prompt.<tenant>.<i>`, trace
/// id `<tenant>-<i>`, replies to `<tenant>.replies.<i>`.
async fn publish_turns(client: &async_nats::Client, tenant: &str, n: usize) {
    for i in 0..n {
        let payload = json!({"text": format!("{tenant} {i}"), "trace_id": format!("{tenant}-{i}")});
        client
            .publish_with_reply(
                format!("opencode.prompt.{tenant}.{i}"),
                format!("{tenant}.replies.{i}"),
                Bytes::from(payload.to_string()),
            )
            .await
            .expect("publish prompt");
    }
    client.flush().await.expect("flush");
}

/// The most turns whose delta streams were open at one instant on the fake.
fn max_overlap(fake: &FakeOpenCode) -> usize {
    let windows = fake.delta_windows();
    windows
        .iter()
        .map(|(start, _)| {
            windows
                .iter()
                .filter(|(s, e)| s <= start && start <= e)
                .count()
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_conversations_get_their_own_answers() {
    let rig = Rig::start_plain(
        None,
        |input| {
            let i: usize = input
                .text
                .strip_prefix("load ")
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or_else(|| panic!("a load prompt: {:?}", input.text));
            // Gaps keep every turn streaming for a while, so the events of
            // all sessions interleave on the one stream.
            fake::paced_text_turn(input, &load_deltas(i), 15)
        },
        |c| {
            c.turn.max_in_flight = 2 * LOAD_TURNS;
            // All 200 conversations are one tenant's (`load`).
            c.tenancy.max_turns_per_tenant = 0;
            c.turn.first_event_timeout = Duration::from_secs(20);
            c.turn.idle_timeout = Duration::from_secs(20);
        },
    )
    .await;
    let mut sub = subscribe_ready(&rig.client, "load.replies.>").await;
    let started = Instant::now();
    publish_turns(&rig.client, "load", LOAD_TURNS).await;
    let by_subject = collect_turns(&mut sub, LOAD_TURNS, Duration::from_secs(18)).await;
    let took = started.elapsed();

    assert_eq!(
        by_subject.len(),
        LOAD_TURNS,
        "replies on unexpected subjects"
    );
    let mut sessions = std::collections::HashSet::new();
    let mut deltas_total = 0;
    for i in 0..LOAD_TURNS {
        let replies = by_subject
            .get(&format!("load.replies.{i}"))
            .unwrap_or_else(|| panic!("no replies for conversation {i}"));
        // seq 0.. without gaps, one terminal reply and it is last, deltas
        // add up to final.content.
        assert_well_formed(replies);
        let fin = terminal(replies);
        assert_eq!(fin["kind"], "final", "conversation {i}: {replies:#?}");
        let want = load_deltas(i);
        assert_eq!(fin["content"], want.concat().as_str(), "conversation {i}");
        // No drops, no merging, no cross-talk: exactly this turn's deltas,
        // one reply each, in order.
        assert_eq!(delta_contents(replies), want, "conversation {i}");
        for (_, v) in replies {
            assert_eq!(v["trace_id"], format!("load-{i}").as_str(), "{v}");
            assert_eq!(v["conversation"], format!("load.{i}").as_str(), "{v}");
            assert_eq!(v["session_id"], fin["session_id"], "{v}");
            if let Some(text) = v["content"].as_str() {
                assert!(only_mentions(text, i), "conversation {i} got {v}");
            }
        }
        deltas_total += of_kind(replies, "delta").len();
        assert!(
            sessions.insert(fin["session_id"].as_str().unwrap().to_string()),
            "two conversations shared session {}",
            fin["session_id"]
        );
    }
    assert_eq!(deltas_total, LOAD_TURNS * LOAD_DELTAS);
    // What the fake saw: one session and one prompt per conversation, all
    // on one event stream whose turns really overlapped.
    assert_eq!(rig.fake.prompts().len(), LOAD_TURNS);
    assert_eq!(rig.fake.sessions().len(), LOAD_TURNS);
    assert_eq!(rig.fake.streams_opened(), 1, "the one stream never dropped");
    let overlap = max_overlap(&rig.fake);
    assert!(
        overlap >= 10,
        "only {overlap} turns streamed at once: the load did not interleave"
    );
    eprintln!(
        "load: {LOAD_TURNS} turns x {LOAD_DELTAS} deltas in {took:?}; up to {overlap} turns streaming at once"
    );
    rig.stop().await;
}

/// A burst of turns all starting at once (single-host, so nothing staggers
/// their start) reuses `[opencode] max_connections` connections for its
/// calls instead of opening one per call: every turn's session, prompt and
/// message list go over at most that many (plus the event stream's own).
/// Without the bound, 100 turns opened well over 100.
#[tokio::test]
async fn a_burst_of_turns_reuses_the_bounded_connection_pool() {
    const TURNS: usize = 100;
    const CONNECTIONS: usize = 4;
    let rig = Rig::start_plain(
        None,
        |input| fake::paced_text_turn(input, &load_deltas(input.text.len()), 5),
        |c| {
            c.turn.max_in_flight = TURNS;
            c.tenancy.max_turns_per_tenant = 0;
            c.cluster.enabled = opencode_nats_bridge::config::Switch::Off;
            c.opencode.max_connections = CONNECTIONS;
        },
    )
    .await;
    let before = rig.fake.connections_accepted();
    let mut sub = subscribe_ready(&rig.client, "pool.replies.>").await;
    publish_turns(&rig.client, "pool", TURNS).await;
    let by_subject = collect_turns(&mut sub, TURNS, Duration::from_secs(25)).await;
    assert_eq!(by_subject.len(), TURNS);
    for (subject, replies) in &by_subject {
        assert_eq!(
            terminal(replies)["kind"],
            "final",
            "{subject}: {replies:#?}"
        );
    }
    assert_eq!(rig.fake.prompts().len(), TURNS);
    let opened = rig.fake.connections_accepted() - before;
    // The pool opens at most CONNECTIONS; one more may open while another
    // is being handed back (hyper races a connect against the checkout),
    // and is then the one reused.
    assert!(
        opened <= 2 * CONNECTIONS as u64,
        "{TURNS} turns opened {opened} connections with max_connections = {CONNECTIONS}"
    );
    eprintln!("pool: {TURNS} turns opened {opened} connections (max_connections = {CONNECTIONS})");
    rig.stop().await;
}

// 2. A slow reply subscriber --------------------------------------------------

/// Deltas of the turn whose caller never reads.
const SLOW_DELTAS: usize = 10_000;
/// Conversations that must not be held up meanwhile.
const OTHERS: usize = 10;

fn slow_delta(k: usize) -> String {
    // 8 bytes each: the whole answer (80 KB) still fits a `final`.
    format!("s{k:05}. ")
}

/// A raw NATS connection (a receive buffer of a few KB) that subscribes to
/// `subject`, waits for the server's PONG (the SUB is registered), then
/// never reads again: the server's outbound buffer for it fills up and the
/// server cuts it as a slow consumer.
async fn never_reading_subscriber(addr: SocketAddr, subject: &str) -> TcpStream {
    let sock = TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut s = tokio::time::timeout(Duration::from_secs(5), sock.connect(addr))
        .await
        .expect("connect in time")
        .expect("connect to nats-server");
    let hello = format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":true,\"name\":\"never-reads\"}}\r\nSUB {subject} 1\r\nPING\r\n"
    );
    s.write_all(hello.as_bytes()).await.expect("write CONNECT");
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !String::from_utf8_lossy(&seen).contains("PONG\r\n") {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&buf[..n]),
            other => panic!(
                "no PONG from nats-server ({other:?}); got {:?}",
                String::from_utf8_lossy(&seen)
            ),
        }
    }
    assert!(
        !String::from_utf8_lossy(&seen).contains("-ERR"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reply_subscriber_does_not_stall_other_turns() {
    let rig = Rig::start_plain(
        // A short write deadline and the smallest outbound buffer allowed
        // (max_pending >= max_payload), so the server cuts the connection
        // that never reads within the test; with the defaults (64 MB, 10 s)
        // kernel buffers and the server absorb the whole flood unflagged.
        Some("max_pending: 1048576\nwrite_deadline: \"1s\"\n"),
        |input| {
            let mut t = TurnBuilder::new(input);
            t.begin();
            let a = t.assistant();
            if input.text.contains("[flood]") {
                let p = t.part_start(&a, "text");
                let mut full = String::new();
                for k in 0..SLOW_DELTAS {
                    let d = slow_delta(k);
                    t.delta(&a, &p, &d);
                    full.push_str(&d);
                    // >= 3 s of streaming: the other turns run meanwhile.
                    if k % 10 == 9 {
                        t.sleep_ms(3);
                    }
                }
                t.part_end(&a, &p, &full);
            } else {
                let w: Vec<String> = (0..10)
                    .map(|k| format!("{}-{k} ", input.text.trim()))
                    .collect();
                t.gap_ms(10);
                t.text(&a, &owned(&w));
            }
            t.finish(&a, "stop");
            t.end();
            t.build()
        },
        |_| {},
    )
    .await;
    let slow_inbox = "slow.caller.replies";
    // Two callers that never read, on the reply subject of the flood: a raw
    // connection that leaves its socket unread (the server flags it), and
    // an async-nats connection with room for 4 messages whose subscription
    // is never polled (the client flags it).
    let addr = SocketAddr::from(([127, 0, 0, 1], rig.nats.port()));
    let raw = never_reading_subscriber(addr, slow_inbox).await;
    let client_slow = Arc::new(AtomicU64::new(0));
    let tiny = {
        let n = client_slow.clone();
        async_nats::ConnectOptions::new()
            .subscription_capacity(4)
            .event_callback(move |e| {
                let n = n.clone();
                async move {
                    if let async_nats::Event::SlowConsumer(_) = e {
                        n.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
            .connect(rig.nats.url())
            .await
            .expect("connect the tiny client")
    };
    let unread = subscribe_ready(&tiny, slow_inbox).await;
    // And one that reads: the flood itself must still arrive whole.
    let mut observer = subscribe_ready(&rig.client, slow_inbox).await;

    let flood_started = Instant::now();
    rig.client
        .publish_with_reply(
            "opencode.prompt.flood",
            slow_inbox,
            Bytes::from_static(b"[flood] go"),
        )
        .await
        .expect("publish the flood prompt");
    rig.client.flush().await.expect("flush");
    // Wait until the flood is well under way.
    rig.fake
        .wait_until("the flood streaming", Duration::from_secs(10), |f| {
            f.turns().first().is_some_and(|t| t.emitted.len() >= 300)
        })
        .await;

    let others_started = Instant::now();
    let others = futures::future::join_all((0..OTHERS).map(|i| {
        let client = rig.client.clone();
        async move {
            let t0 = Instant::now();
            let r = request(
                &client,
                &format!("opencode.prompt.other.{i}"),
                &format!("other{i}"),
                Duration::from_secs(5),
            )
            .await;
            (i, r, t0.elapsed())
        }
    }))
    .await;
    let others_took = others_started.elapsed();
    let flood_turn = rig.fake.turns()[0].clone();
    assert!(
        flood_turn.input.text.contains("[flood]"),
        "{:?}",
        flood_turn.input.text
    );
    let flood_still_streaming = flood_turn.finished_at.is_none();

    for (i, r, took) in &others {
        assert_well_formed(r);
        let fin = terminal(r);
        assert_eq!(fin["kind"], "final", "other {i}: {r:#?}");
        let want: String = (0..10).map(|k| format!("other{i}-{k} ")).collect();
        assert_eq!(fin["content"], want.as_str(), "other {i}");
        assert_eq!(of_kind(r, "delta").len(), 10, "other {i}: {r:#?}");
        // A 10-delta turn takes ~150 ms here; "promptly" leaves room for a
        // loaded 2-core machine.
        assert!(
            *took < Duration::from_secs(3),
            "other {i} took {took:?} beside the slow caller"
        );
    }
    assert!(
        flood_still_streaming,
        "the flood ended before the other turns did: they did not overlap"
    );

    // The flood itself reached its reading subscriber whole.
    let flood = collect_until_terminal(&mut observer, Duration::from_secs(20)).await;
    let flood_took = flood_started.elapsed();
    assert_well_formed(&flood);
    let fin = terminal(&flood);
    assert_eq!(fin["kind"], "final", "{:#?}", &flood[flood.len() - 1]);
    let want: String = (0..SLOW_DELTAS).map(slow_delta).collect();
    assert_eq!(fin["content"], want.as_str());
    assert_eq!(of_kind(&flood, "delta").len(), SLOW_DELTAS);

    // Both slow callers were really overwhelmed.
    let server_log = rig.nats.logs();
    assert!(
        server_log.contains("Slow Consumer Detected"),
        "nats-server never flagged the unread connection; log:\n{server_log}"
    );
    assert!(
        client_slow.load(Ordering::Relaxed) > 0,
        "the tiny subscription never overflowed"
    );
    // The bridge still serves.
    let after = request(
        &rig.client,
        "opencode.prompt.after",
        "after",
        Duration::from_secs(5),
    )
    .await;
    assert_well_formed(&after);
    assert_eq!(terminal(&after)["kind"], "final", "{after:#?}");
    eprintln!(
        "slow subscriber: {OTHERS} other turns done in {others_took:?} (slowest {:?}) while the \
         {SLOW_DELTAS}-delta flood ran ({flood_took:?} to its final)",
        others.iter().map(|(_, _, t)| *t).max().unwrap_or_default()
    );
    drop((raw, unread, tiny));
    rig.stop().await;
}

// 3. Bad data from OpenCode ---------------------------------------------------

const MAX_EVENT_BYTES: usize = 64 * 1024;

/// `data: <event>\n\n` for an event sent as raw bytes.
fn sse(event: &Value) -> Bytes {
    Bytes::from(format!("data: {event}\n\n"))
}

/// A turn whose events are laced with garbage (see the test below).
fn garbage_turn(input: &TurnInput) -> TurnScript {
    let mut t = TurnBuilder::new(input);
    let sid = t.sid.clone();
    t.begin();
    let a = t.assistant();
    let p = t.part_start(&a, "text");
    t.delta(&a, &p, "Before the noise. ");
    // A comment line, then a real delta carrying `event:`, `id:` and
    // `retry:` fields (OpenCode sends none; they must not matter).
    let fields = ev::delta(&sid, &a, &p, "Fields ignored. ");
    t.push(Step::StoreOnly(fields.clone()));
    t.push(Step::Raw(Bytes::from(format!(
        ": a comment line\nevent: message\nid: 42\nretry: 1000\ndata: {fields}\n\n"
    ))));
    // Unusable data: not JSON, an unknown type for this session, a delta
    // without its `delta`.
    t.push(Step::Raw(Bytes::from_static(b"data: not json\n\n")));
    t.push(Step::Raw(sse(
        &json!({"type": "future.unknown", "properties": {"sessionID": sid}}),
    )));
    t.push(Step::Raw(sse(
        &json!({"type": "message.part.delta", "properties":
        {"sessionID": sid, "messageID": a, "partID": p, "field": "text"}}),
    )));
    t.delta(&a, &p, "Between. ");
    // This turn's own text in an event above max_event_bytes: the message
    // list has it, the stream cannot carry it.
    let big = format!("[{}]", "b".repeat(MAX_EVENT_BYTES + 1024));
    let big_event = ev::delta(&sid, &a, &p, &big);
    t.push(Step::StoreOnly(big_event.clone()));
    t.push(Step::Raw(sse(&big_event)));
    // A data line that is not UTF-8.
    let mut bad =
        b"data: {\"type\":\"message.part.delta\",\"properties\":{\"sessionID\":\"".to_vec();
    bad.extend_from_slice(sid.as_bytes());
    bad.extend_from_slice(b"\",\"delta\":\"\xff\xfe\xc3\x28\"}}\n\n");
    t.push(Step::Raw(Bytes::from(bad)));
    // Then the rest of the turn, as usual.
    t.delta(&a, &p, "After. ");
    let full = format!("Before the noise. Fields ignored. Between. {big}After. ");
    t.part_end(&a, &p, &full);
    t.finish(&a, "stop");
    t.end();
    t.build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_data_from_opencode_is_skipped_and_the_turn_still_ends_once() {
    let rig = Rig::start_plain(
        None,
        |input| {
            if input.text.contains("[garbage]") {
                garbage_turn(input)
            } else {
                fake::default_script(input)
            }
        },
        |c| c.limits.max_event_bytes = MAX_EVENT_BYTES,
    )
    .await;
    let r = request(
        &rig.client,
        "opencode.prompt.garbage",
        "[garbage] please",
        Duration::from_secs(10),
    )
    .await;
    // Exactly one terminal reply, last; seq without gaps; deltas add up to
    // final.content.
    assert_well_formed(&r);
    let fin = terminal(&r);
    assert_eq!(fin["kind"], "final", "{:#?}", &r[r.len() - 1]);
    let sid = fin["session_id"].as_str().unwrap();
    let big = format!("[{}]", "b".repeat(MAX_EVENT_BYTES + 1024));
    let want = format!("Before the noise. Fields ignored. Between. {big}After. ");
    // The real text: OpenCode's message list.
    assert_eq!(listed_answer(&rig.fake, sid), want);
    assert_eq!(fin["content"], want.as_str(), "final.content");
    assert_eq!(delta_text(&r), want, "concatenated deltas");
    assert!(fin.get("content_truncated").is_none(), "{}", fin["notes"]);
    // Up to the oversized event the turn followed the stream live, one
    // reply per delta: the garbage in between was skipped, the comment and
    // the extra SSE fields ignored.
    let deltas = delta_contents(&r);
    assert_eq!(
        deltas[..3],
        ["Before the noise. ", "Fields ignored. ", "Between. "],
        "{deltas:?}"
    );
    // The bridge keeps serving: the same conversation, and a one-off.
    let again = request(
        &rig.client,
        "opencode.prompt.garbage",
        "still there?",
        Duration::from_secs(10),
    )
    .await;
    assert_well_formed(&again);
    assert_eq!(terminal(&again)["kind"], "final", "{again:#?}");
    assert_eq!(
        terminal(&again)["content"],
        fake::echo_reply("still there?").as_str()
    );
    assert_eq!(terminal(&again)["session_id"], sid, "same conversation");
    let other = request(
        &rig.client,
        "opencode.prompt",
        "hello",
        Duration::from_secs(10),
    )
    .await;
    assert_well_formed(&other);
    assert_eq!(
        terminal(&other)["content"],
        fake::echo_reply("hello").as_str()
    );
    eprintln!(
        "bad data: {} replies, {} event stream connection(s)",
        r.len(),
        rig.fake.streams_opened()
    );
    rig.stop().await;
}

// 4. Only heartbeats after the prompt ---------------------------------------------

const HB_FIRST_EVENT: Duration = Duration::from_millis(1500);
const HB_IDLE: Duration = Duration::from_millis(1500);
const HB_ABORT: Duration = Duration::from_secs(1);
const HB_ANSWER: [&str; 3] = ["Done ", "long ", "ago."];

/// The whole turn reaches OpenCode's message list (complete, session idle),
/// but the stream carries only the first `streamed` events of it, then
/// nothing but heartbeats.
fn lost_completion_turn(input: &TurnInput, streamed: usize) -> TurnScript {
    let mut steps: Vec<Step> = fake::text_turn(input, &HB_ANSWER)
        .steps
        .into_iter()
        .enumerate()
        .map(|(i, s)| match s {
            Step::Emit(v) if i >= streamed => Step::StoreOnly(v),
            other => other,
        })
        .collect();
    steps.push(Step::Heartbeats {
        every: Duration::from_millis(100),
        total: Duration::from_secs(15),
    });
    TurnScript { steps }
}

/// The number of steps up to and including the first delta of a
/// [`fake::text_turn`].
fn through_first_delta(input: &TurnInput) -> usize {
    fake::text_turn(input, &HB_ANSWER)
        .steps
        .iter()
        .position(|s| fake::emits(s, "message.part.delta"))
        .expect("a delta")
        + 1
}

fn heartbeat_script(input: &TurnInput) -> TurnScript {
    if input.text.contains("[silent]") {
        lost_completion_turn(input, 0)
    } else {
        lost_completion_turn(input, through_first_delta(input))
    }
}

fn heartbeat_config(c: &mut Config) {
    c.turn.first_event_timeout = HB_FIRST_EVENT;
    c.turn.idle_timeout = HB_IDLE;
    c.turn.abort_timeout = HB_ABORT;
}

/// PEERS #1: a stream that carries only heartbeats after the prompt (the
/// completion signal lost). When the first-event or idle deadline fires, the
/// bridge asks OpenCode before giving up: the session is idle and the
/// message list holds the complete answer, so the turn ends with its
/// `final` (nothing of it streamed, or only its start), and no abort. (A
/// turn that is really stuck still ends with `timeout`:
/// `bridge_fake::the_idle_deadline_aborts_a_silent_turn` and
/// `bridge_fake::no_event_at_all_hits_the_first_event_deadline`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_only_after_the_prompt_still_get_the_listed_answer() {
    let rig = Rig::start_plain(None, heartbeat_script, heartbeat_config).await;
    let (silent, cut) = tokio::join!(
        request(
            &rig.client,
            "opencode.prompt.hb.silent",
            "[silent] answer",
            Duration::from_secs(10)
        ),
        request(
            &rig.client,
            "opencode.prompt.hb.cut",
            "answer",
            Duration::from_secs(10)
        ),
    );
    for r in [&silent, &cut] {
        assert_well_formed(r);
        let fin = terminal(r);
        assert_eq!(fin["kind"], "final", "{r:#?}");
        assert_eq!(fin["content"], HB_ANSWER.concat().as_str());
        let sid = fin["session_id"].as_str().unwrap();
        assert!(
            rig.fake
                .requests_to("POST", &format!("/session/{sid}/abort"))
                .is_empty(),
            "a finished session was aborted"
        );
    }
    rig.stop().await;
}
