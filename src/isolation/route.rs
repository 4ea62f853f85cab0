//! Where a turn runs: which server (the shared one, or its tenant's own)
//! and which workspace directory on it. Decided before the turn begins,
//! so the turn itself just drives the client and stream it is given.

use std::path::Path;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::workspaces::{DirLease, DirectoryStreams};
use super::{env, Lease, TenantServers};
use crate::config::Config;
use crate::opencode::{EventHub, OpenCodeClient, OpenCodeError};
use crate::protocol::workspace;
use crate::protocol::{ErrorCode, Prompt};
use crate::turn::{SessionStore, TurnError};

/// Workspaces and tenants' servers, when `[workspaces] root` is set.
pub struct Isolation {
    config: Arc<Config>,
    /// `[isolation] mode = "process"`.
    pub tenants: Option<Arc<TenantServers>>,
    dirs: Arc<DirectoryStreams>,
}

/// Workspaces and tenants' servers, in the daemon's `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct IsolationStatus {
    /// `shared` or `process`.
    pub mode: String,
    /// `[workspaces] root`.
    pub workspaces_root: String,
    /// Workspaces with an event stream open (turns in them lately).
    pub workspaces_open: usize,
    /// `process`: tenants' servers running or starting, and `max_servers`.
    pub tenant_servers: usize,
    pub max_servers: usize,
    /// `process`: servers started, stopped (idle or for another tenant)
    /// and restarted after a crash since the daemon started.
    pub server_starts: u64,
    pub server_stops: u64,
    pub server_restarts: u64,
}

/// What a turn holds while it runs: its tenant's server and its
/// workspace's stream.
pub struct Placed {
    pub client: OpenCodeClient,
    pub hub: Arc<EventHub>,
    /// The named workspace (`None`: the tenant's own directory).
    pub workspace: Option<String>,
    _server: Option<Lease>,
    _dir: Option<DirLease>,
}

impl Isolation {
    /// `None` without `[workspaces] root` (one directory for all).
    pub fn start(
        config: &Arc<Config>,
        sessions: &Arc<dyn SessionStore>,
        cancel: &CancellationToken,
    ) -> Option<Arc<Isolation>> {
        config.workspaces.root.as_ref()?;
        let tenants = config.isolation.mode.per_tenant().then(|| {
            info!(
                max_servers = config.isolation.max_servers,
                "isolation: one OpenCode server per tenant"
            );
            TenantServers::start(config.clone(), sessions.clone(), cancel.child_token())
        });
        Some(Arc::new(Isolation {
            config: config.clone(),
            tenants,
            dirs: DirectoryStreams::start(config.clone(), cancel.child_token()),
        }))
    }

    /// What `status` shows.
    pub fn status(&self) -> IsolationStatus {
        use std::sync::atomic::Ordering::Relaxed;
        let t = self.tenants.as_deref();
        IsolationStatus {
            mode: format!("{:?}", self.config.isolation.mode).to_lowercase(),
            workspaces_root: self
                .config
                .workspaces
                .root
                .as_ref()
                .map(|r| r.display().to_string())
                .unwrap_or_default(),
            workspaces_open: self.dirs.open(),
            tenant_servers: t.map_or(0, TenantServers::running),
            max_servers: self.config.isolation.max_servers,
            server_starts: t.map_or(0, |t| t.starts.load(Relaxed)),
            server_stops: t.map_or(0, |t| t.stops.load(Relaxed)),
            server_restarts: t.map_or(0, |t| t.restarts.load(Relaxed)),
        }
    }

    pub async fn stop(&self) {
        if let Some(t) = &self.tenants {
            t.stop().await;
        }
        self.dirs.stop().await;
    }

    /// Where `prompt` runs, given the shared server (`client`, `hub`) and
    /// the conversation map. A conversation keeps the workspace of its
    /// first turn (read from its session's directory).
    pub async fn place(
        &self,
        prompt: &Prompt,
        client: &OpenCodeClient,
        hub: &Arc<EventHub>,
        sessions: &dyn SessionStore,
    ) -> Result<Placed, TurnError> {
        let bad = |m: String| TurnError::new(ErrorCode::BadRequest, m);
        let root = self
            .config
            .workspaces
            .root
            .as_deref()
            .expect("started with a root");
        if prompt.workspace.is_some() && !self.config.workspaces.allow_named {
            return Err(bad(
                "named workspaces are off on this bridge ([workspaces] allow_named)".into(),
            ));
        }
        let tenant = prompt.caller.tenant();
        let base = workspace::directory(root, tenant, None).map_err(bad)?;
        let (client, hub, server) = match (&self.tenants, tenant) {
            (Some(t), Some(name)) => {
                let lease = t.lease(name).await?;
                let (c, h) = (lease.server.client.clone(), lease.server.hub.clone());
                (c, h, Some(lease))
            }
            _ => (client.clone(), hub.clone(), None),
        };
        // A server being restarted: the prompt waits for it (as in
        // `turn::begin`) before asking it about the conversation.
        if hub.state().borrow().restarting
            && !hub
                .wait_connected(self.config.opencode.startup_timeout)
                .await
        {
            return Err(TurnError::new(
                ErrorCode::OpencodeUnavailable,
                "OpenCode exited and has not come back yet",
            ));
        }
        let kept = conversation_workspace(prompt, &client, sessions, &base).await?;
        let named = match (kept, &prompt.workspace) {
            (Some(kept), Some(asked)) if kept.as_deref() != Some(asked.as_str()) => {
                return Err(bad(format!(
                    "conversation {:?} works in {}; a conversation keeps the workspace of its first turn (start a new conversation for workspace {asked:?})",
                    prompt.conversation.as_deref().unwrap_or_default(),
                    kept.map_or("its tenant's own directory".into(), |k| format!("workspace {k:?}")),
                )))
            }
            (Some(kept), _) => kept,
            (None, asked) => asked.clone(),
        };
        let dir = workspace::directory(root, tenant, named.as_deref()).map_err(bad)?;
        prepare(
            root,
            &base,
            &dir,
            self.config.workspaces.template.as_deref(),
        )?;
        let dir_str = dir.display().to_string();
        if client.directory() == Some(dir_str.as_str()) {
            return Ok(Placed {
                client,
                hub,
                workspace: named,
                _server: server,
                _dir: None,
            });
        }
        let lease = self.dirs.lease(&client, &hub, &dir_str);
        Ok(Placed {
            client: lease.client.clone(),
            hub: lease.hub.clone(),
            workspace: named,
            _server: server,
            _dir: Some(lease),
        })
    }
}

/// The workspace the prompt's conversation already works in: `None` for
/// a new conversation (or one whose session is gone), `Some(None)` for
/// the tenant's own directory, `Some(Some(name))` for a named one.
async fn conversation_workspace(
    prompt: &Prompt,
    client: &OpenCodeClient,
    sessions: &dyn SessionStore,
    base: &Path,
) -> Result<Option<Option<String>>, TurnError> {
    let id = match (&prompt.session_id, &prompt.conversation) {
        (Some(id), _) => id.clone(),
        (None, Some(conv)) => match sessions.get(conv).await {
            Some(id) => id,
            None => return Ok(None),
        },
        (None, None) => return Ok(None),
    };
    let info = match client.get_session(&id).await {
        Ok(info) => info,
        Err(OpenCodeError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let Some(dir) = info.directory else {
        return Ok(None);
    };
    match workspace::name_of(base, Path::new(&dir)) {
        Ok(name) => Ok(Some(name)),
        // A session made before workspaces were on (or by the operator
        // elsewhere): the session's checks decide, not the directory.
        Err(_) => {
            warn!(session_id = %id, directory = %dir, "the conversation's session works outside its workspaces");
            Ok(None)
        }
    }
}

/// Creates the root, the tenant's directory and the workspace (mode
/// 0700; a new workspace gets the template).
fn prepare(root: &Path, base: &Path, dir: &Path, template: Option<&Path>) -> Result<(), TurnError> {
    let made = std::fs::DirBuilder::new()
        .recursive(true)
        .create(root)
        .and_then(|()| {
            if base != root {
                env::create_workspace(base, if dir == base { template } else { None })?;
            }
            if dir != base {
                env::create_workspace(dir, template)?;
            }
            Ok(())
        });
    made.map_err(|e| {
        warn!(directory = %dir.display(), error = %e, "cannot create the workspace");
        TurnError::new(ErrorCode::Internal, "cannot create the workspace directory")
    })
}
