//! The Synadia Agent Protocol v0.3 registration: the micro service
//! `agents` with its `prompt` and `status` endpoints (queue group
//! `agents`), and the heartbeat on `agents.hb.opencode.<owner>.<name>`.
//! Prompts come out as [`Incoming`] for the intake; their reply streams go
//! out through [`Publisher::publish_chunk`].

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{barrier, BusError, Incoming, Publisher};
use crate::protocol::agent::{Identity, PROTOCOL_VERSION, QUEUE_GROUP, SERVICE_NAME};

/// What the registration says about this daemon.
pub struct AgentOptions {
    pub identity: Identity,
    /// The daemon's semantic version.
    pub version: String,
    pub description: String,
    /// Extra service metadata (ours: tenant, OpenCode version...).
    pub metadata: HashMap<String, String>,
    /// The `prompt` endpoint's `max_payload` (`1MB`-style).
    pub max_payload: String,
    pub attachments_ok: bool,
    pub heartbeat_interval: Duration,
}

/// The registered agent: answers `status` and `$SRV.*`, beats.
pub struct AgentService {
    service: async_nats::service::Service,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Prompts on the agent's `prompt` endpoint.
pub struct AgentPrompts {
    endpoint: async_nats::service::endpoint::Endpoint,
}

impl AgentPrompts {
    /// The next prompt; `None` once the service stopped.
    pub async fn next(&mut self) -> Option<Incoming> {
        self.endpoint
            .next()
            .await
            .map(|r| Incoming::from(r.message))
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

impl AgentService {
    /// Registers the service and its endpoints, then starts the heartbeat.
    pub async fn start(
        publisher: &Publisher,
        opts: AgentOptions,
    ) -> Result<(AgentService, AgentPrompts), BusError> {
        use async_nats::service::ServiceExt;
        let fail = |source: super::Source| BusError::Service {
            name: SERVICE_NAME.into(),
            source,
        };
        let mut metadata = opts.metadata;
        metadata.insert("agent".into(), crate::protocol::agent::AGENT.into());
        metadata.insert("owner".into(), opts.identity.owner.clone());
        metadata.insert("protocol_version".into(), PROTOCOL_VERSION.into());
        let service = publisher
            .client
            .service_builder()
            .description(&opts.description)
            .metadata(metadata)
            .start(SERVICE_NAME, &opts.version)
            .await
            .map_err(&fail)?;
        let id = service.info().await.id;
        let prompt_subject = opts.identity.subject("prompt");
        let status_subject = opts.identity.subject("status");
        let endpoint_meta = HashMap::from([
            ("max_payload".to_string(), opts.max_payload.clone()),
            (
                "attachments_ok".to_string(),
                opts.attachments_ok.to_string(),
            ),
        ]);
        let prompts = service
            .endpoint_builder()
            .name("prompt")
            .queue_group(QUEUE_GROUP)
            .metadata(endpoint_meta)
            .add(&prompt_subject)
            .await
            .map_err(|e| fail(format!("endpoint {prompt_subject}: {e}").into()))?;
        let status = service
            .endpoint_builder()
            .name("status")
            .queue_group(QUEUE_GROUP)
            .add(&status_subject)
            .await
            .map_err(|e| fail(format!("endpoint {status_subject}: {e}").into()))?;
        barrier(&publisher.client).await?;
        let stop = CancellationToken::new();
        let interval = opts.heartbeat_interval;
        let beat = Beat {
            identity: opts.identity.clone(),
            id: id.clone(),
            interval_s: interval.as_secs().max(1),
        };
        let tasks = vec![
            tokio::spawn(serve_status(status, beat.clone(), stop.clone())),
            tokio::spawn(heartbeat(publisher.clone(), beat, interval, stop.clone())),
        ];
        info!(%id, prompt = %prompt_subject, status = %status_subject, "registered as an agent (Synadia Agent Protocol 0.3)");
        Ok((
            AgentService {
                service,
                stop,
                tasks,
            },
            AgentPrompts { endpoint: prompts },
        ))
    }

    /// Unregisters: no more `$SRV` answers, status replies or heartbeats.
    pub async fn stop(self) {
        self.stop.cancel();
        if let Err(e) = self.service.stop().await {
            warn!(error = %e, "stopping the agent service failed");
        }
        for mut t in self.tasks {
            if tokio::time::timeout(Duration::from_secs(2), &mut t)
                .await
                .is_err()
            {
                t.abort();
            }
        }
    }
}

/// What a heartbeat and a status reply carry.
#[derive(Clone)]
struct Beat {
    identity: Identity,
    id: String,
    interval_s: u64,
}

impl Beat {
    fn payload(&self) -> Bytes {
        let v = self
            .identity
            .heartbeat(&self.id, &now_rfc3339(), self.interval_s);
        Bytes::from(v.to_string())
    }
}

async fn serve_status(
    mut endpoint: async_nats::service::endpoint::Endpoint,
    beat: Beat,
    stop: CancellationToken,
) {
    loop {
        let req = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = endpoint.next() => r,
        };
        let Some(req) = req else { break };
        if let Err(e) = req.respond(Ok(beat.payload())).await {
            warn!(error = %e, "answering an agent status request failed");
        }
    }
    let _ = endpoint.stop().await;
}

async fn heartbeat(publisher: Publisher, beat: Beat, every: Duration, stop: CancellationToken) {
    let subject = beat.identity.subject("hb");
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        if let Err(e) = publisher
            .client
            .publish(subject.clone(), beat.payload())
            .await
        {
            warn!(error = %e, %subject, "publishing an agent heartbeat failed");
        }
    }
}
