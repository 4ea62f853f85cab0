//! The NATS micro service of a daemon: `$SRV.PING`, `$SRV.INFO`,
//! `$SRV.STATS` and the `status` endpoint.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use futures::StreamExt;
use tracing::{info, warn};

use super::{barrier, BusError, Publisher};

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
        let fail = |source: super::Source| BusError::Service {
            name: name.clone(),
            source,
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
            .map_err(&fail)?;
        let id = service.info().await.id;
        let mut endpoint = service
            .endpoint_builder()
            .name("status")
            .queue_group(&id)
            .add(&opts.status_subject)
            .await
            .map_err(|e| fail(format!("endpoint {}: {e}", opts.status_subject).into()))?;
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
