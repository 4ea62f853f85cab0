//! `sd_notify` for `Type=notify` units, over the `NOTIFY_SOCKET` datagram
//! socket (a path, or an abstract name starting with `@`): `READY=1` once
//! the daemon serves, `WATCHDOG=1` while it is healthy, `STOPPING=1` when a
//! stop begins, `STATUS=...` for `systemctl status`.
//!
//! Without `NOTIFY_SOCKET` (not under systemd, or another `Type=`) every
//! call is a no-op. Sending never blocks the daemon: the socket is
//! non-blocking and a failed send is logged, not fatal.

use std::ffi::OsString;
use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

use tracing::{debug, warn};

/// Where notifications go.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Path(PathBuf),
    /// An abstract socket name (without the leading `@`/NUL).
    Abstract(Vec<u8>),
}

/// The service manager's notification socket.
#[derive(Debug, Clone)]
pub struct Notifier {
    target: Target,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`; `None`
    /// when there is no socket to notify.
    pub fn from_env() -> Option<Notifier> {
        Self::from_vars(
            std::env::var_os("NOTIFY_SOCKET"),
            std::env::var("WATCHDOG_USEC").ok(),
            std::env::var("WATCHDOG_PID").ok(),
            std::process::id(),
        )
    }

    fn from_vars(
        socket: Option<OsString>,
        watchdog_usec: Option<String>,
        watchdog_pid: Option<String>,
        pid: u32,
    ) -> Option<Notifier> {
        let socket = socket?;
        let bytes = socket.as_encoded_bytes();
        let target = match bytes.first() {
            Some(b'@') => Target::Abstract(bytes[1..].to_vec()),
            Some(b'/') => Target::Path(PathBuf::from(&socket)),
            _ => {
                warn!(
                    socket = %socket.to_string_lossy(),
                    "NOTIFY_SOCKET is neither a path nor an abstract name; not notifying"
                );
                return None;
            }
        };
        // The watchdog is meant for us unless WATCHDOG_PID names another
        // process (a wrapper script that exec'd us keeps the same pid).
        let for_us = watchdog_pid
            .map(|p| p.trim().parse::<u32>().ok() == Some(pid))
            .unwrap_or(true);
        let watchdog = watchdog_usec
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|u| *u > 0 && for_us)
            .map(Duration::from_micros);
        Some(Notifier { target, watchdog })
    }

    /// `WatchdogSec=` of the unit, if the watchdog is on for this process.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends one notification (`READY=1`, `STATUS=...`; several lines may
    /// be joined with `\n`).
    pub fn notify(&self, state: &str) -> io::Result<()> {
        let sock = UnixDatagram::unbound()?;
        sock.set_nonblocking(true)?;
        match &self.target {
            Target::Path(p) => sock.send_to(state.as_bytes(), p)?,
            Target::Abstract(name) => send_abstract(&sock, name, state.as_bytes())?,
        };
        debug!(state, "sd_notify");
        Ok(())
    }

    /// [`notify`](Self::notify), logging a failure instead of returning it.
    pub fn notify_or_warn(&self, state: &str) {
        if let Err(e) = self.notify(state) {
            warn!(error = %e, state, "sd_notify failed");
        }
    }
}

#[cfg(target_os = "linux")]
fn send_abstract(sock: &UnixDatagram, name: &[u8], data: &[u8]) -> io::Result<usize> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    sock.send_to_addr(data, &addr)
}

#[cfg(not(target_os = "linux"))]
fn send_abstract(_: &UnixDatagram, _: &[u8], _: &[u8]) -> io::Result<usize> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract unix sockets exist only on Linux",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(socket: &str, usec: Option<&str>, pid: Option<&str>) -> Option<Notifier> {
        Notifier::from_vars(
            Some(socket.into()),
            usec.map(str::to_string),
            pid.map(str::to_string),
            42,
        )
    }

    #[test]
    fn reads_the_environment() {
        assert!(Notifier::from_vars(None, Some("1".into()), None, 42).is_none());
        assert!(vars("relative/path", None, None).is_none());
        assert!(vars("", None, None).is_none());
        let n = vars("/run/systemd/notify", Some("30000000"), None).unwrap();
        assert_eq!(n.target, Target::Path("/run/systemd/notify".into()));
        assert_eq!(n.watchdog(), Some(Duration::from_secs(30)));
        let n = vars("@sd-notify", Some("500000"), Some("42")).unwrap();
        assert_eq!(n.target, Target::Abstract(b"sd-notify".to_vec()));
        assert_eq!(n.watchdog(), Some(Duration::from_millis(500)));
        // The watchdog of another process, or none at all.
        assert_eq!(
            vars("/s", Some("500000"), Some("7")).unwrap().watchdog(),
            None
        );
        assert_eq!(vars("/s", Some("0"), None).unwrap().watchdog(), None);
        assert_eq!(vars("/s", Some("soon"), None).unwrap().watchdog(), None);
    }

    #[test]
    fn sends_datagrams_to_a_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = vars(path.to_str().unwrap(), None, None).unwrap();
        n.notify("READY=1\nSTATUS=serving").unwrap();
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sends_datagrams_to_an_abstract_name() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("opencode-nats-bridge-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        let n = vars(&format!("@{name}"), None, None).unwrap();
        n.notify("STOPPING=1").unwrap();
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STOPPING=1");
    }

    #[test]
    fn a_missing_socket_is_an_error_not_a_hang() {
        let n = vars("/nonexistent/notify.sock", None, None).unwrap();
        assert!(n.notify("READY=1").is_err());
    }
}
