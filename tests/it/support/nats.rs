//! A real nats-server per test (JetStream on, file store in a temp dir), plus
//! client helpers that avoid async-nats 0.51's subscribe/flush race.
//!
//! Binary: `$NATS_SERVER_BIN`, else `<crate>/.tools/bin/nats-server` if it
//! exists, else `nats-server` on `PATH`.

use std::fs::{self, File};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::{Client, HeaderMap, Subscriber, ToSubject};
use futures::StreamExt;
use serde_json::Value;
use tempfile::TempDir;

/// How long `start`/`restart` wait for the server to log ready and accept TCP.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Extra time `collect_until_terminal` listens after the terminal reply.
pub const AFTER_TERMINAL: Duration = Duration::from_millis(200);
/// Bound on the round-trip barrier in `subscribe_ready` / `barrier`.
pub const BARRIER_TIMEOUT: Duration = Duration::from_secs(5);

/// One reply as received: headers (if any) and the JSON body.
pub type Reply = (Option<HeaderMap>, Value);

pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
    config: Option<PathBuf>,
    /// Number of launches so far; each writes its own log file.
    launches: u32,
}

impl NatsServer {
    /// Starts a fresh server on a free loopback port with JetStream enabled.
    pub fn start() -> Self {
        Self::launch(None)
    }

    /// Like [`start`](Self::start), with `conf_text` written to a config file
    /// passed via `-c` (address, port, `-js` and store dir still come from the
    /// command line, which overrides the file).
    pub fn start_with_config(conf_text: &str) -> Self {
        Self::launch(Some(conf_text))
    }

    fn launch(conf_text: Option<&str>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("nats-test-")
            .tempdir()
            .expect("create temp dir for nats-server");
        let config = conf_text.map(|text| {
            let path = dir.path().join("nats.conf");
            // The store is the test's own temp dir (`-sd`); nats-server
            // refuses a second `store_dir` from the file.
            let text: String = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("store_dir"))
                .map(|l| format!("{l}\n"))
                .collect();
            fs::write(&path, text).expect("write nats-server config");
            path
        });
        let mut server = NatsServer {
            child: None,
            port: 0,
            dir,
            config,
            launches: 0,
        };
        // The free port can be taken between probing and binding: retry.
        let mut last_err = String::new();
        for _ in 0..5 {
            server.port = free_port();
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => last_err = e,
            }
        }
        panic!("nats-server did not start: {last_err}");
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The running server's process id (the e2e bench samples its CPU).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// JetStream store directory (kept across `restart`).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL the server and reap it. No-op if it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL on Unix
            let _ = child.wait();
        }
    }

    /// Kills the server if running, then starts it again on the same port
    /// with the same store dir and config. Panics if it does not come up.
    pub fn restart(&mut self) {
        self.kill();
        let mut last_err = String::new();
        for _ in 0..3 {
            match self.spawn() {
                Ok(()) => return,
                Err(e) => {
                    last_err = e;
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        panic!(
            "nats-server did not restart on port {}: {last_err}",
            self.port
        );
    }

    /// Replaces the config file the next [`restart`](Self::restart) reads
    /// (a cluster node restarted without its routes, then with them).
    pub fn set_config(&mut self, conf_text: &str) {
        let path = self.dir.path().join("nats.conf");
        fs::write(&path, conf_text).expect("write nats-server config");
        self.config = Some(path);
    }

    /// All log output of every launch so far (for failure messages).
    pub fn logs(&self) -> String {
        (1..=self.launches)
            .map(|n| fs::read_to_string(self.log_path(n)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("--- restart ---\n")
    }

    fn log_path(&self, n: u32) -> PathBuf {
        self.dir.path().join(format!("nats-server-{n}.log"))
    }

    fn spawn(&mut self) -> Result<(), String> {
        self.launches += 1;
        let log_path = self.log_path(self.launches);
        let log = File::create(&log_path).map_err(|e| format!("create log: {e}"))?;
        let stderr = log.try_clone().map_err(|e| format!("clone log: {e}"))?;
        let bin = server_bin();
        let mut cmd = Command::new(&bin);
        if let Some(config) = &self.config {
            cmd.arg("-c").arg(config);
        }
        cmd.args([
            "-a",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-js",
            "-sd",
        ])
        .arg(self.store_dir())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(stderr);
        let child = cmd
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
        self.child = Some(child);

        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!("exited with {status}; log:\n{}", read(&log_path)));
            }
            if read(&log_path).contains("Server is ready")
                && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!(
                    "not ready within {READY_TIMEOUT:?}; log:\n{}",
                    read(&log_path)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

fn server_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN") {
        return bin.into();
    }
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/nats-server");
    if tools.exists() {
        tools
    } else {
        "nats-server".into()
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("probe a free port")
        .port()
}

/// Connects with fast reconnects (<= 250 ms apart) so fault tests don't wait
/// on async-nats' default backoff of up to 4 s.
pub async fn client(url: &str) -> Client {
    async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .reconnect_delay_callback(|attempts| Duration::from_millis((attempts as u64 * 50).min(250)))
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

/// Waits until the client reports `Connected` (e.g. after a server restart).
pub async fn wait_connected(client: &Client, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while client.connection_state() != State::Connected {
        assert!(
            Instant::now() < deadline,
            "client not reconnected within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Round-trip barrier: once this returns, the server has processed every
/// command this connection sent before it (e.g. SUB). `flush()` does not
/// prove that in async-nats 0.51.
pub async fn barrier(client: &Client) {
    let inbox = client.new_inbox();
    let mut probe = client
        .subscribe(inbox.clone())
        .await
        .expect("barrier subscribe");
    client
        .publish(inbox, bytes::Bytes::new())
        .await
        .expect("barrier publish");
    match tokio::time::timeout(BARRIER_TIMEOUT, probe.next()).await {
        Ok(Some(_)) => {}
        Ok(None) => panic!("barrier subscription closed"),
        Err(_) => panic!("barrier echo not received within {BARRIER_TIMEOUT:?}"),
    }
    let _ = probe.unsubscribe().await;
}

/// Subscribes and waits until the server has registered the subscription, so
/// messages published afterwards from any connection are delivered.
pub async fn subscribe_ready(client: &Client, subject: impl ToSubject) -> Subscriber {
    let subject = subject.to_subject();
    let sub = client
        .subscribe(subject.clone())
        .await
        .unwrap_or_else(|e| panic!("subscribe {subject}: {e}"));
    barrier(client).await;
    sub
}

/// `kind` is `final` or `error`.
pub fn is_terminal(body: &Value) -> bool {
    matches!(
        body.get("kind").and_then(Value::as_str),
        Some("final" | "error")
    )
}

fn to_reply(msg: async_nats::Message) -> Reply {
    let body = serde_json::from_slice(&msg.payload)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&msg.payload).into_owned()));
    super::leaks::assert_no_leak(&body);
    (msg.headers, body)
}

/// Reads JSON replies until one whose `kind` is `final` or `error` (panics
/// with everything collected if none arrives within `timeout`), then listens
/// [`AFTER_TERMINAL`] more so callers can assert nothing follows the
/// terminal reply. A non-JSON payload is kept as a JSON string.
pub async fn collect_until_terminal(sub: &mut Subscriber, timeout: Duration) -> Vec<Reply> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(Some(msg)) => {
                let reply = to_reply(msg);
                let terminal = is_terminal(&reply.1);
                got.push(reply);
                if terminal {
                    break;
                }
            }
            Ok(None) => panic!("subscription closed before a terminal reply; got: {got:#?}"),
            Err(_) => panic!("no final/error reply within {timeout:?}; got: {got:#?}"),
        }
    }
    let grace = tokio::time::Instant::now() + AFTER_TERMINAL;
    while let Ok(Some(msg)) = tokio::time::timeout_at(grace, sub.next()).await {
        got.push(to_reply(msg));
    }
    got
}
