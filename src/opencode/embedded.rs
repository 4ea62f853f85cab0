//! The embedded default: the daemon runs `opencode serve` itself, on a free
//! loopback port with a random password, and stops it on shutdown.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::client::{OpenCodeClient, OpenCodeError};
use super::stream::EventHub;
use crate::config::OpenCodeConfig;

/// Why the embedded server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error("cannot start `{binary}` (is OpenCode installed? set [opencode] binary or base_url): {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot find a free loopback port: {0}")]
    Port(std::io::Error),
    #[error("`opencode serve` exited during start-up with {0}")]
    Exited(std::process::ExitStatus),
    #[error("`opencode serve` did not become healthy within {0:?}: {1}")]
    NotHealthy(Duration, String),
    #[error(transparent)]
    Client(#[from] OpenCodeError),
}

/// The reaper's handle. Dropping it ends the whole process group with
/// SIGTERM: the reaper then stops the server and its tools. (Not tokio's
/// `kill_on_drop`: a SIGKILL would end the reaper before its trap ran, and a
/// server it had just forked would outlive it.) A start abandoned half-way
/// (a signal during start-up) leaves nothing.
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        if let (Some(pid), Ok(None)) = (self.0.id(), self.0.try_wait()) {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGTERM);
        }
    }
}

/// A running `opencode serve` child.
pub struct EmbeddedServer {
    child: Group,
    spec: ServerSpec,
    pub base_url: String,
    cfg: OpenCodeConfig,
    client: OpenCodeClient,
}

/// Everything one `opencode serve` process is made of. [`server_command`]
/// is the one place that turns it into a command, so a confinement (a
/// sandbox helper in front of the binary) wraps it there; restarts reuse
/// the spec (same port and password, so every client stays valid).
#[derive(Clone)]
pub struct ServerSpec {
    /// The `opencode` binary, resolved.
    pub binary: PathBuf,
    pub port: u16,
    /// The server's working directory (its default project).
    pub directory: PathBuf,
    /// `None`: the daemon's environment is inherited (the shared server).
    /// `Some`: the server gets these variables and nothing else (a
    /// tenant's server, `[isolation] mode = "process"`).
    pub env: Option<Vec<(std::ffi::OsString, std::ffi::OsString)>>,
    pub username: String,
    pub password: String,
    /// `OPENCODE_CONFIG_CONTENT`: the operator's, with `permission` set to
    /// ask ([`asking_config`]).
    pub config_content: String,
    /// What runs the binary confined (`[isolation] mode = "sandbox"`:
    /// `opencode-nats-bridge sandbox-exec <policy> --`); empty: nothing.
    pub wrapper: Vec<std::ffi::OsString>,
}

/// The command that runs `spec`: the reaper (`setpriv --pdeathsig TERM --
/// sh -c REAPER`) in front of `<binary> serve --hostname 127.0.0.1 --port
/// <port>`, in `spec.directory`, in a process group of its own.
pub fn server_command(spec: &ServerSpec) -> Command {
    let mut cmd = reaper_command();
    cmd.args(&spec.wrapper)
        .arg(&spec.binary)
        .arg("serve")
        .arg("--hostname")
        .arg("127.0.0.1")
        .arg("--port")
        .arg(spec.port.to_string())
        .current_dir(&spec.directory);
    if let Some(env) = &spec.env {
        cmd.env_clear().envs(env.iter().map(|(k, v)| (k, v)));
    }
    cmd.env("OPENCODE_SERVER_PASSWORD", &spec.password)
        .env("OPENCODE_SERVER_USERNAME", &spec.username)
        // OpenCode's own default allows nearly every tool without asking;
        // asking for everything puts every tool use before the bridge's
        // policy (docs/PROTOCOL.md, "Tenants and trust").
        .env("OPENCODE_CONFIG_CONTENT", &spec.config_content)
        // Its own process group, so stopping it (or losing the daemon)
        // ends the tool processes it started as well.
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Spawns `spec` and waits until it is healthy.
async fn spawn_healthy(
    cfg: &OpenCodeConfig,
    spec: &ServerSpec,
    client: &OpenCodeClient,
) -> Result<Group, EmbeddedError> {
    let child = server_command(spec)
        .spawn()
        .map_err(|source| EmbeddedError::Spawn {
            binary: cfg.binary.clone(),
            source,
        })?;
    let mut child = Group(child);
    forward_output(&mut child.0);
    info!(binary = %cfg.binary.display(), base_url = client.base_url(), directory = %spec.directory.display(), "started embedded `opencode serve`");
    let deadline = tokio::time::Instant::now() + cfg.startup_timeout;
    let mut last;
    loop {
        if let Some(status) = child.0.try_wait().ok().flatten() {
            return Err(EmbeddedError::Exited(status));
        }
        // A server still starting can accept the connection and not answer:
        // keep each probe short.
        match client.health(Duration::from_secs(1)).await {
            Ok(h) if h.healthy => {
                info!(version = %h.version, "embedded OpenCode is healthy");
                return Ok(child);
            }
            Ok(_) => last = "reported unhealthy".to_string(),
            Err(e) => last = e.to_string(),
        }
        if tokio::time::Instant::now() >= deadline {
            drop(child);
            return Err(EmbeddedError::NotHealthy(cfg.startup_timeout, last));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl EmbeddedServer {
    /// Spawns the shared server (the daemon's environment, `[opencode]
    /// directory` or the current one) and waits until `GET /global/health`
    /// answers.
    pub async fn start(
        cfg: &OpenCodeConfig,
    ) -> Result<(EmbeddedServer, OpenCodeClient), EmbeddedError> {
        let directory = match &cfg.directory {
            Some(d) => d.clone(),
            None => std::env::current_dir().map_err(|source| EmbeddedError::Spawn {
                binary: cfg.binary.clone(),
                source,
            })?,
        };
        let content = asking_config(std::env::var("OPENCODE_CONFIG_CONTENT").ok().as_deref());
        Self::start_in(cfg, directory, None, content, None).await
    }

    /// Spawns a server in `directory` with exactly `env` (`None`: the
    /// daemon's), a free loopback port and a new random password, confined
    /// by `sandbox` when given, and waits until it is healthy.
    pub async fn start_in(
        cfg: &OpenCodeConfig,
        directory: PathBuf,
        env: Option<Vec<(std::ffi::OsString, std::ffi::OsString)>>,
        config_content: String,
        sandbox: Option<&crate::sandbox::TenantSandbox>,
    ) -> Result<(EmbeddedServer, OpenCodeClient), EmbeddedError> {
        let binary = find_binary(&cfg.binary).map_err(|source| EmbeddedError::Spawn {
            binary: cfg.binary.clone(),
            source,
        })?;
        let port = free_port_where(|p| sandbox.is_none_or(|s| s.may_listen_on(p)))?;
        let wrapper = sandbox.map_or_else(Vec::new, |s| s.prefix(&binary, port));
        let spec = ServerSpec {
            binary,
            port,
            directory,
            env,
            username: cfg.username.clone(),
            password: uuid::Uuid::new_v4().simple().to_string(),
            config_content,
            wrapper,
        };
        let base_url = format!("http://127.0.0.1:{}", spec.port);
        let client = OpenCodeClient::new(
            &base_url,
            Some(spec.password.clone()),
            Some(spec.directory.display().to_string()),
            cfg,
        )?;
        let child = spawn_healthy(cfg, &spec, &client).await?;
        Ok((
            EmbeddedServer {
                child,
                spec,
                base_url,
                cfg: cfg.clone(),
                client: client.clone(),
            },
            client,
        ))
    }

    pub fn directory(&self) -> &Path {
        &self.spec.directory
    }

    /// The process id of the server's reaper (the leader of its process
    /// group), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.0.id()
    }

    /// Keeps the server running until `cancel`, then stops it. When it
    /// exits or crashes, `hub` hears it at once (turns in flight on it end
    /// with `opencode_unavailable`, new ones wait), and it is started again
    /// from the same spec, with capped, jittered backoff; `hub` reconnects
    /// as soon as it is healthy.
    pub async fn supervise(
        mut self,
        cancel: CancellationToken,
        restarts: Arc<AtomicU64>,
        hub: Arc<EventHub>,
    ) {
        let mut delay = Duration::from_millis(500);
        loop {
            let status = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                s = self.child.0.wait() => s,
            };
            error!(status = ?status, "embedded `opencode serve` exited; restarting it");
            hub.server_exited();
            loop {
                let pause = delay.mul_f64(rand::random_range(0.5..1.0));
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
                match spawn_healthy(&self.cfg, &self.spec, &self.client).await {
                    Ok(child) => {
                        self.child = child;
                        restarts.fetch_add(1, Ordering::Relaxed);
                        info!(base_url = %self.base_url, "embedded OpenCode restarted");
                        hub.server_restarted();
                        delay = Duration::from_millis(500);
                        break;
                    }
                    Err(e) => {
                        warn!(error = %e, retry_in = ?delay, "restarting embedded OpenCode failed");
                        hub.server_gone();
                        delay = (delay * 2).min(Duration::from_secs(30));
                    }
                }
            }
        }
        self.stop(Duration::from_secs(5)).await;
    }

    /// SIGTERM to the reaper (which stops the server and its tools), then
    /// SIGKILL to the whole process group after `grace`.
    pub async fn stop(mut self, grace: Duration) {
        // Tool commands first: OpenCode ends them (they run in process
        // groups of their own) when told to dispose.
        if let Ok(Err(e)) =
            tokio::time::timeout(Duration::from_secs(3), self.client.dispose()).await
        {
            debug!(error = %e, "disposing the embedded OpenCode failed");
        }
        let Some(pid) = self.child.0.id() else { return };
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        match tokio::time::timeout(grace, self.child.0.wait()).await {
            Ok(_) => info!("embedded OpenCode stopped"),
            Err(_) => warn!(?grace, "embedded OpenCode ignored SIGTERM; killing it"),
        }
        // Whatever is left of the group (the leader's pid is its id).
        let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.0.wait().await;
    }
}

/// The config the embedded server runs with: the operator's
/// `OPENCODE_CONFIG_CONTENT` (a JSON object), its `permission` replaced by
/// `{"*": "ask"}`, so OpenCode asks the bridge for every tool use. (A
/// replacement, not a merge: OpenCode's last matching rule wins, and a
/// merged object would keep the operator's keys after `*`.)
pub fn asking_config(operator: Option<&str>) -> String {
    let mut config = match operator.map(serde_json::from_str::<serde_json::Value>) {
        Some(Ok(serde_json::Value::Object(m))) => m,
        Some(_) => {
            warn!("OPENCODE_CONFIG_CONTENT is not a JSON object; the embedded OpenCode starts without it");
            serde_json::Map::new()
        }
        None => serde_json::Map::new(),
    };
    // And the saved tool outputs denied: one folder for all tenants.
    let glob = super::tool_output::folder_glob(|k| std::env::var(k).ok());
    config.insert(
        "permission".into(),
        super::tool_output::deny_rules(glob.as_deref()),
    );
    serde_json::Value::Object(config).to_string()
}

/// A POSIX shell as the leader of the server's process group: it runs
/// `opencode serve` (its arguments) and, on SIGTERM, first kills the
/// server's children with their process groups (OpenCode starts each tool
/// command detached, in a group of its own, and leaves it running when it
/// exits itself), then passes SIGTERM to its own group, waits for the
/// server (at most 5 s; not at all when the signal came before the server's
/// pid was known) and SIGKILLs whatever is left. The daemon sends
/// that SIGTERM when it stops; `setpriv --pdeathsig TERM` sends it when the
/// daemon dies without stopping (kill -9), so nothing outlives it.
const REAPER: &str = r#"kill_tools() {
  for f in /proc/[0-9]*/stat; do
    s=$(cat "$f" 2>/dev/null) || continue
    s=${s##*) }
    set -- $s
    [ "$2" = "$child" ] || continue
    p=${f#/proc/}; p=${p%/stat}
    kill -KILL -- "-$p" 2>/dev/null; kill -KILL "$p" 2>/dev/null
  done
}
trap 'trap "" TERM; kill_tools; kill -TERM -$$ 2>/dev/null; if [ -n "$child" ]; then (sleep 5; kill -KILL -$$ 2>/dev/null) & wait "$child"; fi; kill -KILL -$$' TERM
"$@" &
child=$!
wait "$child"
status=$?
exit "$status""#;

/// `setpriv --pdeathsig TERM -- sh -c REAPER sh` (util-linux, on every
/// Debian), or the bare reaper where `setpriv` is missing.
fn reaper_command() -> Command {
    let mut cmd = match find_binary(Path::new("setpriv")) {
        Ok(setpriv) => {
            let mut c = Command::new(setpriv);
            c.args(["--pdeathsig", "TERM", "--", "sh"]);
            c
        }
        Err(_) => {
            warn!("`setpriv` not found: the embedded OpenCode is stopped with the daemon, but not if the daemon is killed");
            Command::new("sh")
        }
    };
    cmd.arg("-c").arg(REAPER).arg("sh");
    cmd
}

/// `binary` as given when it has a `/`, else its first match on `PATH`.
fn find_binary(binary: &Path) -> std::io::Result<PathBuf> {
    let is_file = |p: &Path| p.is_file();
    if binary.components().count() > 1 || binary.is_absolute() {
        return if is_file(binary) {
            Ok(binary.to_path_buf())
        } else {
            Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} does not exist", binary.display()),
            ))
        };
    }
    // No PATH: the default search path of a POSIX shell.
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|p| is_file(p))
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} is not on PATH", binary.display()),
            )
        })
}

/// A free loopback port that `ok` accepts (a sandboxed tenant's server
/// never gets a provider port, which other tenants may connect to).
fn free_port_where(ok: impl Fn(u16) -> bool) -> Result<u16, EmbeddedError> {
    for _ in 0..64 {
        let port = free_port().map_err(EmbeddedError::Port)?;
        if ok(port) {
            return Ok(port);
        }
    }
    Err(EmbeddedError::Port(std::io::Error::other(
        "every free port tried is a provider port",
    )))
}

fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn forward_output(child: &mut Child) {
    if let Some(out) = child.stdout.take() {
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                debug!(target: "opencode", "{line}");
            }
        });
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(async move {
            let mut lines = BufReader::new(err).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                debug!(target: "opencode", "{line}");
            }
        });
    }
}
