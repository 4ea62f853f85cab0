//! The reqwest adapter for OpenCode's HTTP API. Every call is bounded by
//! `request_timeout`; errors say whether OpenCode was unreachable or
//! answered badly. A call that fails on the way is sent again on a fresh
//! connection when that is safe ([`super::retry`]; `prompt_async` checks
//! first). The password is never logged.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::events::MessageWithParts;
use super::retry::{decode, read_body, Failure, Lost, Reach, Retry, FIRST_PAUSE, MAX_PAUSE};
use crate::config::OpenCodeConfig;
use crate::protocol::{ErrorCode, ModelRef};

/// What went wrong talking to OpenCode.
#[derive(Debug, thiserror::Error)]
pub enum OpenCodeError {
    /// Connection refused, reset, timed out: OpenCode is not there.
    #[error("OpenCode is unreachable ({what}): {detail}")]
    Unavailable { what: String, detail: String },
    /// The thing asked for does not exist (a deleted session).
    #[error("OpenCode says not found ({what}): {body}")]
    NotFound { what: String, body: String },
    /// OpenCode refused our credentials.
    #[error("OpenCode refused the credentials ({what}): HTTP {status}")]
    Unauthorized { what: String, status: u16 },
    /// Any other non-2xx answer.
    #[error("OpenCode answered HTTP {status} ({what}): {body}")]
    Status {
        what: String,
        status: u16,
        body: String,
    },
    /// A 2xx answer we could not read.
    #[error("OpenCode sent an unreadable answer ({what}): {detail}")]
    Decode { what: String, detail: String },
}

impl OpenCodeError {
    /// The wire error code for a turn that fails with this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            OpenCodeError::Unavailable { .. } => ErrorCode::OpencodeUnavailable,
            _ => ErrorCode::OpencodeError,
        }
    }

    /// What a client may be told: what failed and how, without OpenCode's
    /// URL, the transport's detail or OpenCode's error body (those go to the
    /// log).
    pub fn public(&self) -> String {
        match self {
            OpenCodeError::Unavailable { what, .. } => format!("OpenCode is unreachable ({what})"),
            OpenCodeError::NotFound { what, .. } => format!("OpenCode says not found ({what})"),
            OpenCodeError::Unauthorized { what, status } => {
                format!("OpenCode refused the bridge's credentials ({what}): HTTP {status}")
            }
            OpenCodeError::Status { what, status, .. } => {
                format!("OpenCode answered HTTP {status} ({what})")
            }
            OpenCodeError::Decode { what, .. } => {
                format!("OpenCode sent an unreadable answer ({what})")
            }
        }
    }

    pub fn retryable(&self) -> bool {
        match self {
            OpenCodeError::Unavailable { .. } => true,
            OpenCodeError::Unauthorized { .. } => false,
            OpenCodeError::Status { status, .. } => *status >= 500,
            OpenCodeError::NotFound { .. } | OpenCodeError::Decode { .. } => true,
        }
    }
}

/// `host[:port]` of a URL (the whole string when it is not one).
pub fn host_of(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => match (u.host_str(), u.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            _ => url.to_string(),
        },
        Err(_) => url.to_string(),
    }
}

/// The most of `GET /session` read at start-up (about 100,000 sessions).
pub const MAX_SESSION_LIST_BYTES: usize = 64 << 20;

/// A session as OpenCode lists it (only what the bridge reads).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct SessionInfo {
    pub id: String,
    #[serde(default)]
    pub title: String,
    #[serde(default, rename = "parentID")]
    pub parent_id: Option<String>,
    /// The project directory the session works in.
    #[serde(default)]
    pub directory: Option<String>,
}

/// An agent as `GET /agent` lists it (only what the bridge reads).
#[derive(Debug, Clone, Deserialize)]
pub struct AgentInfo {
    pub name: String,
    /// OpenCode's own agents (title, summary, compaction): not offered.
    #[serde(default)]
    pub hidden: bool,
    /// Its merged rules, in order (the last match wins).
    #[serde(default)]
    pub permission: Vec<crate::protocol::interactive::OpenCodeRule>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Health {
    #[serde(default)]
    pub healthy: bool,
    #[serde(default)]
    pub version: String,
}

/// The body of `POST /session/{id}/prompt_async`.
#[derive(Debug, Clone, Serialize)]
pub struct PromptBody {
    /// The id of the user message OpenCode creates for this prompt.
    #[serde(rename = "messageID")]
    pub message_id: String,
    pub parts: Vec<PromptPart>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelBody>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tools: Option<std::collections::BTreeMap<String, bool>>,
}

/// One part of a prompt: the text, or a file as a `data:` URL (what
/// OpenCode 1.14-1.18 take in `prompt_async`; it hands images to the model
/// as images and inlines `text/*` files as text).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum PromptPart {
    Text {
        text: String,
    },
    File {
        mime: String,
        filename: String,
        url: String,
    },
}

impl PromptPart {
    /// The text, then one file part per attachment, in order.
    pub fn of(text: &str, attachments: &[crate::protocol::Attachment]) -> Vec<PromptPart> {
        let mut parts = Vec::with_capacity(1 + attachments.len());
        parts.push(PromptPart::Text {
            text: text.to_string(),
        });
        parts.extend(attachments.iter().map(|a| PromptPart::File {
            mime: a.mime.clone(),
            filename: a.filename.clone(),
            url: a.data_url(),
        }));
        parts
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelBody {
    #[serde(rename = "providerID")]
    pub provider_id: String,
    #[serde(rename = "modelID")]
    pub model_id: String,
}

impl From<&ModelRef> for ModelBody {
    fn from(m: &ModelRef) -> Self {
        ModelBody {
            provider_id: m.provider.clone(),
            model_id: m.model.clone(),
        }
    }
}

/// Which calls wait for a connection of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lane {
    /// A turn's traffic (sessions, prompts, status, message lists):
    /// at most `[opencode] max_connections` at once.
    Pooled,
    /// Aborts, answers to permission requests and questions, health
    /// probes, dispose: rare, and never queued behind turn traffic (a
    /// tenant whose calls are slow must not delay another's abort); each
    /// is bounded by its own timeout. They reuse an idle connection of the
    /// pool when there is one.
    Control,
}

/// A client for one OpenCode server.
#[derive(Clone)]
pub struct OpenCodeClient {
    http: reqwest::Client,
    /// No `/event` deadline: the stream lives as long as it can.
    stream_http: reqwest::Client,
    base: String,
    username: String,
    password: Option<String>,
    directory: Option<String>,
    /// Since when OpenCode has not been reached (shared by every clone).
    reach: Arc<Reach>,
    unavailable_after: Duration,
    /// One permit per connection of the pool (`[opencode] max_connections`):
    /// a call holds one from its send to the end of its body, so at most
    /// that many calls are in flight and the pool, which keeps as many
    /// idle, always has a connection to reuse for the next.
    connections: Arc<tokio::sync::Semaphore>,
    /// How long a call waits for a free connection (`request_timeout`).
    connection_wait: Duration,
}

/// A `prompt_async` that may have reached OpenCode is sent again at most
/// this many times (each after OpenCode showed it does not have it).
const PROMPT_RESENDS: u32 = 2;
/// Looks at the message list for a prompt whose POST failed (50 ms apart,
/// doubling to 400 ms: about a second in all).
const PROMPT_LOOKS: u32 = 5;

impl std::fmt::Debug for OpenCodeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenCodeClient")
            .field("base", &self.base)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("directory", &self.directory)
            .finish()
    }
}

impl OpenCodeClient {
    pub fn new(
        base_url: &str,
        password: Option<String>,
        directory: Option<String>,
        cfg: &OpenCodeConfig,
    ) -> Result<Self, OpenCodeError> {
        let build = |timeout: Option<Duration>| {
            let mut b = reqwest::Client::builder()
                .connect_timeout(cfg.connect_timeout)
                .pool_idle_timeout(Duration::from_secs(30))
                // As many kept idle as may be in use at once (the calls
                // wait for a permit of `connections`): a burst of turns
                // reuses the pool instead of opening a connection per call
                // (docs/BENCHMARKS.md, `[opencode] max_connections`).
                .pool_max_idle_per_host(cfg.max_connections)
                .user_agent(concat!("opencode-nats-bridge/", env!("CARGO_PKG_VERSION")));
            if let Some(t) = timeout {
                b = b.timeout(t);
            }
            b.build().map_err(|e| OpenCodeError::Unavailable {
                what: "building the HTTP client".into(),
                detail: e.to_string(),
            })
        };
        Ok(OpenCodeClient {
            http: build(Some(cfg.request_timeout))?,
            stream_http: build(None)?,
            base: base_url.trim_end_matches('/').to_string(),
            username: cfg.username.clone(),
            password,
            directory,
            reach: Arc::default(),
            unavailable_after: cfg.unavailable_after,
            connections: Arc::new(tokio::sync::Semaphore::new(cfg.max_connections)),
            connection_wait: cfg.request_timeout,
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// A request on the pooled client (bounded by `request_timeout`), or,
    /// with `timeout`, on the unbounded one with that bound instead.
    pub(super) fn request_for(
        &self,
        method: Method,
        path: &str,
        timeout: Option<Duration>,
    ) -> reqwest::RequestBuilder {
        match timeout {
            None => self.request(&self.http, method, path),
            Some(t) => self.request(&self.stream_http, method, path).timeout(t),
        }
    }

    /// This client for the project at `directory` (OpenCode's `directory`
    /// query parameter, honoured per request): the same server, the same
    /// connection pool and reach.
    pub fn in_directory(&self, directory: &str) -> OpenCodeClient {
        OpenCodeClient {
            directory: Some(directory.to_string()),
            ..self.clone()
        }
    }

    /// The directory every call names, if any.
    pub fn directory(&self) -> Option<&str> {
        self.directory.as_deref()
    }

    fn request(
        &self,
        client: &reqwest::Client,
        method: Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        let mut rb = client.request(method, format!("{}{}", self.base, path));
        if let Some(dir) = &self.directory {
            rb = rb.query(&[("directory", dir)]);
        }
        if let Some(pw) = &self.password {
            rb = rb.basic_auth(&self.username, Some(pw));
        }
        rb
    }

    /// How long OpenCode has not been reached (no call and no connect of
    /// the event stream answered since the first that failed); `None`
    /// while it answers.
    pub fn unreachable_for(&self) -> Option<Duration> {
        self.reach.down_for()
    }

    /// `[opencode] unavailable_after`.
    pub fn unavailable_after(&self) -> Duration {
        self.unavailable_after
    }

    /// A failure to reach OpenCode seen outside this client's calls (the
    /// event stream waited too long for its headers), from `started`.
    pub fn note_unreachable(&self, started: Instant) {
        self.reach.failed(started);
    }

    /// One call, retried as `retry` allows: the body of a 2xx answer, at
    /// most `max_body` bytes.
    ///
    /// A call that fails on the way (a pooled connection the network just
    /// closed, a reset, a refused connect) is sent again after a short,
    /// growing pause ([`FIRST_PAUSE`] .. [`MAX_PAUSE`]); by then the pool
    /// has dropped the connections the peer closed, so the retry goes out
    /// on a fresh one (and one that lands on another dead one is retried
    /// again). At least one retry; more while OpenCode has been
    /// unreachable for less than `unavailable_after`. A timeout is never
    /// retried: the call already waited its bound.
    pub(super) async fn call(
        &self,
        what: &str,
        retry: Retry,
        lane: Lane,
        rb: reqwest::RequestBuilder,
        max_body: usize,
    ) -> Result<Bytes, Failure> {
        let mut pause = FIRST_PAUSE;
        let mut attempt = 0u32;
        loop {
            // Waiting for a free connection is not OpenCode failing to
            // answer: it is neither retried nor counted as unreachable.
            let permit = match lane {
                Lane::Pooled => Some(self.connection(what).await?),
                Lane::Control => None,
            };
            let started = Instant::now();
            let once = rb.try_clone().expect("request bodies are in memory");
            let outcome = match self.respond(what, once).await {
                Ok(resp) => read_body(what, resp, max_body).await,
                Err(f) => Err(f),
            };
            let lost = match outcome {
                Err(Failure::Lost(lost)) => lost,
                answered => return answered,
            };
            let down_for = self.reach.failed(started);
            if !retry.allows(&lost, attempt, down_for >= self.unavailable_after) {
                return Err(Failure::Lost(lost));
            }
            debug!(what, attempt, error = %lost.error, "retrying a call to OpenCode on a fresh connection");
            drop(permit);
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_PAUSE);
            attempt += 1;
        }
    }

    /// A free connection of the pool, waited for at most `request_timeout`
    /// (a wait that long means every connection is held by a call OpenCode
    /// does not answer: a timeout, not retried).
    async fn connection(&self, what: &str) -> Result<tokio::sync::OwnedSemaphorePermit, Failure> {
        let permit = tokio::time::timeout(
            self.connection_wait,
            Arc::clone(&self.connections).acquire_owned(),
        )
        .await;
        match permit {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed.
            Ok(Err(_)) | Err(_) => Err(Failure::Lost(Lost {
                error: OpenCodeError::Unavailable {
                    what: what.to_string(),
                    detail: format!(
                        "no free connection within {:?}: all [opencode] max_connections calls are waiting for OpenCode",
                        self.connection_wait
                    ),
                },
                maybe_sent: false,
                timeout: true,
            })),
        }
    }

    /// One attempt: the response to `rb` if it is a 2xx.
    async fn respond(
        &self,
        what: &str,
        rb: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, Failure> {
        let resp = rb.send().await.map_err(|e| Failure::lost(what, &e))?;
        self.reach.answered();
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        let body: String = body.chars().take(500).collect();
        Err(Failure::Answered(match status {
            StatusCode::NOT_FOUND => OpenCodeError::NotFound {
                what: what.to_string(),
                body,
            },
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => OpenCodeError::Unauthorized {
                what: what.to_string(),
                status: status.as_u16(),
            },
            _ => OpenCodeError::Status {
                what: what.to_string(),
                status: status.as_u16(),
                body,
            },
        }))
    }

    /// A call whose answer is not read.
    pub(super) async fn send(
        &self,
        what: &str,
        retry: Retry,
        lane: Lane,
        rb: reqwest::RequestBuilder,
    ) -> Result<(), OpenCodeError> {
        self.call(what, retry, lane, rb, usize::MAX)
            .await
            .map(drop)
            .map_err(Failure::into_error)
    }

    pub(super) async fn json<T: DeserializeOwned>(
        &self,
        what: &str,
        retry: Retry,
        lane: Lane,
        rb: reqwest::RequestBuilder,
    ) -> Result<T, OpenCodeError> {
        let bytes = self
            .call(what, retry, lane, rb, usize::MAX)
            .await
            .map_err(Failure::into_error)?;
        decode(what, &bytes)
    }

    /// `GET /global/health`.
    /// Bounded by `timeout` (a server still starting can accept the
    /// connection and not answer).
    pub async fn health(&self, timeout: Duration) -> Result<Health, OpenCodeError> {
        let rb = self
            .request(&self.http, Method::GET, "/global/health")
            .timeout(timeout);
        self.json("health check", Retry::Once, Lane::Control, rb)
            .await
    }

    /// `POST /session` with a title.
    ///
    /// Retried like an idempotent call although it is not one: a POST that
    /// reached OpenCode before its connection failed leaves an empty
    /// session behind, older than the one the retry makes (so the
    /// conversation map, rebuilt from titles with the newest first, never
    /// picks it). One stray empty session is cheaper than a failed turn.
    pub async fn create_session(&self, title: &str) -> Result<SessionInfo, OpenCodeError> {
        let rb = self
            .request(&self.http, Method::POST, "/session")
            .json(&serde_json::json!({ "title": title }));
        self.json("creating a session", Retry::Idempotent, Lane::Pooled, rb)
            .await
    }

    /// `GET /session`.
    /// Bounded by [`MAX_SESSION_LIST_BYTES`]: a server with more sessions
    /// than that is refused (the caller logs it) rather than read into
    /// memory whole.
    pub async fn list_sessions(&self) -> Result<Vec<SessionInfo>, OpenCodeError> {
        let what = "listing sessions";
        let rb = self.request(&self.http, Method::GET, "/session");
        let body = self
            .call(
                what,
                Retry::Idempotent,
                Lane::Pooled,
                rb,
                MAX_SESSION_LIST_BYTES,
            )
            .await
            .map_err(Failure::into_error)?;
        decode(what, &body)
    }

    /// `GET /session/{id}`.
    pub async fn get_session(&self, id: &str) -> Result<SessionInfo, OpenCodeError> {
        let path = format!("/session/{id}");
        self.json(
            "reading a session",
            Retry::Idempotent,
            Lane::Pooled,
            self.request(&self.http, Method::GET, &path),
        )
        .await
    }

    /// `GET /agent`: each agent with its merged permission rules.
    pub async fn agents(&self) -> Result<Vec<AgentInfo>, OpenCodeError> {
        self.json(
            "listing agents",
            Retry::Idempotent,
            Lane::Pooled,
            self.request(&self.http, Method::GET, "/agent"),
        )
        .await
    }

    /// `POST /global/dispose`: OpenCode stops what its instances run, the
    /// tool processes included (they run in their own process groups, so
    /// stopping the server alone would leave them behind).
    pub async fn dispose(&self) -> Result<(), OpenCodeError> {
        let rb = self.request(&self.http, Method::POST, "/global/dispose");
        self.send("disposing", Retry::Unsent, Lane::Control, rb)
            .await
    }

    /// `DELETE /session/{id}` (retried: deleting twice is harmless, the
    /// second answer a 404).
    pub async fn delete_session(&self, id: &str) -> Result<(), OpenCodeError> {
        let path = format!("/session/{id}");
        let rb = self.request(&self.http, Method::DELETE, &path);
        self.send("deleting a session", Retry::Idempotent, Lane::Pooled, rb)
            .await
    }

    /// `POST /session/{id}/prompt_async` (204 on acceptance), so that
    /// OpenCode answers the prompt once.
    ///
    /// A POST is not idempotent: a prompt sent twice is answered twice. A
    /// POST that never left (no connection could be made) is sent again
    /// like any call. One that failed after it may have reached OpenCode (a
    /// reset, the connection closed before the 204) is sent again only
    /// when OpenCode shows no user message with the prompt's `messageID`
    /// (the bridge names each turn's user message) about a second later
    /// and the session is not busy ([`Self::prompt_arrived`]); the second
    /// POST carries the same id. When OpenCode cannot be asked, the turn
    /// fails (retryable) rather than risk a second answer.
    pub async fn prompt_async(&self, id: &str, body: &PromptBody) -> Result<(), OpenCodeError> {
        let what = "sending the prompt";
        let path = format!("/session/{id}/prompt_async");
        let rb = self.request(&self.http, Method::POST, &path).json(body);
        let mut resent = 0;
        loop {
            let once = rb.try_clone().expect("request bodies are in memory");
            match self
                .call(what, Retry::Unsent, Lane::Pooled, once, usize::MAX)
                .await
            {
                Ok(_) => return Ok(()),
                Err(Failure::Lost(lost)) if lost.maybe_sent && resent < PROMPT_RESENDS => {
                    warn!(session_id = %id, error = %lost.error, "the prompt may not have reached OpenCode; looking for it");
                    if self.prompt_arrived(id, &body.message_id).await? {
                        info!(session_id = %id, "OpenCode has the prompt");
                        return Ok(());
                    }
                    info!(session_id = %id, "OpenCode does not have the prompt; sending it again");
                    resent += 1;
                }
                Err(f) => return Err(f.into_error()),
            }
        }
    }

    /// Whether session `id` holds the user message `message_id`: looked
    /// for a few times over about a second, since OpenCode answers
    /// `prompt_async` before it writes the message. Still absent but the
    /// session busy: the bridge cannot tell whether its prompt is what runs
    /// there, so an error (the turn fails, retryable), not a second POST.
    async fn prompt_arrived(&self, id: &str, message_id: &str) -> Result<bool, OpenCodeError> {
        let mut pause = Duration::from_millis(50);
        for _ in 0..PROMPT_LOOKS {
            tokio::time::sleep(pause).await;
            if self
                .messages(id)
                .await?
                .iter()
                .any(|m| m.info.id == message_id)
            {
                return Ok(true);
            }
            pause = (pause * 2).min(Duration::from_millis(400));
        }
        if self.session_status().await?.contains_key(id) {
            return Err(OpenCodeError::Unavailable {
                what: "sending the prompt".into(),
                detail: "the connection failed after the prompt was sent, and the session is busy without the prompt's message".into(),
            });
        }
        Ok(false)
    }

    /// `GET /session/{id}/message`.
    pub async fn messages(&self, id: &str) -> Result<Vec<MessageWithParts>, OpenCodeError> {
        let path = format!("/session/{id}/message");
        self.json(
            "reading messages",
            Retry::Idempotent,
            Lane::Pooled,
            self.request(&self.http, Method::GET, &path),
        )
        .await
    }

    /// `GET /session/status`: busy sessions (idle ones are absent).
    pub async fn session_status(&self) -> Result<HashMap<String, Value>, OpenCodeError> {
        self.json(
            "reading session status",
            Retry::Idempotent,
            Lane::Pooled,
            self.request(&self.http, Method::GET, "/session/status"),
        )
        .await
    }

    /// `POST /session/{id}/abort`, each attempt bounded by `timeout`.
    /// OpenCode answers `true` even for an idle session: confirm from the
    /// events. Retried: aborting twice is aborting once.
    pub async fn abort(&self, id: &str, timeout: Duration) -> Result<(), OpenCodeError> {
        let path = format!("/session/{id}/abort");
        let rb = self
            .request(&self.http, Method::POST, &path)
            .timeout(timeout);
        self.send("aborting the session", Retry::Idempotent, Lane::Control, rb)
            .await
    }

    /// Answers a permission request: `POST /permission/{id}/reply`, falling
    /// back to the older `POST /session/{sid}/permissions/{id}`.
    pub async fn reply_permission(
        &self,
        session_id: &str,
        request_id: &str,
        reply: &str,
        message: Option<&str>,
    ) -> Result<(), OpenCodeError> {
        let path = format!("/permission/{request_id}/reply");
        let mut body = serde_json::json!({ "reply": reply });
        if let Some(m) = message {
            body["message"] = m.into();
        }
        let rb = self.request(&self.http, Method::POST, &path).json(&body);
        // Not retried once sent: a second reply to an applied one is a 404.
        match self
            .send(
                "answering a permission request",
                Retry::Unsent,
                Lane::Control,
                rb,
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(OpenCodeError::NotFound { .. }) => {
                let path = format!("/session/{session_id}/permissions/{request_id}");
                let rb = self
                    .request(&self.http, Method::POST, &path)
                    .json(&serde_json::json!({ "response": reply }));
                self.send(
                    "answering a permission request (old route)",
                    Retry::Unsent,
                    Lane::Control,
                    rb,
                )
                .await
            }
            Err(e) => Err(e),
        }
    }

    /// Answers a question: `POST /question/{id}/reply` with one list of
    /// chosen labels per question.
    pub async fn reply_question(
        &self,
        request_id: &str,
        answers: &[Vec<String>],
    ) -> Result<(), OpenCodeError> {
        let path = format!("/question/{request_id}/reply");
        let rb = self
            .request(&self.http, Method::POST, &path)
            .json(&serde_json::json!({ "answers": answers }));
        self.send("answering a question", Retry::Unsent, Lane::Control, rb)
            .await
    }

    /// `GET /config/providers`: provider id -> its model ids.
    pub async fn providers(
        &self,
    ) -> Result<HashMap<String, std::collections::HashSet<String>>, OpenCodeError> {
        let v: Value = self
            .json(
                "listing providers",
                Retry::Idempotent,
                Lane::Pooled,
                self.request(&self.http, Method::GET, "/config/providers"),
            )
            .await?;
        let mut out = HashMap::new();
        for p in v
            .get("providers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let Some(id) = p.get("id").and_then(Value::as_str) else {
                continue;
            };
            let models = p
                .get("models")
                .and_then(Value::as_object)
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            out.insert(id.to_string(), models);
        }
        Ok(out)
    }

    /// Where a provider's model is served (`GET /config/providers`): the
    /// provider's `options.baseURL`, else the model's `api.url`; `None`
    /// when OpenCode does not say.
    pub async fn provider_endpoint(
        &self,
        provider: &str,
        model: &str,
    ) -> Result<Option<String>, OpenCodeError> {
        let v: Value = self
            .json(
                "listing providers",
                Retry::Idempotent,
                Lane::Pooled,
                self.request(&self.http, Method::GET, "/config/providers"),
            )
            .await?;
        let Some(p) = v
            .get("providers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|p| p.get("id").and_then(Value::as_str) == Some(provider))
        else {
            return Ok(None);
        };
        let url = p
            .pointer("/options/baseURL")
            .and_then(Value::as_str)
            .or_else(|| {
                p.get("models")?
                    .get(model)?
                    .pointer("/api/url")
                    .and_then(Value::as_str)
            })
            .filter(|u| !u.is_empty())
            .map(str::to_string);
        Ok(url)
    }

    /// Rejects a question: `POST /question/{id}/reject`.
    pub async fn reject_question(&self, request_id: &str) -> Result<(), OpenCodeError> {
        let path = format!("/question/{request_id}/reject");
        let rb = self.request(&self.http, Method::POST, &path);
        self.send("rejecting a question", Retry::Unsent, Lane::Control, rb)
            .await
    }

    /// Opens `GET /event`, checking the status and the content type (a 401
    /// must not look like an early end of stream).
    pub async fn open_events(&self) -> Result<reqwest::Response, OpenCodeError> {
        let rb = self
            .request(&self.stream_http, Method::GET, "/event")
            .header(reqwest::header::ACCEPT, "text/event-stream");
        // Not retried here: the reader has its own reconnect loop.
        let started = Instant::now();
        let resp = match self.respond("opening the event stream", rb).await {
            Ok(r) => r,
            Err(f) => {
                if matches!(f, Failure::Lost(_)) {
                    self.reach.failed(started);
                }
                return Err(f.into_error());
            }
        };
        let ct = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        if !ct.starts_with("text/event-stream") {
            return Err(OpenCodeError::Decode {
                what: "opening the event stream".into(),
                detail: format!("content type is {ct:?}, not text/event-stream"),
            });
        }
        Ok(resp)
    }
}

/// `reqwest` hides the useful part of an error in its sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Attachment;

    /// A turn's call that finds every connection of the pool held waits
    /// for one at most `request_timeout`, then fails saying so, without
    /// opening a connection of its own; an abort (a control call) does not
    /// wait behind it.
    #[tokio::test]
    async fn a_call_waits_for_a_free_connection_and_an_abort_does_not() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        // Accepts and never answers.
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = listener.accept().await {
                counter.fetch_add(1, SeqCst);
                held.push(sock);
            }
        });
        let cfg = OpenCodeConfig {
            max_connections: 1,
            request_timeout: Duration::from_secs(30),
            ..OpenCodeConfig::default()
        };
        let mut client = OpenCodeClient::new(&format!("http://{addr}"), None, None, &cfg).unwrap();
        // The wait is request_timeout; shorter here than the holder's call.
        client.connection_wait = Duration::from_millis(200);
        // Holds the only connection (OpenCode never answers it).
        let holder = {
            let c = client.clone();
            tokio::spawn(async move { c.session_status().await })
        };
        while accepted.load(SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let err = client.messages("ses_x").await.unwrap_err();
        match &err {
            OpenCodeError::Unavailable { detail, .. } => {
                assert!(detail.contains("no free connection"), "{err}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(err.code(), ErrorCode::OpencodeUnavailable);
        assert_eq!(
            accepted.load(SeqCst),
            1,
            "the waiting call opened a connection"
        );
        assert_eq!(
            client.unreachable_for(),
            None,
            "waiting for a connection is not OpenCode being unreachable"
        );
        // An abort goes out at once on a connection of its own, bounded by
        // its own timeout.
        let err = client
            .abort("ses_x", Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(!err.to_string().contains("no free connection"), "{err}");
        assert_eq!(accepted.load(SeqCst), 2, "the abort did not go out");
        holder.abort();
        server.abort();
    }

    #[test]
    fn prompt_parts_are_the_text_then_data_url_files() {
        let a = Attachment {
            filename: "dot.png".into(),
            mime: "image/png".into(),
            base64: "iVBORw==".into(),
            size: 4,
        };
        let parts = PromptPart::of("look", std::slice::from_ref(&a));
        assert_eq!(
            serde_json::to_value(&parts).unwrap(),
            serde_json::json!([
                {"type": "text", "text": "look"},
                {"type": "file", "mime": "image/png", "filename": "dot.png",
                 "url": "data:image/png;base64,iVBORw=="}
            ])
        );
    }
}
