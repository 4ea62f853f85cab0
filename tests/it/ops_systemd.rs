//! The real binary under a stand-in for systemd: the test binds the
//! `NOTIFY_SOCKET` datagram socket (a path, or an abstract name) and reads
//! what the daemon says: `READY=1` once it serves, `WATCHDOG=1` while it is
//! healthy, none while OpenCode's event stream is down, `STOPPING=1` on
//! SIGTERM.

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::net::UnixDatagram;
use tokio::process::Child;

use crate::support::bridge::{request, terminal};
use crate::support::daemon::log_lines;
use crate::support::fake_opencode::{echo_reply, FakeOpenCode};
use crate::support::nats::{client, NatsServer};
use crate::support::ops::command;

/// What the daemon sent, in order.
struct Manager {
    sock: UnixDatagram,
    seen: Vec<String>,
}

impl Manager {
    /// The next datagram within `within`, or `None`.
    async fn recv(&mut self, within: Duration) -> Option<String> {
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(within, self.sock.recv(&mut buf))
            .await
            .ok()?
            .expect("recv on the notify socket");
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        self.seen.push(msg.clone());
        Some(msg)
    }

    /// Reads until a datagram has `line` as one of its lines.
    async fn expect(&mut self, line: &str, within: Duration) -> String {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv(left).await {
                Some(m) if m.lines().any(|l| l == line || l.starts_with(line)) => return m,
                Some(_) => {}
                None => panic!("no {line:?} within {within:?}; got {:#?}", self.seen),
            }
        }
    }
}

/// Starts the daemon against `fake` with `notify_socket`; its stderr is
/// forwarded with `SHOW_DAEMON_LOG`.
fn start(
    nats_url: &str,
    fake: &FakeOpenCode,
    notify_socket: &str,
    watchdog_usec: Option<&str>,
) -> Child {
    let mut cmd = command(&["run"]);
    cmd.env("OPENCODE_BRIDGE__NATS__URL", nats_url)
        .env("OPENCODE_BRIDGE__OPENCODE__BASE_URL", fake.url())
        .env("OPENCODE_BRIDGE__OPENCODE__RECONNECT_MIN", "50ms")
        .env("OPENCODE_BRIDGE__OPENCODE__RECONNECT_MAX", "200ms")
        .env("OPENCODE_BRIDGE__SHUTDOWN__GRACE", "2s")
        .env("OPENCODE_BRIDGE__SERVICE__HEARTBEAT_INTERVAL", "0s")
        .env("NOTIFY_SOCKET", notify_socket)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null());
    if let Some(u) = watchdog_usec {
        cmd.env("WATCHDOG_USEC", u);
    }
    let mut child = cmd.spawn().expect("spawn the daemon");
    drop(log_lines(&mut child));
    child
}

async fn sigterm_and_wait(child: &mut Child) -> std::process::ExitStatus {
    kill(Pid::from_raw(child.id().unwrap() as i32), Signal::SIGTERM).unwrap();
    tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the daemon exits after SIGTERM")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_watchdog_while_healthy_and_stopping() {
    let nats = NatsServer::start();
    let fake = FakeOpenCode::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let mut mgr = Manager {
        sock: UnixDatagram::bind(&path).unwrap(),
        seen: Vec::new(),
    };
    // A 1 s watchdog: pings every 500 ms.
    let mut daemon = start(&nats.url(), &fake, path.to_str().unwrap(), Some("1000000"));

    let ready = mgr.expect("READY=1", Duration::from_secs(30)).await;
    assert!(
        ready.contains("STATUS=serving prompts on opencode.prompt"),
        "{ready:?}"
    );
    // READY means serving: a prompt sent now is answered.
    let c = client(&nats.url()).await;
    let r = request(
        &c,
        "opencode.prompt",
        "are you up?",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(terminal(&r)["content"], echo_reply("are you up?"));
    for _ in 0..3 {
        mgr.expect("WATCHDOG=1", Duration::from_secs(3)).await;
    }

    // OpenCode goes away: the event stream is down, pings stop.
    drop(fake);
    let why = mgr.expect("STATUS=unhealthy", Duration::from_secs(5)).await;
    assert!(why.contains("event stream"), "{why:?}");
    let quiet_from = mgr.seen.len();
    while let Some(m) = mgr.recv(Duration::from_millis(1500)).await {
        assert!(
            !m.contains("WATCHDOG=1"),
            "a ping while unhealthy: {:#?}",
            &mgr.seen[quiet_from..]
        );
    }

    let status = sigterm_and_wait(&mut daemon).await;
    assert!(status.success(), "{status}");
    mgr.expect("STOPPING=1", Duration::from_secs(5)).await;
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abstract_notify_socket() {
    use std::os::linux::net::SocketAddrExt;
    let nats = NatsServer::start();
    let fake = FakeOpenCode::start().await;
    let name = format!(
        "opencode-nats-bridge-it-{}-{}",
        std::process::id(),
        rand_suffix()
    );
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let std_sock = std::os::unix::net::UnixDatagram::bind_addr(&addr).unwrap();
    std_sock.set_nonblocking(true).unwrap();
    let mut mgr = Manager {
        sock: UnixDatagram::from_std(std_sock).unwrap(),
        seen: Vec::new(),
    };
    let mut daemon = start(&nats.url(), &fake, &format!("@{name}"), None);
    mgr.expect("READY=1", Duration::from_secs(30)).await;
    let status = sigterm_and_wait(&mut daemon).await;
    assert!(status.success(), "{status}");
    let stopping = mgr.expect("STOPPING=1", Duration::from_secs(5)).await;
    assert!(stopping.contains("STATUS=stopping"), "{stopping:?}");
    // No watchdog was asked for: no pings.
    assert!(
        !mgr.seen.iter().any(|m| m.contains("WATCHDOG=1")),
        "{:#?}",
        mgr.seen
    );
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
}
