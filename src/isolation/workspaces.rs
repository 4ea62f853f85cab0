//! Workspaces on one OpenCode server. OpenCode serves any directory per
//! request (its `directory` query parameter: sessions, tools and project
//! context are that directory's), but `GET /event` shows one directory's
//! events only. So each workspace in use has an event stream of its own,
//! read by its own [`EventHub`], kept while turns use it and stopped
//! after a minute without.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::config::Config;
use crate::opencode::stream::{StreamOptions, StreamState};
use crate::opencode::{EventHub, OpenCodeClient};

/// How long a workspace's stream stays open without a turn.
const IDLE: Duration = Duration::from_secs(60);

struct Entry {
    client: OpenCodeClient,
    hub: Arc<EventHub>,
    stop: CancellationToken,
    busy: usize,
    last_used: Instant,
}

/// The event streams of the workspaces in use, by server and directory.
pub struct DirectoryStreams {
    config: Arc<Config>,
    entries: Mutex<HashMap<(String, String), Entry>>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

/// A turn's hold on a workspace's client and stream.
pub struct DirLease {
    pub client: OpenCodeClient,
    pub hub: Arc<EventHub>,
    pool: Arc<DirectoryStreams>,
    key: (String, String),
}

impl Drop for DirLease {
    fn drop(&mut self) {
        if let Some(e) = self.pool.lock().get_mut(&self.key) {
            e.busy = e.busy.saturating_sub(1);
            e.last_used = Instant::now();
        }
    }
}

impl DirectoryStreams {
    /// The streams, and their idle reaper (until `cancel`).
    pub fn start(config: Arc<Config>, cancel: CancellationToken) -> Arc<Self> {
        let pool = Arc::new(DirectoryStreams {
            config,
            entries: Mutex::new(HashMap::new()),
            cancel,
            tasks: TaskTracker::new(),
        });
        pool.tasks.spawn(pool.clone().reap_idle());
        pool
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `directory` on the server of `client` (whose own stream is
    /// `server_hub`): its client and its stream, opened if need be. The
    /// workspace's stream hears the server's exits and restarts from
    /// `server_hub`, so its turns end at once as well.
    pub fn lease(
        self: &Arc<Self>,
        client: &OpenCodeClient,
        server_hub: &Arc<EventHub>,
        directory: &str,
    ) -> DirLease {
        let key = (client.base_url().to_string(), directory.to_string());
        let mut entries = self.lock();
        let e = entries.entry(key.clone()).or_insert_with(|| {
            let client = client.in_directory(directory);
            let hub = EventHub::new(self.config.turn.event_buffer);
            let stop = self.cancel.child_token();
            let opts = StreamOptions::from(&self.config.opencode, &self.config.limits);
            self.tasks
                .spawn(hub.clone().run(client.clone(), opts, stop.clone()));
            self.tasks
                .spawn(relay(server_hub.state(), hub.clone(), stop.clone()));
            debug!(%directory, "opened a workspace's event stream");
            Entry {
                client,
                hub,
                stop,
                busy: 0,
                last_used: Instant::now(),
            }
        });
        e.busy += 1;
        DirLease {
            client: e.client.clone(),
            hub: e.hub.clone(),
            pool: self.clone(),
            key,
        }
    }

    async fn reap_idle(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(IDLE / 4) => {}
            }
            self.lock().retain(|_, e| {
                let keep = e.busy > 0 || e.last_used.elapsed() < IDLE;
                if !keep {
                    e.stop.cancel();
                }
                keep
            });
        }
    }

    /// Workspaces with a stream open.
    pub fn open(&self) -> usize {
        self.lock().len()
    }

    /// Stops every stream (the daemon stops).
    pub async fn stop(&self) {
        self.cancel.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await;
    }
}

/// Passes the server's exits and restarts on to a workspace's stream.
async fn relay(
    mut server: watch::Receiver<StreamState>,
    hub: Arc<EventHub>,
    stop: CancellationToken,
) {
    let mut exits = server.borrow().exits;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = server.changed() => if r.is_err() { return },
        }
        let s = *server.borrow_and_update();
        if s.exits != exits {
            exits = s.exits;
            hub.server_exited();
        }
        if s.connected && hub.state().borrow().restarting {
            hub.server_restarted();
        }
    }
}
