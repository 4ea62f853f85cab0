//! Configuration: a TOML file layered with `OPENCODE_BRIDGE__<SECTION>__<KEY>`
//! environment variables, read into serde structs that reject unknown keys,
//! then validated into [`Config`]. Every key is documented here and in
//! `config.example.toml`, with its default.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use cluster::{ClusterConfig, JetStreamConfig, Switch};
pub use controls::{ControlsConfig, OnNew};
pub use isolation::{IsolationConfig, IsolationMode, WorkspacesConfig};
pub use sandbox::{NetworkMode, SandboxLimits};
pub use shares::SharesConfig;

/// The environment prefix: `OPENCODE_BRIDGE__NATS__URL` sets `[nats] url`.
pub const ENV_PREFIX: &str = "OPENCODE_BRIDGE";

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[nats]`: how to reach NATS.
    pub nats: NatsConfig,
    /// `[subjects]`: the subjects of the wire contract.
    pub subjects: SubjectsConfig,
    /// `[opencode]`: which OpenCode server to drive, or how to start one.
    pub opencode: OpenCodeConfig,
    /// `[turn]`: per-turn deadlines, queues and the provider retry limit.
    pub turn: TurnConfig,
    /// `[limits]`: sizes.
    pub limits: LimitsConfig,
    /// `[shutdown]`: the grace period on SIGTERM/SIGINT.
    pub shutdown: ShutdownConfig,
    /// `[log]`: format and level.
    pub log: LogConfig,
    /// `[service]`: the NATS micro service and heartbeats.
    pub service: ServiceConfig,
    /// `[metrics]`: Prometheus over HTTP.
    pub metrics: MetricsConfig,
    /// `[permissions]`: answers to OpenCode's permission requests.
    pub permissions: PermissionsConfig,
    pub tenancy: TenancyConfig,
    pub prompt: PromptConfig,
    /// `[agent_protocol]`: the Synadia Agent Protocol v0.3 registration.
    pub agent_protocol: AgentProtocolConfig,
    /// `[cluster]`: conversation homes, leases and turn states in KV.
    pub cluster: ClusterConfig,
    /// `[jetstream]`: durable jobs and the optional replies stream.
    pub jetstream: JetStreamConfig,
    /// `[shares]`: what one tenant may hold of what tenants share.
    pub shares: SharesConfig,
    /// `[controls]`: the conversation control API (undo, diff, history...).
    pub controls: ControlsConfig,
    /// `[workspaces]`: a directory per tenant and per named workspace.
    pub workspaces: WorkspacesConfig,
    /// `[isolation]`: one OpenCode for all tenants, one per tenant, or one
    /// per tenant confined by the kernel.
    pub isolation: IsolationConfig,
}

/// The daemon as a Synadia Agent Protocol v0.3 agent (docs/PROTOCOL.md,
/// "Agent protocol profile"): the micro service `agents`, its `prompt`
/// and `status` endpoints and heartbeats on
/// `agents.{prompt|status|hb}.opencode.<owner>.<name>`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentProtocolConfig {
    /// Register as an agent beside the bridge's own subjects. Prompts on
    /// the agent subjects act as the operator (no tenant): restrict who
    /// may publish to `agents.prompt.>` with NATS permissions.
    pub enabled: bool,
    /// The operator or account owning this agent (`metadata.owner`, the
    /// 4th subject token). Letters, digits, `-` and `_`.
    pub owner: String,
    /// The instance name (the 5th subject token). Unset: `[service] host`,
    /// else the machine's host name (dots become `-`).
    pub name: Option<String>,
    /// How often a heartbeat goes out on `agents.hb.opencode.<owner>.<name>`
    /// (the protocol's default is 30 s; at least 1 s).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// How often a running turn's stream hears `{"type":"status","data":"ack"}`
    /// again (the protocol SDK's 30 s; callers give up after 60 s of
    /// silence). At least 1 s.
    #[serde(with = "humantime_serde")]
    pub ack_interval: Duration,
}

impl Default for AgentProtocolConfig {
    fn default() -> Self {
        AgentProtocolConfig {
            enabled: true,
            owner: "default".into(),
            name: None,
            heartbeat_interval: Duration::from_secs(30),
            ack_interval: Duration::from_secs(30),
        }
    }
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
    /// Turns one tenant may have queued or running at once; one more gets
    /// `overloaded` (retryable), so one tenant cannot take every slot of
    /// `turn.max_in_flight` (default: a quarter of it). A chat platform is
    /// one tenant for all its channels: size it for the busiest. 0: no
    /// limit. The operator has none.
    pub max_turns_per_tenant: usize,
    /// The pace of replies for prompts that do not say (`"stream"`), by
    /// tenant: `"full"`, `"final"` or `{ coalesce_ms = N }`; the key `"*"`
    /// is everyone else, the operator included. A chat platform that edits
    /// one message a second sets `slack = { coalesce_ms = 1000 }`.
    pub stream: std::collections::BTreeMap<String, serde_json::Value>,
}

impl TenancyConfig {
    /// The pace for a prompt of `caller` that does not name one.
    pub fn stream_default(
        &self,
        caller: &crate::protocol::tenant::Caller,
    ) -> crate::protocol::StreamMode {
        let v = caller
            .tenant()
            .and_then(|t| self.stream.get(t))
            .or_else(|| self.stream.get("*"));
        v.and_then(|v| crate::protocol::prompt::parse_stream_mode(v.clone()).ok())
            .unwrap_or_default()
    }
}

impl Default for TenancyConfig {
    fn default() -> Self {
        TenancyConfig {
            strict: false,
            inbox_prefix: "_INBOX".into(),
            max_turns_per_tenant: 256,
            stream: Default::default(),
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
    /// OpenCode commands a prompt may run (`"command": {"name": ...}`: the
    /// built-ins such as `init` and the project's `.opencode/command/*.md`);
    /// empty: none. A command runs as a turn with the tenant's permission
    /// rules, like a prompt of its text.
    pub commands: Vec<String>,
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
    /// Password, for user/password auth (with `user`). Never logged.
    pub password: Option<String>,
    /// A CA bundle to verify the server's certificate (enables TLS).
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate, for mutual TLS (with `tls_key_file`).
    pub tls_cert_file: Option<PathBuf>,
    /// The client certificate's private key (with `tls_cert_file`).
    pub tls_key_file: Option<PathBuf>,
    /// Require TLS even without a CA file.
    pub tls_required: bool,
    /// Keep retrying when the server is not up yet at start (a sidecar may
    /// start before its server): the daemon logs the URL once, then one line
    /// per retry (250 ms doubling to 8 s), until NATS answers or a signal
    /// stops it (exit 0). `false`: exit 1 at once when NATS is unreachable.
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
    /// Turn state requests (`{"trace_id"}`): `<turn_status>` for the
    /// operator, `<turn_status>.<tenant>` for a tenant's own turns; one
    /// daemon answers each (queue group), from `[cluster] turns_bucket`.
    pub turn_status: String,
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
            turn_status: "opencode.turn.status".into(),
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
    /// The longest delay between event-stream reconnects.
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// OpenCode counts as gone (turns in flight end `opencode_unavailable`)
    /// only after it stayed unreachable this long while connects kept
    /// failing. A blip shorter than this (a reset connection, a restarted
    /// proxy) costs a reconnect and a resync, not a turn.
    #[serde(with = "humantime_serde")]
    pub unavailable_after: Duration,
    /// Session titles are `<title_prefix><conversation>`, so the
    /// conversation map can be rebuilt from `GET /session` after a restart.
    pub title_prefix: String,
    /// HTTP connections to OpenCode for the turns' calls (sessions,
    /// prompts, status, message lists; the event stream has its own): at
    /// most this many are in flight at once, the rest wait for a free
    /// connection in arrival order (at most `request_timeout`, then
    /// `opencode_unavailable` saying so), and as many are kept open for
    /// reuse, so a burst of turns reuses them instead of opening one per
    /// call. Aborts, answers to permission requests and questions, and
    /// health probes never wait for one. Each costs about 20 KB while
    /// open. A few dozen serve hundreds of concurrent turns; raise it when
    /// many turns end in the same instant. At most 4096.
    /// (`max_idle_connections`, the old name, is read as this key, with a
    /// warning.)
    pub max_connections: usize,
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
            unavailable_after: Duration::from_secs(5),
            title_prefix: "nats:".into(),
            max_connections: 32,
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
    /// Turns in flight (running or queued behind their conversation)
    /// across all conversations.
    pub max_in_flight: usize,
    /// Prompts read while `max_in_flight` turns are in flight wait here
    /// (in arrival order) for a slot; one more gets `overloaded` at once.
    /// The daemon never stops reading, so the NATS buffer never drops one.
    pub max_waiting: usize,
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
    /// When the model provider fails, OpenCode retries it with growing
    /// pauses (five times, over about 70 s, before it reports an error).
    /// The bridge ends the turn with `provider_error` at OpenCode's
    /// `provider_retry_limit`-th retry instead, so a caller hears of a
    /// broken provider in seconds. `0`: wait for OpenCode to give up.
    pub provider_retry_limit: u32,
}

impl Default for TurnConfig {
    fn default() -> Self {
        TurnConfig {
            first_event_timeout: Duration::from_secs(120),
            idle_timeout: Duration::from_secs(600),
            turn_timeout: Duration::from_secs(1800),
            conversation_queue: 8,
            max_in_flight: 1024,
            max_waiting: 1024,
            event_buffer: 1024,
            abort_timeout: Duration::from_secs(10),
            max_conversations: 10_000,
            provider_retry_limit: 3,
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
    /// A prompt with more attachments than this gets `bad_request` before
    /// any is read: OpenCode spends time on each one (about 17 ms), so a
    /// prompt of thousands of tiny files would hold it for every tenant.
    pub max_attachments: usize,
    /// An image attachment whose header declares more pixels (width x
    /// height) than this gets `bad_request`: OpenCode decodes images whole
    /// on the event loop all tenants share, and a 250 KB PNG can declare
    /// 16000x16000. The default is 40 megapixels (8000x5000).
    pub max_image_pixels: u64,
    /// An SSE event from OpenCode above this is skipped (logged).
    pub max_event_bytes: usize,
    /// A tool result above this is cut on a UTF-8 boundary and marked
    /// `truncated: true`.
    pub max_tool_result_bytes: usize,
    /// Reply payloads are kept under this (and under the server's
    /// `max_payload`); longer deltas are split.
    pub max_reply_bytes: usize,
    /// A `final` longer than a reply can carry keeps the prefix that fits
    /// (`content_truncated`) and, with JetStream, its whole text goes to
    /// this NATS object store bucket (`final.content_object`; a tenant's
    /// to `<bucket>-<tenant>`), kept `[cluster] turn_ttl`.
    pub large_final_bucket: String,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_prompt_bytes: 1024 * 1024,
            max_attachment_bytes: 768 * 1024,
            max_attachments_bytes: 768 * 1024,
            max_attachments: crate::protocol::prompt::DEFAULT_MAX_ATTACHMENTS,
            max_image_pixels: crate::protocol::prompt::DEFAULT_MAX_IMAGE_PIXELS,
            max_event_bytes: 16 * 1024 * 1024,
            max_tool_result_bytes: 64 * 1024,
            max_reply_bytes: 512 * 1024,
            large_final_bucket: "opencode_bridge_finals".into(),
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
            max_attachments: self.max_attachments,
            max_image_pixels: self.max_image_pixels,
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

/// A configuration that could not be loaded, naming where (file or
/// environment variable), the key, what was given and what is valid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {} does not exist", path.display())]
    Missing { path: PathBuf },
    /// The file cannot be read or is not TOML.
    #[error("config file {}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    /// One key's value (or name) is wrong; `origin` says where it came from.
    #[error("{origin}: {reason}")]
    Key { origin: String, reason: String },
    #[error("config: {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// Which sources a configuration was read from (`check-config` says it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sources {
    /// The file given with `--config`, if any.
    pub file: Option<PathBuf>,
    /// The `OPENCODE_BRIDGE__*` variables that were set, sorted.
    pub env: Vec<String>,
    /// Keys read under an old name: what to tell the operator.
    pub renamed: Vec<String>,
}

impl std::fmt::Display for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.file, self.env.is_empty()) {
            (None, true) => write!(
                f,
                "built-in defaults only (no --config file, no {ENV_PREFIX}__* environment variables)"
            ),
            (file, _) => {
                write!(f, "built-in defaults")?;
                if let Some(p) = file {
                    write!(f, ", config file {}", p.display())?;
                }
                if !self.env.is_empty() {
                    write!(f, ", environment {}", self.env.join(" "))?;
                }
                Ok(())
            }
        }
    }
}

/// How a duration is written, for error messages.
const DURATION_EXAMPLE: &str = "a duration such as \"10m\", \"90s\" or \"1h 30m\"";

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
            turn_status: &s.turn_status,
            jobs: &self.jetstream.jobs_subject,
            instances: &self.cluster.instance_prefix,
            controls: &self.controls.subject,
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
            commands: &self.prompt.commands,
        }
    }

    /// Loads the embedded defaults, then `path` (if given), then the
    /// environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, None)
    }

    /// As [`load`](Self::load), also saying which sources were read.
    pub fn load_with_sources(path: Option<&Path>) -> Result<(Config, Sources), ConfigError> {
        Self::load_inner(path, None)
    }

    /// As [`load`](Self::load), with an explicit environment (for tests).
    pub fn load_with_env(
        path: Option<&Path>,
        env: Option<std::collections::HashMap<String, String>>,
    ) -> Result<Config, ConfigError> {
        Self::load_inner(path, env).map(|(c, _)| c)
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

mod cluster;
mod controls;
mod isolation;
mod load;
mod sandbox;
mod shares;
#[cfg(test)]
mod tests;
mod validate;
