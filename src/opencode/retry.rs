//! What the client does when a call to OpenCode fails on the way: which
//! failures are tried again ([`Retry`]), and since when OpenCode has not
//! been reached ([`Reach`], shared by every clone of the client and by the
//! event-stream reader), so that a blip (a reset connection, a restarted
//! proxy) costs a retry and OpenCode counts as gone only after
//! `[opencode] unavailable_after` of failures.

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use super::client::{error_chain, OpenCodeError};

/// The first pause before a retry; it doubles up to [`MAX_PAUSE`].
pub const FIRST_PAUSE: Duration = Duration::from_millis(25);
pub const MAX_PAUSE: Duration = Duration::from_millis(500);

/// Which failures of a call are tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Once, whatever the time: for probes that loop themselves (start-up,
    /// version checks) and only need a stale pooled connection skipped.
    Once,
    /// Only a request that never left (no connection was made): the call
    /// is not idempotent, and one that may have reached OpenCode must not
    /// be sent again blindly.
    Unsent,
    /// Any failure on the way but a timeout: the call is idempotent.
    Idempotent,
}

impl Retry {
    /// Whether to try again after `lost`, the `attempt`-th retry (0 for the
    /// first); `window_over`: OpenCode has been unreachable for
    /// `unavailable_after` or longer.
    pub fn allows(self, lost: &Lost, attempt: u32, window_over: bool) -> bool {
        if lost.timeout {
            return false;
        }
        let in_window = attempt == 0 || !window_over;
        match self {
            Retry::Once => attempt == 0,
            Retry::Unsent => !lost.maybe_sent && in_window,
            Retry::Idempotent => in_window,
        }
    }
}

/// A call that got no (whole) answer.
#[derive(Debug)]
pub struct Lost {
    /// [`OpenCodeError::Unavailable`].
    pub error: OpenCodeError,
    /// The request may have reached OpenCode (the connection was made).
    pub maybe_sent: bool,
    /// It timed out.
    pub timeout: bool,
}

/// Why a call failed.
#[derive(Debug)]
pub enum Failure {
    /// On the way: see [`Lost`].
    Lost(Lost),
    /// OpenCode answered, badly.
    Answered(OpenCodeError),
}

impl Failure {
    pub fn lost(what: &str, e: &reqwest::Error) -> Failure {
        Failure::Lost(Lost {
            error: OpenCodeError::Unavailable {
                what: what.to_string(),
                detail: error_chain(e),
            },
            maybe_sent: !e.is_connect(),
            timeout: e.is_timeout(),
        })
    }

    pub fn into_error(self) -> OpenCodeError {
        match self {
            Failure::Lost(l) => l.error,
            Failure::Answered(e) => e,
        }
    }
}

/// Reads a 2xx answer's body, at most `max` bytes (above: a decode error,
/// not retried).
pub async fn read_body(
    what: &str,
    mut resp: reqwest::Response,
    max: usize,
) -> Result<Bytes, Failure> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| Failure::lost(what, &e))? {
        if body.len() + chunk.len() > max {
            return Err(Failure::Answered(OpenCodeError::Decode {
                what: what.to_string(),
                detail: format!("the answer is above {max} bytes"),
            }));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(body))
}

pub fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, OpenCodeError> {
    serde_json::from_slice(bytes).map_err(|e| OpenCodeError::Decode {
        what: what.to_string(),
        detail: e.to_string(),
    })
}

/// Since when OpenCode has not been reached: set by the first call (or
/// connect of the event stream) that failed on the way, cleared by any
/// answer, whatever its status.
#[derive(Debug, Default)]
pub struct Reach {
    since: Mutex<Option<Instant>>,
}

impl Reach {
    pub fn answered(&self) {
        *self.since.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// A failure of an attempt made at `started`; how long OpenCode has
    /// been unreachable now.
    pub fn failed(&self, started: Instant) -> Duration {
        let mut since = self.since.lock().unwrap_or_else(|p| p.into_inner());
        since.get_or_insert(started).elapsed()
    }

    pub fn down_for(&self) -> Option<Duration> {
        self.since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|s| s.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lost(maybe_sent: bool, timeout: bool) -> Lost {
        Lost {
            error: OpenCodeError::Unavailable {
                what: "x".into(),
                detail: "y".into(),
            },
            maybe_sent,
            timeout,
        }
    }

    #[test]
    fn what_is_tried_again() {
        let (sent, unsent, timed_out) = (lost(true, false), lost(false, false), lost(true, true));
        for r in [Retry::Once, Retry::Unsent, Retry::Idempotent] {
            assert!(!r.allows(&timed_out, 0, false), "{r:?}: a timeout");
        }
        assert!(Retry::Once.allows(&sent, 0, true));
        assert!(!Retry::Once.allows(&sent, 1, false));
        // A POST that may have reached OpenCode is not sent again.
        assert!(!Retry::Unsent.allows(&sent, 0, false));
        assert!(Retry::Unsent.allows(&unsent, 3, false));
        assert!(!Retry::Unsent.allows(&unsent, 3, true));
        // At least one retry, then only within the window.
        assert!(Retry::Idempotent.allows(&sent, 0, true));
        assert!(Retry::Idempotent.allows(&sent, 7, false));
        assert!(!Retry::Idempotent.allows(&sent, 1, true));
    }

    #[tokio::test(start_paused = true)]
    async fn reach_counts_from_the_first_failure_until_an_answer() {
        let r = Reach::default();
        assert_eq!(r.down_for(), None);
        let t0 = Instant::now();
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(r.failed(t0), Duration::from_secs(1));
        let t1 = Instant::now();
        tokio::time::advance(Duration::from_secs(2)).await;
        // A later failure does not restart the count.
        assert_eq!(r.failed(t1), Duration::from_secs(3));
        assert_eq!(r.down_for(), Some(Duration::from_secs(3)));
        r.answered();
        assert_eq!(r.down_for(), None);
    }
}
