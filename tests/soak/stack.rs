//! The stack under soak: three nats-servers in a cluster, two daemons (the
//! release or debug binary as processes of their own), each connected to
//! its own server and driving its own fake OpenCode through a TCP proxy
//! (so OpenCode can be "killed" and its connections cut).

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::support::cluster::NatsCluster;
use crate::support::daemon::{log_lines, wait_for_line, BIN};
use crate::support::fake_opencode::{
    echo_reply, paced_text_turn, words, FakeOpenCode, TurnInput, TurnScript,
};
use crate::support::nats::free_port;
use crate::support::proxy::Proxy;
use crate::Settings;

/// nats-servers in the cluster, daemons.
pub const SERVERS: usize = 3;
pub const DAEMONS: usize = 2;
/// How long a daemon may take to say it serves (a loaded machine).
const READY: Duration = Duration::from_secs(60);
/// Starts of a daemon tried before the soak gives up.
const START_ATTEMPTS: u32 = 10;

/// The fake's turn: the echo of the prompt, a word per delta, 25 ms apart.
pub fn script(input: &TurnInput) -> TurnScript {
    let w = words(&echo_reply(&input.text));
    paced_text_turn(input, &w, 25)
}

/// One daemon: its process (none while killed), its OpenCode, its port.
pub struct Daemon {
    pub index: usize,
    pub child: Option<Child>,
    pub fake: FakeOpenCode,
    pub proxy: Proxy,
    pub metrics_port: u16,
    pub starts: u32,
    /// Starts that did not get to "is serving" (tried again).
    pub failed_starts: u32,
    log: PathBuf,
}

pub struct Stack {
    pub cluster: NatsCluster,
    pub daemons: Vec<Daemon>,
}

impl Stack {
    pub async fn start(s: &Settings) -> Stack {
        let cluster = NatsCluster::start(SERVERS, Duration::from_secs(60)).await;
        let mut daemons = Vec::new();
        for index in 0..DAEMONS {
            let fake = FakeOpenCode::start().await;
            fake.set_script(script);
            let proxy = Proxy::start(&fake.url()).await;
            let mut d = Daemon {
                index,
                child: None,
                fake,
                proxy,
                metrics_port: free_port(),
                starts: 0,
                failed_starts: 0,
                log: s.out.join(format!("daemon-{index}.log")),
            };
            let _ = std::fs::remove_file(&d.log);
            d.spawn(&cluster).await;
            daemons.push(d);
        }
        Stack { cluster, daemons }
    }

    /// The load's client: every server of the cluster, fast reconnects, a
    /// large subscription buffer (it hears every reply of every turn).
    pub async fn client(&self) -> async_nats::Client {
        async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .subscription_capacity(1 << 18)
            .client_capacity(1 << 14)
            .reconnect_delay_callback(|n| Duration::from_millis((n as u64 * 100).min(500)))
            .connect(
                self.cluster
                    .urls()
                    .split(',')
                    .map(|u| u.parse().expect("a server URL"))
                    .collect::<Vec<async_nats::ServerAddr>>(),
            )
            .await
            .expect("the soak client connects")
    }

    /// Every session of every fake: (fake index, session id) -> title.
    pub fn sessions_by_fake(&self) -> HashMap<String, (usize, String)> {
        let mut out = HashMap::new();
        for d in &self.daemons {
            for s in d.fake.sessions() {
                out.insert(s.id.clone(), (d.index, s.title.clone()));
            }
        }
        out
    }

    /// Every prompt text each fake received: text -> (daemon, seconds).
    pub fn turns_by_text(&self) -> HashMap<String, Vec<(usize, f64)>> {
        let mut out: HashMap<String, Vec<(usize, f64)>> = HashMap::new();
        for d in &self.daemons {
            for t in d.fake.turns() {
                out.entry(t.input.text.clone())
                    .or_default()
                    .push((d.index, crate::secs(t.received_at)));
            }
        }
        out
    }

    pub async fn stop(&mut self) {
        for d in &mut self.daemons {
            d.terminate().await;
        }
    }
}

impl Daemon {
    /// Starts the daemon on server `index % SERVERS`; panics (with its log)
    /// if it does not serve within [`READY`].
    pub async fn spawn(&mut self, cluster: &NatsCluster) {
        // A start can fail while the cluster elects a JetStream leader (the
        // daemon exits when `[cluster] enabled = "on"` finds no JetStream
        // within 5 s): counted, logged, tried again.
        for attempt in 1..=START_ATTEMPTS {
            if self.try_spawn(cluster).await {
                return;
            }
            self.failed_starts += 1;
            eprintln!(
                "soak: daemon {} did not start (attempt {attempt}); trying again",
                self.index
            );
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        panic!(
            "daemon {} did not start in {START_ATTEMPTS} attempts (its log: {})",
            self.index,
            self.log.display()
        );
    }

    async fn try_spawn(&mut self, cluster: &NatsCluster) -> bool {
        let server = self.index % SERVERS;
        let mut cmd = Command::new(BIN);
        cmd.arg("run")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("OPENCODE_BRIDGE__NATS__URL", cluster.url(server))
            .env(
                "OPENCODE_BRIDGE__NATS__NAME",
                format!("soak-daemon-{}", self.index),
            )
            .env("OPENCODE_BRIDGE__OPENCODE__BASE_URL", self.proxy.url())
            .env("OPENCODE_BRIDGE__OPENCODE__RECONNECT_MAX", "1s")
            .env(
                "OPENCODE_BRIDGE__SERVICE__HOST",
                format!("soak-{}", self.index),
            )
            .env("OPENCODE_BRIDGE__CLUSTER__ENABLED", "on")
            .env("OPENCODE_BRIDGE__CLUSTER__LEASE_TTL", "6s")
            .env("OPENCODE_BRIDGE__JETSTREAM__JOBS", "on")
            .env("OPENCODE_BRIDGE__JETSTREAM__REPLICAS", SERVERS.to_string())
            .env("OPENCODE_BRIDGE__JETSTREAM__ACK_WAIT", "10s")
            .env("OPENCODE_BRIDGE__JETSTREAM__RETRY_DELAY", "2s")
            .env("OPENCODE_BRIDGE__JETSTREAM__MAX_DELIVER", "30")
            .env("OPENCODE_BRIDGE__TURN__FIRST_EVENT_TIMEOUT", "20s")
            .env("OPENCODE_BRIDGE__TURN__IDLE_TIMEOUT", "20s")
            .env("OPENCODE_BRIDGE__TURN__TURN_TIMEOUT", "60s")
            .env("OPENCODE_BRIDGE__SHUTDOWN__GRACE", "5s")
            .env("OPENCODE_BRIDGE__AGENT_PROTOCOL__ENABLED", "false")
            .env(
                "OPENCODE_BRIDGE__METRICS__LISTEN",
                format!("127.0.0.1:{}", self.metrics_port),
            )
            .env("RUST_LOG", "info");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the daemon");
        let mut log = log_lines(&mut child);
        let mut seen = Vec::new();
        let serving = wait_for_line(&mut log, &mut seen, "is serving", READY).await;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the daemon's log");
        if !serving {
            let _ = writeln!(file, "=== a start that failed ===\n{}", seen.join("\n"));
            let _ = child.start_kill();
            let _ = child.wait().await;
            return false;
        }
        self.starts += 1;
        let _ = writeln!(file, "=== start {} ===\n{}", self.starts, seen.join("\n"));
        tokio::spawn(async move {
            while let Some(l) = log.recv().await {
                let _ = writeln!(file, "{l}");
            }
        });
        self.child = Some(child);
        true
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// `kill -9`.
    pub async fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    /// SIGTERM and wait (the drain); SIGKILL after 30 s.
    pub async fn terminate(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        if let Some(pid) = c.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(Duration::from_secs(30), c.wait())
            .await
            .is_err()
        {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }
}
