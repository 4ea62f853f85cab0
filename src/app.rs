//! Wiring only: connect NATS and OpenCode, start the event-stream reader,
//! serve prompts, and shut down as a tree with a grace period.
//!
//! Shutdown order: stop taking prompts (systemd `STOPPING=1`, leave the
//! micro service, drain the subscriptions and serve what was already
//! delivered) -> let in-flight turns finish within
//! `shutdown.grace` -> cancel the rest (each ends with `shutting_down`) ->
//! flush NATS -> stop the stream reader and the embedded OpenCode.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::bus::{self, BusError, ControlSubscription, PromptSubscription, Publisher};
use crate::config::Config;
use crate::intake::Intake;
use crate::opencode::compat::{self, SeenVersion};
use crate::opencode::embedded::{EmbeddedError, EmbeddedServer};
use crate::opencode::stream::StreamOptions;
use crate::opencode::{EventHub, OpenCodeClient, OpenCodeError};
use crate::ops::metrics::Metrics;
use crate::ops::status::{Health, Sources};
use crate::ops::{Ops, OpsError};
use crate::turn::{Dispatcher, MemoryStore, SessionStore, TurnContext};

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Embedded(#[from] EmbeddedError),
    #[error(transparent)]
    OpenCode(#[from] OpenCodeError),
    #[error(transparent)]
    Ops(#[from] OpsError),
    /// An OpenCode the bridge cannot drive: a known-broken or 2.x version,
    /// or a server without the v1 routes (`opencode::compat`).
    #[error("{0}")]
    UnsupportedOpenCode(String),
    /// `[opencode] require_ask` and OpenCode would run tools without asking.
    #[error("OpenCode allows without asking what the bridge's policy would deny or ask ([opencode] require_ask): {0}")]
    PolicyBypassed(String),
}

impl AppError {
    /// A fault of the configuration (exit 78, no restart), not of the run.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            AppError::PolicyBypassed(_) | AppError::UnsupportedOpenCode(_)
        )
    }
}

/// What a caller learns once the daemon is serving.
#[derive(Debug, Clone)]
pub struct Ready {
    pub opencode_url: String,
}

/// Runs the daemon until `shutdown` resolves. `ready` is told once the
/// prompt subscriptions are live.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
    ready: Option<oneshot::Sender<Ready>>,
) -> Result<(), AppError> {
    let config = Arc::new(config);
    let nats = bus::connect(&config.nats).await?;
    let publisher = Publisher::new(nats.clone()).with_reply_headers(config.subjects.reply_headers);

    let (embedded, client) = match &config.opencode.base_url {
        Some(url) => {
            let client = OpenCodeClient::new(
                url,
                config.opencode.resolved_password(),
                config
                    .opencode
                    .directory
                    .as_ref()
                    .map(|d| d.display().to_string()),
                &config.opencode,
            )?;
            (None, client)
        }
        None => {
            let (server, client) = EmbeddedServer::start(&config.opencode).await?;
            (Some(server), client)
        }
    };

    let seen_version = Arc::new(SeenVersion::default());
    if let Err(reason) = compat::check_at_start(&client, &seen_version).await {
        if let Some(server) = embedded {
            server.stop(Duration::from_secs(5)).await;
        }
        return Err(AppError::UnsupportedOpenCode(reason));
    }

    let permission_bypasses = audit_permissions(&client, &config).await;
    if config.opencode.require_ask && !permission_bypasses.is_empty() {
        if let Some(server) = embedded {
            server.stop(Duration::from_secs(5)).await;
        }
        return Err(AppError::PolicyBypassed(permission_bypasses.join(", ")));
    }

    let stream_cancel = CancellationToken::new();
    let embedded_restarts = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let supervisor = embedded.map(|server| {
        tokio::spawn(server.supervise(stream_cancel.clone(), embedded_restarts.clone()))
    });
    let hub = EventHub::new(config.turn.event_buffer);
    let reader = tokio::spawn(hub.clone().run(
        client.clone(),
        StreamOptions {
            max_event_bytes: config.limits.max_event_bytes,
            stall_timeout: config.opencode.stream_stall_timeout,
            reconnect_min: config.opencode.reconnect_min,
            reconnect_max: config.opencode.reconnect_max,
        },
        stream_cancel.clone(),
    ));

    let version_watch = tokio::spawn(compat::watch_reconnects(
        client.clone(),
        hub.state(),
        seen_version.clone(),
        stream_cancel.clone(),
    ));

    let sessions: Arc<dyn SessionStore> = Arc::new(rebuild_sessions(&client, &config).await);

    let ctx = Arc::new(TurnContext::new(
        client.clone(),
        hub.clone(),
        publisher.clone(),
        sessions,
        config.clone(),
    ));
    let tracker = TaskTracker::new();
    let turn_cancel = CancellationToken::new();
    let dispatcher = Dispatcher::new(ctx.clone(), tracker.clone(), turn_cancel.clone());
    let in_flight = Arc::new(Semaphore::new(config.turn.max_in_flight));
    let metrics = Metrics::new();

    let subjects = &config.subjects;
    let mut aborts = ControlSubscription::subscribe(
        &nats,
        &[
            subjects.abort.clone(),
            format!("{}.*", subjects.abort),
            subjects.permission_reply.clone(),
            format!("{}.>", subjects.permission_reply),
            subjects.question_reply.clone(),
            format!("{}.>", subjects.question_reply),
        ],
    )
    .await?;
    let intake = Arc::new(Intake::new(
        dispatcher.clone(),
        ctx.answers.clone(),
        publisher.clone(),
        config.clone(),
        metrics.clone(),
    ));
    let abort_task = {
        let intake = intake.clone();
        let cancel = stream_cancel.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break,
                    m = aborts.next() => m,
                };
                let Some(msg) = msg else { break };
                intake.control(msg).await;
            }
        })
    };
    let mut prompts = PromptSubscription::subscribe(&nats, &config.subjects).await?;
    let health = Health::new(
        &config,
        Sources {
            publisher: publisher.clone(),
            hub: hub.clone(),
            dispatcher: dispatcher.clone(),
            metrics: metrics.clone(),
            embedded_restarts: embedded_restarts.clone(),
            opencode_url: client.base_url().to_string(),
            embedded: config.opencode.base_url.is_none(),
            permission_bypasses,
            opencode_version: seen_version,
        },
    );
    // The micro service, heartbeat, metrics listener; READY=1 to systemd.
    let mut ops = Ops::start(&config, health, publisher.clone()).await?;
    if let Some(r) = ready {
        let _ = r.send(Ready {
            opencode_url: client.base_url().to_string(),
        });
    }
    info!("opencode-nats-bridge is serving");

    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            p = in_flight.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let msg = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            m = prompts.next() => m,
        };
        let Some(msg) = msg else {
            warn!("prompt subscriptions ended (NATS connection closed)");
            break;
        };
        intake.prompt(msg, Some(permit)).await;
    }

    info!("shutting down: no new prompts");
    ops.stopping().await;
    prompts.drain().await;
    // Serve what the server had already delivered before the drain.
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(2), prompts.next()).await {
        intake.prompt(msg, None).await;
    }
    tracker.close();
    let grace = config.shutdown.grace;
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!(
            ?grace,
            "turns still running after the grace period; ending them"
        );
        turn_cancel.cancel();
        let bound = config.turn.abort_timeout + Duration::from_secs(5);
        if tokio::time::timeout(bound, tracker.wait()).await.is_err() {
            warn!("some turns did not end; exiting anyway");
        }
    }
    publisher.flush().await;
    stream_cancel.cancel();
    let _ = reader.await;
    let _ = version_watch.await;
    let _ = abort_task.await;
    if let Some(s) = supervisor {
        let _ = s.await;
    }
    ops.stop().await;
    if let Err(e) = nats.drain().await {
        warn!(error = %e, "NATS drain failed");
    }
    info!("stopped");
    Ok(())
}

/// The conversation map from OpenCode's session titles, retried with
/// backoff: starting empty would fork every existing conversation into a
/// new session, so it happens only after the last attempt, at error level.
async fn rebuild_sessions(client: &OpenCodeClient, config: &Config) -> MemoryStore {
    const ATTEMPTS: u32 = 5;
    let mut delay = Duration::from_millis(200);
    for attempt in 1..=ATTEMPTS {
        match MemoryStore::rebuild(
            client,
            &config.opencode.title_prefix,
            config.turn.max_conversations,
        )
        .await
        {
            Ok(s) => {
                info!(
                    conversations = s.len(),
                    "conversation map rebuilt from OpenCode's sessions"
                );
                return s;
            }
            Err(e) if attempt < ATTEMPTS => {
                warn!(error = %e, attempt, retry_in = ?delay, "cannot list OpenCode's sessions; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot list OpenCode's sessions; starting with an empty conversation map: existing conversations will start new sessions");
            }
        }
    }
    MemoryStore::with_capacity(config.turn.max_conversations)
}

/// Asks OpenCode which permissions its own rules allow without asking
/// (`GET /agent`, every agent a prompt may choose) and names those the
/// bridge's policy would deny or ask about: OpenCode would never ask, so
/// the policy would never run. Logged at error level; shown in `status`.
async fn audit_permissions(client: &OpenCodeClient, config: &Config) -> Vec<String> {
    let agents = match client.agents().await {
        Ok(a) => a,
        Err(e) => {
            warn!(error = %e, "cannot read OpenCode's agents to check its permission rules");
            return vec![format!("unchecked: {}", e.public())];
        }
    };
    let mut found = Vec::new();
    for agent in agents.iter().filter(|a| !a.hidden) {
        let allowed = &config.prompt.agents;
        if !allowed.is_empty() && !allowed.contains(&agent.name) {
            continue;
        }
        for b in
            crate::protocol::interactive::bypasses(&config.permissions.rules, &agent.permission)
        {
            tracing::error!(agent = %agent.name, permission = %b, "OpenCode allows this without asking the bridge: its policy never sees it (set \"permission\": {{\"*\": \"ask\"}} in OpenCode's config)");
            found.push(format!("agent {}: {b}", agent.name));
        }
    }
    if found.is_empty() {
        info!(
            agents = agents.len(),
            "OpenCode asks the bridge for every permission its policy does not allow"
        );
    }
    found
}
