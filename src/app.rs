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

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::bus::{
    self, AgentOptions, AgentPrompts, AgentService, BusError, ControlSubscription, Incoming,
    PromptSubscription, Publisher,
};
use crate::bus::{Forwarded, InstanceSubscription, JetStream};
use crate::cluster::{Cluster, ClusterSessions};
use crate::config::{Config, Switch};
use crate::controls::{self, Controls};
use crate::intake::Intake;
use crate::isolation::Isolation;
use crate::jobs::Jobs;
use crate::metrics::Metrics;
use crate::opencode::compat::{self, SeenVersion};
use crate::opencode::embedded::{EmbeddedError, EmbeddedServer};
use crate::opencode::stream::StreamOptions;
use crate::opencode::{EventHub, OpenCodeClient, OpenCodeError};
use crate::ops::status::{Health, Sources};
use crate::ops::{Ops, OpsError};
use crate::turn::{self, Dispatcher, MemoryStore, SessionStore, TurnContext};

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
    /// `[cluster] enabled` or `[jetstream] jobs` is `on` and the NATS
    /// server offers no JetStream to this daemon.
    #[error("[cluster] enabled or [jetstream] jobs is \"on\", but the NATS server offers no JetStream to this daemon (start nats-server with -js, or grant the user $JS.API.>)")]
    NoJetStream,
    /// `[opencode] require_ask` and OpenCode would run tools without asking.
    #[error("OpenCode allows without asking what the bridge's policy would deny or ask ([opencode] require_ask): {0}")]
    PolicyBypassed(String),
    /// `[isolation] mode = "sandbox"` on a kernel that cannot enforce it
    /// (`sandbox::probe`).
    #[error("{0}")]
    SandboxUnsupported(String),
}

impl AppError {
    /// A fault of the configuration (exit 78, no restart), not of the run.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            AppError::PolicyBypassed(_)
                | AppError::UnsupportedOpenCode(_)
                | AppError::NoJetStream
                | AppError::SandboxUnsupported(_)
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
    crate::sandbox::check_at_start(&config.isolation).map_err(AppError::SandboxUnsupported)?;
    let config = Arc::new(config);
    // A signal during start-up (waiting for NATS, OpenCode starting) stops
    // the daemon at once: nothing is serving yet, so nothing is drained.
    tokio::pin!(shutdown);
    let metrics = Metrics::new();
    let connect = bus::connect_observed(&config.nats, metrics.clone());
    let Some(nats) = unless_shutdown(&mut shutdown, connect).await else {
        info!("stopped during start-up, before NATS was connected");
        return Ok(());
    };
    let nats = nats?;
    let jetstream = jetstream(&config, &nats).await?;
    // Dropping the start stops a half-started `opencode serve`.
    let Some(opencode) = unless_shutdown(&mut shutdown, opencode(&config)).await else {
        info!("stopped during start-up, while OpenCode was starting");
        return Ok(());
    };
    let (embedded, client) = opencode?;
    let seen_version = Arc::new(SeenVersion::default());
    if let Err(reason) = compat::check_at_start(&client, &seen_version).await {
        if let Some(server) = embedded {
            server.stop(Duration::from_secs(5)).await;
        }
        return Err(AppError::UnsupportedOpenCode(reason));
    }
    let bypasses = audit_permissions(&client, &config).await;
    if config.opencode.require_ask && !bypasses.is_empty() {
        if let Some(server) = embedded {
            server.stop(Duration::from_secs(5)).await;
        }
        return Err(AppError::PolicyBypassed(bypasses.join(", ")));
    }
    let opencode = Started {
        embedded,
        client,
        permission_bypasses: bypasses,
        seen_version,
    };
    let mut daemon = Daemon::start(config, nats, opencode, metrics, jetstream).await?;
    daemon.jobs = daemon.start_jobs().await?;
    if let Some(r) = ready {
        let _ = r.send(Ready {
            opencode_url: daemon.opencode_url.clone(),
        });
    }
    info!("opencode-nats-bridge is serving");
    info!(
        "try it: {} (or any NATS client on {}: docs/PROTOCOL.md)",
        try_it(&daemon.config.nats.url),
        daemon.config.subjects.prompt
    );
    daemon.serve(&mut shutdown).await;
    daemon.stop().await;
    Ok(())
}

/// The command to try once the daemon serves, as the README and
/// `deploy/dev-up.sh` show it: this binary by its path, `--server` only
/// when NATS is not at the default URL.
pub fn try_it(nats_url: &str) -> String {
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "opencode-nats-bridge".into());
    let server = if nats_url == crate::config::NatsConfig::default().url {
        String::new()
    } else {
        format!(" --server {nats_url}")
    };
    format!("{exe} prompt{server} {TRY_IT_ARGS}")
}

/// The arguments of the command to try (the README, `deploy/dev-up.sh`
/// and the daemon's log show the same).
pub const TRY_IT_ARGS: &str = "--conversation demo 'Write a haiku about queues'";

/// JetStream, if the cluster or the jobs may use it (`auto`) or must
/// (`on`: a server without it is a configuration fault, exit 78).
async fn jetstream(config: &Config, nats: &bus::Connection) -> Result<Option<JetStream>, AppError> {
    let wanted = [config.cluster.enabled, config.jetstream.jobs];
    if wanted.iter().all(|s| *s == Switch::Off) {
        info!("[cluster] enabled and [jetstream] jobs are off: running single-host");
        return Ok(None);
    }
    // Required: asked again for up to 30 s (a JetStream leader election).
    let patience = if wanted.contains(&Switch::On) {
        Duration::from_secs(30)
    } else {
        Duration::ZERO
    };
    let js = JetStream::probe(nats, patience)
        .await
        .map(|js| js.with_replicas(config.jetstream.replicas));
    if js.is_none() && wanted.contains(&Switch::On) {
        return Err(AppError::NoJetStream);
    }
    Ok(js)
}

/// The OpenCode server to drive: an external one, or `opencode serve`
/// started here (the embedded default).
async fn opencode(config: &Config) -> Result<(Option<EmbeddedServer>, OpenCodeClient), AppError> {
    let Some(url) = &config.opencode.base_url else {
        let (server, client) = EmbeddedServer::start(&config.opencode).await?;
        return Ok((Some(server), client));
    };
    let directory = config
        .opencode
        .directory
        .as_ref()
        .map(|d| d.display().to_string());
    let client = OpenCodeClient::new(
        url,
        config.opencode.resolved_password(),
        directory,
        &config.opencode,
    )?;
    Ok((None, client))
}

/// OpenCode as start-up found it: checked, audited.
struct Started {
    embedded: Option<EmbeddedServer>,
    client: OpenCodeClient,
    permission_bypasses: Vec<String>,
    seen_version: Arc<SeenVersion>,
}

/// Everything that runs while the daemon serves, for the shutdown tree.
struct Daemon {
    config: Arc<Config>,
    nats: bus::Connection,
    publisher: Publisher,
    intake: Arc<Intake>,
    prompts: PromptSubscription,
    /// The Synadia Agent Protocol registration and its prompts, when
    /// `[agent_protocol] enabled`.
    agent: Option<AgentService>,
    agent_prompts: Option<AgentPrompts>,
    in_flight: Arc<Semaphore>,
    /// JetStream, when the server offers it (docs/CLUSTER.md).
    jetstream: Option<JetStream>,
    /// This daemon in the cluster, its forwarded prompts and its lease
    /// renewal (none single-host).
    cluster: Option<Arc<Cluster>>,
    forwarded: Option<InstanceSubscription>,
    renewal: Option<JoinHandle<()>>,
    /// Turn states and large finals (`turn::states`), with JetStream.
    states: Option<turn::states::Running>,
    /// Durable jobs, when `[jetstream] jobs` and JetStream allow them.
    jobs: Option<Jobs>,
    /// Prompts read while every slot was taken (`turn.max_waiting`).
    waiting: std::collections::VecDeque<(From, Incoming)>,
    metrics: Arc<Metrics>,
    /// Every turn's task.
    tracker: TaskTracker,
    /// Ends running turns (`shutting_down`) after the grace.
    turn_cancel: CancellationToken,
    /// Stops the stream reader, the control task and the supervisor.
    stream_cancel: CancellationToken,
    reader: JoinHandle<()>,
    /// Reads OpenCode's version again after every reconnect.
    version_watch: JoinHandle<()>,
    control: Control,
    supervisor: Option<JoinHandle<()>>,
    ops: Ops,
    opencode_url: String,
}

impl Daemon {
    /// The event-stream reader, the conversation map, the dispatcher, the
    /// subscriptions and the operations side.
    async fn start(
        config: Arc<Config>,
        nats: bus::Connection,
        opencode: Started,
        metrics: Arc<Metrics>,
        jetstream: Option<JetStream>,
    ) -> Result<Daemon, AppError> {
        let Started {
            embedded,
            client,
            permission_bypasses,
            seen_version,
        } = opencode;
        let publisher =
            Publisher::new(nats.clone()).with_reply_headers(config.subjects.reply_headers);
        let stream_cancel = CancellationToken::new();
        let (hub, reader, version_watch) =
            spawn_reader(&config, &client, &seen_version, &stream_cancel);
        let (supervisor, embedded_restarts) = spawn_supervisor(embedded, &hub, &stream_cancel);
        let (cluster, forwarded, renewal) =
            join_cluster(&config, &nats, jetstream.as_ref(), &client, &stream_cancel).await?;
        let sessions = sessions(&client, &config, &cluster).await;
        let (c, h, p) = (client.clone(), hub.clone(), publisher.clone());
        let s = turn::states::Running::start(jetstream.as_ref(), &config, &nats, &p).await;
        let ctx = TurnContext::new(c, h, p, sessions, config.clone()).with_states(&s);
        let ctx = Arc::new(with_tenant_servers(ctx, &stream_cancel));
        let (tracker, turn_cancel) = (TaskTracker::new(), CancellationToken::new());
        let dispatcher = Dispatcher::new(ctx.clone(), tracker.clone(), turn_cancel.clone());
        let intake = Intake::new(
            dispatcher.clone(),
            publisher.clone(),
            config.clone(),
            metrics.clone(),
        );
        let intake = Arc::new(intake.in_cluster(cluster.clone()));
        let cancel = stream_cancel.clone();
        let control = spawn_control(&nats, &config, intake.clone(), &cluster, cancel).await?;
        let prompts = PromptSubscription::subscribe(&nats, &config.subjects).await?;
        let (agent, agent_prompts) = start_agent(&config, &publisher, &seen_version).await?;
        let sources = Sources {
            publisher: publisher.clone(),
            hub,
            dispatcher,
            metrics: metrics.clone(),
            cluster: cluster.as_ref().map(|c| c.status()),
            embedded_restarts,
            opencode_url: client.base_url().to_string(),
            embedded: config.opencode.base_url.is_none(),
            permission_bypasses,
            opencode_version: seen_version,
        };
        let ops = Ops::start(&config, Health::new(&config, sources), publisher.clone()).await?; // $SRV, heartbeat, metrics, READY=1
        Ok(Daemon {
            in_flight: Arc::new(Semaphore::new(config.turn.max_in_flight)),
            waiting: std::collections::VecDeque::new(),
            jetstream,
            cluster,
            forwarded,
            renewal,
            states: s,
            jobs: None,
            metrics,
            config,
            nats,
            publisher,
            intake,
            prompts,
            agent,
            agent_prompts,
            tracker,
            turn_cancel,
            stream_cancel,
            reader,
            version_watch,
            control,
            supervisor,
            ops,
            opencode_url: client.base_url().to_string(),
        })
    }

    /// Takes prompts until `shutdown` (or the connection closes). Never
    /// stops reading: a prompt that finds every `turn.max_in_flight` slot
    /// taken waits in `turn.max_waiting` (arrival order); beyond that it is
    /// answered `overloaded` at once, so no NATS buffer ever fills.
    async fn serve(&mut self, shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>) {
        loop {
            let next = tokio::select! {
                biased;
                _ = shutdown.as_mut() => break,
                p = self.in_flight.clone().acquire_owned(), if !self.waiting.is_empty() => {
                    let permit = p.expect("semaphore never closed");
                    let (from, msg) = self.waiting.pop_front().expect("not empty");
                    self.metrics.set_waiting(self.waiting.len());
                    self.take(from, msg, Some(permit)).await;
                    continue;
                }
                p = self.in_flight.clone().acquire_owned(), if self.waiting.is_empty() && self.jobs.as_ref().is_some_and(Jobs::has_parked) => {
                    if let Some(jobs) = &mut self.jobs {
                        jobs.run_parked(p.expect("semaphore never closed")).await;
                    }
                    continue;
                }
                m = self.prompts.next() => m.map(|m| (From::Prompts, m)),
                m = next_forwarded(&mut self.forwarded) => match m {
                    Some(Forwarded::Prompt(m)) if self.control.controls.is_control(&m.subject) => {
                        self.control.controls.take_forwarded(m);
                        continue;
                    }
                    Some(Forwarded::Prompt(m)) => Some((From::Prompts, m)),
                    Some(Forwarded::Job(j)) => {
                        self.forwarded_job(*j).await;
                        continue;
                    }
                    None => {
                        warn!("the instance subscription ended");
                        self.forwarded = None;
                        continue;
                    }
                },
                m = next_agent_prompt(&mut self.agent_prompts) => match m {
                    Some(m) => Some((From::Agent, m)),
                    None => {
                        warn!("the agent protocol endpoint ended");
                        self.agent_prompts = None;
                        continue;
                    }
                },
                job = next_job(&mut self.jobs) => {
                    self.job_arrived(job).await;
                    continue;
                }
            };
            let Some((from, msg)) = next else {
                warn!("prompt subscriptions ended (NATS connection closed)");
                break;
            };
            self.arrived(from, msg).await;
        }
    }

    /// A `turn.max_in_flight` slot, if one is free and no prompt waits for
    /// one before this.
    fn free_slot(&self) -> Option<OwnedSemaphorePermit> {
        if !self.waiting.is_empty() {
            return None;
        }
        self.in_flight.clone().try_acquire_owned().ok()
    }

    /// A prompt just read: runs at once if a slot is free and nothing
    /// waits before it, else waits, else is answered `overloaded`.
    async fn arrived(&mut self, from: From, msg: Incoming) {
        if let Some(permit) = self.free_slot() {
            return self.take(from, msg, Some(permit)).await;
        }
        if self.waiting.len() < self.config.turn.max_waiting {
            self.waiting.push_back((from, msg));
            self.metrics.set_waiting(self.waiting.len());
            return;
        }
        let reason = format!(
            "the bridge has {} turns in flight and {} prompts waiting (turn.max_in_flight, turn.max_waiting); send again shortly",
            self.config.turn.max_in_flight, self.config.turn.max_waiting
        );
        match from {
            From::Prompts => self.intake.overloaded(msg, reason).await,
            From::Agent => self.intake.agent_overloaded(msg, reason).await,
        }
    }

    /// Durable jobs (`crate::jobs`) on the shared consumer, if JetStream
    /// is there and `[jetstream] jobs` is not off; with `jobs = "on"` a
    /// stream or consumer that cannot be made stops the start.
    async fn start_jobs(&self) -> Result<Option<Jobs>, AppError> {
        let started = Jobs::start(
            self.jetstream.as_ref(),
            self.config.clone(),
            self.intake.clone(),
            self.in_flight.clone(),
            self.metrics.clone(),
            self.tracker.clone(),
        )
        .await;
        match started {
            Ok(jobs) => Ok(jobs),
            Err(e) if self.config.jetstream.jobs == Switch::On => Err(e.into()),
            Err(e) => {
                tracing::error!(error = %e, "durable jobs are off: the jobs stream or its consumer cannot be used");
                Ok(None)
            }
        }
    }

    /// A job another daemon pulled and forwarded here (this is its
    /// conversation's home): it runs now, or parks for the next free slot;
    /// if a job is parked already (or jobs are off here), it goes back to
    /// the stream at once.
    async fn forwarded_job(&mut self, job: crate::bus::JobMessage) {
        let permit = self.free_slot();
        match &mut self.jobs {
            Some(jobs) if permit.is_some() || !jobs.has_parked() => jobs.arrived(job, permit).await,
            // Its last delivery runs here, over the limit: this is its home.
            Some(jobs) if jobs.is_last(&job) => jobs.arrived_over_limit(job).await,
            _ => {
                // Back after `retry_delay` (not at once: it would bounce
                // between its puller and here through its deliveries).
                let delay = self.config.jetstream.retry_delay;
                if let Err(e) = job.nak(Some(delay)).await {
                    warn!(error = %e, "handing a job back failed; it comes back after ack_wait");
                }
            }
        }
    }

    /// A job the feed pulled (it only pulls when a slot was free and no
    /// prompt waited): it runs now, or at the next free slot.
    async fn job_arrived(&mut self, job: crate::bus::JobMessage) {
        let permit = self.free_slot();
        if let Some(jobs) = &mut self.jobs {
            jobs.arrived(job, permit).await;
        }
    }

    /// Hands a prompt to the intake, with its slot (none while stopping).
    async fn take(&self, from: From, msg: Incoming, permit: Option<OwnedSemaphorePermit>) {
        match from {
            From::Prompts => self.intake.prompt(msg, permit).await,
            From::Agent => self.intake.agent_prompt(msg, permit).await,
        }
    }

    /// Stops taking prompts and serves what was already delivered; idle
    /// conversations go back to the cluster.
    async fn stop_taking(&mut self) {
        info!("shutting down: no new prompts");
        self.ops.stopping().await;
        // No new jobs; a job not started goes back to the stream at once.
        if let Some(jobs) = self.jobs.take() {
            jobs.stop().await;
        }
        if let Some(agent) = self.agent.take() {
            agent.stop().await;
        }
        // The endpoint unsubscribed; serve what it had already received.
        if let Some(mut agent_prompts) = self.agent_prompts.take() {
            while let Ok(Some(msg)) =
                tokio::time::timeout(Duration::from_secs(2), agent_prompts.next()).await
            {
                self.intake.agent_prompt(msg, None).await;
            }
        }
        self.prompts.drain().await;
        if let Some(f) = &mut self.forwarded {
            f.drain().await;
        }
        // Serve what waited for a slot, then what the server had already
        // delivered before the drain.
        while let Some((from, msg)) = self.waiting.pop_front() {
            self.take(from, msg, None).await;
        }
        self.metrics.set_waiting(0);
        while let Ok(Some(msg)) =
            tokio::time::timeout(Duration::from_secs(2), self.prompts.next()).await
        {
            self.intake.prompt(msg, None).await;
        }
        while let Ok(Some(f)) =
            tokio::time::timeout(Duration::from_secs(2), next_forwarded(&mut self.forwarded)).await
        {
            match f {
                Forwarded::Prompt(m) if self.control.controls.is_control(&m.subject) => {
                    self.control.controls.take_forwarded(m)
                }
                Forwarded::Prompt(msg) => self.intake.prompt(msg, None).await,
                // Stopping: back to the stream, for another daemon.
                Forwarded::Job(j) => crate::jobs::give_back(&j, &self.metrics).await,
            }
        }
        // Conversations with nothing running are handed back now: their
        // next prompt is served at once by another daemon.
        if let Some(c) = &self.cluster {
            let d = self.intake.dispatcher().clone();
            let release = c.release(|conv| d.is_active(conv));
            let n = tokio::time::timeout(RELEASE_BOUND, release)
                .await
                .unwrap_or(0);
            info!(
                conversations = n,
                "handed idle conversations back to the cluster"
            );
        }
    }

    /// The shutdown tree (see the module's documentation).
    async fn stop(mut self) {
        self.stop_taking().await;
        self.tracker.close();
        let grace = self.config.shutdown.grace;
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                ?grace,
                "turns still running after the grace period; ending them"
            );
            self.turn_cancel.cancel();
            let bound = self.config.turn.abort_timeout + Duration::from_secs(5);
            if tokio::time::timeout(bound, self.tracker.wait())
                .await
                .is_err()
            {
                warn!("some turns did not end; exiting anyway");
            }
        }
        if let Some(r) = self.renewal.take() {
            r.abort();
        }
        if let Some(c) = &self.cluster {
            let n = tokio::time::timeout(RELEASE_BOUND, c.release(|_| false))
                .await
                .unwrap_or(0);
            info!(
                conversations = n,
                "handed the remaining conversations back; leaving the cluster"
            );
            c.leave().await;
        }
        self.publisher.flush().await;
        if let Some(states) = self.states.take() {
            states.stop().await;
        }
        self.stream_cancel.cancel();
        let _ = self.reader.await;
        let _ = self.version_watch.await;
        let _ = self.control.task.await;
        let _ = self.control.controls_task.await;
        if let Some(s) = self.supervisor {
            let _ = s.await;
        }
        // The tenants' own servers (`[isolation] mode = "process"`).
        if let Some(s) = &self.intake.dispatcher().context().isolation {
            s.stop().await;
        }
        self.ops.stop().await;
        if let Err(e) = self.nats.drain().await {
            warn!(error = %e, "NATS drain failed");
        }
        info!("stopped");
    }
}

/// Bound on handing conversations back at a stop: past it the rest are
/// taken over as the lease is deleted right after.
const RELEASE_BOUND: Duration = Duration::from_secs(5);

/// Where a prompt came from.
#[derive(Debug, Clone, Copy)]
enum From {
    /// The bridge's prompt subjects.
    Prompts,
    /// The Synadia Agent Protocol endpoint.
    Agent,
}

/// The next prompt forwarded by another daemon (never, single-host).
async fn next_forwarded(sub: &mut Option<InstanceSubscription>) -> Option<Forwarded> {
    match sub {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// The next job the feed pulled (never, without jobs).
async fn next_job(jobs: &mut Option<Jobs>) -> crate::bus::JobMessage {
    match jobs {
        Some(j) => j.next().await,
        None => std::future::pending().await,
    }
}

/// The next prompt on the agent protocol endpoint (never, without one).
async fn next_agent_prompt(prompts: &mut Option<AgentPrompts>) -> Option<Incoming> {
    match prompts {
        Some(p) => p.next().await,
        None => std::future::pending().await,
    }
}

/// Registers as a Synadia Agent Protocol agent, if `[agent_protocol]
/// enabled`.
async fn start_agent(
    config: &Config,
    publisher: &Publisher,
    seen_version: &SeenVersion,
) -> Result<(Option<AgentService>, Option<AgentPrompts>), AppError> {
    let a = &config.agent_protocol;
    if !a.enabled {
        return Ok((None, None));
    }
    use crate::protocol::agent::{name_token, size_label, Identity};
    let name = a.name.clone().unwrap_or_else(|| {
        name_token(
            &config
                .service
                .host
                .clone()
                .unwrap_or_else(crate::ops::status::hostname),
        )
    });
    let mut metadata = std::collections::HashMap::from([(
        "bridge_service".to_string(),
        config.service.name.clone(),
    )]);
    if let Some(v) = seen_version.version() {
        metadata.insert("opencode_version".into(), v);
    }
    let max = config.limits.max_prompt_bytes.min(publisher.max_payload());
    let opts = AgentOptions {
        identity: Identity {
            owner: a.owner.clone(),
            name,
        },
        version: env!("CARGO_PKG_VERSION").to_string(),
        description: "OpenCode through opencode-nats-bridge".into(),
        metadata,
        max_payload: size_label(max),
        attachments_ok: true,
        heartbeat_interval: a.heartbeat_interval,
    };
    let (service, prompts) = AgentService::start(publisher, opts).await?;
    Ok((Some(service), Some(prompts)))
}

/// Restarts the embedded `opencode serve` when it dies (counted), until
/// `cancel`; its turns in flight hear of an exit through `hub`.
fn spawn_supervisor(
    embedded: Option<EmbeddedServer>,
    hub: &Arc<EventHub>,
    cancel: &CancellationToken,
) -> (Option<JoinHandle<()>>, Arc<std::sync::atomic::AtomicU64>) {
    let restarts = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let task = embedded.map(|server| {
        tokio::spawn(server.supervise(cancel.clone(), restarts.clone(), hub.clone()))
    });
    (task, restarts)
}

/// With `[workspaces] root`, turns run in their workspaces and, in
/// `[isolation] mode = "process"`, tenants' turns on servers of their own
/// (until `cancel`).
fn with_tenant_servers(ctx: TurnContext, cancel: &CancellationToken) -> TurnContext {
    let isolation = Isolation::start(&ctx.config, &ctx.sessions, cancel);
    ctx.with_isolation(isolation)
}

/// The one reader of OpenCode's event stream, and the task that reads
/// OpenCode's version again after every reconnect.
fn spawn_reader(
    config: &Config,
    client: &OpenCodeClient,
    seen_version: &Arc<SeenVersion>,
    cancel: &CancellationToken,
) -> (Arc<EventHub>, JoinHandle<()>, JoinHandle<()>) {
    let hub = EventHub::new(config.turn.event_buffer);
    let reader = tokio::spawn(hub.clone().run(
        client.clone(),
        StreamOptions::from(&config.opencode, &config.limits),
        cancel.clone(),
    ));
    let version_watch = tokio::spawn(compat::watch_reconnects(
        client.clone(),
        hub.state(),
        seen_version.clone(),
        cancel.clone(),
    ));
    (hub, reader, version_watch)
}

/// The control side: aborts and answers (every daemon listens), and the
/// conversation controls (one daemon answers each); until `cancel`.
struct Control {
    task: JoinHandle<()>,
    controls: Arc<Controls>,
    controls_task: JoinHandle<()>,
}

/// Aborts and answers: every daemon listens (no queue group); the
/// conversation controls in the queue group; until `cancel`.
async fn spawn_control(
    nats: &bus::Connection,
    config: &Arc<Config>,
    intake: Arc<Intake>,
    cluster: &Option<Arc<Cluster>>,
    cancel: CancellationToken,
) -> Result<Control, AppError> {
    let controls = Controls::new(intake.dispatcher().clone(), config.clone(), cluster.clone());
    let controls_task = controls::start(controls.clone(), nats, cancel.clone()).await?;
    let s = &config.subjects;
    let mut control = ControlSubscription::subscribe(
        nats,
        &[
            s.abort.clone(),
            format!("{}.*", s.abort),
            s.permission_reply.clone(),
            format!("{}.>", s.permission_reply),
            s.question_reply.clone(),
            format!("{}.>", s.question_reply),
        ],
    )
    .await?;
    let task = tokio::spawn(async move {
        loop {
            let msg = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                m = control.next() => m,
            };
            let Some(msg) = msg else { break };
            intake.control(msg).await;
        }
    });
    Ok(Control {
        task,
        controls,
        controls_task,
    })
}

/// This daemon in the cluster, the subscription of its prompts forwarded
/// by others, and its lease renewal (until `cancel`).
type Joined = (
    Option<Arc<Cluster>>,
    Option<InstanceSubscription>,
    Option<JoinHandle<()>>,
);

/// Joins the cluster when JetStream is there and `[cluster] enabled` is
/// not `off`.
async fn join_cluster(
    config: &Config,
    nats: &bus::Connection,
    jetstream: Option<&JetStream>,
    client: &OpenCodeClient,
    cancel: &CancellationToken,
) -> Result<Joined, AppError> {
    let Some(js) = jetstream.filter(|_| config.cluster.enabled != Switch::Off) else {
        return Ok((None, None, None));
    };
    let host = config
        .service
        .host
        .clone()
        .unwrap_or_else(crate::ops::status::hostname);
    let opencode_id =
        config
            .cluster
            .opencode_id
            .clone()
            .unwrap_or_else(|| match &config.opencode.base_url {
                Some(_) => client.base_url().to_string(),
                None => {
                    let dir = config
                        .opencode
                        .directory
                        .clone()
                        .or_else(|| std::env::current_dir().ok())
                        .unwrap_or_default();
                    format!("embedded@{host}:{}", dir.display())
                }
            });
    let cluster = Cluster::start(js, nats, config, &host, opencode_id).await?;
    let prefix = &config.cluster.instance_prefix;
    let sub = InstanceSubscription::subscribe(nats, prefix, cluster.instance()).await?;
    let renewal = cluster.spawn_renewal(cancel.clone());
    Ok((Some(cluster), Some(sub), Some(renewal)))
}

/// The conversation map; in a cluster, every new session is recorded in
/// the conversation's home.
async fn sessions(
    client: &OpenCodeClient,
    config: &Config,
    cluster: &Option<Arc<Cluster>>,
) -> Arc<dyn SessionStore> {
    let inner = rebuild_sessions(client, config).await;
    match cluster {
        Some(c) => Arc::new(ClusterSessions {
            inner,
            cluster: c.clone(),
        }),
        None => Arc::new(inner),
    }
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
    for agent in &agents {
        let allowed = &config.prompt.agents;
        if !allowed.is_empty() && !allowed.contains(&agent.name) {
            continue;
        }
        if crate::protocol::interactive::reads_saved_outputs(&agent.permission) {
            warn!(agent = %agent.name, "{}", crate::opencode::tool_output::AUDIT_WARNING);
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

/// `step`, unless `shutdown` resolves first (then `None`).
async fn unless_shutdown<T>(
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    step: impl Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        biased;
        _ = shutdown.as_mut() => None,
        r = step => Some(r),
    }
}
