//! Forwarding a prompt to its conversation's home daemon, and that
//! daemon's own prompt subject (`<instance_prefix>.<id>.prompt`).
//!
//! A forwarded prompt travels as a request: the payload and the prompt
//! headers as they came, the original subject in `Bridge-Subject` and the
//! original reply subject in `Bridge-Reply`. The home daemon answers the
//! request at once (it has taken the prompt, and answers the caller
//! itself); no answer means it did not take it. The `Bridge-*` headers are
//! trusted only on the instance subject, where only daemons may publish
//! (deploy/nats-server.conf).

use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use tracing::{info, warn};

use super::subscribe::subscribe_one;
use super::{barrier, BusError, Incoming, JobMessage};

const SUBJECT: &str = "Bridge-Subject";
const REPLY: &str = "Bridge-Reply";
const FROM: &str = "Bridge-Forwarded-By";
/// A forwarded job: its ack subject and its delivery.
const JOB_ACK: &str = "Bridge-Job-Ack";
const JOB_DELIVERY: &str = "Bridge-Job-Delivery";

/// What another daemon forwarded here (one at a time, never stored: the
/// size of the prompt variant does not matter).
#[allow(clippy::large_enum_variant)]
pub enum Forwarded {
    Prompt(Incoming),
    /// A job it pulled; this daemon settles it (on its ack subject).
    Job(Box<JobMessage>),
}

/// Sends prompts to other daemons.
#[derive(Clone)]
pub struct Forwarder {
    client: async_nats::Client,
    prefix: String,
    me: String,
    timeout: Duration,
}

impl Forwarder {
    pub fn new(client: async_nats::Client, prefix: &str, me: &str, timeout: Duration) -> Self {
        Forwarder {
            client,
            prefix: prefix.to_string(),
            me: me.to_string(),
            timeout,
        }
    }

    /// Where `instance` takes forwarded prompts.
    pub fn subject_of(prefix: &str, instance: &str) -> String {
        format!("{prefix}.{instance}.prompt")
    }

    /// Hands `msg` to `instance`; `Ok` once that daemon took it.
    pub async fn forward(&self, instance: &str, msg: &Incoming) -> Result<(), BusError> {
        self.send(instance, msg, HeaderMap::new()).await
    }

    /// Hands a pulled job to `instance`, which then settles it; `Ok` once
    /// that daemon took it (this one must not settle it any more).
    pub async fn forward_job(&self, instance: &str, job: &JobMessage) -> Result<(), BusError> {
        let Some(ack) = job.ack_subject() else {
            return Err(BusError::Refused {
                subject: job.incoming.subject.clone(),
                detail: "a job without an ack subject cannot be forwarded".into(),
            });
        };
        let mut h = HeaderMap::new();
        h.insert(JOB_ACK, ack);
        let delivery = format!(
            "{} {} {} {}",
            job.delivered, job.stream, job.sequence, job.published_nanos
        );
        h.insert(JOB_DELIVERY, delivery.as_str());
        self.send(instance, &job.incoming, h).await
    }

    async fn send(&self, instance: &str, msg: &Incoming, mut h: HeaderMap) -> Result<(), BusError> {
        let subject = Self::subject_of(&self.prefix, instance);
        h.insert(SUBJECT, msg.subject.as_str());
        if let Some(r) = &msg.reply {
            h.insert(REPLY, r.as_str());
        }
        h.insert(FROM, self.me.as_str());
        let p = &msg.headers;
        for (name, v) in [
            ("Trace-Id", &p.trace_id),
            ("Conversation", &p.conversation),
            ("Model", &p.model),
            ("Agent", &p.agent),
            ("traceparent", &msg.traceparent),
        ] {
            if let Some(v) = v {
                h.insert(name, v.as_str());
            }
        }
        let req = async_nats::Request::new()
            .payload(msg.payload.clone())
            .headers(h)
            .timeout(Some(self.timeout));
        let answer = self
            .client
            .send_request(subject.clone(), req)
            .await
            .map_err(|e| BusError::Publish {
                subject: subject.clone(),
                source: e.into(),
            })?;
        if answer.payload.as_ref() == b"{\"taken\":true}" {
            return Ok(());
        }
        Err(BusError::Refused {
            subject,
            detail: "the daemon did not take the prompt (too many forwarded prompts waiting)"
                .into(),
        })
    }
}

/// `Bridge-Job-Delivery`: delivered, stream, sequence, published (ns).
fn delivery(v: &str) -> Option<(u64, String, u64, i128)> {
    let mut it = v.split(' ');
    let d = it.next()?.parse().ok()?;
    let stream = it.next()?.to_string();
    let seq = it.next()?.parse().ok()?;
    let published = it.next()?.parse().ok()?;
    Some((d, stream, seq, published))
}

/// This daemon's own prompt subject: prompts other daemons forwarded here.
/// A task of its own reads it and tells the forwarding daemon at once
/// whether the prompt was taken, whatever the serve loop is doing (two
/// daemons forwarding to each other never wait on each other's loop).
pub struct InstanceSubscription {
    rx: tokio::sync::mpsc::Receiver<Forwarded>,
    drain: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Forwarded prompts taken but not yet read by the serve loop; beyond
/// this a forward is answered `{"taken":false}` (the forwarder decides
/// again, as for a silent home).
const TAKEN_BOUND: usize = 1024;

impl InstanceSubscription {
    pub async fn subscribe(
        client: &async_nats::Client,
        prefix: &str,
        me: &str,
    ) -> Result<Self, BusError> {
        let subject = Forwarder::subject_of(prefix, me);
        let sub = subscribe_one(client, &subject, None).await?;
        barrier(client).await?;
        info!(%subject, "listening for prompts forwarded by other daemons");
        let (tx, rx) = tokio::sync::mpsc::channel(TAKEN_BOUND);
        let (drain_tx, drain_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(take_forwarded(sub, client.clone(), tx, drain_rx));
        Ok(InstanceSubscription {
            rx,
            drain: Some(drain_tx),
        })
    }

    /// The next forwarded prompt or job, as it first came off the bus
    /// (subject, reply subject and headers restored; `forwarded_by` set).
    pub async fn next(&mut self) -> Option<Forwarded> {
        self.rx.recv().await
    }

    /// Stops taking forwarded prompts (what is on the way is still read).
    pub async fn drain(&mut self) {
        if let Some(d) = self.drain.take() {
            let _ = d.send(());
        }
    }
}

/// Reads the instance subject until drained: each forward is answered
/// `{"taken":true}` once it is in the serve loop's channel.
async fn take_forwarded(
    mut sub: async_nats::Subscriber,
    client: async_nats::Client,
    tx: tokio::sync::mpsc::Sender<Forwarded>,
    mut drain: tokio::sync::oneshot::Receiver<()>,
) {
    let mut draining = false;
    loop {
        let m = tokio::select! {
            _ = &mut drain, if !draining => {
                draining = true;
                if let Err(e) = sub.drain().await {
                    warn!(error = %e, "draining the instance subscription failed");
                }
                continue;
            }
            m = sub.next() => m,
        };
        let Some(m) = m else { break };
        let ack_to = m.reply.clone();
        let Some(f) = forwarded(m, &client) else {
            continue;
        };
        let taken = tx.try_send(f).is_ok();
        if !taken {
            warn!("too many forwarded prompts waiting for the serve loop; refusing one");
        }
        if let Some(r) = ack_to {
            let body: &'static [u8] = if taken {
                b"{\"taken\":true}"
            } else {
                b"{\"taken\":false}"
            };
            let _ = client.publish(r, Bytes::from_static(body)).await;
        }
    }
}

/// A forwarded message as it first came off the bus, or `None` (logged)
/// when it is not a forward.
fn forwarded(m: async_nats::Message, client: &async_nats::Client) -> Option<Forwarded> {
    let h = m.headers.clone().unwrap_or_default();
    let get = |n: &str| h.get(n).map(|v| v.as_str().to_string());
    let Some(original) = get(SUBJECT) else {
        warn!(subject = %m.subject, "a message on the instance subject without Bridge-Subject: ignored");
        return None;
    };
    let mut msg = Incoming::from(m);
    msg.subject = original;
    msg.reply = get(REPLY);
    msg.forwarded_by = Some(get(FROM).unwrap_or_default());
    let job = get(JOB_ACK).zip(get(JOB_DELIVERY).as_deref().and_then(delivery));
    Some(match job {
        Some((ack, d)) => {
            Forwarded::Job(Box::new(JobMessage::forwarded(client.clone(), msg, d, ack)))
        }
        None => Forwarded::Prompt(msg),
    })
}
