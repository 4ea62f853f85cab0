//! End to end: NATS -> the bridge -> the real OpenCode (pinned npm
//! package) -> the scripted fake LLM, and back.

use std::time::Duration;

use serde_json::json;

use crate::support::bridge::{
    assert_well_formed, delta_text, request, terminal, test_config, Bridge,
};
use crate::support::fake_llm::{self, FakeLlm};
use crate::support::nats::{client, NatsServer};
use crate::support::real_opencode::RealOpenCode;
use crate::support::rig::RealStack;

const TURN: Duration = Duration::from_secs(60);

async fn stack() -> RealStack {
    stack_with(|_| {}).await
}

async fn stack_with(tweak: impl FnOnce(&mut opencode_nats_bridge::config::Config)) -> RealStack {
    RealStack::start(|_| {}, tweak).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_text_turn() {
    let s = stack().await;
    let replies = request(&s.client, "opencode.prompt", "Say hello over NATS", TURN).await;
    assert_well_formed(&replies);
    let fin = terminal(&replies);
    assert_eq!(fin["kind"], "final", "{replies:#?}");
    assert_eq!(fin["content"], fake_llm::text_reply("Say hello over NATS"));
    assert_eq!(fin["model"], "fake/m1");
    assert!(fin["usage"]["input"].as_u64().unwrap() > 0, "{fin}");
    assert!(fin["usage"]["output"].as_u64().unwrap() > 0, "{fin}");
    assert!(replies.iter().filter(|(_, v)| v["kind"] == "delta").count() > 1);
    assert!(fin["session_id"].as_str().unwrap().starts_with("ses"));
    s.bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_call_really_runs() {
    let s = stack().await;
    let marker = format!("e2e-tool-{}", std::process::id());
    let prompt =
        json!({"text": format!("[tool:bash echo {marker}] run it"), "conversation": "e2e.tool"})
            .to_string();
    let replies = request(&s.client, "opencode.prompt", &prompt, TURN).await;
    assert_well_formed(&replies);
    let call = replies
        .iter()
        .find(|(_, v)| v["kind"] == "tool_call")
        .expect("a tool_call");
    assert_eq!(call.1["tool"], "bash");
    assert_eq!(call.1["args"]["command"], format!("echo {marker}"));
    let result = replies
        .iter()
        .find(|(_, v)| v["kind"] == "tool_result")
        .expect("a tool_result");
    assert_eq!(result.1["call_id"], call.1["call_id"]);
    assert_eq!(result.1["success"], true);
    // The output comes from a shell that really ran.
    assert!(
        result.1["result"].as_str().unwrap().contains(&marker),
        "{result:?}"
    );
    let fin = terminal(&replies);
    assert_eq!(fin["kind"], "final");
    assert!(fin["content"].as_str().unwrap().contains(&marker), "{fin}");
    assert_eq!(fin["conversation"], "e2e.tool");
    s.bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_turn_sees_the_first() {
    let s = stack().await;
    let first = "Remember the word kumquat-e2e";
    let r1 = request(&s.client, "opencode.prompt.chat.e2e", first, TURN).await;
    assert_well_formed(&r1);
    assert_eq!(terminal(&r1)["kind"], "final", "{r1:#?}");
    let r2 = request(
        &s.client,
        "opencode.prompt.chat.e2e",
        "[recall] what did I say first?",
        TURN,
    )
    .await;
    assert_well_formed(&r2);
    let fin = terminal(&r2);
    assert_eq!(fin["kind"], "final", "{r2:#?}");
    assert_eq!(fin["content"], fake_llm::recall_reply(first));
    assert_eq!(delta_text(&r2), fin["content"].as_str().unwrap());
    // Same conversation, same OpenCode session.
    assert_eq!(terminal(&r1)["session_id"], fin["session_id"]);
    assert_eq!(fin["conversation"], "chat.e2e");
    // And the session carries the conversation in its title.
    let sessions = s.opencode.get_json("/session").await;
    let sid = fin["session_id"].as_str().unwrap();
    let title = sessions
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == sid)
        .map(|x| x["title"].clone());
    assert_eq!(title, Some(json!("nats:chat.e2e")));
    s.bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_stops_the_running_turn_and_keeps_the_queue() {
    use futures::StreamExt;
    let s = stack().await;
    let c = &s.client;
    // A slow turn, and a second prompt queued behind it.
    let inbox1 = c.new_inbox();
    let mut sub1 = crate::support::nats::subscribe_ready(c, inbox1.clone()).await;
    let slow = json!({"text": "[slow] count", "trace_id": "abort-me", "conversation": "e2e.abort"});
    c.publish_with_reply("opencode.prompt", inbox1, slow.to_string().into())
        .await
        .unwrap();
    let first = tokio::time::timeout(TURN, sub1.next())
        .await
        .expect("first reply")
        .unwrap();
    let mut r1 = vec![(
        first.headers.clone(),
        serde_json::from_slice(&first.payload).unwrap(),
    )];
    let inbox2 = c.new_inbox();
    let mut sub2 = crate::support::nats::subscribe_ready(c, inbox2.clone()).await;
    let queued = json!({"text": "after the abort", "conversation": "e2e.abort"});
    c.publish_with_reply("opencode.prompt", inbox2, queued.to_string().into())
        .await
        .unwrap();
    c.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        c.request("opencode.abort", r#"{"trace_id":"abort-me"}"#.into()),
    )
    .await
    .expect("abort answered")
    .unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&answer.payload).unwrap();
    assert_eq!(answer["aborted"], true, "{answer}");

    r1.extend(crate::support::nats::collect_until_terminal(&mut sub1, TURN).await);
    assert_well_formed(&r1);
    let t = terminal(&r1);
    assert_eq!(t["kind"], "error", "{r1:#?}");
    assert_eq!(t["code"], "aborted");
    // OpenCode really stopped: the slow answer was cut short.
    assert!(
        delta_text(&r1).len() < fake_llm::slow_reply().len(),
        "{}",
        delta_text(&r1)
    );

    // The queued prompt was not dropped: it runs on the same session.
    let r2 = crate::support::nats::collect_until_terminal(&mut sub2, TURN).await;
    assert_well_formed(&r2);
    let fin = terminal(&r2);
    assert_eq!(fin["kind"], "final", "{r2:#?}");
    assert_eq!(fin["content"], fake_llm::text_reply("after the abort"));
    assert_eq!(fin["session_id"], t["session_id"]);

    // Nothing is running now: an abort says so.
    let answer = c
        .request("opencode.abort", r#"{"conversation":"e2e.abort"}"#.into())
        .await
        .unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&answer.payload).unwrap();
    assert_eq!(answer["aborted"], false, "{answer}");
    s.bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_mid_turn_still_delivers_the_terminal_reply() {
    use futures::StreamExt;
    let mut nats = NatsServer::start();
    let llm = FakeLlm::start().await;
    let opencode = RealOpenCode::start(&llm.base_url()).await;
    let mut cfg = test_config(&nats.url(), opencode.base_url(), Some(opencode.password()));
    cfg.opencode.directory = Some(opencode.directory().to_path_buf());
    let bridge = Bridge::start(cfg).await;
    let c = client(&nats.url()).await;
    let inbox = c.new_inbox();
    let mut sub = crate::support::nats::subscribe_ready(&c, inbox.clone()).await;
    c.publish_with_reply("opencode.prompt", inbox, "[slow] count".into())
        .await
        .unwrap();
    let first = tokio::time::timeout(TURN, sub.next())
        .await
        .expect("first reply")
        .unwrap();
    let mut replies = vec![(
        first.headers.clone(),
        serde_json::from_slice(&first.payload).unwrap(),
    )];

    // The server dies mid-turn and comes back on the same port.
    nats.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nats.restart();

    replies.extend(crate::support::nats::collect_until_terminal(&mut sub, TURN).await);
    let t = terminal(&replies);
    assert_eq!(t["kind"], "final", "{replies:#?}");
    // The answer is whole in the final (read from OpenCode), whatever core
    // NATS lost at the instant of the kill; seq is strictly increasing, so a
    // receiver can see any gap.
    assert_eq!(t["content"], fake_llm::slow_reply());
    let seqs: Vec<u64> = replies
        .iter()
        .map(|(_, v)| v["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(
        replies.iter().filter(|(_, v)| v["kind"] == "final").count(),
        1
    );

    // The prompt subscriptions came back: a new turn works.
    let r = request(&c, "opencode.prompt", "after the restart", TURN).await;
    assert_well_formed(&r);
    assert_eq!(
        terminal(&r)["content"],
        fake_llm::text_reply("after the restart")
    );
    bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_restart_keeps_the_conversation() {
    let s = stack().await;
    let first = "Remember the word medlar-restart";
    let r1 = request(&s.client, "opencode.prompt.keep.me", first, TURN).await;
    assert_eq!(terminal(&r1)["kind"], "final", "{r1:#?}");
    s.bridge.stop().await.unwrap();

    // A new daemon rebuilds the conversation map from the session titles.
    let mut cfg = test_config(
        &s.nats.url(),
        s.opencode.base_url(),
        Some(s.opencode.password()),
    );
    cfg.opencode.directory = Some(s.opencode.directory().to_path_buf());
    let bridge = Bridge::start(cfg).await;
    let r2 = request(
        &s.client,
        "opencode.prompt.keep.me",
        "[recall] and first?",
        TURN,
    )
    .await;
    assert_well_formed(&r2);
    let fin = terminal(&r2);
    assert_eq!(fin["content"], fake_llm::recall_reply(first), "{r2:#?}");
    assert_eq!(fin["session_id"], terminal(&r1)["session_id"]);
    bridge.stop().await.unwrap();
}

/// A 1x1 PNG (one red pixel), 69 bytes.
const TINY_PNG_BASE64: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attachments_reach_the_llm_and_bad_ones_are_refused() {
    use base64::Engine as _;
    let s = stack_with(|c| c.limits.max_attachment_bytes = 1024).await;
    let marker = format!("attached-text-{}", std::process::id());
    let text_file = base64::engine::general_purpose::STANDARD.encode(format!("{marker}\n"));
    let prompt = json!({
        "text": "What is in these files?",
        "attachments": [
            {"filename": "dot.png", "content": TINY_PNG_BASE64},
            {"filename": "notes.txt", "content": text_file},
        ],
    });
    let replies = request(&s.client, "opencode.prompt", &prompt.to_string(), TURN).await;
    assert_well_formed(&replies);
    assert_eq!(terminal(&replies)["kind"], "final", "{replies:#?}");

    // The request OpenCode sent the LLM: the image as an image (a data URL,
    // mime guessed from the name), the text file inlined as text.
    let asked = s
        .llm
        .chat_requests()
        .into_iter()
        .find_map(|body| {
            let user = body["messages"]
                .as_array()?
                .iter()
                .rev()
                .find(|m| m["role"] == "user")?
                .clone();
            fake_llm::content_text(&user)
                .contains("What is in these files?")
                .then_some(user)
        })
        .expect("a chat request with the prompt");
    let parts = asked["content"].as_array().expect("content parts");
    let image = format!("data:image/png;base64,{TINY_PNG_BASE64}");
    assert!(
        parts
            .iter()
            .any(|p| p["image_url"]["url"] == image.as_str()),
        "no image part in {asked:#}"
    );
    assert!(
        fake_llm::content_text(&asked).contains(&marker),
        "the text file is not in {asked:#}"
    );

    // A 0-byte attachment and one above max_attachment_bytes: bad_request,
    // and nothing reaches OpenCode.
    let before = s.llm.chat_requests().len();
    let big = base64::engine::general_purpose::STANDARD.encode(vec![7u8; 1025]);
    for (what, attachment) in [
        ("0 bytes", json!({"filename": "empty.txt", "content": ""})),
        ("too large", json!({"filename": "big.bin", "content": big})),
    ] {
        let prompt = json!({"text": "refuse me", "attachments": [attachment]});
        let replies = request(&s.client, "opencode.prompt", &prompt.to_string(), TURN).await;
        assert_well_formed(&replies);
        let e = terminal(&replies);
        assert_eq!(e["kind"], "error", "{what}: {replies:#?}");
        assert_eq!(e["code"], "bad_request", "{what}: {e}");
    }
    assert_eq!(s.llm.chat_requests().len(), before);
    s.bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_service_metadata_show_the_opencode_version() {
    let s = stack().await;
    let health = s.opencode.get_json("/global/health").await;
    let version = health["version"].as_str().expect("a version").to_string();
    let status = s
        .client
        .request("opencode.bridge.status", bytes::Bytes::new())
        .await
        .expect("status");
    let status: serde_json::Value = serde_json::from_slice(&status.payload).unwrap();
    assert_eq!(status["opencode_version"], version.as_str(), "{status}");
    let info = s
        .client
        .request("$SRV.INFO.opencode-bridge", bytes::Bytes::new())
        .await
        .expect("service info");
    let info: serde_json::Value = serde_json::from_slice(&info.payload).unwrap();
    assert_eq!(
        info["metadata"]["opencode_version"],
        version.as_str(),
        "{info}"
    );
    s.bridge.stop().await.unwrap();
}

/// The real OpenCode streaming 2,000 deltas: with `"stream":
/// {"coalesce_ms": 500}` the caller gets a handful of delta replies whose
/// concatenation is the whole answer, the same as `final.content`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_text_is_a_handful_of_replies_and_whole() {
    let s = stack().await;
    let started = std::time::Instant::now();
    let r = request(
        &s.client,
        "opencode.prompt",
        r#"{"text":"[many] go","stream":{"coalesce_ms":500}}"#,
        TURN,
    )
    .await;
    let took = started.elapsed();
    assert_well_formed(&r);
    let fin = terminal(&r);
    assert_eq!(fin["kind"], "final", "{r:#?}");
    assert_eq!(fin["content"], fake_llm::many_reply());
    let deltas = r.iter().filter(|(_, v)| v["kind"] == "delta").count();
    let bound = (took.as_millis() / 500) as usize + 2;
    assert!(
        (1..=bound).contains(&deltas),
        "{deltas} delta replies for 2,000 deltas in {took:?}"
    );
    s.bridge.stop().await.unwrap();
}
