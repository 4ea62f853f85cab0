//! The async-nats adapter: connect, subscribe to prompts, publish replies,
//! drain; the micro service (`$SRV.*`, `status`) and the client side of the
//! contract (the CLI's [`Caller`]). Architecture invariant: this is the only
//! module that imports `async_nats`; the rest of the daemon sees
//! [`Incoming`], [`Publisher`], [`Service`] and [`Caller`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::header::HeaderName;
use async_nats::{HeaderMap, ServerAddr};
use bytes::Bytes;
use futures::stream::SelectAll;
use futures::StreamExt;
use tracing::{debug, info, warn};

use crate::config::{NatsConfig, ReplyHeaders, SubjectsConfig};
use crate::protocol::traceparent::TraceParent;
use crate::protocol::{PromptHeaders, Reply, ReplyBody};

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
    #[error("cannot connect to NATS at {urls}: {detail} (is a nats-server running there? `[nats] url` / OPENCODE_BRIDGE__NATS__URL says where)")]
    Connect { urls: String, detail: String },
    #[error("cannot subscribe to {subject}: {detail}")]
    Subscribe { subject: String, detail: String },
    #[error("cannot publish to {subject}: {detail}")]
    Publish { subject: String, detail: String },
    #[error("cannot start the NATS micro service {name}: {detail}")]
    Service { name: String, detail: String },
    #[error("the NATS server refused a request on {subject}: {detail}")]
    Refused { subject: String, detail: String },
}

/// Connects with every option of `[nats]`.
pub async fn connect(cfg: &NatsConfig) -> Result<async_nats::Client, BusError> {
    connect_with(cfg, None).await
}

/// [`connect`], also handing every server error (`-ERR`, e.g. a
/// permissions violation) to `errors`.
async fn connect_with(
    cfg: &NatsConfig,
    errors: Option<tokio::sync::broadcast::Sender<String>>,
) -> Result<async_nats::Client, BusError> {
    let mut addrs = Vec::new();
    for url in cfg.urls() {
        let addr: ServerAddr = url.parse().map_err(|e: std::io::Error| BusError::Url {
            url: url.clone(),
            detail: e.to_string(),
        })?;
        addrs.push(addr);
    }
    let urls = cfg.urls().join(",");
    let backoff_urls = urls.clone();
    let mut opts = async_nats::ConnectOptions::new()
        .name(&cfg.name)
        // One line per backoff step, with the URL (async-nats itself only
        // reports a bare "IO error" per failed attempt, logged at debug).
        .reconnect_delay_callback(move |attempt| {
            let delay = reconnect_delay(attempt);
            if attempt > 1 {
                warn!(
                    url = %backoff_urls,
                    attempt = attempt - 1,
                    retry_in = %humantime::format_duration(delay),
                    "NATS not reachable; retrying"
                );
            }
            delay
        })
        .custom_inbox_prefix(&cfg.inbox_prefix)
        .subscription_capacity(cfg.subscription_capacity)
        .client_capacity(cfg.client_capacity)
        .connection_timeout(cfg.connection_timeout)
        .require_tls(cfg.tls_required)
        .event_callback(move |event| {
            let errors = errors.clone();
            let urls = urls.clone();
            async move {
                match event {
                    async_nats::Event::Connected => info!(url = %urls, "NATS connected"),
                    async_nats::Event::ServerError(e) => {
                        warn!(error = %e, "NATS server error");
                        if let Some(tx) = errors {
                            let _ = tx.send(e.to_string());
                        }
                    }
                    async_nats::Event::Disconnected => warn!("NATS disconnected; reconnecting"),
                    async_nats::Event::SlowConsumer(sid) => {
                        warn!(sid, "NATS slow consumer: the server dropped prompts for us")
                    }
                    // A failed connection attempt: the backoff line says it.
                    async_nats::Event::ClientError(e) => debug!(error = %e, "NATS client error"),
                    other => info!(event = %other, "NATS event"),
                }
            }
        });
    if cfg.retry_on_initial_connect {
        opts = opts.retry_on_initial_connect();
        info!(url = %cfg.urls().join(","), "connecting to NATS; retrying until it answers (nats.retry_on_initial_connect)");
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
    let client = opts.connect(addrs).await.map_err(|e| BusError::Connect {
        urls: cfg.url.clone(),
        detail: e.to_string(),
    })?;
    if cfg.retry_on_initial_connect {
        // async-nats returns at once and connects in the background: wait
        // here (a flush is answered only once connected), so the caller can
        // race this against a shutdown signal.
        client.flush().await.map_err(|e| BusError::Connect {
            urls: cfg.url.clone(),
            detail: e.to_string(),
        })?;
    }
    Ok(client)
}

/// Delay before connection attempt `attempt` (1-based): none for the first,
/// then 250 ms doubling to 8 s. Also used between reconnects.
fn reconnect_delay(attempt: usize) -> Duration {
    if attempt <= 1 {
        return Duration::ZERO;
    }
    let exp = u32::try_from(attempt - 2).unwrap_or(u32::MAX).min(5);
    Duration::from_millis(250 * 2u64.pow(exp))
}

/// A prompt as it came off the bus.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub subject: String,
    /// The NATS reply subject (request style), if any.
    pub reply: Option<String>,
    pub headers: PromptHeaders,
    /// A valid W3C `traceparent` header, normalised (an invalid one is
    /// dropped, as the specification says).
    pub traceparent: Option<String>,
    pub payload: Bytes,
}

fn header(h: Option<&HeaderMap>, name: &str) -> Option<String> {
    h.and_then(|h| h.get(name))
        .map(|v| v.as_str().trim().to_string())
        .filter(|v| !v.is_empty())
}

/// A header whose name is matched without regard to case: W3C trace
/// context names are lowercase, but Go's NATS client canonicalises them
/// (`Traceparent`).
fn header_any_case(h: Option<&HeaderMap>, name: &str) -> Option<String> {
    h?.iter()
        .find(|(k, _)| AsRef::<str>::as_ref(*k).eq_ignore_ascii_case(name))
        .and_then(|(_, v)| v.first())
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
            traceparent: header_any_case(h, "traceparent")
                .and_then(|v| TraceParent::parse(&v))
                .map(|t| t.to_string()),
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
        .map_err(publish_failed(&inbox))?;
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

    /// Publishes one reply with its headers (`Trace-Id`, `Reply-Kind`,
    /// `Reply-Seq`, `Nats-Msg-Id`). While NATS is disconnected this waits in
    /// the client's bounded buffer.
    pub async fn publish(&self, subject: &str, reply: &Reply<'_>) -> Result<(), BusError> {
        self.publish_traced(subject, reply, None).await
    }

    /// [`publish`](Self::publish), plus a W3C `traceparent` header.
    pub async fn publish_traced(
        &self,
        subject: &str,
        reply: &Reply<'_>,
        traceparent: Option<&str>,
    ) -> Result<(), BusError> {
        // Static names (no allocation, no validation per reply); the values
        // are the only per-reply allocations async-nats' HeaderMap allows.
        const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
        const TRACE_ID: HeaderName = HeaderName::from_static("Trace-Id");
        const REPLY_KIND: HeaderName = HeaderName::from_static("Reply-Kind");
        const REPLY_SEQ: HeaderName = HeaderName::from_static("Reply-Seq");
        const NATS_MSG_ID: HeaderName = HeaderName::from_static("Nats-Msg-Id");
        let mut h = HeaderMap::new();
        if let Some(t) = traceparent {
            h.insert(TRACEPARENT, t);
        }
        h.insert(TRACE_ID, reply.trace_id);
        let streamed = matches!(
            reply.body,
            ReplyBody::Delta { .. } | ReplyBody::Reasoning { .. }
        );
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
            .publish_with_headers(subject.to_string(), h, Bytes::from(reply.to_json()))
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
fn publish_failed<E: std::fmt::Display>(subject: &str) -> impl FnOnce(E) -> BusError + '_ {
    move |e| BusError::Publish {
        subject: subject.to_string(),
        detail: e.to_string(),
    }
}

/// What the micro service tells `$SRV.INFO` about this daemon.
pub struct ServiceOptions {
    /// The service name (`$SRV.PING.<name>`).
    pub name: String,
    /// A semantic version (the crate's).
    pub version: String,
    pub description: String,
    pub metadata: HashMap<String, String>,
    /// Subject of the `status` endpoint. It has a queue group of its own
    /// per instance, so one request gathers the status of every daemon.
    pub status_subject: String,
}

/// The status document, made on demand (the `status` endpoint, and the
/// `data` of every endpoint in `$SRV.STATS`).
pub type StatusFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// The NATS micro service of this daemon: `$SRV.PING`, `$SRV.INFO` and
/// `$SRV.STATS` (with the status as endpoint data) for free, and the
/// `status` request/reply endpoint.
pub struct Service {
    service: async_nats::service::Service,
    stop: tokio_util::sync::CancellationToken,
    endpoint: tokio::task::JoinHandle<()>,
    id: String,
}

impl Service {
    /// Registers the service and its endpoint; returns once the server has
    /// them.
    pub async fn start(
        publisher: &Publisher,
        opts: ServiceOptions,
        status: StatusFn,
    ) -> Result<Service, BusError> {
        use async_nats::service::ServiceExt;
        let name = opts.name.clone();
        let fail = |detail: String| BusError::Service {
            name: name.clone(),
            detail,
        };
        let for_stats = status.clone();
        let service = publisher
            .client
            .service_builder()
            .description(&opts.description)
            .metadata(opts.metadata)
            .stats_handler(move |_endpoint, _stats| for_stats())
            .start(&opts.name, &opts.version)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let id = service.info().await.id;
        let mut endpoint = service
            .endpoint_builder()
            .name("status")
            .queue_group(&id)
            .add(&opts.status_subject)
            .await
            .map_err(|e| fail(format!("endpoint {}: {e}", opts.status_subject)))?;
        barrier(&publisher.client).await?;
        let stop = tokio_util::sync::CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            loop {
                let req = tokio::select! {
                    biased;
                    _ = stopped.cancelled() => break,
                    r = endpoint.next() => r,
                };
                let Some(req) = req else { break };
                let body = serde_json::to_vec(&status()).unwrap_or_default();
                if let Err(e) = req.respond(Ok(Bytes::from(body))).await {
                    warn!(error = %e, "answering a status request failed");
                }
            }
            let _ = endpoint.stop().await;
        });
        info!(service = %opts.name, %id, status = %opts.status_subject, "micro service registered");
        Ok(Service {
            service,
            stop,
            endpoint: task,
            id,
        })
    }

    /// This instance's id (`$SRV.PING` answers carry it).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Unregisters: no more `$SRV` answers, no more status requests.
    pub async fn stop(self) {
        self.stop.cancel();
        if let Err(e) = self.service.stop().await {
            warn!(error = %e, "stopping the micro service failed");
        }
        let mut endpoint = self.endpoint;
        if tokio::time::timeout(Duration::from_secs(2), &mut endpoint)
            .await
            .is_err()
        {
            endpoint.abort();
        }
    }
}

/// The client side of the contract (the CLI): request-style prompts whose
/// replies stream back to an inbox, scatter-gather requests, plain
/// publishes.
pub struct Caller {
    client: async_nats::Client,
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
            client: connect_with(cfg, Some(errors.clone())).await?,
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
        let sub = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| BusError::Subscribe {
                subject: inbox.clone(),
                detail: e.to_string(),
            })?;
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
