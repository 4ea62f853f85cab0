//! The Synadia Agent Protocol v0.3 (synadia-agent-sdk-docs,
//! `core-protocol.md`) against the bridge: a conformance client written
//! from the spec, over a real nats-server with the fake OpenCode. It knows
//! nothing of the bridge's own contract: it discovers the agent through
//! `$SRV.INFO.agents`, takes the endpoint subjects from there, and reads
//! reply streams as §6 says (headers first, an empty headerless message
//! ends the stream).

use std::time::Duration;

use async_nats::{Client, HeaderMap, Message};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};

use crate::support::fake_opencode::{
    api_error, error_turn, text_turn, tool_turn, TurnBuilder, TurnInput,
};
use crate::support::nats::subscribe_ready;
use crate::support::rig::Rig;

/// The caller's inactivity timeout (§6.6 recommends 60 s; a test needs less).
const INACTIVITY: Duration = Duration::from_secs(15);

async fn rig(
    script: impl Fn(&TurnInput) -> crate::support::fake_opencode::TurnScript + Send + Sync + 'static,
) -> Rig {
    Rig::start(script, |c| {
        c.agent_protocol.enabled = true;
        c.agent_protocol.owner = "ops".into();
        c.agent_protocol.name = Some("box-1".into());
        c.agent_protocol.heartbeat_interval = Duration::from_secs(1);
        c.agent_protocol.ack_interval = Duration::from_secs(1);
    })
    .await
}

/// §4: the one agent's `$SRV.INFO.agents` record.
async fn discover(client: &Client) -> Value {
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        client.request("$SRV.INFO.agents", Bytes::new()),
    )
    .await
    .expect("discovery in time")
    .expect("an agent answers $SRV.INFO.agents");
    serde_json::from_slice(&reply.payload).expect("INFO is JSON")
}

fn endpoint<'a>(info: &'a Value, name: &str) -> &'a Value {
    info["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no {name} endpoint in {info:#}"))
}

/// One message of a reply stream, as §6 and §9 read it.
#[derive(Debug)]
enum Got {
    Chunk(Value),
    Error {
        code: String,
        description: String,
        body: Value,
    },
    Terminator,
}

fn classify(m: &Message) -> Got {
    let header = |n: &str| {
        m.headers
            .as_ref()
            .and_then(|h| h.get(n))
            .map(|v| v.as_str().to_string())
    };
    if let Some(code) = header("Nats-Service-Error-Code") {
        return Got::Error {
            code,
            description: header("Nats-Service-Error").expect("Nats-Service-Error"),
            body: serde_json::from_slice(&m.payload).unwrap_or(Value::Null),
        };
    }
    if m.payload.is_empty() {
        let no_headers = m.headers.as_ref().is_none_or(|h| h.is_empty());
        assert!(no_headers, "the terminator carries no headers: {m:?}");
        return Got::Terminator;
    }
    let v: Value = serde_json::from_slice(&m.payload).expect("every chunk is JSON");
    assert!(v["type"].is_string(), "every chunk has a type: {v}");
    assert!(!v["data"].is_null(), "every chunk has data: {v}");
    Got::Chunk(v)
}

/// Sends `payload` to `subject` and reads the stream to its terminator,
/// then checks that nothing follows it.
async fn stream(client: &Client, subject: &str, headers: HeaderMap, payload: &[u8]) -> Vec<Got> {
    stream_answering(client, subject, headers, payload, None).await
}

/// [`stream`], answering every `query` chunk (§7) with `answer`.
async fn stream_answering(
    client: &Client,
    subject: &str,
    headers: HeaderMap,
    payload: &[u8],
    answer: Option<&str>,
) -> Vec<Got> {
    let inbox = client.new_inbox();
    let mut sub = subscribe_ready(client, inbox.clone()).await;
    client
        .publish_with_reply_and_headers(
            subject.to_string(),
            inbox,
            headers,
            payload.to_vec().into(),
        )
        .await
        .unwrap();
    client.flush().await.unwrap();
    let mut got = Vec::new();
    loop {
        let m = tokio::time::timeout(INACTIVITY, sub.next())
            .await
            .unwrap_or_else(|_| panic!("inactivity timeout; so far {got:#?}"))
            .expect("subscription open");
        let g = classify(&m);
        if let (Got::Chunk(v), Some(a)) = (&g, answer) {
            if v["type"] == "query" {
                let to = v["data"]["reply_subject"].as_str().expect("reply_subject");
                client
                    .publish(to.to_string(), a.to_string().into())
                    .await
                    .unwrap();
                client.flush().await.unwrap();
            }
        }
        let end = matches!(g, Got::Terminator);
        got.push(g);
        if end {
            break;
        }
    }
    let after = tokio::time::timeout(Duration::from_millis(400), sub.next()).await;
    assert!(after.is_err(), "a message after the terminator: {after:?}");
    got
}

fn chunks(got: &[Got]) -> Vec<&Value> {
    got.iter()
        .filter_map(|g| match g {
            Got::Chunk(v) => Some(v),
            _ => None,
        })
        .collect()
}

/// §6.3: response texts, concatenated in order (both forms).
fn response_text(got: &[Got]) -> String {
    chunks(got)
        .iter()
        .filter(|v| v["type"] == "response")
        .map(|v| match &v["data"] {
            Value::String(s) => s.clone(),
            d => d["text"].as_str().unwrap_or_default().to_string(),
        })
        .collect()
}

fn assert_acked_first(got: &[Got]) {
    match &got[0] {
        Got::Chunk(v) => assert_eq!(v, &json!({"type": "status", "data": "ack"}), "{got:#?}"),
        other => panic!("the first message is not the ack: {other:?}"),
    }
    assert!(matches!(got.last(), Some(Got::Terminator)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_says_what_section_3_requires() {
    let rig = rig(|i| text_turn(i, &["hi"])).await;
    let info = discover(&rig.client).await;
    assert_eq!(info["name"], "agents");
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(info["metadata"]["agent"], "opencode");
    assert_eq!(info["metadata"]["owner"], "ops");
    assert_eq!(info["metadata"]["protocol_version"], "0.3");
    let prompt = endpoint(&info, "prompt");
    assert_eq!(prompt["subject"], "agents.prompt.opencode.ops.box-1");
    assert_eq!(prompt["queue_group"], "agents");
    let max = prompt["metadata"]["max_payload"]
        .as_str()
        .expect("max_payload");
    let digits = max.trim_end_matches(['B', 'K', 'M', 'G']);
    assert!(digits.parse::<u64>().is_ok_and(|n| n > 0), "{max}");
    assert_eq!(prompt["metadata"]["attachments_ok"], "true");
    let status = endpoint(&info, "status");
    assert_eq!(status["subject"], "agents.status.opencode.ops.box-1");
    assert_eq!(status["queue_group"], "agents");
    // §4: PING answers too.
    let ping = rig
        .client
        .request("$SRV.PING.agents", Bytes::new())
        .await
        .expect("ping");
    let ping: Value = serde_json::from_slice(&ping.payload).unwrap();
    assert_eq!(ping["id"], info["id"]);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_turn_is_ack_then_the_answer_once_then_the_terminator() {
    let rig = rig(|i| text_turn(i, &["Hello ", "from ", "OpenCode."])).await;
    let info = discover(&rig.client).await;
    let subject = endpoint(&info, "prompt")["subject"]
        .as_str()
        .unwrap()
        .to_string();
    // Plain text (§5.1 shorthand).
    let got = stream(&rig.client, &subject, HeaderMap::new(), b"Say hello").await;
    assert_acked_first(&got);
    assert_eq!(response_text(&got), "Hello from OpenCode.", "{got:#?}");
    assert!(!got.iter().any(|g| matches!(g, Got::Error { .. })));
    // A JSON envelope with leading whitespace and an unknown field (§5.3, §5.6).
    let got = stream(
        &rig.client,
        &subject,
        HeaderMap::new(),
        b" \n{\"prompt\": \"Say hello\", \"x-extra\": 1}",
    )
    .await;
    assert_acked_first(&got);
    assert_eq!(response_text(&got), "Hello from OpenCode.");
    // Exactly one ack before the content (none repeated: the turn is short).
    let acks = chunks(&got).iter().filter(|v| v["data"] == "ack").count();
    assert_eq!(acks, 1, "{got:#?}");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_activity_is_status_tokens_before_the_answer() {
    let rig = rig(|i| {
        tool_turn(
            i,
            &[("call_1", "bash", json!({"command": "ls"}), "a.txt\nb.txt")],
            &["Two files."],
        )
    })
    .await;
    let got = stream(
        &rig.client,
        "agents.prompt.opencode.ops.box-1",
        HeaderMap::new(),
        b"List files",
    )
    .await;
    assert_acked_first(&got);
    let statuses: Vec<String> = chunks(&got)
        .iter()
        .filter(|v| v["type"] == "status")
        .map(|v| {
            v["data"]
                .as_str()
                .expect("status data is a string")
                .to_string()
        })
        .collect();
    let tool_use = statuses
        .iter()
        .position(|s| s.starts_with("tool_use:"))
        .unwrap_or_else(|| panic!("no tool_use in {statuses:#?}"));
    let detail: Value = serde_json::from_str(&statuses[tool_use]["tool_use:".len()..]).unwrap();
    assert_eq!(detail["name"], "bash");
    assert_eq!(detail["input"], json!({"command": "ls"}));
    let result = statuses
        .iter()
        .position(|s| s.starts_with("tool_result:"))
        .expect("tool_result");
    assert!(tool_use < result);
    let detail: Value = serde_json::from_str(&statuses[result]["tool_result:".len()..]).unwrap();
    assert_eq!(detail["output"], "a.txt\nb.txt");
    assert_eq!(response_text(&got), "Two files.");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_400_with_headers_then_the_terminator() {
    let rig = rig(|i| text_turn(i, &["never"])).await;
    let subject = "agents.prompt.opencode.ops.box-1";
    for payload in [
        &b""[..],
        b"   ",
        b"{\"text\": \"no prompt field\"}",
        b"{\"prompt\": ",
    ] {
        let got = stream(&rig.client, subject, HeaderMap::new(), payload).await;
        assert_acked_first(&got);
        assert_eq!(got.len(), 3, "ack, error, terminator: {got:#?}");
        let Got::Error {
            code,
            description,
            body,
        } = &got[1]
        else {
            panic!("not an error: {got:#?}")
        };
        assert_eq!(code, "400", "{payload:?}");
        assert!(!description.is_empty());
        assert_eq!(body["error"], "bad_request");
        assert!(body["message"].is_string());
    }
    assert_eq!(rig.fake.prompts().len(), 0, "nothing reached OpenCode");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conversation_header_keeps_one_session() {
    // The answer is the OpenCode session the turn ran in.
    let rig = rig(|i| {
        let s = i.session_id.clone();
        text_turn(i, &[&s])
    })
    .await;
    let subject = "agents.prompt.opencode.ops.box-1";
    let mut h = HeaderMap::new();
    h.insert("Conversation", "chat.42");
    let first = response_text(&stream(&rig.client, subject, h.clone(), b"one").await);
    let second = response_text(&stream(&rig.client, subject, h, b"two").await);
    assert!(first.starts_with("ses_"), "{first}");
    assert_eq!(first, second, "one conversation, one session");
    let other = response_text(&stream(&rig.client, subject, HeaderMap::new(), b"three").await);
    assert_ne!(other, first, "without the header: a one-off session");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_and_status_carry_the_section_8_3_fields() {
    let rig = rig(|i| text_turn(i, &["hi"])).await;
    // §8.5: subscribe before discovering.
    let mut beats = subscribe_ready(&rig.client, "agents.hb.*.*.*").await;
    let info = discover(&rig.client).await;
    let beat = tokio::time::timeout(Duration::from_secs(5), beats.next())
        .await
        .expect("a heartbeat within the interval")
        .unwrap();
    assert_eq!(beat.subject.as_str(), "agents.hb.opencode.ops.box-1");
    let beat: Value = serde_json::from_slice(&beat.payload).unwrap();
    assert_eq!(beat["agent"], "opencode");
    assert_eq!(beat["owner"], "ops");
    assert_eq!(beat["instance_id"], info["id"]);
    assert_eq!(beat["interval_s"], 1);
    let ts = beat["ts"].as_str().unwrap();
    assert!(humantime::parse_rfc3339(ts).is_ok(), "{ts}");
    let status_subject = endpoint(&info, "status")["subject"]
        .as_str()
        .unwrap()
        .to_string();
    let status = rig
        .client
        .request(status_subject, Bytes::new())
        .await
        .expect("status answers");
    let status: Value = serde_json::from_slice(&status.payload).unwrap();
    for key in ["agent", "owner", "instance_id", "interval_s"] {
        assert_eq!(status[key], beat[key], "{key}");
    }
    assert!(status["ts"].is_string());
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_turn_hears_ack_again_and_none_after_the_terminator() {
    let rig = rig(|i| {
        let mut t = TurnBuilder::new(i);
        t.begin();
        t.sleep_ms(2600);
        let a = t.assistant();
        t.text(&a, &["late answer"]);
        t.finish(&a, "stop");
        t.end();
        t.build()
    })
    .await;
    let got = stream(
        &rig.client,
        "agents.prompt.opencode.ops.box-1",
        HeaderMap::new(),
        b"take your time",
    )
    .await;
    assert_acked_first(&got);
    let acks = chunks(&got).iter().filter(|v| v["data"] == "ack").count();
    assert!(acks >= 3, "the first ack and one a second after: {got:#?}");
    assert_eq!(response_text(&got), "late answer");
    // `stream` checked that nothing (no late ack) follows the terminator.
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_turn_ends_with_a_500_error_message_then_the_terminator() {
    let rig = rig(|i| error_turn(i, api_error(401, "Incorrect API key provided", false))).await;
    let got = stream(
        &rig.client,
        "agents.prompt.opencode.ops.box-1",
        HeaderMap::new(),
        b"hello",
    )
    .await;
    assert_acked_first(&got);
    let n = got.len();
    let Got::Error {
        code,
        description,
        body,
    } = &got[n - 2]
    else {
        panic!("the message before the terminator is not an error: {got:#?}")
    };
    assert_eq!(code, "500");
    assert!(description.contains("API key"), "{description}");
    assert_eq!(body["error"], "provider_error");
    assert_eq!(body["retryable"], false);
    rig.stop().await;
}

// End to end: the same client against the real OpenCode (pinned) and the
// fake LLM.

/// The real stack with the agent registered as `ops/e2e`.
async fn real_stack() -> crate::support::rig::RealStack {
    crate::support::rig::RealStack::start(
        |_| {},
        |c| {
            c.agent_protocol.enabled = true;
            c.agent_protocol.owner = "ops".into();
            c.agent_protocol.name = Some("e2e".into());
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_opencode_text_turn_has_the_answer_exactly_once() {
    let s = real_stack().await;
    let info = discover(&s.client).await;
    assert_eq!(
        info["metadata"]["opencode_version"]
            .as_str()
            .map(|v| !v.is_empty()),
        Some(true)
    );
    let subject = endpoint(&info, "prompt")["subject"]
        .as_str()
        .unwrap()
        .to_string();
    let got = stream(
        &s.client,
        &subject,
        HeaderMap::new(),
        b"Say hello over NATS",
    )
    .await;
    assert_acked_first(&got);
    assert!(
        !got.iter().any(|g| matches!(g, Got::Error { .. })),
        "{got:#?}"
    );
    let want = crate::support::fake_llm::text_reply("Say hello over NATS");
    assert_eq!(
        response_text(&got),
        want,
        "the answer exactly once: {got:#?}"
    );
    let responses = chunks(&got)
        .iter()
        .filter(|v| v["type"] == "response")
        .count();
    assert!(responses > 1, "streamed in pieces: {got:#?}");
    let usage = chunks(&got)
        .iter()
        .filter_map(|v| v["data"].as_str())
        .find(|d| d.starts_with("usage:"))
        .map(str::to_string)
        .expect("a usage status");
    let usage: Value = serde_json::from_str(&usage["usage:".len()..]).unwrap();
    assert!(usage["tokens"]["output"].as_u64().unwrap() > 0, "{usage}");
    s.bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_opencode_tool_turn_reports_the_tool_and_answers_once() {
    let s = real_stack().await;
    let marker = format!("agent-tool-{}", std::process::id());
    let prompt = json!({"prompt": format!("[tool:bash echo {marker}] run it")}).to_string();
    let got = stream(
        &s.client,
        "agents.prompt.opencode.ops.e2e",
        HeaderMap::new(),
        prompt.as_bytes(),
    )
    .await;
    assert_acked_first(&got);
    let statuses: Vec<String> = chunks(&got)
        .iter()
        .filter(|v| v["type"] == "status")
        .filter_map(|v| v["data"].as_str().map(str::to_string))
        .collect();
    let tool_use = statuses
        .iter()
        .find_map(|s| s.strip_prefix("tool_use:"))
        .unwrap_or_else(|| panic!("no tool_use: {got:#?}"));
    let tool_use: Value = serde_json::from_str(tool_use).unwrap();
    assert_eq!(tool_use["name"], "bash");
    let result = statuses
        .iter()
        .find_map(|s| s.strip_prefix("tool_result:"))
        .expect("a tool_result");
    let result: Value = serde_json::from_str(result).unwrap();
    assert_eq!(result["id"], tool_use["id"]);
    assert!(
        result["output"].as_str().unwrap().contains(&marker),
        "{result}"
    );
    let text = response_text(&got);
    assert_eq!(
        text,
        crate::support::fake_llm::tool_followup_reply(&marker),
        "{got:#?}"
    );
    s.bridge.stop().await.unwrap();
}

/// The real stack where OpenCode asks before bash and the policy asks the
/// caller.
async fn asking_stack() -> crate::support::rig::RealStack {
    use opencode_nats_bridge::protocol::interactive::{Action, Rule};
    crate::support::rig::RealStack::start(
        |oc| oc["permission"]["bash"] = json!("ask"),
        |c| {
            c.agent_protocol.enabled = true;
            c.agent_protocol.owner = "ops".into();
            c.agent_protocol.name = Some("e2e".into());
            c.permissions.rules = vec![Rule {
                tenant: None,
                permission: "bash".into(),
                pattern: "*".into(),
                action: Action::Ask,
            }];
        },
    )
    .await
}

fn queries(got: &[Got]) -> Vec<&Value> {
    chunks(got)
        .into_iter()
        .filter(|v| v["type"] == "query")
        .collect()
}

fn tool_result(got: &[Got]) -> Value {
    let s = chunks(got)
        .iter()
        .filter_map(|v| v["data"].as_str())
        .find_map(|s| s.strip_prefix("tool_result:"))
        .unwrap_or_else(|| panic!("no tool_result: {got:#?}"))
        .to_string();
    serde_json::from_str(&s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_opencode_permission_query_answered_yes_runs_the_tool() {
    let s = asking_stack().await;
    let marker = format!("agent-allowed-{}", std::process::id());
    let got = stream_answering(
        &s.client,
        "agents.prompt.opencode.ops.e2e",
        HeaderMap::new(),
        format!("[tool:bash echo {marker}] go").as_bytes(),
        Some("yes"),
    )
    .await;
    assert_acked_first(&got);
    let q = queries(&got);
    assert_eq!(q.len(), 1, "{got:#?}");
    let data = &q[0]["data"];
    assert!(data["id"].as_str().is_some_and(|i| !i.is_empty()));
    assert!(data["prompt"].as_str().unwrap().contains("bash"), "{data}");
    let result = tool_result(&got);
    assert_eq!(result["ok"], true, "{result}");
    assert!(result["output"].as_str().unwrap().contains(&marker));
    assert_eq!(
        response_text(&got),
        crate::support::fake_llm::tool_followup_reply(&marker),
        "the answer exactly once: {got:#?}"
    );
    s.bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_opencode_permission_query_answered_no_denies_the_tool() {
    let s = asking_stack().await;
    let started = std::time::Instant::now();
    let got = stream_answering(
        &s.client,
        "agents.prompt.opencode.ops.e2e",
        HeaderMap::new(),
        b"[tool:bash echo agent-denied] go",
        Some("no"),
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(25));
    assert_acked_first(&got);
    assert_eq!(queries(&got).len(), 1, "{got:#?}");
    assert!(
        !got.iter().any(|g| matches!(g, Got::Error { .. })),
        "{got:#?}"
    );
    assert_eq!(tool_result(&got)["ok"], false);
    // OpenCode 1.18 ends a turn whose tool was rejected without a second
    // model call (finish `tool-calls`): no answer text, and none invented.
    assert_eq!(response_text(&got), "", "{got:#?}");
    s.bridge.stop().await.unwrap();
}
