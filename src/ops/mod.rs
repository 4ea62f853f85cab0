//! Operating the daemon: what systemd, Prometheus, NATS tooling and the
//! operator see. None of it is on a prompt's path except the counters the
//! reply sink feeds.
//!
//! - [`crate::metrics`] (a leaf module, so `turn/` and `bus/` record into it
//!   without importing `ops/`): turn counters and histograms, Prometheus text.
//! - [`status`]: the health read from the live parts: the `status`
//!   document, the Prometheus text, the watchdog's yes/no.
//! - [`systemd`]: `sd_notify` (`READY=1`, `WATCHDOG=1`, `STOPPING=1`).
//! - [`http`]: the optional loopback `/metrics` listener.
//! - [`log`]: the log writer that escapes control characters.
//! - [`Ops`]: starts all of it next to the prompt loop and stops it.

pub mod http;
pub mod log;
pub mod status;
pub mod systemd;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::bus::{BusError, Publisher, Service, ServiceOptions};
use crate::config::Config;
use status::{subject_token, Health};
use systemd::Notifier;

/// Why the operations side could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("cannot serve metrics on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// The running operations side: micro service, heartbeat, metrics
/// listener, systemd notifications and watchdog.
pub struct Ops {
    health: Arc<Health>,
    publisher: Publisher,
    service: Option<Service>,
    notifier: Option<Notifier>,
    heartbeat_subject: Option<String>,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Ops {
    /// Starts the metrics listener, the micro service, the heartbeat and
    /// the watchdog, then tells systemd `READY=1`. Call it once the prompt
    /// subscriptions are live.
    pub async fn start(
        config: &Config,
        health: Arc<Health>,
        publisher: Publisher,
    ) -> Result<Ops, OpsError> {
        let cancel = CancellationToken::new();
        let mut tasks = Vec::new();
        if let Some(addr) = config.metrics.listen {
            let listener = http::bind(addr)
                .await
                .map_err(|source| OpsError::Listen { addr, source })?;
            tasks.push(tokio::spawn(http::serve(
                listener,
                health.clone(),
                cancel.clone(),
            )));
        }

        let service = start_service(config, &health, &publisher).await?;
        health.set_instance(service.id());

        let interval = config.service.heartbeat_interval;
        let heartbeat_subject = (!interval.is_zero()).then(|| {
            format!(
                "{}.{}",
                config.subjects.heartbeat,
                subject_token(health.host())
            )
        });
        if let Some(subject) = &heartbeat_subject {
            tasks.push(tokio::spawn(heartbeat(
                health.clone(),
                publisher.clone(),
                subject.clone(),
                interval,
                cancel.clone(),
            )));
        }

        let notifier = Notifier::from_env();
        if let Some(n) = &notifier {
            n.notify_or_warn(&format!(
                "READY=1\nSTATUS=serving prompts on {}",
                config.subjects.prompt
            ));
            if let Some(every) = n.watchdog() {
                info!(?every, "systemd watchdog on");
                tasks.push(tokio::spawn(watchdog(
                    n.clone(),
                    health.clone(),
                    every,
                    cancel.clone(),
                )));
            }
        }
        Ok(Ops {
            health,
            publisher,
            service: Some(service),
            notifier,
            heartbeat_subject,
            cancel,
            tasks,
        })
    }

    /// The daemon stops taking prompts: tells systemd `STOPPING=1`,
    /// unregisters the micro service and publishes a last heartbeat that
    /// says so. Metrics and the watchdog go on until [`stop`](Self::stop).
    pub async fn stopping(&mut self) {
        self.health.set_stopping();
        if let Some(n) = &self.notifier {
            n.notify_or_warn("STOPPING=1\nSTATUS=stopping: finishing in-flight turns");
        }
        if let Some(s) = self.service.take() {
            s.stop().await;
        }
        if let Some(subject) = &self.heartbeat_subject {
            publish_status(&self.health, &self.publisher, subject).await;
        }
    }

    /// Stops everything that is left.
    pub async fn stop(mut self) {
        if let Some(s) = self.service.take() {
            s.stop().await;
        }
        self.cancel.cancel();
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

async fn publish_status(health: &Health, publisher: &Publisher, subject: &str) {
    let body = serde_json::to_vec(&health.status()).unwrap_or_default();
    if let Err(e) = publisher.publish_raw(subject, body).await {
        warn!(error = %e, "publishing a heartbeat failed");
    }
}

/// The status on `subject` every `interval`, the first one at once.
async fn heartbeat(
    health: Arc<Health>,
    publisher: Publisher,
    subject: String,
    interval: Duration,
    cancel: CancellationToken,
) {
    info!(%subject, ?interval, "publishing heartbeats");
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = tick.tick() => publish_status(&health, &publisher, &subject).await,
        }
    }
}

/// `WATCHDOG=1` at half the watchdog interval while the daemon is healthy
/// (NATS connected, OpenCode's event stream connected). While it is not,
/// the health is looked at again every second and the ping resumes as soon
/// as it recovers; systemd restarts the daemon only when it stays unhealthy
/// for about half the interval.
async fn watchdog(
    notifier: Notifier,
    health: Arc<Health>,
    every: Duration,
    cancel: CancellationToken,
) {
    let period = every / 2;
    let retry = period.min(Duration::from_secs(1));
    let mut was_healthy = true;
    // The daemon just said READY=1: the first ping is unconditional, so an
    // event stream still connecting is not reported as a problem.
    notifier.notify_or_warn("WATCHDOG=1");
    tokio::select! {
        biased;
        _ = cancel.cancelled() => return,
        _ = tokio::time::sleep(period) => {}
    }
    loop {
        let wait = match health.check() {
            Ok(()) => {
                if !was_healthy {
                    info!("healthy again; watchdog pings resume");
                    notifier.notify_or_warn("STATUS=serving");
                }
                was_healthy = true;
                notifier.notify_or_warn("WATCHDOG=1");
                period
            }
            Err(why) => {
                if was_healthy {
                    warn!(problem = %why, "unhealthy; withholding watchdog pings");
                    notifier.notify_or_warn(&format!("STATUS=unhealthy: {why}"));
                }
                was_healthy = false;
                retry
            }
        };
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// The micro service (`$SRV.*` and the `status` endpoint).
async fn start_service(
    config: &Config,
    health: &Arc<Health>,
    publisher: &Publisher,
) -> Result<Service, OpsError> {
    let for_status = health.clone();
    let service = Service::start(
        publisher,
        ServiceOptions {
            name: config.service.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            description: "NATS prompts -> OpenCode turns -> NATS replies".into(),
            metadata: HashMap::from([
                ("host".to_string(), health.host().to_string()),
                ("prompt".to_string(), config.subjects.prompt.clone()),
                ("status".to_string(), config.subjects.status.clone()),
                // As read at start-up; `status` has the current one.
                (
                    "opencode_version".to_string(),
                    health.opencode_version().unwrap_or_default(),
                ),
            ]),
            status_subject: config.subjects.status.clone(),
        },
        Arc::new(move || serde_json::to_value(for_status.status()).unwrap_or_default()),
    )
    .await?;
    Ok(service)
}
