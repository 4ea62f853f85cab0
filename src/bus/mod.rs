//! The async-nats adapter: connect, subscribe to prompts, publish replies,
//! drain. Architecture invariant: this is the only module that imports
//! `async_nats`; the rest of the daemon sees [`Incoming`] and [`Publisher`].

use std::time::Duration;

use async_nats::{HeaderMap, ServerAddr};
use bytes::Bytes;
use futures::stream::SelectAll;
use futures::StreamExt;
use tracing::{info, warn};

use crate::config::{NatsConfig, SubjectsConfig};
use crate::protocol::{PromptHeaders, Reply};

/// What went wrong on the NATS side.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("NATS server URL {url:?} is invalid: {detail}")]
    Url { url: String, detail: String },
    #[error("cannot read NATS credentials file {path}: {source}")]
    Credentials {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot connect to NATS at {urls}: {detail}")]
    Connect { urls: String, detail: String },
    #[error("cannot subscribe to {subject}: {detail}")]
    Subscribe { subject: String, detail: String },
    #[error("cannot publish to {subject}: {detail}")]
    Publish { subject: String, detail: String },
}

/// Connects with every option of `[nats]`.
pub async fn connect(cfg: &NatsConfig) -> Result<async_nats::Client, BusError> {
    let mut addrs = Vec::new();
    for url in cfg.urls() {
        let addr: ServerAddr = url.parse().map_err(|e: std::io::Error| BusError::Url {
            url: url.clone(),
            detail: e.to_string(),
        })?;
        addrs.push(addr);
    }
    let mut opts = async_nats::ConnectOptions::new()
        .name(&cfg.name)
        .subscription_capacity(cfg.subscription_capacity)
        .client_capacity(cfg.client_capacity)
        .connection_timeout(cfg.connection_timeout)
        .require_tls(cfg.tls_required)
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => info!("NATS connected"),
                async_nats::Event::Disconnected => warn!("NATS disconnected; reconnecting"),
                async_nats::Event::SlowConsumer(sid) => {
                    warn!(sid, "NATS slow consumer: the server dropped prompts for us")
                }
                other => info!(event = %other, "NATS event"),
            }
        });
    if cfg.retry_on_initial_connect {
        opts = opts.retry_on_initial_connect();
    }
    if let Some(path) = &cfg.credentials_file {
        opts = opts
            .credentials_file(path)
            .await
            .map_err(|source| BusError::Credentials {
                path: path.display().to_string(),
                source,
            })?;
    }
    if let Some(seed) = &cfg.nkey {
        opts = opts.nkey(seed.clone());
    }
    if let Some(token) = &cfg.token {
        opts = opts.token(token.clone());
    }
    if let (Some(u), Some(p)) = (&cfg.user, &cfg.password) {
        opts = opts.user_and_password(u.clone(), p.clone());
    }
    if let Some(ca) = &cfg.tls_ca_file {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let (Some(c), Some(k)) = (&cfg.tls_cert_file, &cfg.tls_key_file) {
        opts = opts.add_client_certificate(c.clone(), k.clone());
    }
    opts.connect(addrs).await.map_err(|e| BusError::Connect {
        urls: cfg.url.clone(),
        detail: e.to_string(),
    })
}

/// A prompt as it came off the bus.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub subject: String,
    /// The NATS reply subject (request style), if any.
    pub reply: Option<String>,
    pub headers: PromptHeaders,
    pub payload: Bytes,
}

fn header(h: Option<&HeaderMap>, name: &str) -> Option<String> {
    h.and_then(|h| h.get(name))
        .map(|v| v.as_str().trim().to_string())
        .filter(|v| !v.is_empty())
}

impl From<async_nats::Message> for Incoming {
    fn from(m: async_nats::Message) -> Self {
        let h = m.headers.as_ref();
        Incoming {
            subject: m.subject.to_string(),
            reply: m.reply.map(|r| r.to_string()),
            headers: PromptHeaders {
                trace_id: header(h, "Trace-Id"),
                conversation: header(h, "Conversation"),
                model: header(h, "Model"),
                agent: header(h, "Agent"),
            },
            payload: m.payload,
        }
    }
}

/// The prompt subscriptions (`<prompt>` and `<prompt>.>`, queue group).
pub struct PromptSubscription {
    subs: SelectAll<async_nats::Subscriber>,
    drained: bool,
    client: async_nats::Client,
    subjects: Vec<String>,
}

impl PromptSubscription {
    pub async fn subscribe(
        client: &async_nats::Client,
        cfg: &SubjectsConfig,
    ) -> Result<Self, BusError> {
        let subjects = vec![cfg.prompt.clone(), format!("{}.>", cfg.prompt)];
        let mut subs = Vec::new();
        for s in &subjects {
            let sub = client
                .queue_subscribe(s.clone(), cfg.queue_group.clone())
                .await
                .map_err(|e| BusError::Subscribe {
                    subject: s.clone(),
                    detail: e.to_string(),
                })?;
            subs.push(sub);
        }
        barrier(client).await?;
        info!(subjects = ?subjects, queue_group = %cfg.queue_group, "listening for prompts");
        Ok(PromptSubscription {
            subs: futures::stream::select_all(subs),
            drained: false,
            client: client.clone(),
            subjects,
        })
    }

    /// The next prompt; `None` once drained and empty (or the connection
    /// closed).
    pub async fn next(&mut self) -> Option<Incoming> {
        self.subs.next().await.map(Incoming::from)
    }

    /// Stops taking new prompts: unsubscribes at the server but delivers
    /// what is already on the way (keep calling [`next`](Self::next) until
    /// `None`).
    pub async fn drain(&mut self) {
        if self.drained {
            return;
        }
        self.drained = true;
        for sub in self.subs.iter_mut() {
            if let Err(e) = sub.drain().await {
                warn!(error = %e, "draining a prompt subscription failed");
            }
        }
        let _ = self.client.flush().await;
        info!(subjects = ?self.subjects, "draining prompt subscriptions");
    }
}

/// A plain subscription to a control subject (every daemon listens).
pub struct ControlSubscription {
    subs: SelectAll<async_nats::Subscriber>,
}

impl ControlSubscription {
    pub async fn subscribe(
        client: &async_nats::Client,
        subjects: &[String],
    ) -> Result<Self, BusError> {
        let mut subs = Vec::new();
        for subject in subjects {
            let sub = client
                .subscribe(subject.clone())
                .await
                .map_err(|e| BusError::Subscribe {
                    subject: subject.clone(),
                    detail: e.to_string(),
                })?;
            subs.push(sub);
        }
        barrier(client).await?;
        Ok(ControlSubscription {
            subs: futures::stream::select_all(subs),
        })
    }

    pub async fn next(&mut self) -> Option<Incoming> {
        self.subs.next().await.map(Incoming::from)
    }
}

/// Proves the server has registered our subscriptions: a round trip through
/// a fresh inbox on the same connection (`flush()` alone only writes bytes).
pub async fn barrier(client: &async_nats::Client) -> Result<(), BusError> {
    let inbox = client.new_inbox();
    let mut sub = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| BusError::Subscribe {
            subject: inbox.clone(),
            detail: e.to_string(),
        })?;
    client
        .publish(inbox.clone(), Bytes::new())
        .await
        .map_err(|e| BusError::Publish {
            subject: inbox.clone(),
            detail: e.to_string(),
        })?;
    let _ = client.flush().await;
    match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
        Ok(Some(_)) => Ok(()),
        _ => Err(BusError::Subscribe {
            subject: inbox,
            detail: "the server did not confirm the subscription within 10s".into(),
        }),
    }
}

/// Publishes replies.
#[derive(Clone)]
pub struct Publisher {
    client: async_nats::Client,
}

impl Publisher {
    pub fn new(client: async_nats::Client) -> Self {
        Publisher { client }
    }

    /// The largest payload the server accepts (headers included).
    pub fn max_payload(&self) -> usize {
        self.client.server_info().max_payload
    }

    /// Publishes one reply with its headers (`Trace-Id`, `Reply-Kind`,
    /// `Reply-Seq`, `Nats-Msg-Id`). While NATS is disconnected this waits in
    /// the client's bounded buffer.
    pub async fn publish(&self, subject: &str, reply: &Reply<'_>) -> Result<(), BusError> {
        let mut h = HeaderMap::new();
        h.insert("Trace-Id", reply.trace_id);
        h.insert("Reply-Kind", reply.body.kind());
        h.insert("Reply-Seq", reply.seq.to_string().as_str());
        h.insert(
            "Nats-Msg-Id",
            format!("{}-{}", reply.trace_id, reply.seq).as_str(),
        );
        self.client
            .publish_with_headers(subject.to_string(), h, Bytes::from(reply.to_json()))
            .await
            .map_err(|e| BusError::Publish {
                subject: subject.to_string(),
                detail: e.to_string(),
            })
    }

    /// Publishes a small JSON answer (no reply headers).
    pub async fn publish_raw(&self, subject: &str, body: Vec<u8>) -> Result<(), BusError> {
        self.client
            .publish(subject.to_string(), Bytes::from(body))
            .await
            .map_err(|e| BusError::Publish {
                subject: subject.to_string(),
                detail: e.to_string(),
            })
    }

    /// Pushes buffered publishes to the socket.
    pub async fn flush(&self) {
        if let Err(e) = self.client.flush().await {
            warn!(error = %e, "NATS flush failed");
        }
    }
}
