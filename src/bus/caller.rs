//! The client side of the contract, for the CLI: request-style prompts
//! whose replies stream back to an inbox, scatter-gather requests, plain
//! publishes.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tracing::warn;

use async_nats::HeaderMap;

use super::connect::connect_with;
use super::publish::publish_failed;
use super::subscribe::subscribe_one;
use super::BusError;
use crate::config::NatsConfig;

/// The client side of the contract (the CLI): request-style prompts whose
/// replies stream back to an inbox, scatter-gather requests, plain
/// publishes.
pub struct Caller {
    pub(super) client: async_nats::Client,
    errors: tokio::sync::broadcast::Sender<String>,
}

/// One message on a [`ReplyStream`].
#[derive(Debug)]
pub enum Received {
    /// A reply (its JSON payload).
    Reply(Bytes),
    /// The server says nobody subscribes to the request's subject.
    NoResponders,
    /// The server refused something of this connection (e.g. a
    /// permissions violation on the request's subject or its inbox).
    ServerError(String),
}

/// The replies to one request, in order.
pub struct ReplyStream {
    sub: async_nats::Subscriber,
    errors: tokio::sync::broadcast::Receiver<String>,
}

impl ReplyStream {
    /// The next message; `None` if the connection closed.
    pub async fn next(&mut self) -> Option<Received> {
        let m = tokio::select! {
            m = self.sub.next() => m?,
            Ok(e) = self.errors.recv() => return Some(Received::ServerError(e)),
        };
        if m.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
            return Some(Received::NoResponders);
        }
        Some(Received::Reply(m.payload))
    }
}

impl Caller {
    /// Connects with `[nats]` (auth, TLS, inbox prefix).
    pub async fn connect(cfg: &NatsConfig) -> Result<Caller, BusError> {
        let (errors, _) = tokio::sync::broadcast::channel(16);
        Ok(Caller {
            client: connect_with(cfg, Some(errors.clone()), None).await?,
            errors,
        })
    }

    /// Publishes `payload` with a fresh inbox as its reply subject, and
    /// returns the stream of what comes back. The inbox is subscribed on
    /// the same connection before the publish, so the server routes every
    /// reply to it.
    pub async fn stream(
        &self,
        subject: &str,
        headers: &[(&str, &str)],
        payload: Vec<u8>,
    ) -> Result<ReplyStream, BusError> {
        let errors = self.errors.subscribe();
        let inbox = self.client.new_inbox();
        let sub = subscribe_one(&self.client, &inbox, None).await?;
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(*k, *v);
        }
        self.client
            .publish_with_reply_and_headers(subject.to_string(), inbox, h, Bytes::from(payload))
            .await
            .map_err(publish_failed(subject))?;
        self.flush().await;
        Ok(ReplyStream { sub, errors })
    }

    /// Publishes one message and pushes it to the socket.
    pub async fn publish(&self, subject: &str, payload: Vec<u8>) -> Result<(), BusError> {
        self.client
            .publish(subject.to_string(), Bytes::from(payload))
            .await
            .map_err(publish_failed(subject))?;
        self.flush().await;
        Ok(())
    }

    /// Publishes a durable job and waits for the stream to store it: its
    /// sequence in the stream. Fails when no stream captures `subject`.
    pub async fn publish_job(&self, subject: &str, payload: Vec<u8>) -> Result<u64, BusError> {
        let js = async_nats::jetstream::new(self.client.clone());
        let ack = js
            .publish(subject.to_string(), Bytes::from(payload))
            .await
            .map_err(publish_failed(subject))?
            .await
            .map_err(publish_failed(subject))?;
        Ok(ack.sequence)
    }

    /// Why this NATS server offers no JetStream (turn states, jobs) to
    /// this user, in words naming its version; `None` when it does.
    pub async fn jetstream_missing(&self) -> Option<String> {
        super::jetstream::missing(&self.client).await
    }

    /// Subscribes to `subject` (before anything that answers there is
    /// published): the replies of a job, in order.
    pub async fn listen(&self, subject: &str) -> Result<ReplyStream, BusError> {
        let errors = self.errors.subscribe();
        let sub = subscribe_one(&self.client, subject, None).await?;
        super::subscribe::barrier(&self.client).await?;
        Ok(ReplyStream { sub, errors })
    }

    /// Sends a request that several responders may answer, and collects
    /// the answers until `timeout`, or until `quiet` passed without a new
    /// one after the first. A server error (a permissions violation) ends
    /// it with [`BusError::Refused`].
    pub async fn gather(
        &self,
        subject: &str,
        payload: Vec<u8>,
        timeout: Duration,
        quiet: Duration,
    ) -> Result<Vec<Bytes>, BusError> {
        let mut stream = self.stream(subject, &[], payload).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            let until = if got.is_empty() {
                deadline
            } else {
                deadline.min(tokio::time::Instant::now() + quiet)
            };
            match tokio::time::timeout_at(until, stream.next()).await {
                Ok(Some(Received::Reply(p))) => got.push(p),
                Ok(Some(Received::ServerError(detail))) => {
                    return Err(BusError::Refused {
                        subject: subject.to_string(),
                        detail,
                    })
                }
                Ok(Some(Received::NoResponders)) | Ok(None) | Err(_) => break,
            }
        }
        Ok(got)
    }

    async fn flush(&self) {
        if let Err(e) = self.client.flush().await {
            warn!(error = %e, "NATS flush failed");
        }
    }

    /// Flushes what is buffered and closes the connection.
    pub async fn close(self) {
        self.flush().await;
        let _ = self.client.drain().await;
    }
}
