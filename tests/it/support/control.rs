//! Conversation control requests (docs/PROTOCOL.md, "Conversation
//! controls"): one request, its one JSON answer.

use std::time::Duration;

use async_nats::Client;
use futures::StreamExt;
use serde_json::Value;

/// Bound on one control answer (an op on the real OpenCode included).
pub const ANSWER: Duration = Duration::from_secs(60);

/// Sends `payload` on `subject` and returns the one answer; panics when
/// none comes within [`ANSWER`], or when a second one follows within
/// 300 ms (a control is answered once).
pub async fn control(client: &Client, subject: &str, payload: &str) -> Value {
    let inbox = client.new_inbox();
    let mut sub = super::nats::subscribe_ready(client, inbox.clone()).await;
    client
        .publish_with_reply(subject.to_string(), inbox, payload.to_string().into())
        .await
        .expect("publish the control request");
    client.flush().await.expect("flush");
    let first = tokio::time::timeout(ANSWER, sub.next())
        .await
        .unwrap_or_else(|_| panic!("no answer to {subject} {payload} within {ANSWER:?}"))
        .expect("the inbox stays open");
    let v: Value = serde_json::from_slice(&first.payload).expect("a JSON answer");
    if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
        panic!(
            "a second answer to {subject}: {}",
            String::from_utf8_lossy(&m.payload)
        );
    }
    v
}

/// The `ok` answer, or a panic naming the refusal.
pub async fn ok(client: &Client, subject: &str, payload: &str) -> Value {
    let v = control(client, subject, payload).await;
    assert_eq!(v["ok"], true, "{subject} {payload}: {v}");
    v
}

/// How many turns the conversation's `history` shows (one page of 50).
pub async fn turns(client: &Client, subject: &str, conversation: &str) -> usize {
    let p = serde_json::json!({"conversation": conversation}).to_string();
    let v = ok(client, subject, &p).await;
    v["turns"].as_array().expect("turns").len()
}
