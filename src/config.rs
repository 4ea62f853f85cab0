//! Configuration: a TOML file layered with `OPENCODE_BRIDGE__<SECTION>__<KEY>`
//! environment variables, read into serde structs that reject unknown keys,
//! then validated into [`Config`]. Every key is documented here and in
//! `config.example.toml`, with its default.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::protocol::subject::validate_subject;

/// The environment prefix: `OPENCODE_BRIDGE__NATS__URL` sets `[nats] url`.
pub const ENV_PREFIX: &str = "OPENCODE_BRIDGE";

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub nats: NatsConfig,
    pub subjects: SubjectsConfig,
    pub opencode: OpenCodeConfig,
    pub turn: TurnConfig,
    pub limits: LimitsConfig,
    pub shutdown: ShutdownConfig,
    pub log: LogConfig,
    pub service: ServiceConfig,
    pub metrics: MetricsConfig,
    pub permissions: PermissionsConfig,
    pub tenancy: TenancyConfig,
    pub prompt: PromptConfig,
}

/// Tenants: the first token after the prompt subject (docs/PROTOCOL.md,
/// "Tenants and trust"). A tenant reaches only its own conversations,
/// replies, turns and permission requests, always; `strict` also binds
/// where its replies may go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenancyConfig {
    /// A tenant's NATS reply subject must be under
    /// `<inbox_prefix>.<tenant>.` and its `reply_to` under
    /// `<reply_prefix>.<tenant>.`; else the prompt gets `forbidden` on the
    /// tenant's own `<reply_prefix>.<tenant>.<trace_id>`. Off by default so
    /// `nats req` works on a laptop; on in `deploy/` (production).
    pub strict: bool,
    /// Where tenants' reply inboxes live (`_INBOX.<tenant>.` for a client
    /// with `custom_inbox_prefix("_INBOX.<tenant>")`).
    pub inbox_prefix: String,
}

impl Default for TenancyConfig {
    fn default() -> Self {
        TenancyConfig {
            strict: false,
            inbox_prefix: "_INBOX".into(),
        }
    }
}

/// What a prompt may switch on or choose.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PromptConfig {
    /// Tools a prompt may enable with `"tools": {"<name>": true}`. OpenCode
    /// turns such an entry into a session rule that allows the tool without
    /// asking the permission policy, for this turn and the session's later
    /// ones; so by default (empty) every `true` is `forbidden` and only
    /// `false` entries (switching a tool off) reach OpenCode.
    pub allow_enable_tools: Vec<String>,
    /// Agents a prompt may choose (`"agent"`); empty: any. An agent whose
    /// own OpenCode config allows a tool skips the bridge's policy for it:
    /// list only agents whose permissions you have checked.
    pub agents: Vec<String>,
    /// Models a prompt may choose (`"provider/model"`); empty: any.
    pub models: Vec<String>,
}

/// What the bridge answers when OpenCode asks for a permission
/// (`permission.asked`) in a turn.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PermissionsConfig {
    /// Rules by permission type and pattern (glob), first match wins:
    /// `allow` (answer once), `deny` (reject), `ask` (ask the caller over
    /// NATS if the prompt is `interactive`, else reject). Anything not
    /// matched is denied, so a headless turn never hangs.
    pub rules: Vec<crate::protocol::interactive::Rule>,
    /// How long a caller has to answer a permission or a question; then
    /// it is rejected (noted in the final).
    #[serde(with = "humantime_serde")]
    pub ask_timeout: Duration,
    /// OpenCode applies an `always` answer to every session on its server
    /// until it restarts; by default the bridge turns `always` into `once`
    /// so one chat user cannot grant a tool to every conversation.
    pub allow_server_wide_always: bool,
}

impl Default for PermissionsConfig {
    fn default() -> Self {
        PermissionsConfig {
            rules: Vec::new(),
            ask_timeout: Duration::from_secs(300),
            allow_server_wide_always: false,
        }
    }
}

/// How to reach NATS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// One or more server URLs, comma-separated (`nats://a:4222,nats://b:4222`).
    pub url: String,
    /// Client name shown by the server (`nats server report connections`).
    pub name: String,
    /// A `.creds` file (JWT + nkey seed), for decentralised auth.
    pub credentials_file: Option<PathBuf>,
    /// An nkey seed (`SU...`), for nkey auth.
    pub nkey: Option<String>,
    /// A token, for token auth.
    pub token: Option<String>,
    /// User name, for user/password auth (with `password`).
    pub user: Option<String>,
    pub password: Option<String>,
    /// A CA bundle to verify the server's certificate (enables TLS).
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate and key, for mutual TLS.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Require TLS even without a CA file.
    pub tls_required: bool,
    /// Keep retrying when the server is not up yet at start (a sidecar may
    /// start before its server).
    pub retry_on_initial_connect: bool,
    /// Give up an initial connection attempt after this long.
    #[serde(with = "humantime_serde")]
    pub connection_timeout: Duration,
    /// Messages buffered per subscription before the server calls us a slow
    /// consumer and drops (async-nats `subscription_capacity`).
    pub subscription_capacity: usize,
    /// Outgoing commands buffered while disconnected (async-nats
    /// `client_capacity`); replies beyond it wait for the reconnect.
    pub client_capacity: usize,
    /// Prefix of this connection's own reply subjects (`<prefix>.<id>`).
    /// With per-user NATS permissions give every user its own
    /// (`_INBOX.<user>`), so one user cannot read another's replies
    /// (deploy/nats-server.conf).
    pub inbox_prefix: String,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            name: "opencode-nats-bridge".into(),
            credentials_file: None,
            nkey: None,
            token: None,
            user: None,
            password: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_required: false,
            retry_on_initial_connect: true,
            connection_timeout: Duration::from_secs(5),
            subscription_capacity: 8192,
            client_capacity: 8192,
            inbox_prefix: "_INBOX".into(),
        }
    }
}

/// The subjects of the wire contract (docs/PROTOCOL.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubjectsConfig {
    /// Prompts arrive on this subject and on `<prompt>.>`; the tail tokens of
    /// the latter name the conversation.
    pub prompt: String,
    /// Queue group of the prompt subscriptions: several daemons share load.
    pub queue_group: String,
    /// Replies go to `<reply_prefix>.<trace_id>` when the prompt names no
    /// reply subject.
    pub reply_prefix: String,
    /// Abort requests (`{"trace_id"}` or `{"conversation"}`); every daemon
    /// listens (no queue group), the one running the turn acts.
    pub abort: String,
    /// Status requests (the micro service's `status` endpoint): every
    /// daemon answers, so one request lists them all.
    pub status: String,
    /// Heartbeats (the status document) go to `<heartbeat>.<host>`.
    pub heartbeat: String,
    /// Answers to `permission` replies: `<permission_reply>.<request_id>`,
    /// or this subject with `request_id` in the payload.
    pub permission_reply: String,
    /// Answers to `question` replies, likewise.
    pub question_reply: String,
    /// Which headers replies carry (docs/PROTOCOL.md, "Replies"). `full`:
    /// `Trace-Id`, `Reply-Kind`, `Reply-Seq` and `Nats-Msg-Id` on every
    /// reply. `lean`: `delta` and `reasoning` replies carry `Trace-Id` only
    /// (the body has `kind` and `seq`); every other kind keeps all four.
    /// Building the headers is the largest share of the daemon's CPU per
    /// streamed reply: `lean` costs 10-20% less CPU per streamed reply
    /// (docs/BENCHMARKS.md).
    pub reply_headers: ReplyHeaders,
}

/// See [`SubjectsConfig::reply_headers`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplyHeaders {
    #[default]
    Full,
    Lean,
}

impl Default for SubjectsConfig {
    fn default() -> Self {
        SubjectsConfig {
            prompt: "opencode.prompt".into(),
            queue_group: "opencode-bridge".into(),
            reply_prefix: "opencode.reply".into(),
            abort: "opencode.abort".into(),
            status: "opencode.bridge.status".into(),
            heartbeat: "opencode.bridge.heartbeat".into(),
            permission_reply: "opencode.permission.reply".into(),
            question_reply: "opencode.question.reply".into(),
            reply_headers: ReplyHeaders::Full,
        }
    }
}

/// Which OpenCode server to drive.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenCodeConfig {
    /// An existing server (`http://127.0.0.1:4096`). Unset: the daemon starts
    /// `opencode serve` itself (the embedded default).
    pub base_url: Option<String>,
    /// HTTP Basic user.
    pub username: String,
    /// HTTP Basic password; falls back to `password_file`, then
    /// `OPENCODE_SERVER_PASSWORD`. Never logged.
    pub password: Option<String>,
    /// A file holding the password (one line), e.g. a systemd credential
    /// (`LoadCredential=` -> `%d/opencode-password`), so the secret is in
    /// neither the config nor the environment.
    pub password_file: Option<PathBuf>,
    /// The `opencode` binary for the embedded server.
    pub binary: PathBuf,
    /// Working directory of the embedded server, and the `directory` passed
    /// on every call (sessions belong to a directory). Unset: the daemon's
    /// current directory for the embedded server, the server's own for an
    /// external one.
    pub directory: Option<PathBuf>,
    /// How long the embedded server may take to become healthy.
    #[serde(with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// Bound on every plain HTTP call (not the event stream).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Bound on connecting to OpenCode.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// The event stream is reconnected after this long without a byte (not
    /// even OpenCode's 10-second heartbeat).
    #[serde(with = "humantime_serde")]
    pub stream_stall_timeout: Duration,
    /// First delay before reconnecting the event stream; doubles (with
    /// jitter) up to `reconnect_max`, and resets after a good connection.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// Session titles are `<title_prefix><conversation>`, so the
    /// conversation map can be rebuilt from `GET /session` after a restart.
    pub title_prefix: String,
    /// With an external server (`base_url`): refuse to start (exit 78) when
    /// OpenCode's own config allows a permission that the bridge's policy
    /// would deny or ask about, since OpenCode would then never ask.
    /// Off: the daemon logs the error and shows it in `status`.
    pub require_ask: bool,
    /// What happens to the session of a one-off prompt (no conversation, no
    /// session id) after its terminal reply: `delete` (default) or `keep`.
    pub one_off_sessions: OneOffSessions,
}

/// See [`OpenCodeConfig::one_off_sessions`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OneOffSessions {
    #[default]
    Delete,
    Keep,
}

impl Default for OpenCodeConfig {
    fn default() -> Self {
        OpenCodeConfig {
            base_url: None,
            username: "opencode".into(),
            password: None,
            password_file: None,
            binary: PathBuf::from("opencode"),
            directory: None,
            startup_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            stream_stall_timeout: Duration::from_secs(30),
            reconnect_min: Duration::from_millis(250),
            reconnect_max: Duration::from_secs(30),
            title_prefix: "nats:".into(),
            require_ask: false,
            one_off_sessions: OneOffSessions::Delete,
        }
    }
}

/// Per-turn deadlines and queues.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TurnConfig {
    /// Deadline for the first event of the turn after the prompt was sent
    /// (slow reasoning models can take a while).
    #[serde(with = "humantime_serde")]
    pub first_event_timeout: Duration,
    /// Deadline between meaningful events (heartbeats don't count).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Deadline for the whole turn.
    #[serde(with = "humantime_serde")]
    pub turn_timeout: Duration,
    /// Prompts waiting behind a running turn of the same conversation; one
    /// more gets `session_busy`.
    pub conversation_queue: usize,
    /// Turns in flight (running or queued) across all conversations; the
    /// daemon stops reading prompts while at the limit.
    pub max_in_flight: usize,
    /// Events buffered between the stream reader and one turn; a turn that
    /// falls this far behind loses live events and is reconciled over HTTP.
    pub event_buffer: usize,
    /// Bound on waiting for OpenCode to confirm an abort.
    #[serde(with = "humantime_serde")]
    pub abort_timeout: Duration,
    /// Conversations kept in the conversation -> session map; the least
    /// recently used is forgotten beyond this (the map is a cache over
    /// session titles: a forgotten conversation is found again by title at
    /// the next start, or starts a new session).
    pub max_conversations: usize,
}

impl Default for TurnConfig {
    fn default() -> Self {
        TurnConfig {
            first_event_timeout: Duration::from_secs(120),
            idle_timeout: Duration::from_secs(600),
            turn_timeout: Duration::from_secs(1800),
            conversation_queue: 8,
            max_in_flight: 1024,
            event_buffer: 1024,
            abort_timeout: Duration::from_secs(10),
            max_conversations: 10_000,
        }
    }
}

/// Sizes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// A prompt payload above this gets `bad_request`. It bounds the
    /// attachments too: base64 makes them a third larger on the wire, and
    /// the NATS server's `max_payload` (1 MB by default) bounds it in turn.
    pub max_prompt_bytes: usize,
    /// One attachment above this (decoded bytes) gets `bad_request`.
    pub max_attachment_bytes: usize,
    /// A prompt whose attachments add up to more than this (decoded bytes)
    /// gets `bad_request`. The default (768 KiB) is what a prompt of the
    /// default `max_prompt_bytes` can carry in base64; raise all three (and
    /// the NATS server's `max_payload`) together to take larger files.
    pub max_attachments_bytes: usize,
    /// An SSE event from OpenCode above this is skipped (logged).
    pub max_event_bytes: usize,
    /// A tool result above this is cut on a UTF-8 boundary and marked
    /// `truncated: true`.
    pub max_tool_result_bytes: usize,
    /// Reply payloads are kept under this (and under the server's
    /// `max_payload`); longer deltas are split.
    pub max_reply_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_prompt_bytes: 1024 * 1024,
            max_attachment_bytes: 768 * 1024,
            max_attachments_bytes: 768 * 1024,
            max_event_bytes: 16 * 1024 * 1024,
            max_tool_result_bytes: 64 * 1024,
            max_reply_bytes: 512 * 1024,
        }
    }
}

impl LimitsConfig {
    /// The limits the prompt parser applies.
    pub fn prompt_limits(&self) -> crate::protocol::PromptLimits {
        crate::protocol::PromptLimits {
            max_prompt_bytes: self.max_prompt_bytes,
            max_attachment_bytes: self.max_attachment_bytes,
            max_attachments_bytes: self.max_attachments_bytes,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// On SIGTERM/SIGINT, in-flight turns get this long to finish; the rest
    /// end with `shutting_down`.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            grace: Duration::from_secs(30),
        }
    }
}

/// Discovery and health on NATS: the micro service and the heartbeat.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// Name of the NATS micro service: `$SRV.PING.<name>`,
    /// `$SRV.INFO.<name>`, `$SRV.STATS.<name>` list every daemon. Letters,
    /// digits, `-` and `_`.
    pub name: String,
    /// This daemon's name in status, heartbeats and metrics. Unset: the
    /// machine's host name.
    pub host: Option<String>,
    /// How often the status is published on `<subjects.heartbeat>.<host>`;
    /// `0s` turns heartbeats off.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            name: "opencode-bridge".into(),
            host: None,
            heartbeat_interval: Duration::from_secs(30),
        }
    }
}

/// Prometheus metrics over HTTP.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve `GET /metrics` (Prometheus text) and `GET /healthz` on this
    /// address. Unset (the default): no listener. Keep it on loopback: it
    /// has no authentication.
    pub listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json` (one object per line, for journald/Loki).
    pub format: LogFormat,
    /// A tracing filter (`info`, `opencode_nats_bridge=debug`); `RUST_LOG`
    /// wins when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// A configuration that could not be loaded, naming what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    File {
        path: PathBuf,
        source: config::ConfigError,
    },
    #[error("config: {0}")]
    Parse(config::ConfigError),
    #[error("config: {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

impl Config {
    /// The daemon's own subjects, for routing incoming messages.
    pub fn route_subjects(&self) -> crate::protocol::tenant::Subjects<'_> {
        let s = &self.subjects;
        crate::protocol::tenant::Subjects {
            prompt: &s.prompt,
            abort: &s.abort,
            permission_reply: &s.permission_reply,
            question_reply: &s.question_reply,
            status: &s.status,
            heartbeat: &s.heartbeat,
            reply_prefix: &s.reply_prefix,
        }
    }

    /// Where replies may go (`[tenancy]`).
    pub fn reply_rules(&self) -> crate::protocol::tenant::ReplyRules<'_> {
        crate::protocol::tenant::ReplyRules {
            subjects: self.route_subjects(),
            strict: self.tenancy.strict,
            inbox_prefix: &self.tenancy.inbox_prefix,
        }
    }

    /// What prompts may switch on or choose (`[prompt]`).
    pub fn prompt_policy(&self) -> crate::protocol::tenant::PromptPolicy<'_> {
        crate::protocol::tenant::PromptPolicy {
            allow_enable_tools: &self.prompt.allow_enable_tools,
            agents: &self.prompt.agents,
            models: &self.prompt.models,
        }
    }

    /// Loads the embedded defaults, then `path` (if given), then the
    /// environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, None)
    }

    /// As [`load`](Self::load), with an explicit environment (for tests).
    pub fn load_with_env(
        path: Option<&Path>,
        env: Option<std::collections::HashMap<String, String>>,
    ) -> Result<Config, ConfigError> {
        let mut b = config::Config::builder();
        if let Some(p) = path {
            if !p.exists() {
                return Err(ConfigError::File {
                    path: p.to_path_buf(),
                    source: config::ConfigError::NotFound(p.display().to_string()),
                });
            }
            b = b.add_source(config::File::from(p).format(config::FileFormat::Toml));
        }
        let mut e = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true);
        if let Some(env) = env {
            e = e.source(Some(env.into_iter().collect()));
        }
        b = b.add_source(e);
        let built = b.build().map_err(|source| match path {
            Some(p) => ConfigError::File {
                path: p.to_path_buf(),
                source,
            },
            None => ConfigError::Parse(source),
        })?;
        let cfg: Config = built.try_deserialize().map_err(ConfigError::Parse)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: String| Err(ConfigError::Invalid { key, reason });
        if self.nats.urls().is_empty() {
            return invalid("nats.url", "no server URL given".into());
        }
        for (key, s) in [
            ("subjects.prompt", &self.subjects.prompt),
            ("subjects.reply_prefix", &self.subjects.reply_prefix),
            ("subjects.queue_group", &self.subjects.queue_group),
            ("subjects.abort", &self.subjects.abort),
            ("subjects.status", &self.subjects.status),
            ("subjects.heartbeat", &self.subjects.heartbeat),
            ("nats.inbox_prefix", &self.nats.inbox_prefix),
            ("subjects.permission_reply", &self.subjects.permission_reply),
            ("subjects.question_reply", &self.subjects.question_reply),
            ("tenancy.inbox_prefix", &self.tenancy.inbox_prefix),
        ] {
            if let Err(e) = validate_subject(s) {
                return invalid(key, format!("{s:?} {e}"));
            }
        }
        if let Some(u) = &self.opencode.base_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return invalid(
                    "opencode.base_url",
                    format!("{u:?} must start with http:// or https://"),
                );
            }
        }
        let positive = [
            ("turn.first_event_timeout", self.turn.first_event_timeout),
            ("turn.idle_timeout", self.turn.idle_timeout),
            ("turn.turn_timeout", self.turn.turn_timeout),
            ("turn.abort_timeout", self.turn.abort_timeout),
            ("opencode.request_timeout", self.opencode.request_timeout),
            ("opencode.connect_timeout", self.opencode.connect_timeout),
            ("opencode.startup_timeout", self.opencode.startup_timeout),
            (
                "opencode.stream_stall_timeout",
                self.opencode.stream_stall_timeout,
            ),
            ("opencode.reconnect_min", self.opencode.reconnect_min),
        ];
        for (key, d) in positive {
            if d.is_zero() {
                return invalid(key, "must be above zero".into());
            }
        }
        if self.opencode.reconnect_max < self.opencode.reconnect_min {
            return invalid(
                "opencode.reconnect_max",
                "must not be below opencode.reconnect_min".into(),
            );
        }
        for (key, n) in [
            ("turn.max_in_flight", self.turn.max_in_flight),
            ("turn.event_buffer", self.turn.event_buffer),
            ("turn.max_conversations", self.turn.max_conversations),
            ("limits.max_prompt_bytes", self.limits.max_prompt_bytes),
            (
                "limits.max_attachment_bytes",
                self.limits.max_attachment_bytes,
            ),
            (
                "limits.max_attachments_bytes",
                self.limits.max_attachments_bytes,
            ),
            ("limits.max_event_bytes", self.limits.max_event_bytes),
            (
                "nats.subscription_capacity",
                self.nats.subscription_capacity,
            ),
            ("nats.client_capacity", self.nats.client_capacity),
        ] {
            if n == 0 {
                return invalid(key, "must be above zero".into());
            }
        }
        if let Err(reason) = self.opencode.password_from_file() {
            return invalid("opencode.password_file", reason);
        }
        let name = &self.service.name;
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return invalid(
                "service.name",
                format!("{name:?} may only have letters, digits, - and _"),
            );
        }
        if self
            .service
            .host
            .as_ref()
            .is_some_and(|h| h.trim().is_empty())
        {
            return invalid("service.host", "must not be empty when set".into());
        }
        if self.limits.max_attachment_bytes > self.limits.max_attachments_bytes {
            return invalid(
                "limits.max_attachment_bytes",
                "must not be above limits.max_attachments_bytes (one attachment could never reach it)".into(),
            );
        }
        if self.limits.max_reply_bytes < 1024 {
            return invalid("limits.max_reply_bytes", "must be at least 1024".into());
        }
        if self.nats.tls_cert_file.is_some() != self.nats.tls_key_file.is_some() {
            return invalid(
                "nats.tls_cert_file",
                "tls_cert_file and tls_key_file go together".into(),
            );
        }
        if self.nats.user.is_some() != self.nats.password.is_some() {
            return invalid("nats.user", "user and password go together".into());
        }
        Ok(())
    }
}

impl NatsConfig {
    pub fn urls(&self) -> Vec<String> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }
}

impl OpenCodeConfig {
    /// The password: from the config, else `password_file`, else
    /// `OPENCODE_SERVER_PASSWORD`.
    pub fn resolved_password(&self) -> Option<String> {
        self.password
            .clone()
            .or_else(|| self.password_from_file().ok().flatten())
            .or_else(|| std::env::var("OPENCODE_SERVER_PASSWORD").ok())
            .filter(|p| !p.is_empty())
    }

    /// The first line of `password_file`, if set.
    fn password_from_file(&self) -> Result<Option<String>, String> {
        let Some(path) = &self.password_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let line = text.lines().next().unwrap_or("").trim().to_string();
        if line.is_empty() {
            return Err(format!("{} is empty", path.display()));
        }
        Ok(Some(line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::load_with_env(None, env(&[])).unwrap();
        assert_eq!(c.nats.url, "nats://127.0.0.1:4222");
        assert_eq!(c.turn.first_event_timeout, Duration::from_secs(120));
        assert!(c.opencode.base_url.is_none());
    }

    #[test]
    fn example_file_is_valid_and_complete() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
        Config::load_with_env(Some(&path), env(&[])).unwrap();
        // Every key of the defaults appears in the example.
        let text = std::fs::read_to_string(&path).unwrap();
        let example: toml_keys::Keys = toml_keys::keys(&text);
        for key in [
            "nats.url",
            "nats.subscription_capacity",
            "subjects.prompt",
            "opencode.base_url",
            "opencode.password",
            "turn.first_event_timeout",
            "limits.max_prompt_bytes",
            "limits.max_attachment_bytes",
            "limits.max_attachments_bytes",
            "shutdown.grace",
            "log.format",
            "nats.inbox_prefix",
            "subjects.status",
            "subjects.heartbeat",
            "service.name",
            "service.host",
            "service.heartbeat_interval",
            "metrics.listen",
            "opencode.password_file",
        ] {
            assert!(
                example.iter().any(|k| k == key),
                "config.example.toml lacks {key}"
            );
        }
    }

    mod toml_keys {
        pub type Keys = Vec<String>;
        /// `section.key` for every `key =` line, commented out or not.
        pub fn keys(text: &str) -> Keys {
            let mut section = String::new();
            let mut out = Vec::new();
            for line in text.lines() {
                let l = line.trim().trim_start_matches('#').trim();
                if l.starts_with('[') && l.ends_with(']') {
                    section = l.trim_matches(['[', ']']).to_string();
                } else if let Some((k, _)) = l.split_once('=') {
                    let k = k.trim();
                    if !k.is_empty() && !k.contains(' ') {
                        out.push(format!("{section}.{k}"));
                    }
                }
            }
            out
        }
    }

    #[test]
    fn file_and_env_layer() {
        let f = write(
            "[nats]\nurl = \"nats://file:4222\"\n[turn]\nidle_timeout = \"90s\"\n[opencode]\nbase_url = \"http://127.0.0.1:4096\"\n",
        );
        let c = Config::load_with_env(
            Some(f.path()),
            env(&[
                ("OPENCODE_BRIDGE__NATS__URL", "nats://env:4222"),
                ("OPENCODE_BRIDGE__OPENCODE__PASSWORD", "s3cret"),
                ("OPENCODE_BRIDGE__TURN__CONVERSATION_QUEUE", "3"),
            ]),
        )
        .unwrap();
        assert_eq!(c.nats.url, "nats://env:4222");
        assert_eq!(c.turn.idle_timeout, Duration::from_secs(90));
        assert_eq!(c.turn.conversation_queue, 3);
        assert_eq!(c.opencode.password.as_deref(), Some("s3cret"));
        assert_eq!(
            c.opencode.base_url.as_deref(),
            Some("http://127.0.0.1:4096")
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let f = write("[nats]\nurll = \"x\"\n");
        let e = Config::load_with_env(Some(f.path()), env(&[])).unwrap_err();
        assert!(e.to_string().contains("urll"), "{e}");
        let f = write("[natz]\nurl = \"x\"\n");
        let e = Config::load_with_env(Some(f.path()), env(&[])).unwrap_err();
        assert!(e.to_string().contains("natz"), "{e}");
        let e = Config::load_with_env(None, env(&[("OPENCODE_BRIDGE__TURN__IDEL_TIMEOUT", "1s")]))
            .unwrap_err();
        assert!(e.to_string().contains("idel_timeout"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            ("[turn]\nidle_timeout = \"soon\"\n", "idle_timeout"),
            ("[turn]\nidle_timeout = \"0s\"\n", "turn.idle_timeout"),
            ("[subjects]\nprompt = \"a.*\"\n", "subjects.prompt"),
            (
                "[opencode]\nbase_url = \"localhost:4096\"\n",
                "opencode.base_url",
            ),
            ("[nats]\nurl = \" , \"\n", "nats.url"),
            ("[log]\nformat = \"xml\"\n", "xml"),
            ("[service]\nname = \"a.b\"\n", "service.name"),
            ("[subjects]\nstatus = \"a.>\"\n", "subjects.status"),
            ("[metrics]\nlisten = \"localhost\"\n", "listen"),
        ];
        for (text, needle) in cases {
            let f = write(text);
            let e = Config::load_with_env(Some(f.path()), env(&[])).unwrap_err();
            assert!(e.to_string().contains(needle), "{text:?}: {e}");
        }
        let e = Config::load_with_env(Some(Path::new("/nonexistent.toml")), env(&[])).unwrap_err();
        assert!(e.to_string().contains("/nonexistent.toml"), "{e}");
    }

    #[test]
    fn the_opencode_password_can_come_from_a_file() {
        let f = write("s3cret-from-file\n");
        let c = Config::load_with_env(
            None,
            env(&[(
                "OPENCODE_BRIDGE__OPENCODE__PASSWORD_FILE",
                f.path().to_str().unwrap(),
            )]),
        )
        .unwrap();
        assert_eq!(
            c.opencode.resolved_password().as_deref(),
            Some("s3cret-from-file")
        );
        let e = Config::load_with_env(
            None,
            env(&[(
                "OPENCODE_BRIDGE__OPENCODE__PASSWORD_FILE",
                "/nonexistent/pw",
            )]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("opencode.password_file"), "{e}");
        assert!(e.to_string().contains("/nonexistent/pw"), "{e}");
    }

    #[test]
    fn ops_keys_are_off_by_default_and_layer() {
        let c = Config::load_with_env(None, env(&[])).unwrap();
        assert!(c.metrics.listen.is_none());
        assert_eq!(c.service.name, "opencode-bridge");
        assert_eq!(c.service.heartbeat_interval, Duration::from_secs(30));
        assert_eq!(c.nats.inbox_prefix, "_INBOX");
        let c = Config::load_with_env(
            None,
            env(&[
                ("OPENCODE_BRIDGE__METRICS__LISTEN", "127.0.0.1:9464"),
                ("OPENCODE_BRIDGE__SERVICE__HEARTBEAT_INTERVAL", "0s"),
                ("OPENCODE_BRIDGE__NATS__INBOX_PREFIX", "_INBOX.bridge"),
            ]),
        )
        .unwrap();
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9464".parse().unwrap()));
        assert!(c.service.heartbeat_interval.is_zero());
        assert_eq!(c.nats.inbox_prefix, "_INBOX.bridge");
    }

    #[test]
    fn several_urls() {
        let c = NatsConfig {
            url: "nats://a:1, nats://b:2".into(),
            ..Default::default()
        };
        assert_eq!(c.urls(), vec!["nats://a:1", "nats://b:2"]);
    }
}
