//! The daemon binary as a process of its own (to kill it for real): its
//! stderr read line by line, and started only once it says it serves.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc::UnboundedReceiver;

/// The binary under test.
pub use super::ops::BIN;

/// Spawns `cmd` (the daemon, its arguments and environment set), forwards
/// its log lines (echoed with `SHOW_DAEMON_LOG=1`), and waits up to
/// `ready` for "opencode-nats-bridge is serving"; panics with the log so
/// far if it does not come. Killed when the child is dropped.
pub async fn spawn_serving(
    mut cmd: Command,
    ready: Duration,
) -> (Child, UnboundedReceiver<String>) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the daemon");
    let mut log = log_lines(&mut child);
    let mut seen = Vec::new();
    let serving = wait_for_line(
        &mut log,
        &mut seen,
        "opencode-nats-bridge is serving",
        ready,
    )
    .await;
    assert!(serving, "daemon not ready; log:\n{}", seen.join("\n"));
    (child, log)
}

/// The daemon's stderr, line by line (echoed with `SHOW_DAEMON_LOG=1`); the
/// lines are read to the end even when the receiver is dropped.
pub fn log_lines(child: &mut Child) -> UnboundedReceiver<String> {
    let (tx, log) = tokio::sync::mpsc::unbounded_channel();
    let stderr = child.stderr.take().expect("the daemon's stderr is piped");
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        let show = std::env::var_os("SHOW_DAEMON_LOG").is_some();
        while let Ok(Some(l)) = lines.next_line().await {
            if show {
                eprintln!("daemon: {l}");
            }
            let _ = tx.send(l);
        }
    });
    log
}

/// Reads `log` into `seen` until a line contains `needle` (true), the log
/// ends or `bound` passes (false).
pub async fn wait_for_line(
    log: &mut UnboundedReceiver<String>,
    seen: &mut Vec<String>,
    needle: &str,
    bound: Duration,
) -> bool {
    let found = tokio::time::timeout(bound, async {
        while let Some(l) = log.recv().await {
            let hit = l.contains(needle);
            seen.push(l);
            if hit {
                return true;
            }
        }
        false
    })
    .await;
    matches!(found, Ok(true))
}
