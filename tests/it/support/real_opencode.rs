//! The real `opencode serve`, spawned hermetically for a test.
//!
//! [`RealOpenCode::start`] runs the binary (env `OPENCODE_BIN`, else
//! `<CARGO_MANIFEST_DIR>/.tools/bin/opencode`, else `opencode` on `PATH`) with:
//!
//! * a fresh temp dir holding `HOME`, every `XDG_*` dir, the working directory
//!   ([`RealOpenCode::directory`]) and the log file ([`RealOpenCode::log_path`],
//!   stdout + stderr with `--print-logs`);
//! * a cleared environment plus the `OPENCODE_DISABLE_*` switches, and a
//!   pre-created `<config>/opencode/node_modules` + `package-lock.json` so it does
//!   not `npm install` its plugin package: nothing leaves loopback;
//! * `OPENCODE_CONFIG_CONTENT` = [`default_config`] (provider `fake`, model
//!   `fake/m1` at the given LLM URL, bash/edit/read allowed);
//! * a random `OPENCODE_SERVER_PASSWORD` (HTTP Basic, user `opencode`).
//!
//! It waits (bounded, [`STARTUP_TIMEOUT`]) for `GET /global/health` to answer
//! 200 and panics with the tail of the log otherwise. Dropping it kills the
//! process group (the server and the tools it spawned) and removes the temp dir;
//! set `KEEP_OPENCODE_TMP=1` to keep the dir for a post-mortem.
//!
//! Also here: HTTP helpers for the routes a bridge uses, a turn waiter that
//! reads `GET /session/{id}/message` as the truth, and [`ascending_id`], the
//! id scheme OpenCode uses for messages (so a client can choose `messageID`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use rand::Rng as _;
use serde_json::{json, Value};
use tokio::process::{Child, Command};

/// How long the server may take to become healthy.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Timeout of each helper HTTP call.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// The Basic-auth user.
pub const USERNAME: &str = "opencode";

/// Where the binary is.
pub fn opencode_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("OPENCODE_BIN") {
        return PathBuf::from(p);
    }
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/opencode");
    if local.exists() {
        return local;
    }
    PathBuf::from("opencode")
}

/// The config given to OpenCode: one OpenAI-compatible provider `fake` with
/// model `m1` (tool calls, reasoning and image input on: without them OpenCode
/// replaces an image with an error text) at `llm_url` (`/v1` is appended
/// when missing), as default and small model, permissions allowed.
pub fn default_config(llm_url: &str) -> Value {
    let base = llm_url.trim_end_matches('/');
    let base = if base.ends_with("/v1") {
        base.to_string()
    } else {
        format!("{base}/v1")
    };
    json!({
        "autoupdate": false, "share": "disabled", "lsp": false, "formatter": false,
        "enabled_providers": ["fake"], "model": "fake/m1", "small_model": "fake/m1",
        "permission": {"bash": "allow", "edit": "allow", "read": "allow"},
        "provider": {"fake": {
            "npm": "@ai-sdk/openai-compatible", "name": "Fake",
            "options": {"baseURL": base, "apiKey": "x"},
            "models": {"m1": {"name": "M1", "tool_call": true, "reasoning": true,
                              "attachment": true,
                              "modalities": {"input": ["text", "image", "pdf"], "output": ["text"]},
                              "limit": {"context": 128000, "output": 8192}},
                       "m2": {"name": "M2", "tool_call": true, "reasoning": true,
                              "limit": {"context": 128000, "output": 8192}}}
        }}
    })
}

/// A running `opencode serve`.
pub struct RealOpenCode {
    child: Child,
    pid: Option<u32>,
    base_url: String,
    password: String,
    work_dir: PathBuf,
    log_path: PathBuf,
    client: reqwest::Client,
    tmp: Option<tempfile::TempDir>,
}

/// A hermetic environment for `opencode serve`: temp HOME and XDG dirs, the
/// OPENCODE_DISABLE_* switches, the pre-made plugin folder (no background
/// `npm install`), and `config` as OPENCODE_CONFIG_CONTENT. Used for the
/// server the tests start and for the daemon's own embedded server.
pub struct IsolatedEnv {
    pub tmp: tempfile::TempDir,
    pub vars: Vec<(String, std::ffi::OsString)>,
    pub work_dir: PathBuf,
}

pub fn isolated_env(config: &Value) -> IsolatedEnv {
    let tmp = tempfile::Builder::new()
        .prefix("opencode-it-")
        .tempdir()
        .expect("temp dir");
    let root = tmp.path().to_path_buf();
    let dir = |name: &str| {
        let p = root.join(name);
        std::fs::create_dir_all(&p).expect("create temp subdir");
        p
    };
    let home = dir("home");
    let config_home = dir("config");
    let data_home = dir("data");
    let cache_home = dir("cache");
    let state_home = dir("state");
    let work_dir = dir("work");
    // Skip the background `npm install @opencode-ai/plugin`.
    let plugin_dir = config_home.join("opencode");
    std::fs::create_dir_all(plugin_dir.join("node_modules")).expect("plugin dir");
    std::fs::write(
        plugin_dir.join("package-lock.json"),
        r#"{"packages":{"":{"dependencies":{"@opencode-ai/plugin":"*"}}}}"#,
    )
    .expect("package-lock.json");
    let shell = if Path::new("/bin/bash").exists() {
        "/bin/bash"
    } else {
        "/bin/sh"
    };
    let mut vars: Vec<(String, std::ffi::OsString)> = vec![
        ("PATH".into(), std::env::var_os("PATH").unwrap_or_default()),
        ("SHELL".into(), shell.into()),
        ("LANG".into(), "C.UTF-8".into()),
        ("HOME".into(), home.clone().into()),
        ("USERPROFILE".into(), home.into()),
        ("TMPDIR".into(), std::env::temp_dir().into()),
        ("XDG_CONFIG_HOME".into(), config_home.into()),
        ("XDG_DATA_HOME".into(), data_home.into()),
        ("XDG_CACHE_HOME".into(), cache_home.into()),
        ("XDG_STATE_HOME".into(), state_home.into()),
        ("OPENCODE_CONFIG_CONTENT".into(), config.to_string().into()),
    ];
    for k in [
        "OPENCODE_DISABLE_AUTOUPDATE",
        "OPENCODE_DISABLE_MODELS_FETCH",
        "OPENCODE_DISABLE_LSP_DOWNLOAD",
        "OPENCODE_DISABLE_DEFAULT_PLUGINS",
        "OPENCODE_DISABLE_SHARE",
        "OPENCODE_DISABLE_EXTERNAL_SKILLS",
        "OPENCODE_DISABLE_CLAUDE_CODE",
        "OPENCODE_PURE",
    ] {
        vars.push((k.into(), "1".into()));
    }
    IsolatedEnv {
        tmp,
        vars,
        work_dir,
    }
}

impl RealOpenCode {
    /// Starts it against an OpenAI-compatible LLM at `llm_url` with [`default_config`].
    pub async fn start(llm_url: &str) -> RealOpenCode {
        Self::start_with_config(default_config(llm_url)).await
    }

    /// Starts it with this config (see [`default_config`] for a base to edit).
    pub async fn start_with_config(config: Value) -> RealOpenCode {
        let mut last_log = String::new();
        // A port picked free may be taken by the time the server binds it:
        // retry a few times when the process dies during startup.
        for _attempt in 0..3 {
            match Self::try_start(&config).await {
                Ok(oc) => return oc,
                Err((fatal, log)) if fatal => panic!("{log}"),
                Err((_, log)) => last_log = log,
            }
        }
        panic!("opencode did not start after 3 attempts:\n{last_log}");
    }

    /// `Err((fatal, message))`: not fatal means the process exited early.
    async fn try_start(config: &Value) -> Result<RealOpenCode, (bool, String)> {
        let env = isolated_env(config);
        let root = env.tmp.path().to_path_buf();
        let work_dir = env.work_dir.clone();
        let tmp = env.tmp;

        let log_path = root.join("opencode.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let log_err = log.try_clone().expect("log file clone");

        let password = random_base62(24);
        let port = free_port();
        let bin = opencode_bin();
        let mut cmd = Command::new(&bin);
        cmd.args(["serve", "--hostname", "127.0.0.1", "--port"])
            .arg(port.to_string())
            .args(["--print-logs", "--log-level", "INFO"])
            .current_dir(&work_dir)
            .env_clear()
            .envs(env.vars.iter().map(|(k, v)| (k.as_str(), v.as_os_str())))
            .env("OPENCODE_SERVER_PASSWORD", &password)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .process_group(0)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .map_err(|e| (true, format!("cannot spawn {}: {e}", bin.display())))?;
        let pid = child.id();

        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .expect("reqwest client");
        let mut oc = RealOpenCode {
            child,
            pid,
            base_url: format!("http://127.0.0.1:{port}"),
            password,
            work_dir,
            log_path,
            client,
            tmp: Some(tmp),
        };

        let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Ok(Some(status)) = oc.child.try_wait() {
                let msg = format!(
                    "opencode ({}) exited during startup with {status}; log tail:\n{}",
                    bin.display(),
                    oc.log_tail(60)
                );
                return Err((false, msg));
            }
            let health = oc
                .client
                .get(oc.url("/global/health"))
                .header("authorization", oc.auth_header())
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if let Ok(resp) = health {
                if resp.status() == 200 {
                    return Ok(oc);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                let msg = format!(
                    "opencode ({}) not healthy after {STARTUP_TIMEOUT:?}; log tail:\n{}",
                    bin.display(),
                    oc.log_tail(60)
                );
                return Err((true, msg));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// `base_url() + path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// The server password (user [`USERNAME`]).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// `Basic base64(opencode:password)`.
    pub fn auth_header(&self) -> String {
        let token = base64::engine::general_purpose::STANDARD
            .encode(format!("{USERNAME}:{}", self.password));
        format!("Basic {token}")
    }

    /// The server's working directory (its sessions' directory).
    pub fn directory(&self) -> &Path {
        &self.work_dir
    }

    /// The file holding the server's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// A client without an overall timeout (fit for `/event`); the helpers
    /// below set [`HTTP_TIMEOUT`] per call.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// A request to `path` with the auth header set.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, self.url(path))
            .header("authorization", self.auth_header())
    }

    /// GET `path`, expecting 2xx JSON.
    pub async fn get_json(&self, path: &str) -> Value {
        let resp = self
            .request(reqwest::Method::GET, path)
            .timeout(HTTP_TIMEOUT)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        assert!(status.is_success(), "GET {path}: {status} {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {path}: {e}: {text}"))
    }

    /// POST JSON to `path`; returns the status and the raw body.
    pub async fn post_json(&self, path: &str, body: &Value) -> (reqwest::StatusCode, String) {
        let resp = self
            .request(reqwest::Method::POST, path)
            .json(body)
            .timeout(HTTP_TIMEOUT)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let status = resp.status();
        (status, resp.text().await.unwrap_or_default())
    }

    /// `POST /session {title}`; returns the session id.
    pub async fn create_session(&self, title: &str) -> String {
        let (status, body) = self.post_json("/session", &json!({ "title": title })).await;
        assert!(status.is_success(), "POST /session: {status} {body}");
        let v: Value = serde_json::from_str(&body).expect("session json");
        v["id"].as_str().expect("session id").to_string()
    }

    /// `POST /session/{id}/prompt_async` with one text part and our message id;
    /// asserts 204.
    pub async fn prompt_async(&self, session_id: &str, text: &str, message_id: &str) {
        let body = json!({"parts": [{"type": "text", "text": text}], "messageID": message_id});
        let path = format!("/session/{session_id}/prompt_async");
        let (status, resp) = self.post_json(&path, &body).await;
        assert_eq!(status, 204, "POST {path}: {resp}");
    }

    /// `GET /session/{id}/message`.
    pub async fn messages(&self, session_id: &str) -> Vec<Value> {
        let v = self
            .get_json(&format!("/session/{session_id}/message"))
            .await;
        v.as_array().cloned().unwrap_or_default()
    }

    /// Is the session busy per `GET /session/status`?
    pub async fn is_busy(&self, session_id: &str) -> bool {
        let v = self.get_json("/session/status").await;
        v.get(session_id)
            .is_some_and(|s| s["type"].as_str() != Some("idle"))
    }

    /// Waits (bounded) until the turn started by user message `user_message_id`
    /// is over: the session is not busy and the last assistant message after
    /// that user message is terminal ([`is_terminal_assistant`]). Returns all
    /// the session's messages at that point.
    pub async fn wait_turn_done(
        &self,
        session_id: &str,
        user_message_id: &str,
        timeout: Duration,
    ) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let msgs = self.messages(session_id).await;
            let done = turn_assistants(&msgs, user_message_id)
                .last()
                .is_some_and(|m| is_terminal_assistant(m));
            if done && !self.is_busy(session_id).await {
                return msgs;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "turn {user_message_id} of {session_id} not done after {timeout:?}; \
                     messages: {}\nlog tail:\n{}",
                    serde_json::to_string_pretty(&msgs).unwrap_or_default(),
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The assistant messages of the turn whose user message is `user_message_id`:
/// those after it in the list, up to the next user message.
pub fn turn_assistants<'a>(messages: &'a [Value], user_message_id: &str) -> Vec<&'a Value> {
    let Some(start) = messages
        .iter()
        .position(|m| m["info"]["id"] == user_message_id)
    else {
        return Vec::new();
    };
    messages[start + 1..]
        .iter()
        .take_while(|m| m["info"]["role"] != "user")
        .collect()
}

/// An assistant message that ends a turn: it carries an `error`, or it has
/// `time.completed` and a `finish` other than `tool-calls`.
pub fn is_terminal_assistant(message: &Value) -> bool {
    let info = &message["info"];
    if !info["error"].is_null() {
        return true;
    }
    !info["time"]["completed"].is_null() && info["finish"].as_str() != Some("tool-calls")
}

/// The concatenated `text` parts of a message.
pub fn message_text(message: &Value) -> String {
    message["parts"]
        .as_array()
        .map(|parts| {
            parts
                .iter()
                .filter(|p| p["type"] == "text")
                .filter_map(|p| p["text"].as_str())
                .collect()
        })
        .unwrap_or_default()
}

impl Drop for RealOpenCode {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.and_then(|p| i32::try_from(p).ok()) {
            // The process group holds the server and the commands it ran.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.start_kill();
        if std::env::var_os("KEEP_OPENCODE_TMP").is_some() {
            if let Some(tmp) = self.tmp.take() {
                let kept = tmp.keep();
                eprintln!("KEEP_OPENCODE_TMP: kept {}", kept.display());
            }
        }
    }
}

/// A port free right now on 127.0.0.1 (racy by nature; the start retries).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn random_base62(n: usize) -> String {
    let mut rng = rand::rng();
    (0..n)
        .map(|_| BASE62[rng.random_range(0..BASE62.len())] as char)
        .collect()
}

/// An ascending OpenCode id, e.g. `ascending_id("msg")`: `prefix_` + 12 hex
/// chars of `(unix_ms * 0x1000 + counter) & 0xffff_ffff_ffff` + 14 random
/// base62 chars, where the counter restarts at 1 when the millisecond changes.
/// Ids made later sort after earlier ones (OpenCode orders messages by id).
pub fn ascending_id(prefix: &str) -> String {
    static LAST: Mutex<(u64, u64)> = Mutex::new((0, 0));
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64;
    let counter = {
        let mut last = LAST.lock().unwrap();
        if last.0 != now_ms {
            *last = (now_ms, 0);
        }
        last.1 += 1;
        last.1
    };
    let value = (now_ms.wrapping_mul(0x1000).wrapping_add(counter)) & 0xffff_ffff_ffff;
    format!("{prefix}_{value:012x}{}", random_base62(14))
}

/// `ascending_id("msg")`.
pub fn new_message_id() -> String {
    ascending_id("msg")
}
