//! The jobs stream, as the daemon uses it (docs/CLUSTER.md, "Durable
//! jobs"): a JetStream work-queue stream and one durable pull consumer
//! that every daemon shares, both created when missing; one job pulled at
//! a time; and a job's fate (acknowledged, in progress, delivered again
//! later, terminated).

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use async_nats::jetstream::message::Acker;
use async_nats::jetstream::{stream, AckKind};
use futures::StreamExt;

use super::{BusError, Incoming, JetStream};

/// Where jobs live (`[jetstream]`).
#[derive(Debug, Clone)]
pub struct JobSettings {
    pub stream: String,
    /// The stream captures `<subject>` and `<subject>.>`.
    pub subject: String,
    pub consumer: String,
    pub ack_wait: Duration,
    pub max_deliver: i64,
    /// The stream's size limit; a full stream refuses new jobs (the
    /// publisher's JetStream ack says so) instead of dropping stored ones.
    pub max_bytes: u64,
    /// Tenants with a stream of their own (`[shares] job_tenants`):
    /// `<stream>_<tenant>` on `<subject>.<tenant>[.>]`, each of
    /// `tenant_bytes`; `stream` then captures `<subject>` alone.
    pub tenants: Vec<String>,
    pub tenant_bytes: u64,
}

/// The shared durable consumer of each jobs stream (one, or one per
/// tenant besides the operator's), pulled in turn.
pub struct JobQueue {
    consumers: Vec<PullConsumer>,
    /// Which consumer is asked first next time (round robin).
    turn: std::sync::atomic::AtomicUsize,
}

/// One delivery of a job: the message as a prompt would arrive (without
/// a reply subject: a JetStream publish has none), and how to settle it.
pub struct JobMessage {
    pub incoming: Incoming,
    /// 1 on the first delivery.
    pub delivered: u64,
    pub stream: String,
    pub sequence: u64,
    /// When the stream stored it (Unix nanoseconds).
    pub published_nanos: i128,
    acker: Settler,
}

/// How a delivery is settled: through async-nats on the daemon that pulled
/// it, or, for a job forwarded to its conversation's home (`bus::forward`),
/// by publishing JetStream's ack protocol (`+ACK`, `+WPI`, `-NAK`,
/// `+TERM`) on its ack subject.
enum Settler {
    Pulled {
        acker: Acker,
        subject: Option<String>,
    },
    Forwarded {
        client: async_nats::Client,
        subject: String,
    },
}

fn failed(what: impl Into<String>) -> impl FnOnce(super::Source) -> BusError {
    let what = what.into();
    move |source| BusError::JetStream { what, source }
}

impl JobQueue {
    /// The stream and the consumer, created when missing (the stream in
    /// `[jetstream] replicas` copies; the consumer follows it); existing
    /// ones are used as they are (an operator may have tuned them; another
    /// replica count is logged).
    pub async fn open(js: &JetStream, s: &JobSettings) -> Result<JobQueue, BusError> {
        let mut consumers = Vec::with_capacity(1 + s.tenants.len());
        let shared = if s.tenants.is_empty() {
            vec![s.subject.clone(), format!("{}.>", s.subject)]
        } else {
            vec![s.subject.clone()]
        };
        consumers.push(Self::one(js, s, &s.stream, shared, s.max_bytes).await?);
        for t in &s.tenants {
            let subjects = vec![format!("{}.{t}", s.subject), format!("{}.{t}.>", s.subject)];
            let name = format!("{}_{t}", s.stream);
            consumers.push(Self::one(js, s, &name, subjects, s.tenant_bytes).await?);
        }
        Ok(JobQueue {
            consumers,
            turn: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// One work-queue stream `name` on `subjects` and its consumer.
    async fn one(
        js: &JetStream,
        s: &JobSettings,
        name: &str,
        subjects: Vec<String>,
        max_bytes: u64,
    ) -> Result<PullConsumer, BusError> {
        let stream = js
            .ctx
            .get_or_create_stream(stream::Config {
                name: name.to_string(),
                subjects,
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                max_bytes: i64::try_from(max_bytes).unwrap_or(i64::MAX),
                discard: stream::DiscardPolicy::New,
                num_replicas: js.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| {
                js.create_failed(format!("create the jobs stream {name} (streams may not overlap: with [shares] job_tenants, a jobs_stream that captures every tenant's jobs must be drained and deleted first)"), e.into())
            })?;
        js.report_replicas("stream", name, name).await;
        let consumer = stream
            .get_or_create_consumer(
                &s.consumer,
                pull::Config {
                    durable_name: Some(s.consumer.clone()),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: s.ack_wait,
                    max_deliver: s.max_deliver,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| failed(format!("create the jobs consumer {}", s.consumer))(e.into()))?;
        Ok(consumer)
    }

    /// The next job, waiting at most `wait` for one (`None`: none came).
    /// Dropping it unsubscribes the pull's inbox, and the server drops a
    /// pull nobody listens to; only a job already on the wire at that
    /// instant waits out `ack_wait` before it goes to another daemon.
    pub async fn next(&self, wait: Duration) -> Result<Option<JobMessage>, BusError> {
        use std::sync::atomic::Ordering;
        let n = self.consumers.len();
        // Each stream is asked in turn, `wait` shared among them.
        let each = (wait / n as u32).max(Duration::from_millis(100));
        let first = self.turn.load(Ordering::Relaxed);
        for k in 0..n {
            let i = (first + k) % n;
            if let Some(job) = Self::pull(&self.consumers[i], each).await? {
                self.turn.store(i + 1, Ordering::Relaxed);
                return Ok(Some(job));
            }
        }
        Ok(None)
    }

    async fn pull(consumer: &PullConsumer, wait: Duration) -> Result<Option<JobMessage>, BusError> {
        let mut batch = consumer
            .batch()
            .max_messages(1)
            .expires(wait)
            .messages()
            .await
            .map_err(|e| failed("pull a job")(e.into()))?;
        match batch.next().await {
            None => Ok(None),
            Some(Err(e)) => Err(failed("pull a job")(e)),
            Some(Ok(m)) => {
                let info = m.info().map_err(failed("read a job's delivery"))?;
                let (delivered, stream, sequence) = (
                    info.delivered.max(1) as u64,
                    info.stream.to_string(),
                    info.stream_sequence,
                );
                let published_nanos = info.published.unix_timestamp_nanos();
                let subject = m.message.reply.as_ref().map(|r| r.to_string());
                let (message, acker) = m.split();
                Ok(Some(JobMessage {
                    incoming: Incoming::from(message),
                    delivered,
                    stream,
                    sequence,
                    published_nanos,
                    acker: Settler::Pulled { acker, subject },
                }))
            }
        }
    }
}

impl JobMessage {
    /// A job another daemon pulled and forwarded here, settled on its ack
    /// subject.
    pub(super) fn forwarded(
        client: async_nats::Client,
        incoming: Incoming,
        (delivered, stream, sequence, published_nanos): (u64, String, u64, i128),
        ack_subject: String,
    ) -> JobMessage {
        JobMessage {
            incoming,
            delivered,
            stream,
            sequence,
            published_nanos,
            acker: Settler::Forwarded {
                client,
                subject: ack_subject,
            },
        }
    }

    /// Where JetStream takes this delivery's acknowledgements.
    pub fn ack_subject(&self) -> Option<&str> {
        match &self.acker {
            Settler::Pulled { subject, .. } => subject.as_deref(),
            Settler::Forwarded { subject, .. } => Some(subject),
        }
    }

    async fn settle(&self, kind: AckKind, confirm: bool, what: &str) -> Result<(), BusError> {
        match &self.acker {
            Settler::Pulled { acker, .. } if confirm => acker.double_ack_with(kind).await,
            Settler::Pulled { acker, .. } => acker.ack_with(kind).await,
            Settler::Forwarded { client, subject } => client
                .publish(subject.clone(), ack_protocol(kind).into())
                .await
                .map_err(Into::into),
        }
        .map_err(failed(what))
    }

    /// Done: removed from the stream (the server confirms it).
    pub async fn ack(&self) -> Result<(), BusError> {
        self.settle(AckKind::Ack, true, "acknowledge a job").await
    }

    /// Still running: `ack_wait` starts again.
    pub async fn in_progress(&self) -> Result<(), BusError> {
        self.settle(AckKind::Progress, false, "mark a job in progress")
            .await
    }

    /// Not served: delivered again after `delay` (to any daemon).
    pub async fn nak(&self, delay: Option<Duration>) -> Result<(), BusError> {
        self.settle(AckKind::Nak(delay), false, "hand a job back")
            .await
    }

    /// Never to be delivered again (its terminal reply is out).
    pub async fn term(&self) -> Result<(), BusError> {
        self.settle(AckKind::Term, true, "terminate a job").await
    }
}

/// JetStream's ack protocol, as a message body.
fn ack_protocol(kind: AckKind) -> String {
    match kind {
        AckKind::Ack => "+ACK".into(),
        AckKind::Progress => "+WPI".into(),
        AckKind::Term => "+TERM".into(),
        AckKind::Nak(None) => "-NAK".into(),
        AckKind::Nak(Some(d)) => format!("-NAK {{\"delay\":{}}}", d.as_nanos()),
        AckKind::Next => "+NXT".into(),
    }
}
