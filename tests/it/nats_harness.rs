//! Self-tests of the nats-server harness in `support::nats`.

use std::time::Duration;

use futures::StreamExt;
use serde_json::json;

use crate::support::nats::{self, NatsServer};

const RECV: Duration = Duration::from_secs(10);

async fn expect_sequence(sub: &mut async_nats::Subscriber, n: u32) {
    for i in 0..n {
        let msg = tokio::time::timeout(RECV, sub.next())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for message {i} of {n}"))
            .expect("subscription closed");
        assert_eq!(msg.payload, i.to_string().as_bytes(), "message {i}");
    }
}

async fn publish_sequence(client: &async_nats::Client, subject: &'static str, n: u32) {
    for i in 0..n {
        client
            .publish(subject, i.to_string().into())
            .await
            .expect("publish");
    }
    client.flush().await.expect("flush");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_everything_and_survives_restart() {
    let mut server = NatsServer::start();
    assert_eq!(server.url(), format!("nats://127.0.0.1:{}", server.port()));
    let sub_client = nats::client(&server.url()).await;
    let pub_client = nats::client(&server.url()).await;

    let mut sub = nats::subscribe_ready(&sub_client, "harness.seq").await;
    publish_sequence(&pub_client, "harness.seq", 1000).await;
    expect_sequence(&mut sub, 1000).await;

    let port = server.port();
    server.kill();
    assert!(!server.is_running());
    server.restart();
    assert!(server.is_running());
    assert_eq!(server.port(), port);

    nats::wait_connected(&sub_client, RECV).await;
    nats::wait_connected(&pub_client, RECV).await;
    // The client re-sends its SUBs on reconnect; the barrier proves the server
    // has them before we publish again.
    nats::barrier(&sub_client).await;
    publish_sequence(&pub_client, "harness.seq", 100).await;
    expect_sequence(&mut sub, 100).await;

    // A brand-new connection works too.
    let late = nats::client(&server.url()).await;
    let mut late_sub = nats::subscribe_ready(&late, "harness.late").await;
    publish_sequence(&pub_client, "harness.late", 10).await;
    expect_sequence(&mut late_sub, 10).await;
}

#[tokio::test]
async fn collect_until_terminal_stops_at_final_and_catches_trailing() {
    let server = NatsServer::start();
    let client = nats::client(&server.url()).await;
    let mut sub = nats::subscribe_ready(&client, "harness.replies").await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Trace-Seq", "1");
    let body = |v: serde_json::Value| v.to_string().into();
    client
        .publish_with_headers("harness.replies", headers, body(json!({"kind": "ack"})))
        .await
        .unwrap();
    client
        .publish(
            "harness.replies",
            body(json!({"kind": "delta", "text": "hi"})),
        )
        .await
        .unwrap();
    client
        .publish("harness.replies", body(json!({"kind": "final"})))
        .await
        .unwrap();
    client
        .publish("harness.replies", "not json".into())
        .await
        .unwrap();
    client.flush().await.unwrap();

    let got = nats::collect_until_terminal(&mut sub, RECV).await;
    let kinds: Vec<_> = got.iter().map(|(_, v)| v["kind"].clone()).collect();
    assert_eq!(
        kinds,
        [json!("ack"), json!("delta"), json!("final"), json!(null)]
    );
    assert_eq!(got[3].1, json!("not json"));
    let seq = got[0].0.as_ref().and_then(|h| h.get("Trace-Seq"));
    assert_eq!(seq.map(|v| v.as_str()), Some("1"));
    assert!(got[1].0.is_none());
}

#[tokio::test]
async fn start_with_config_applies_authorization() {
    let server = NatsServer::start_with_config(
        "authorization { users = [ { user: bridge, password: s3cret } ] }\n",
    );
    let denied = async_nats::ConnectOptions::new()
        .max_reconnects(1)
        .connect(server.url())
        .await;
    assert!(denied.is_err(), "connect without credentials must fail");
    let client =
        async_nats::ConnectOptions::with_user_and_password("bridge".into(), "s3cret".into())
            .connect(server.url())
            .await
            .expect("connect with credentials");
    let mut sub = nats::subscribe_ready(&client, "harness.auth").await;
    client.publish("harness.auth", "x".into()).await.unwrap();
    let msg = tokio::time::timeout(RECV, sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(msg.payload, "x");
}
