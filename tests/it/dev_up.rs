//! `deploy/dev-up.sh` on a machine whose NATS server cannot serve the
//! daemon's JetStream features (Debian's 2.9.10, or any server with
//! JetStream off): it leaves that server alone, starts the pinned one on a
//! free port, says so in one line, and its daemon gets JetStream; a second
//! dev-up in the same directory refuses to start; every process it started
//! is gone after it stops. And the daemon itself, on such a server, says in
//! words what it turned off; the CLI's `turn` and `prompt --job` blame the
//! server, not a missing daemon.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::support::daemon::BIN;
use crate::support::fake_opencode::FakeOpenCode;

const WAIT: Duration = Duration::from_secs(90);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn answers(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// A process reading its stderr line by line; SIGTERM and a bounded wait
/// when dropped (dev-up cleans up after itself on SIGTERM).
struct Proc {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Proc {
    fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let show = std::env::var_os("SHOW_DAEMON_LOG").is_some();
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                if show {
                    eprintln!("dev-up: {l}");
                }
                let _ = tx.send(l);
            }
        });
        Proc {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first line (from now on) containing `needle`; panics with the
    /// output so far when none comes within [`WAIT`].
    fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    panic!("no line with {needle:?}; output:\n{}", self.log())
                }
            }
        }
    }

    fn log(&self) -> String {
        self.seen.join("\n")
    }

    /// SIGTERM, then its exit status (bounded), and the rest of its output.
    fn stop(&mut self) -> std::process::ExitStatus {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "did not stop:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        };
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(l);
        }
        status
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.stop();
        }
    }
}

/// A nats-server without JetStream on a free port: "old" to dev-up.
fn server_without_jetstream(bin: &str) -> (Proc, u16) {
    let port = free_port();
    let mut cmd = Command::new(bin);
    cmd.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
    let server = Proc::spawn(cmd);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !answers(port) {
        assert!(Instant::now() < deadline, "{bin} did not start on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    (server, port)
}

fn nats_server_bin() -> String {
    std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into())
}

fn dev_up(dir: &Path, probe: u16, fake: &FakeOpenCode) -> Command {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/dev-up.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(script)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", dir)
        .env("XDG_RUNTIME_DIR", dir)
        .env("DEV_UP_NATS", format!("127.0.0.1:{probe}"))
        .env("DEV_UP_BIN", BIN)
        .env("OPENCODE_BRIDGE__OPENCODE__BASE_URL", fake.url())
        .env("OPENCODE_BRIDGE__AGENT_PROTOCOL__ENABLED", "false")
        .env("RUST_LOG", "info");
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_up_starts_its_own_nats_server_beside_one_without_jetstream() {
    let (_old, old_port) = server_without_jetstream(&nats_server_bin());
    let fake = FakeOpenCode::start().await;
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut up = Proc::spawn(dev_up(dir.path(), old_port, &fake));

    // One line says why and where.
    let line = up.wait_for("starting the pinned nats-server");
    assert!(
        line.contains(&format!(
            "the NATS server on 127.0.0.1:{old_port} is nats-server "
        )) && line
            .contains("with JetStream off: starting the pinned nats-server 2.15.1 on 127.0.0.1:"),
        "{line}"
    );
    let own_port: u16 = line
        .split("starting the pinned nats-server 2.15.1 on 127.0.0.1:")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    assert_ne!(own_port, old_port);

    // Its daemon serves on the new server, with JetStream features on.
    let banner = up.wait_for("==> The bridge is serving");
    assert!(
        started.elapsed() < WAIT,
        "serving after {:?}",
        started.elapsed()
    );
    let url = format!("nats://127.0.0.1:{own_port}");
    assert!(banner.contains(&url), "{banner}");
    let try_it = up.wait_for("prompt --server");
    assert_eq!(
        try_it.trim(),
        format!(
            "{BIN} prompt --server {url} {}",
            opencode_nats_bridge::app::TRY_IT_ARGS
        )
    );
    let log = up.log();
    for on in [
        "taking durable jobs",
        "turn states are kept in KV",
        "joined the cluster",
    ] {
        assert!(log.contains(on), "{on:?} not in:\n{log}");
    }
    assert!(!log.contains("are off"), "{log}");
    // The daemon's log prints the same command.
    assert!(log.contains(&format!("try it: {}", try_it.trim())), "{log}");

    // A second dev-up in the same directory says where the first runs.
    let second = dev_up(dir.path(), old_port, &fake).output().unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    let dir_shown = dir.path().display().to_string();
    assert!(
        err.contains(&format!(
            "a bridge started by dev-up.sh already runs in {dir_shown}"
        )) && err.contains(&format!("dev-up pid {}", up.child.id())),
        "{err}"
    );
    assert!(!err.contains("serving"), "{err}");

    // Stopped: the daemon drained, its nats-server is gone, the old one
    // was left alone.
    let status = up.stop();
    let log = up.log();
    assert!(status.success(), "{status}\n{log}");
    assert!(log.contains("stopped"), "{log}");
    assert!(
        log.contains("dev-up: stopping the nats-server it started"),
        "{log}"
    );
    assert!(!answers(own_port), "dev-up's nats-server still answers");
    assert!(answers(old_port), "the old server was stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_says_what_a_server_without_jetstream_turns_off() {
    let mut servers = vec![(
        "pinned, JetStream off",
        nats_server_bin(),
        "offers no JetStream to this user (JetStream off: start it with -js",
    )];
    // Debian's 2.9.10, where the machine has it (CI has not).
    let debian = "/usr/sbin/nats-server";
    if Path::new(debian).exists() {
        servers.push((
            "Debian's",
            debian.to_string(),
            "has no JetStream API this daemon can use (2.10 or newer)",
        ));
    } else {
        eprintln!("SKIPPED (Debian's nats-server): {debian} is not installed");
    }
    let fake = FakeOpenCode::start().await;
    for (what, bin, says) in servers {
        let (_server, port) = server_without_jetstream(&bin);
        let mut cmd = Command::new(BIN);
        cmd.arg("run")
            .env_clear()
            .env(
                "OPENCODE_BRIDGE__NATS__URL",
                format!("nats://127.0.0.1:{port}"),
            )
            .env("OPENCODE_BRIDGE__OPENCODE__BASE_URL", fake.url())
            .env("OPENCODE_BRIDGE__AGENT_PROTOCOL__ENABLED", "false")
            .env("RUST_LOG", "info");
        let mut d = Proc::spawn(cmd);
        let line = d.wait_for("cluster, jobs and turn states are off");
        assert!(
            line.contains("nats-server ") && line.contains(says),
            "{what}: {line}"
        );
        d.wait_for("opencode-nats-bridge is serving");
        assert!(d.stop().success(), "{what}: {}", d.log());
    }
}

#[test]
fn the_cli_blames_a_server_without_jetstream_and_names_the_flag_given() {
    let (_server, port) = server_without_jetstream(&nats_server_bin());
    let url = format!("nats://127.0.0.1:{port}");
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .env_clear()
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["turn", "--server", &url, "--timeout", "1s", "t-1"]);
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.starts_with("no turn states on this NATS server: nats-server 2.15.1 offers no JetStream to this user (JetStream off: start it with -js"),
        "{err}"
    );
    let (code, err) = run(&["prompt", "--server", &url, "--job", "hello"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.starts_with("cannot publish a job: nats-server 2.15.1 offers no JetStream"),
        "{err}"
    );
    let dead = format!("nats://127.0.0.1:{}", free_port());
    let (code, err) = run(&["prompt", "--server", &dead, "hello"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.starts_with(&format!("cannot connect to NATS at {dead}: "))
            && err
                .trim_end()
                .ends_with("(is a nats-server running there? --server gave this URL)"),
        "{err}"
    );
}
