//! Runs the bridge in-process (`app::run`) against a given NATS and OpenCode,
//! with a shutdown trigger the test controls; and helpers to send prompts
//! and collect their replies.

use std::time::Duration;

use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures::StreamExt;
use opencode_nats_bridge::app;
use opencode_nats_bridge::config::Config;
use opencode_nats_bridge::protocol::ReplyOwned;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::nats::{collect_until_terminal, subscribe_ready, Reply};

pub struct Bridge {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), app::AppError>>>,
}

/// A config for tests: the given NATS and OpenCode, short deadlines.
pub fn test_config(nats_url: &str, opencode_url: &str, password: Option<&str>) -> Config {
    let mut c = Config::default();
    c.nats.url = nats_url.to_string();
    c.nats.retry_on_initial_connect = false;
    c.opencode.base_url = Some(opencode_url.to_string());
    c.opencode.password = password.map(str::to_string);
    c.opencode.reconnect_min = Duration::from_millis(50);
    c.opencode.reconnect_max = Duration::from_millis(500);
    c.turn.first_event_timeout = Duration::from_secs(30);
    c.turn.idle_timeout = Duration::from_secs(30);
    c.turn.turn_timeout = Duration::from_secs(60);
    c.turn.abort_timeout = Duration::from_secs(2);
    c.shutdown.grace = Duration::from_secs(5);
    // On in tests/it/agent_protocol.rs; elsewhere one service per daemon.
    c.agent_protocol.enabled = false;
    c.agent_protocol.name = Some("test".into());
    c.validate().expect("test config is valid");
    c
}

impl Bridge {
    /// Starts the bridge and waits until its subscriptions are live.
    pub async fn start(config: Config) -> Bridge {
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = tokio::spawn(app::run(
            config,
            async move {
                let _ = stop_rx.await;
            },
            Some(ready_tx),
        ));
        match tokio::time::timeout(Duration::from_secs(30), ready_rx).await {
            Ok(Ok(_)) => {}
            _ => {
                let res = if task.is_finished() {
                    format!("{:?}", task.await)
                } else {
                    "still starting".to_string()
                };
                panic!("the bridge did not become ready: {res}");
            }
        }
        Bridge {
            stop: Some(stop_tx),
            task: Some(task),
        }
    }

    /// Triggers a graceful shutdown and waits for `app::run` to return.
    pub async fn stop(mut self) -> Result<(), app::AppError> {
        self.stop_inner().await
    }

    async fn stop_inner(&mut self) -> Result<(), app::AppError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.task.take() {
            Some(t) => tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("the bridge stops within 30s")
                .expect("the bridge task did not panic"),
            None => Ok(()),
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Sends `payload` request-style (to a fresh inbox) and collects the replies
/// until the terminal one.
pub async fn request(
    client: &Client,
    subject: &str,
    payload: &str,
    timeout: Duration,
) -> Vec<Reply> {
    request_with_headers(client, subject, HeaderMap::new(), payload, timeout).await
}

pub async fn request_with_headers(
    client: &Client,
    subject: &str,
    headers: HeaderMap,
    payload: &str,
    timeout: Duration,
) -> Vec<Reply> {
    let inbox = client.new_inbox();
    let mut sub = subscribe_ready(client, inbox.clone()).await;
    client
        .publish_with_reply_and_headers(
            subject.to_string(),
            inbox,
            headers,
            Bytes::from(payload.to_string()),
        )
        .await
        .expect("publish prompt");
    client.flush().await.expect("flush");
    collect_until_terminal(&mut sub, timeout).await
}

/// The bodies only.
pub fn bodies(replies: &[Reply]) -> Vec<Value> {
    replies.iter().map(|(_, v)| v.clone()).collect()
}

/// The concatenated `delta` contents.
pub fn delta_text(replies: &[Reply]) -> String {
    replies
        .iter()
        .filter(|(_, v)| v["kind"] == "delta")
        .map(|(_, v)| v["content"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The terminal reply.
pub fn terminal(replies: &[Reply]) -> &Value {
    let (_, last) = replies.last().expect("at least one reply");
    last
}

/// Reads reply `i` through the contract's one definition
/// ([`ReplyOwned`]): it must read, and write back to the same JSON (no field
/// the contract does not know, none missing).
pub fn assert_typed(i: usize, v: &Value) -> ReplyOwned {
    let typed: ReplyOwned = serde_json::from_value(v.clone())
        .unwrap_or_else(|e| panic!("reply {i} is not a typed reply ({e}): {v}"));
    assert_eq!(
        &serde_json::to_value(&typed).expect("a typed reply serialises"),
        v,
        "reply {i} does not write back as it was read"
    );
    typed
}

/// Checks the contract every turn keeps: every reply reads as the typed
/// contract, seq 0.. without gaps, one trace id, exactly one terminal reply
/// and it is last, headers match the body, and (for a final) the deltas add
/// up to its content.
pub fn assert_well_formed(replies: &[Reply]) {
    assert!(!replies.is_empty(), "no replies");
    let trace = replies[0].1["trace_id"]
        .as_str()
        .expect("trace_id")
        .to_string();
    let mut terminals = 0;
    for (i, (h, v)) in replies.iter().enumerate() {
        let typed = assert_typed(i, v);
        assert_eq!(typed.seq, i as u64, "seq gap at {i}: {replies:#?}");
        assert_eq!(typed.trace_id, trace);
        let kind = typed.body.kind();
        assert!(
            [
                "delta",
                "reasoning",
                "tool_call",
                "tool_result",
                "status",
                "final",
                "error"
            ]
            .contains(&kind),
            "unknown kind {kind}"
        );
        if kind == "final" || kind == "error" {
            terminals += 1;
            assert_eq!(
                i,
                replies.len() - 1,
                "a reply follows the terminal one: {replies:#?}"
            );
        }
        let h = h.as_ref().expect("reply headers");
        assert_eq!(h.get("Trace-Id").map(|v| v.as_str()), Some(trace.as_str()));
        assert_eq!(h.get("Reply-Kind").map(|v| v.as_str()), Some(kind));
        assert_eq!(
            h.get("Reply-Seq").map(|v| v.as_str()),
            Some(i.to_string().as_str())
        );
        assert_eq!(
            h.get("Nats-Msg-Id").map(|v| v.as_str().to_string()),
            Some(format!("{trace}-{i}"))
        );
    }
    assert_eq!(terminals, 1, "exactly one terminal reply");
    let last = terminal(replies);
    if last["kind"] == "final" {
        assert_eq!(
            delta_text(replies),
            last["content"].as_str().unwrap(),
            "deltas != final.content"
        );
    }
}

/// Reads whatever arrives on `sub` within `wait`.
pub async fn drain_for(sub: &mut async_nats::Subscriber, wait: Duration) -> Vec<Value> {
    let mut out = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(wait, sub.next()).await {
        let body = serde_json::from_slice(&m.payload).unwrap_or(Value::Null);
        super::leaks::assert_no_leak(&body);
        out.push(body);
    }
    out
}
