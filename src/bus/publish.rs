//! Publishing replies, with their headers.

use async_nats::header::HeaderName;
use async_nats::HeaderMap;
use bytes::Bytes;
use tracing::warn;

use super::BusError;
use crate::config::ReplyHeaders;
use crate::protocol::agent::Chunk;
use crate::protocol::{Reply, ReplyBody};

// Static names: no allocation and no validation per reply.
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACE_ID: HeaderName = HeaderName::from_static("Trace-Id");
const REPLY_KIND: HeaderName = HeaderName::from_static("Reply-Kind");
const REPLY_SEQ: HeaderName = HeaderName::from_static("Reply-Seq");
const NATS_MSG_ID: HeaderName = HeaderName::from_static("Nats-Msg-Id");

/// What every reply of one turn shares on the wire, built once per turn:
/// its subject (cloned per reply as a reference count, not a copy) and the
/// headers whose values do not change (`Trace-Id`, `traceparent`). A reply
/// clones the map and adds its own: async-nats' `HeaderMap` is a `HashMap`
/// with a `Vec` and a `String` per header, so that is what the API allows
/// (docs/BENCHMARKS.md).
#[derive(Clone, Debug)]
pub struct TurnHeaders {
    subject: async_nats::Subject,
    base: HeaderMap,
}

impl TurnHeaders {
    pub fn new(subject: &str, trace_id: &str, traceparent: Option<&str>) -> Self {
        let mut base = HeaderMap::new();
        if let Some(t) = traceparent {
            base.insert(TRACEPARENT, t);
        }
        base.insert(TRACE_ID, trace_id);
        TurnHeaders {
            subject: async_nats::Subject::from(subject),
            base,
        }
    }
}

/// Publishes replies.
#[derive(Clone)]
pub struct Publisher {
    pub(super) client: async_nats::Client,
    headers: ReplyHeaders,
}

impl Publisher {
    /// A publisher whose replies carry the full header set.
    pub fn new(client: async_nats::Client) -> Self {
        Publisher {
            client,
            headers: ReplyHeaders::Full,
        }
    }

    /// Which headers replies carry (`[subjects] reply_headers`).
    pub fn with_reply_headers(mut self, headers: ReplyHeaders) -> Self {
        self.headers = headers;
        self
    }

    /// The largest payload the server accepts (headers included).
    pub fn max_payload(&self) -> usize {
        self.client.server_info().max_payload
    }

    /// Whether the connection to the server is up now.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Successful reconnects since the first connection.
    pub fn reconnects(&self) -> u64 {
        self.client
            .statistics()
            .connects
            .load(std::sync::atomic::Ordering::Relaxed)
            .saturating_sub(1)
    }

    /// Publishes one reply of a turn with its headers (`Trace-Id`, and with
    /// `reply_headers = "full"` or on any reply but a delta or reasoning,
    /// `Reply-Kind`, `Reply-Seq`, `Nats-Msg-Id`). The subject and the
    /// headers every reply of the turn shares come ready from `turn`, so a
    /// reply costs only its own. While NATS is disconnected this waits in
    /// the client's bounded buffer.
    pub async fn publish_turn(
        &self,
        turn: &TurnHeaders,
        reply: &Reply<'_>,
    ) -> Result<(), BusError> {
        let streamed = matches!(
            reply.body,
            ReplyBody::Delta { .. } | ReplyBody::Reasoning { .. }
        );
        let mut h = turn.base.clone();
        if !(streamed && self.headers == ReplyHeaders::Lean) {
            let seq = reply.seq.to_string();
            let mut msg_id = String::with_capacity(reply.trace_id.len() + 1 + seq.len());
            msg_id.push_str(reply.trace_id);
            msg_id.push('-');
            msg_id.push_str(&seq);
            h.insert(REPLY_KIND, reply.body.kind());
            h.insert(REPLY_SEQ, seq);
            h.insert(NATS_MSG_ID, msg_id);
        }
        self.client
            .publish_with_headers(turn.subject.clone(), h, Bytes::from(reply.to_json()))
            .await
            .map_err(publish_failed(turn.subject.as_str()))
    }

    /// Publishes one message of an agent-protocol reply stream: a chunk
    /// without headers, or the error message with the micro service error
    /// headers (`Nats-Service-Error-Code`, `Nats-Service-Error`).
    pub async fn publish_chunk(&self, subject: &str, chunk: &Chunk) -> Result<(), BusError> {
        let (headers, body) = match chunk {
            Chunk::Data(body) => (None, body.clone()),
            Chunk::Error {
                code,
                description,
                body,
            } => {
                let mut h = HeaderMap::new();
                h.insert(
                    async_nats::service::NATS_SERVICE_ERROR_CODE,
                    code.to_string(),
                );
                h.insert(
                    async_nats::service::NATS_SERVICE_ERROR,
                    description.as_str(),
                );
                (Some(h), body.clone())
            }
        };
        let subject_owned = subject.to_string();
        let sent = match headers {
            Some(h) => {
                self.client
                    .publish_with_headers(subject_owned, h, Bytes::from(body))
                    .await
            }
            None => self.client.publish(subject_owned, Bytes::from(body)).await,
        };
        sent.map_err(publish_failed(subject))
    }

    /// Ends an agent-protocol reply stream: an empty message, no headers.
    pub async fn publish_terminator(&self, subject: &str) -> Result<(), BusError> {
        self.client
            .publish(subject.to_string(), Bytes::new())
            .await
            .map_err(publish_failed(subject))
    }

    /// Publishes a small JSON answer (no reply headers).
    pub async fn publish_raw(&self, subject: &str, body: Vec<u8>) -> Result<(), BusError> {
        self.client
            .publish(subject.to_string(), Bytes::from(body))
            .await
            .map_err(publish_failed(subject))
    }

    /// Pushes buffered publishes to the socket.
    pub async fn flush(&self) {
        if let Err(e) = self.client.flush().await {
            warn!(error = %e, "NATS flush failed");
        }
    }
}

/// Maps a publish error of async-nats to [`BusError::Publish`] on `subject`.
pub(super) fn publish_failed<E: Into<super::Source>>(
    subject: &str,
) -> impl FnOnce(E) -> BusError + '_ {
    move |e| BusError::Publish {
        subject: subject.to_string(),
        source: e.into(),
    }
}
