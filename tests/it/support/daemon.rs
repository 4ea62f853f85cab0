//! The daemon binary as a process of its own (to kill it for real): its
//! stderr read line by line, and started only once it says it serves.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc::UnboundedReceiver;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_opencode-nats-bridge");

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
    let (tx, mut log) = tokio::sync::mpsc::unbounded_channel();
    let stderr = child.stderr.take().unwrap();
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
    let mut seen = Vec::new();
    let serving = tokio::time::timeout(ready, async {
        while let Some(l) = log.recv().await {
            let done = l.contains("opencode-nats-bridge is serving");
            seen.push(l);
            if done {
                return true;
            }
        }
        false
    })
    .await;
    assert!(
        matches!(serving, Ok(true)),
        "daemon not ready; log:\n{}",
        seen.join("\n")
    );
    (child, log)
}
