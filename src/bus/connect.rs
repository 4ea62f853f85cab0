//! Connecting with every option of `[nats]`: auth, TLS, capacities, one log
//! line per NATS event and per backoff step.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::ServerAddr;
use tracing::{debug, info, warn};

use super::BusError;
use crate::config::NatsConfig;
use crate::metrics::Metrics;

/// Connects with every option of `[nats]`.
pub async fn connect(cfg: &NatsConfig) -> Result<async_nats::Client, BusError> {
    connect_with(cfg, None, None).await
}

/// [`connect`], counting every message the client drops for a full
/// subscription buffer (a slow consumer) in `metrics`.
pub async fn connect_observed(
    cfg: &NatsConfig,
    metrics: Arc<Metrics>,
) -> Result<async_nats::Client, BusError> {
    connect_with(cfg, None, Some(metrics)).await
}

/// [`connect`], also handing every server error (`-ERR`, e.g. a
/// permissions violation) to `errors`.
pub(super) async fn connect_with(
    cfg: &NatsConfig,
    errors: Option<tokio::sync::broadcast::Sender<String>>,
    metrics: Option<Arc<Metrics>>,
) -> Result<async_nats::Client, BusError> {
    let mut addrs = Vec::new();
    for url in cfg.urls() {
        let addr: ServerAddr = url.parse().map_err(|e: std::io::Error| BusError::Url {
            url: url.clone(),
            source: e.into(),
        })?;
        addrs.push(addr);
    }
    let urls = cfg.urls().join(",");
    let failures = Arc::new(Failures {
        addrs: addrs.clone(),
        count: AtomicUsize::new(0),
    });
    let mut opts = async_nats::ConnectOptions::new()
        .name(&cfg.name)
        // One line per failed attempt (logged from the event it raises,
        // with the cause: see `Failures::log`).
        .reconnect_delay_callback(reconnect_delay)
        .custom_inbox_prefix(&cfg.inbox_prefix)
        .subscription_capacity(cfg.subscription_capacity)
        .client_capacity(cfg.client_capacity)
        .connection_timeout(cfg.connection_timeout)
        .require_tls(cfg.tls_required)
        .event_callback(move |event| {
            let errors = errors.clone();
            let urls = urls.clone();
            let metrics = metrics.clone();
            let failures = failures.clone();
            async move { log_event(event, &urls, errors, metrics, &failures).await }
        });
    if cfg.retry_on_initial_connect {
        opts = opts.retry_on_initial_connect();
        info!(url = %cfg.urls().join(","), "connecting to NATS; retrying until it answers (nats.retry_on_initial_connect)");
    }
    let opts = with_auth(opts, cfg).await?;
    let client = opts.connect(addrs).await.map_err(|e| BusError::Connect {
        urls: cfg.url.clone(),
        source: e.into(),
    })?;
    if cfg.retry_on_initial_connect {
        // async-nats returns at once and connects in the background: wait
        // here (a flush is answered only once connected), so the caller can
        // race this against a shutdown signal.
        client.flush().await.map_err(|e| BusError::Connect {
            urls: cfg.url.clone(),
            source: e.into(),
        })?;
    }
    Ok(client)
}

/// One log line per NATS event; server errors also go to `errors`.
async fn log_event(
    event: async_nats::Event,
    urls: &str,
    errors: Option<tokio::sync::broadcast::Sender<String>>,
    metrics: Option<Arc<Metrics>>,
    failures: &Failures,
) {
    match event {
        async_nats::Event::Connected => {
            failures.count.store(0, Ordering::Relaxed);
            info!(url = %urls, "NATS connected")
        }
        async_nats::Event::ServerError(e) => {
            warn!(error = %e, "NATS server error");
            if let Some(tx) = errors {
                let _ = tx.send(e.to_string());
            }
        }
        async_nats::Event::Disconnected => warn!("NATS disconnected; reconnecting"),
        async_nats::Event::SlowConsumer(sid) => {
            if let Some(m) = metrics {
                m.dropped_message();
            }
            tracing::error!(sid, "NATS slow consumer: a subscription's buffer was full and a message was dropped ([nats] subscription_capacity; counted in status and metrics)")
        }
        // A failed connection attempt: one line with its cause.
        async_nats::Event::ClientError(async_nats::ClientError::Other(kind)) => {
            failures.log(urls, &kind).await
        }
        async_nats::Event::ClientError(e) => debug!(error = %e, "NATS client error"),
        other => info!(event = %other, "NATS event"),
    }
}

/// Credentials, nkey, token, user/password and TLS of `[nats]`.
async fn with_auth(
    mut opts: async_nats::ConnectOptions,
    cfg: &NatsConfig,
) -> Result<async_nats::ConnectOptions, BusError> {
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
    Ok(opts)
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

/// Failed connection attempts since the last connect, told one line each
/// with their cause. async-nats reports only the kind of a failure ("DNS
/// error", "IO error"), so a name that does not resolve is resolved again
/// here, for the system's words.
struct Failures {
    addrs: Vec<ServerAddr>,
    count: AtomicUsize,
}

impl Failures {
    async fn log(&self, urls: &str, kind: &str) {
        let attempt = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        let mut causes = Vec::new();
        for addr in &self.addrs {
            causes.push(cause(addr, kind).await);
        }
        warn!(
            url = %urls,
            attempt,
            retry_in = %humantime::format_duration(reconnect_delay(attempt + 1)),
            error = %causes.join("; "),
            "NATS not reachable; retrying"
        );
    }
}

/// Why `addr` cannot be reached: its name does not resolve (in the
/// system's words), or where it resolves to the connection failed (the
/// kind of failure async-nats reports, in words).
async fn cause(addr: &ServerAddr, kind: &str) -> String {
    let (host, port) = (addr.host(), addr.port());
    let found = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::lookup_host((host, port)),
    )
    .await;
    let first = match found {
        Err(_) => return format!("cannot resolve {host}: no answer within 2s"),
        Ok(Err(e)) => return format!("cannot resolve {host}: {e}"),
        Ok(Ok(mut found)) => found.next(),
    };
    let Some(sock) = first else {
        return format!("cannot resolve {host}: no address");
    };
    let what = match kind {
        "IO error" => "the connection failed (is a nats-server listening there?)",
        "timed out" => "no answer within [nats] connection_timeout",
        other => other,
    };
    format!("{host}:{port} ({}): {what}", sock.ip())
}
