//! `[isolation] mode = "process"`: one embedded `opencode serve` per
//! tenant, started on the tenant's first prompt in `<root>/<tenant>`,
//! stopped after `idle_stop` without turns, at most `max_servers` at once.
//!
//! Each server has its own storage (`<root>/<tenant>/.opencode/`), its own
//! password, its own event stream ([`EventHub`]) and its own supervisor: a
//! crash fails only that tenant's turns in flight (at once) and restarts
//! it. A turn takes a [`Lease`] on its tenant's server for its whole run
//! (`turn::queue` asks for it): the narrowest seam, the turn itself drives
//! whatever client and stream the lease holds.

pub mod env;
pub mod route;
pub mod workspaces;

pub use route::{Isolation, IsolationStatus, Placed};

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, OnceCell};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Config;
use crate::opencode::embedded::{asking_config, EmbeddedServer};
use crate::opencode::stream::StreamOptions;
use crate::opencode::{EventHub, OpenCodeClient};
use crate::protocol::ErrorCode;
use crate::sandbox::TenantSandbox;
use crate::turn::{SessionStore, TurnError};

/// One tenant's running server: what its turns drive.
pub struct Running {
    pub client: OpenCodeClient,
    pub hub: Arc<EventHub>,
    /// `<root>/<tenant>`, the server's directory.
    pub directory: PathBuf,
    /// Stops its reader and its supervisor (which stops the server).
    stop: CancellationToken,
    /// Cancelled once the server has stopped (its supervisor ended).
    stopped: CancellationToken,
}

type Start = Arc<OnceCell<Arc<Running>>>;

/// A tenant's place in the pool: its server (once started) and how many
/// turns use it.
struct Slot {
    server: Start,
    busy: usize,
    last_used: Instant,
}

/// The tenants' servers.
pub struct TenantServers {
    config: Arc<Config>,
    sessions: Arc<dyn SessionStore>,
    slots: Mutex<HashMap<String, Slot>>,
    /// A server became idle or was stopped: a tenant waiting for a place
    /// looks again.
    freed: Notify,
    cancel: CancellationToken,
    tasks: TaskTracker,
    /// Servers started (first starts, not restarts) and stopped for idling
    /// or for another tenant's place.
    pub starts: AtomicU64,
    pub stops: AtomicU64,
    /// Restarts after a crash, over every tenant.
    pub restarts: Arc<AtomicU64>,
}

/// A turn's hold on its tenant's server: the server is not stopped for
/// idling or for another tenant while a lease on it lives.
pub struct Lease {
    pub server: Arc<Running>,
    _place: Place,
}

/// A place in the pool counted busy; dropping it counts it free.
struct Place {
    pool: Arc<TenantServers>,
    tenant: String,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut slots = self.pool.lock();
        if let Some(s) = slots.get_mut(&self.tenant) {
            s.busy = s.busy.saturating_sub(1);
            s.last_used = Instant::now();
        }
        drop(slots);
        self.pool.freed.notify_waiters();
    }
}

impl TenantServers {
    /// The pool, and its idle reaper (until `cancel`).
    pub fn start(
        config: Arc<Config>,
        sessions: Arc<dyn SessionStore>,
        cancel: CancellationToken,
    ) -> Arc<Self> {
        let pool = Arc::new(TenantServers {
            config,
            sessions,
            slots: Mutex::new(HashMap::new()),
            freed: Notify::new(),
            cancel,
            tasks: TaskTracker::new(),
            starts: AtomicU64::new(0),
            stops: AtomicU64::new(0),
            restarts: Arc::new(AtomicU64::new(0)),
        });
        pool.tasks.spawn(pool.clone().reap_idle());
        pool
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Servers running or starting.
    pub fn running(&self) -> usize {
        self.lock().len()
    }

    /// `tenant`'s server, started if it is not running; waits (at most
    /// `[isolation] server_wait`) for a place under `max_servers`, then
    /// for the start. `overloaded` when no place freed in time,
    /// `opencode_unavailable` when the server would not start.
    pub async fn lease(self: &Arc<Self>, tenant: &str) -> Result<Lease, TurnError> {
        let wait = self.config.isolation.server_wait;
        let deadline = Instant::now() + wait;
        let server = loop {
            let freed = self.freed.notified();
            if let Some((start, evicted)) = self.take_place(tenant) {
                // `max_servers` holds: the evicted server is gone first.
                if let Some(stopped) = evicted {
                    stopped.cancelled().await;
                }
                break start;
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                warn!(%tenant, max_servers = self.config.isolation.max_servers, "no tenant server place freed in time");
                return Err(TurnError::new(
                    ErrorCode::Overloaded,
                    format!(
                        "all {} tenant OpenCode servers are busy and none freed within {} ([isolation] max_servers); retry later",
                        self.config.isolation.max_servers,
                        humantime::format_duration(wait)
                    ),
                ));
            }
        };
        // The lease exists from here: a failed start gives its place back.
        let place = Place {
            pool: self.clone(),
            tenant: tenant.to_string(),
        };
        let started = tokio::time::timeout_at(
            deadline.max(Instant::now() + self.config.opencode.startup_timeout),
            server.get_or_try_init(|| self.start_server(tenant)),
        )
        .await;
        match started {
            Ok(Ok(running)) => Ok(Lease {
                server: running.clone(),
                _place: place,
            }),
            Ok(Err(e)) => {
                self.forget_failed(tenant, &server);
                Err(e)
            }
            Err(_) => Err(TurnError::new(
                ErrorCode::OpencodeUnavailable,
                "the tenant's OpenCode server did not start in time",
            )),
        }
    }

    /// A place for `tenant` (its own, a free one, or an idle tenant's,
    /// whose server is stopped: then also what says it has stopped),
    /// counted busy; `None`: every place is busy.
    fn take_place(&self, tenant: &str) -> Option<(Start, Option<CancellationToken>)> {
        let mut slots = self.lock();
        if let Some(s) = slots.get_mut(tenant) {
            s.busy += 1;
            return Some((s.server.clone(), None));
        }
        let mut evicted = None;
        if slots.len() >= self.config.isolation.max_servers {
            let idle = slots
                .iter()
                .filter(|(_, s)| s.busy == 0 && s.server.initialized())
                .min_by_key(|(_, s)| s.last_used)
                .map(|(t, _)| t.clone())?;
            let slot = slots.remove(&idle).expect("found above");
            info!(tenant = %idle, for_tenant = %tenant, "stopping an idle tenant server for another tenant");
            evicted = self.stop_slot(slot);
        }
        let start: Start = Arc::default();
        slots.insert(
            tenant.to_string(),
            Slot {
                server: start.clone(),
                busy: 1,
                last_used: Instant::now(),
            },
        );
        Some((start, evicted))
    }

    /// A start failed: the next prompt of the tenant tries a new one. (A
    /// turn of the tenant still waiting on the same start tries again in
    /// the same place, so the place stays while it does.)
    fn forget_failed(&self, tenant: &str, start: &Start) {
        let mut slots = self.lock();
        if slots
            .get(tenant)
            .is_some_and(|s| Arc::ptr_eq(&s.server, start) && !start.initialized() && s.busy <= 1)
        {
            slots.remove(tenant);
        }
    }

    /// Stops a slot's server; what says when it has stopped.
    fn stop_slot(&self, slot: Slot) -> Option<CancellationToken> {
        let running = slot.server.get()?;
        running.stop.cancel();
        self.stops.fetch_add(1, Ordering::Relaxed);
        Some(running.stopped.clone())
    }

    /// Stops servers without turns for `[isolation] idle_stop`.
    async fn reap_idle(self: Arc<Self>) {
        let idle_stop = self.config.isolation.idle_stop;
        let every = (idle_stop / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let stale: Vec<(String, Slot)> = {
                let mut slots = self.lock();
                let names: Vec<String> = slots
                    .iter()
                    .filter(|(_, s)| {
                        s.busy == 0 && s.server.initialized() && s.last_used.elapsed() >= idle_stop
                    })
                    .map(|(t, _)| t.clone())
                    .collect();
                names
                    .into_iter()
                    .filter_map(|t| slots.remove(&t).map(|s| (t, s)))
                    .collect()
            };
            for (tenant, slot) in stale {
                info!(%tenant, ?idle_stop, "stopping an idle tenant OpenCode server");
                self.stop_slot(slot);
            }
            self.freed.notify_waiters();
        }
    }

    /// Starts `tenant`'s server: its directories, its environment, the
    /// process, its event stream and its supervisor; then learns its
    /// conversations (after a daemon restart the map does not know them).
    async fn start_server(&self, tenant: &str) -> Result<Arc<Running>, TurnError> {
        let cfg = &self.config;
        let root = cfg.workspaces.root.as_deref().expect("validated");
        let unavailable = |what: String| TurnError::new(ErrorCode::OpencodeUnavailable, what);
        let layout = env::Layout::create(root, tenant, cfg.workspaces.template.as_deref())
            .map_err(|e| {
                warn!(%tenant, error = %e, "cannot prepare the tenant's directories");
                unavailable("cannot prepare the tenant's workspace".into())
            })?;
        let vars = layout.environment(&cfg.isolation);
        let sandbox =
            TenantSandbox::for_tenant(&cfg.isolation, &layout.workspace, &layout.state, &vars)
                .map_err(|e| {
                    warn!(%tenant, error = %e, "cannot prepare the tenant's sandbox");
                    unavailable("cannot prepare the tenant's sandbox".into())
                })?;
        let content = asking_config(std::env::var("OPENCODE_CONFIG_CONTENT").ok().as_deref());
        let t0 = Instant::now();
        let (server, client) = EmbeddedServer::start_in(
            &cfg.opencode,
            layout.workspace.clone(),
            Some(vars),
            content,
            sandbox.as_ref(),
        )
        .await
        .map_err(|e| {
            warn!(%tenant, error = %e, "cannot start the tenant's OpenCode server");
            unavailable("the tenant's OpenCode server did not start".into())
        })?;
        let stop = self.cancel.child_token();
        let hub = EventHub::new(cfg.turn.event_buffer);
        let opts = StreamOptions::from(&cfg.opencode, &cfg.limits);
        self.tasks
            .spawn(hub.clone().run(client.clone(), opts, stop.clone()));
        let stopped = CancellationToken::new();
        let supervised = server.supervise(stop.clone(), self.restarts.clone(), hub.clone());
        let done = stopped.clone();
        self.tasks.spawn(async move {
            supervised.await;
            done.cancel();
        });
        self.starts.fetch_add(1, Ordering::Relaxed);
        info!(%tenant, elapsed = ?t0.elapsed(), directory = %layout.workspace.display(), "tenant OpenCode server started");
        self.learn_sessions(tenant, &client).await;
        Ok(Arc::new(Running {
            client,
            hub,
            directory: layout.workspace,
            stop,
            stopped,
        }))
    }

    /// Puts the tenant's conversations its server has sessions for, and
    /// the map does not know, into the map.
    async fn learn_sessions(&self, tenant: &str, client: &OpenCodeClient) {
        let prefix = &self.config.opencode.title_prefix;
        let sessions = match client.list_sessions().await {
            Ok(s) => s,
            Err(e) => {
                warn!(%tenant, error = %e, "cannot list the tenant server's sessions");
                return;
            }
        };
        for s in sessions.iter().filter(|s| s.parent_id.is_none()) {
            let Some(conv) = s.title.strip_prefix(prefix.as_str()) else {
                continue;
            };
            if crate::protocol::tenant::is_under(conv, tenant)
                && self.sessions.get(conv).await.is_none()
            {
                self.sessions.put(conv, &s.id).await;
            }
        }
    }

    /// Stops every server (the daemon stops), waiting for them.
    pub async fn stop(&self) {
        self.cancel.cancel();
        self.tasks.close();
        if tokio::time::timeout(Duration::from_secs(15), self.tasks.wait())
            .await
            .is_err()
        {
            warn!("some tenant OpenCode servers did not stop in time");
        }
    }
}
