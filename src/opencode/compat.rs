//! Which OpenCode the bridge talks to: its version read at start-up and
//! after every reconnect of the event stream, judged by [`super::version`],
//! plus a probe of a v1 route, so a server the bridge cannot drive is
//! refused with one clear message rather than a cascade of 404s.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::client::{OpenCodeClient, OpenCodeError};
use super::stream::StreamState;
use super::version::{classify, supported_range, Verdict};

/// How long one look at the server may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// What one look found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The server answered; `verdict` is not [`Verdict::Refused`].
    Served { version: String, verdict: Verdict },
    /// A server the bridge cannot drive (a configuration problem).
    Refused {
        version: Option<String>,
        reason: String,
    },
    /// It did not answer (it may still be starting): look again later.
    Unreachable(String),
}

/// Looks at the server: `GET /global/health` for the version, then
/// `GET /session/status` (a v1 route the bridge uses; cheap: it lists busy
/// sessions only) to see that the routes are there.
pub async fn probe(client: &OpenCodeClient) -> Probe {
    let version = match client.health(PROBE_TIMEOUT).await {
        Ok(h) => h.version,
        Err(OpenCodeError::NotFound { .. }) => {
            return Probe::Refused {
                version: None,
                reason: format!(
                    "{} has no GET /global/health: it is not an OpenCode server the bridge can drive (supported: OpenCode {})",
                    client.base_url(),
                    supported_range()
                ),
            }
        }
        Err(e) => return Probe::Unreachable(e.to_string()),
    };
    let verdict = classify(&version);
    if let Verdict::Refused(reason) = verdict {
        return Probe::Refused {
            version: Some(version),
            reason,
        };
    }
    match client.session_status().await {
        Err(OpenCodeError::NotFound { .. }) => Probe::Refused {
            reason: format!(
                "OpenCode {version:?} has no GET /session/status: the v1 HTTP routes the bridge uses are missing (OpenCode 2.x removed them); run OpenCode {}",
                supported_range()
            ),
            version: Some(version),
        },
        // Any other failure is not about the version: the turns will say.
        _ => Probe::Served { version, verdict },
    }
}

/// The start-up look: reads the version and probes the v1 routes, records
/// and logs what it found. `Err` with the reason when the server is one the
/// bridge cannot drive. A server that does not answer yet is looked at
/// again when the event stream connects ([`watch_reconnects`]).
pub async fn check_at_start(client: &OpenCodeClient, seen: &SeenVersion) -> Result<(), String> {
    let p = probe(client).await;
    seen.record(&p);
    log(&p, "start-up");
    match p {
        Probe::Refused { reason, .. } => Err(reason),
        _ => Ok(()),
    }
}

/// The version last seen, for `status` and the micro service metadata.
#[derive(Debug, Default)]
pub struct SeenVersion {
    inner: Mutex<Seen>,
}

#[derive(Debug, Default, Clone)]
struct Seen {
    version: Option<String>,
    refused: Option<String>,
}

impl SeenVersion {
    /// The version OpenCode last reported (`None`: not read yet).
    pub fn version(&self) -> Option<String> {
        self.lock().version.clone()
    }

    /// Why the server now running is refused (after a reconnect to a
    /// different one); the daemon reports itself unhealthy.
    pub fn refused(&self) -> Option<String> {
        self.lock().refused.clone()
    }

    /// Records a probe; returns whether the version changed.
    pub fn record(&self, p: &Probe) -> bool {
        let mut s = self.lock();
        let before = s.version.clone();
        match p {
            Probe::Served { version, .. } => {
                s.version = Some(version.clone());
                s.refused = None;
            }
            Probe::Refused { version, reason } => {
                s.version = version.clone().or(s.version.take());
                s.refused = Some(reason.clone());
            }
            Probe::Unreachable(_) => {}
        }
        s.version != before
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Logs a probe: the version at info, an untested one at warn, a refused
/// one at error.
pub fn log(p: &Probe, when: &str) {
    match p {
        Probe::Served {
            version,
            verdict: Verdict::Supported,
        } => info!(%version, when, "OpenCode version"),
        Probe::Served {
            version,
            verdict: Verdict::Untested(why),
        } => warn!(%version, when, "{why}"),
        Probe::Served { .. } => {}
        Probe::Refused { version, reason } => {
            error!(
                version = version.as_deref().unwrap_or("?"),
                when, "{reason}"
            )
        }
        Probe::Unreachable(e) => {
            warn!(error = %e, when, "cannot read OpenCode's version yet; it is read again when the event stream connects")
        }
    }
}

/// Reads the version again every time the event stream (re)connects, until
/// `cancel`. The first connection after a start-up probe that found the
/// version is skipped (it was just read).
pub async fn watch_reconnects(
    client: OpenCodeClient,
    mut state: watch::Receiver<StreamState>,
    seen: std::sync::Arc<SeenVersion>,
    cancel: CancellationToken,
) {
    let mut last_epoch = 0;
    loop {
        let changed = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            r = state.wait_for(|s| s.connected && s.epoch != last_epoch) => r.map(|s| s.epoch),
        };
        let Ok(epoch) = changed else { return };
        let first = last_epoch == 0;
        last_epoch = epoch;
        if first && seen.version().is_some() {
            continue;
        }
        let p = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            p = probe(&client) => p,
        };
        seen.record(&p);
        log(&p, "event stream connected");
    }
}
