//! Records the real OpenCode's event stream as fixtures.
//!
//! ```text
//! cargo test --test it -- --ignored record_fixtures --nocapture
//! ```
//!
//! Starts the fake LLM and the real `opencode serve`, opens ONE `GET /event`
//! connection and keeps its body bytes exactly as received, then runs the
//! scenarios one after the other, each in its own session titled
//! `nats:fixture.<name>`. For each it writes, into
//! `tests/fixtures/opencode-<version>/`:
//!
//! * `<name>.sse`: the raw SSE bytes of that scenario's time window, from the
//!   end of the previous window (the first window starts at the first byte, so
//!   `text.sse` begins with `server.connected`) to the last complete event
//!   1.5 s after the turn ended (late `session.idle` duplicates included).
//!   Windows are cut at event boundaries only; concatenated in order, the files
//!   are the stream as received. Noise (heartbeats, other sessions) is kept.
//! * `<name>.messages.json`: the raw body of the final
//!   `GET /session/{id}/message`.
//!
//! and `manifest.json`: per scenario the session id, the prompts, the message
//! ids we chose, the text the fake LLM scripted and what the window holds.
//!
//! A second `GET /event?directory=<server cwd>` connection runs alongside, only
//! to compare; its bytes are not saved.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use crate::support::fake_llm::{self, FakeLlm};
use crate::support::real_opencode::{message_text, new_message_id, turn_assistants, RealOpenCode};

const VERSION: &str = "1.18.34";
/// Wait after a turn ends before cutting its window (late idles land here).
const SETTLE: Duration = Duration::from_millis(1500);
const TURN_TIMEOUT: Duration = Duration::from_secs(60);

/// One complete event in the tapped stream.
#[derive(Debug, Clone)]
struct TapEvent {
    /// Byte offset just past the event's blank line.
    end: usize,
    json: Value,
}

#[derive(Default)]
struct TapState {
    bytes: Vec<u8>,
    parsed_to: usize,
    events: Vec<TapEvent>,
    ended: Option<String>,
}

impl TapState {
    fn parse(&mut self) {
        loop {
            let rest = &self.bytes[self.parsed_to..];
            let lf = find(rest, b"\n\n").map(|i| (i, 2));
            let crlf = find(rest, b"\r\n\r\n").map(|i| (i, 4));
            let Some((at, sep)) = [lf, crlf].into_iter().flatten().min_by_key(|(i, _)| *i) else {
                return;
            };
            let block = String::from_utf8_lossy(&rest[..at]).into_owned();
            let data: Vec<&str> = block
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            self.parsed_to += at + sep;
            if !data.is_empty() {
                let json = serde_json::from_str(&data.join("\n"))
                    .unwrap_or_else(|_| Value::String(data.join("\n")));
                self.events.push(TapEvent {
                    end: self.parsed_to,
                    json,
                });
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A raw `GET /event` connection, recorded.
struct Tap {
    state: Arc<Mutex<TapState>>,
    task: JoinHandle<()>,
    headers: Vec<(String, String)>,
}

impl Tap {
    async fn open(oc: &RealOpenCode, path: &str) -> Tap {
        let resp = oc
            .request(reqwest::Method::GET, path)
            .header("accept", "text/event-stream")
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(resp.status(), 200, "GET {path}");
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
            .collect();
        let state: Arc<Mutex<TapState>> = Arc::default();
        let st = state.clone();
        let task = tokio::spawn(async move {
            let mut body = resp.bytes_stream();
            while let Some(chunk) = body.next().await {
                let mut s = st.lock().unwrap();
                match chunk {
                    Ok(bytes) => {
                        s.bytes.extend_from_slice(&bytes);
                        s.parse();
                    }
                    Err(e) => {
                        s.ended = Some(format!("error: {e}"));
                        return;
                    }
                }
            }
            st.lock().unwrap().ended = Some("eof".into());
        });
        Tap {
            state,
            task,
            headers,
        }
    }

    /// Offset just past the last complete event.
    fn complete_end(&self) -> usize {
        self.state.lock().unwrap().parsed_to
    }

    fn bytes(&self, from: usize, to: usize) -> Vec<u8> {
        self.state.lock().unwrap().bytes[from..to].to_vec()
    }

    fn events_in(&self, from: usize, to: usize) -> Vec<Value> {
        let s = self.state.lock().unwrap();
        s.events
            .iter()
            .filter(|e| e.end > from && e.end <= to)
            .map(|e| e.json.clone())
            .collect()
    }

    fn all_events(&self) -> Vec<Value> {
        let s = self.state.lock().unwrap();
        s.events.iter().map(|e| e.json.clone()).collect()
    }

    /// Waits (bounded) for an event after byte offset `from` matching `pred`.
    async fn wait_for(&self, from: usize, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let fut = async {
            loop {
                {
                    let s = self.state.lock().unwrap();
                    if let Some(e) = s.events.iter().find(|e| e.end > from && pred(&e.json)) {
                        return e.json.clone();
                    }
                    if let Some(end) = &s.ended {
                        panic!("event stream ended ({end}) while waiting for {what}");
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), fut)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The session an event belongs to, if any.
fn event_session(ev: &Value) -> Option<&str> {
    let p = &ev["properties"];
    p["sessionID"]
        .as_str()
        .or_else(|| p["part"]["sessionID"].as_str())
        .or_else(|| p["info"]["sessionID"].as_str())
        .or_else(|| {
            ev["type"]
                .as_str()
                .filter(|t| t.starts_with("session."))
                .and(p["info"]["id"].as_str())
        })
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What a scenario did, for the manifest and the summary.
struct Outcome {
    session_id: String,
    prompts: Vec<String>,
    message_ids: Vec<String>,
    expected_text: Option<String>,
    note: Value,
}

async fn turn(oc: &RealOpenCode, session_id: &str, text: &str) -> (String, Vec<Value>) {
    let message_id = new_message_id();
    oc.prompt_async(session_id, text, &message_id).await;
    let msgs = oc
        .wait_turn_done(session_id, &message_id, TURN_TIMEOUT)
        .await;
    (message_id, msgs)
}

fn last_assistant_text(msgs: &[Value], user_message_id: &str) -> String {
    turn_assistants(msgs, user_message_id)
        .last()
        .map(|m| message_text(m))
        .unwrap_or_default()
}

async fn simple(oc: &RealOpenCode, name: &str, prompt: &str, expected: Option<String>) -> Outcome {
    let sid = oc.create_session(&format!("nats:fixture.{name}")).await;
    let (mid, msgs) = turn(oc, &sid, prompt).await;
    let got = last_assistant_text(&msgs, &mid);
    if let Some(want) = &expected {
        assert_eq!(&got, want, "{name}: final text");
    }
    Outcome {
        session_id: sid,
        prompts: vec![prompt.into()],
        message_ids: vec![mid],
        expected_text: expected,
        note: json!({}),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "records fixtures from the real OpenCode; run on purpose"]
async fn record_fixtures() {
    tokio::time::timeout(Duration::from_secs(300), record())
        .await
        .expect("record_fixtures timed out");
}

async fn record() {
    let llm = FakeLlm::start().await;
    let oc = RealOpenCode::start(&llm.base_url()).await;
    let health = oc.get_json("/global/health").await;
    println!("health: {health}");
    assert_eq!(health["version"], VERSION, "fixtures are for {VERSION}");

    let tap = Tap::open(&oc, "/event").await;
    let dir_path = format!(
        "/event?directory={}",
        percent_encode(&oc.directory().to_string_lossy())
    );
    let tap_dir = Tap::open(&oc, &dir_path).await;
    println!("GET /event headers: {:?}", tap.headers);
    println!("GET {dir_path} headers: {:?}", tap_dir.headers);
    let is_connected = |e: &Value| e["type"] == "server.connected";
    tap.wait_for(0, "server.connected", is_connected).await;
    tap_dir.wait_for(0, "server.connected", is_connected).await;

    let out_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("opencode-{VERSION}"));
    std::fs::create_dir_all(&out_dir).expect("fixtures dir");

    let names = [
        "text",
        "reasoning",
        "tool",
        "error401",
        "abort",
        "two_turns",
    ];
    let mut cut = 0usize;
    let mut manifest = Vec::new();
    for name in names {
        let start = cut;
        let outcome = match name {
            "text" => {
                let prompt = "Say hello to the fixture recorder";
                simple(&oc, name, prompt, Some(fake_llm::text_reply(prompt))).await
            }
            "reasoning" => {
                let prompt = "[reasoning] What is the answer?";
                let want = Some(fake_llm::REASONING_ANSWER.to_string());
                simple(&oc, name, prompt, want).await
            }
            "tool" => {
                let prompt = "[tool:bash echo fixture-tool-ok] Run the command please";
                let o = simple(&oc, name, prompt, None).await;
                let msgs = oc.messages(&o.session_id).await;
                let got = last_assistant_text(&msgs, &o.message_ids[0]);
                assert!(
                    got.contains("fixture-tool-ok"),
                    "tool: final text lacks the tool output: {got:?}"
                );
                Outcome {
                    expected_text: Some(got),
                    ..o
                }
            }
            "error401" => simple(&oc, name, "[error401] This call fails", None).await,
            "abort" => {
                let sid = oc.create_session("nats:fixture.abort").await;
                let prompt = "[slow] Count slowly";
                let mid = new_message_id();
                oc.prompt_async(&sid, prompt, &mid).await;
                let delta = tap
                    .wait_for(start, "first delta of the abort turn", |e| {
                        e["type"] == "message.part.delta" && event_session(e) == Some(&sid)
                    })
                    .await;
                println!("abort: first delta {delta}");
                let (status, body) = oc
                    .post_json(&format!("/session/{sid}/abort"), &json!({}))
                    .await;
                println!("abort: POST /session/{{id}}/abort -> {status} {body}");
                oc.wait_turn_done(&sid, &mid, TURN_TIMEOUT).await;
                Outcome {
                    session_id: sid,
                    prompts: vec![prompt.into()],
                    message_ids: vec![mid],
                    expected_text: None,
                    note: json!({"abortResponse": {"status": status.as_u16(), "body": body}}),
                }
            }
            "two_turns" => {
                let sid = oc.create_session("nats:fixture.two_turns").await;
                let first = "Remember the word pineapple-fixture";
                let second = "[recall] What was my first message?";
                let (m1, msgs) = turn(&oc, &sid, first).await;
                assert_eq!(last_assistant_text(&msgs, &m1), fake_llm::text_reply(first));
                let (m2, msgs) = turn(&oc, &sid, second).await;
                let want = fake_llm::recall_reply(first);
                assert_eq!(last_assistant_text(&msgs, &m2), want, "two_turns: recall");
                Outcome {
                    session_id: sid,
                    prompts: vec![first.into(), second.into()],
                    message_ids: vec![m1, m2],
                    expected_text: Some(want),
                    note: json!({}),
                }
            }
            _ => unreachable!(),
        };
        tokio::time::sleep(SETTLE).await;
        let end = tap.complete_end();
        cut = end;

        let raw = tap.bytes(start, end);
        std::fs::write(out_dir.join(format!("{name}.sse")), &raw).expect("write sse");
        let sid = &outcome.session_id;
        let msgs_raw = oc
            .request(reqwest::Method::GET, &format!("/session/{sid}/message"))
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .expect("GET messages")
            .text()
            .await
            .expect("messages body");
        std::fs::write(out_dir.join(format!("{name}.messages.json")), &msgs_raw)
            .expect("write messages");

        // Summary for humans (and the facts we verify).
        let events = tap.events_in(start, end);
        let mine: Vec<&Value> = events
            .iter()
            .filter(|e| event_session(e) == Some(sid.as_str()))
            .collect();
        let types: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
        let idles = mine.iter().filter(|e| e["type"] == "session.idle").count();
        let session = oc.get_json(&format!("/session/{sid}")).await;
        let msgs: Vec<Value> = serde_json::from_str(&msgs_raw).expect("messages json");
        let parents: Vec<Value> = msgs
            .iter()
            .filter(|m| m["info"]["role"] == "assistant")
            .map(|m| {
                json!({"id": m["info"]["id"], "parentID": m["info"]["parentID"],
                       "finish": m["info"]["finish"], "completed": m["info"]["time"]["completed"],
                       "error": m["info"]["error"]})
            })
            .collect();
        let users: Vec<&Value> = msgs
            .iter()
            .filter(|m| m["info"]["role"] == "user")
            .map(|m| &m["info"]["id"])
            .collect();
        println!(
            "\n=== {name}: {} bytes, {} events ({} of the session), session.idle x{idles}",
            raw.len(),
            events.len(),
            mine.len()
        );
        println!("session title now: {}", session["title"]);
        println!(
            "our message ids: {:?}; user ids in GET /message: {users:?}",
            outcome.message_ids
        );
        println!("assistants: {}", Value::Array(parents));
        println!("event types: {types:?}");

        manifest.push(json!({
            "name": name,
            "sse": format!("{name}.sse"),
            "messages": format!("{name}.messages.json"),
            "sessionID": sid,
            "sessionTitle": session["title"],
            "prompts": outcome.prompts,
            "messageIDs": outcome.message_ids,
            "expectedText": outcome.expected_text,
            "bytes": raw.len(),
            "events": events.len(),
            "sessionEvents": mine.len(),
            "sessionIdleCount": idles,
            "note": outcome.note,
        }));
    }

    let manifest = json!({
        "opencodeVersion": VERSION,
        "recordedWith": "cargo test --test it -- --ignored record_fixtures --nocapture",
        "fakeLlmUsage": {
            "prompt_tokens": fake_llm::USAGE_PROMPT_TOKENS,
            "completion_tokens": fake_llm::USAGE_COMPLETION_TOKENS,
            "total_tokens": fake_llm::USAGE_TOTAL_TOKENS,
            "cached_tokens": fake_llm::USAGE_CACHED_TOKENS,
            "reasoning_tokens": fake_llm::USAGE_REASONING_TOKENS,
        },
        "eventContentType": tap.headers.iter().find(|(k, _)| k == "content-type").map(|(_, v)| v),
        "scenarios": manifest,
    });
    std::fs::write(
        out_dir.join("manifest.json"),
        serde_json::to_string_pretty(&manifest).expect("manifest json") + "\n",
    )
    .expect("write manifest");

    // `/event` vs `/event?directory=<cwd>`: same events?
    let ids = |evs: Vec<Value>| -> Vec<(String, String)> {
        evs.iter()
            .filter(|e| e["type"] != "server.connected" && e["type"] != "server.heartbeat")
            .map(|e| {
                (
                    e["id"].as_str().unwrap_or("").to_string(),
                    e["type"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    };
    let plain = ids(tap.all_events());
    let with_dir = ids(tap_dir.all_events());
    println!(
        "\n/event: {} events; /event?directory=cwd: {} events; identical sequence: {}",
        plain.len(),
        with_dir.len(),
        plain == with_dir
    );
    if plain != with_dir {
        let only_plain: Vec<_> = plain.iter().filter(|x| !with_dir.contains(x)).collect();
        let only_dir: Vec<_> = with_dir.iter().filter(|x| !plain.contains(x)).collect();
        println!("only on /event: {only_plain:?}\nonly on ?directory=: {only_dir:?}");
    }
    println!("fake LLM saw {} requests:", llm.recorded().len());
    for r in llm.recorded() {
        println!(
            "  {:?} stream={} tools={}",
            r.scenario,
            r.body["stream"],
            r.body["tools"].as_array().map_or(0, Vec::len)
        );
    }
    println!("fixtures written to {}", out_dir.display());
}
