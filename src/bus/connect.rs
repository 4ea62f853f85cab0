//! Connecting with every option of `[nats]`: auth, TLS, capacities, one log
//! line per NATS event and per backoff step.

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
            let metrics = metrics.clone();
            async move { log_event(event, &urls, errors, metrics) }
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
fn log_event(
    event: async_nats::Event,
    urls: &str,
    errors: Option<tokio::sync::broadcast::Sender<String>>,
    metrics: Option<Arc<Metrics>>,
) {
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
            if let Some(m) = metrics {
                m.dropped_message();
            }
            tracing::error!(sid, "NATS slow consumer: a subscription's buffer was full and a message was dropped ([nats] subscription_capacity; counted in status and metrics)")
        }
        // A failed connection attempt: the backoff line says it.
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
