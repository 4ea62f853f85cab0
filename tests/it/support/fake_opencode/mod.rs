//! A fake OpenCode headless server, for what the real one cannot be made to
//! do on cue: events before the `204`, duplicated or stray events, a stream
//! cut mid-turn, provider errors, permission requests, silence.
//!
//! Built on [`super::http`] (byte-exact chunked SSE). It serves what the
//! bridge calls (see `src/opencode/client.rs`):
//!
//! | route | answer |
//! |---|---|
//! | `GET /global/health` | `{"healthy":true,"version":"1.18.34"}` |
//! | `POST /session` `{title}` | the new session `{"id":"ses_...","title",...}` (titles recorded) |
//! | `GET /session`, `GET /session/{id}` | the sessions / one; unknown: 404 `{"name":"NotFoundError",...}` |
//! | `POST /session/{id}/prompt_async` | runs the turn script; **204** (when the script says, see [`Step::Respond`]); unknown session 404; no `parts` 400 |
//! | `GET /session/{id}/message` | the session's message list (see below) |
//! | `GET /config/providers` | `{"providers":[{id, models:{...}}], "default":{...}}` from [`FakeOptions::providers`] |
//! | `GET /session/status` | `{"<sid>":{"type":"busy"}}` for busy sessions |
//! | `DELETE /session/{id}` | 200 `true`, the session removed; unknown: 404 |
//! | `PATCH /session/{id}` `{title}` | the session, renamed; unknown: 404 |
//! | `GET /agent` | two agents, `build` and `plan` (as OpenCode has), whose rules ask for every permission |
//! | `POST /session/{id}/abort` | 200 `true`; cancels the running scripts of the session and, if it was busy, emits what OpenCode emits on abort ([`FakeOptions::abort_delay`] later) |
//! | `POST /permission/{id}/reply`, `POST /session/{sid}/permissions/{id}` | 200 `true` for a permission asked on the stream, else 404 |
//! | `POST /question/{id}/reject`, `POST /question/{id}/reply` | 200 `true` for a question asked, else 404 |
//! | `GET /event` | `text/event-stream`, chunked, `server.connected` first; every event of every turn |
//!
//! With a password ([`FakeOptions::password`]) every route wants HTTP Basic
//! (user `opencode`) or `?auth_token=`; a refusal is a 401 with an empty body.
//! Every request is recorded ([`FakeOpenCode::requests`]).
//!
//! # Turns are scripts
//! Each `prompt_async` builds a [`TurnInput`] (session, text, body, the user
//! message id: the body's `messageID` as OpenCode takes it, else a fresh one) and asks the test's script function
//! ([`FakeOpenCode::set_script`], default [`default_script`]: markers in the
//! text) for a [`TurnScript`]: a list of [`Step`]s run in order by a task of
//! its own: emit an event, sleep, answer the `204`, drop the streams, wait for
//! a reconnect or a request, heartbeats, stall... Event JSON may use the
//! placeholders `{sid}`, `{user}` and `{asst}` (the session, the user message
//! and [`TurnInput::asst_id`]) in any string.
//!
//! [`TurnBuilder`] writes realistic sequences mirroring the recorded
//! fixtures of OpenCode 1.18.34 (`tests/fixtures/opencode-1.18.34/`): text,
//! reasoning, tool calls, provider errors, with the same ids ([`next_id`]:
//! `msg_`, `prt_`, `evt_` ascending, always above a client's `messageID`), field names and order, plus some noise events.
//!
//! # The message list follows the events
//! Like OpenCode, the fake keeps each session's messages by applying the
//! events it emits (`message.updated` upserts a message, `message.part.updated`
//! a part, `message.part.delta` appends to a part's field). So
//! `GET /session/{id}/message` agrees with what was streamed, including events
//! that no stream received (a cut stream). [`Step::EmitOnly`] sends without
//! touching the list (duplicates, strays), [`Step::StoreOnly`] changes the list
//! without sending, [`Step::SetMessages`] replaces it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};

use crate::support::http::{handler, HttpServer, Request};

mod builder;
pub mod ev;
mod ids;
mod server;

pub use builder::*;
pub use ids::*;
use server::*;

/// The version the fake claims to be.
pub const VERSION: &str = "1.18.34";
/// The Basic-auth user.
pub const USERNAME: &str = "opencode";
/// The model of every assistant message unless the prompt names one.
pub const PROVIDER: &str = "fake";
pub const MODEL: &str = "m1";
/// Tokens of every finished step (as in the recorded fixtures).
pub const TOKENS_INPUT: u64 = 100;
pub const TOKENS_OUTPUT: u64 = 22;
pub const TOKENS_REASONING: u64 = 8;
pub const TOKENS_CACHE_READ: u64 = 20;
/// How long a `prompt_async` waits at most for its script to say
/// [`Step::Respond`].
pub const RESPOND_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on handing one event to one stream.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// What a script knows about the prompt it answers.
#[derive(Debug, Clone)]
pub struct TurnInput {
    pub session_id: String,
    /// The text parts of the prompt, concatenated.
    pub text: String,
    /// The whole `prompt_async` body.
    pub body: Value,
    /// The user message id of this turn: the prompt's `messageID`, else a
    /// fresh ascending id.
    pub user_id: String,
    /// A fresh assistant message id (after `user_id`), for `{asst}`.
    pub asst_id: String,
    /// 0-based index of this prompt on the server.
    pub nth: usize,
    /// 0-based index of this prompt in its session.
    pub nth_in_session: usize,
    /// The `directory` query parameter of the call.
    pub directory: Option<String>,
}

impl TurnInput {
    /// `(providerID, modelID)` of the prompt's `model`, else the default.
    pub fn model(&self) -> (String, String) {
        match (
            self.body["model"]["providerID"].as_str(),
            self.body["model"]["modelID"].as_str(),
        ) {
            (Some(p), Some(m)) => (p.to_string(), m.to_string()),
            _ => (PROVIDER.to_string(), MODEL.to_string()),
        }
    }
}

/// One step of a turn script.
#[derive(Debug, Clone)]
pub enum Step {
    /// Emit on every connected stream and apply to the message list.
    Emit(Value),
    /// Emit on the streams only (the message list does not change).
    EmitOnly(Value),
    /// Apply to the message list only (an event no stream gets).
    StoreOnly(Value),
    /// These bytes, verbatim, to every connected stream.
    Raw(Bytes),
    Sleep(Duration),
    /// Answer `prompt_async` now with 204. A script without any `Respond*`
    /// step answers before its first step.
    Respond,
    /// Answer `prompt_async` now with this status and JSON body.
    RespondWith(u16, Value),
    /// Drop every connected stream on the spot (no terminating chunk).
    DropStreams,
    /// Wait (bounded) until at least one stream is connected.
    WaitForStream(Duration),
    /// Wait (bounded) until a request `method` whose path starts with `path`
    /// was received after this turn's prompt.
    WaitForRequest {
        method: String,
        path: String,
        timeout: Duration,
    },
    /// Replace the session's message list.
    SetMessages(Vec<Value>),
    /// `server.heartbeat` on every stream every `every`, for `total`.
    Heartbeats {
        every: Duration,
        total: Duration,
    },
    /// `true`: hold everything sent to the streams connected now (events
    /// still apply to the message list; streams connected later get events
    /// live); `false`: release what they held, and go on.
    Stall(bool),
}

/// The steps of one turn.
#[derive(Debug, Clone, Default)]
pub struct TurnScript {
    pub steps: Vec<Step>,
}

impl TurnScript {
    pub fn new() -> Self {
        TurnScript::default()
    }

    pub fn step(mut self, step: Step) -> Self {
        self.steps.push(step);
        self
    }

    pub fn emit(self, event: Value) -> Self {
        self.step(Step::Emit(event))
    }

    pub fn sleep_ms(self, ms: u64) -> Self {
        self.step(Step::Sleep(Duration::from_millis(ms)))
    }

    /// Every `message.updated` and `message.part.updated` sent twice (the
    /// copy does not touch the message list).
    pub fn duplicate_updates(self) -> Self {
        let mut steps = Vec::with_capacity(self.steps.len() * 2);
        for s in self.steps {
            let dup = match &s {
                Step::Emit(v) | Step::EmitOnly(v)
                    if matches!(
                        v["type"].as_str(),
                        Some("message.updated" | "message.part.updated")
                    ) =>
                {
                    let mut copy = v.clone();
                    if let Some(o) = copy.as_object_mut() {
                        o.remove("id");
                    }
                    Some(Step::EmitOnly(copy))
                }
                _ => None,
            };
            steps.push(s);
            steps.extend(dup);
        }
        TurnScript { steps }
    }

    /// Inserts `step` before the first step for which `at` is true (at the
    /// end if none).
    pub fn insert_before(mut self, at: impl Fn(&Step) -> bool, step: Step) -> Self {
        let i = self.steps.iter().position(at).unwrap_or(self.steps.len());
        self.steps.insert(i, step);
        self
    }
}

/// Whether a step emits an event of this `type`.
pub fn emits(step: &Step, kind: &str) -> bool {
    match step {
        Step::Emit(v) | Step::EmitOnly(v) | Step::StoreOnly(v) => v["type"] == kind,
        _ => false,
    }
}

/// The script function a test provides.
pub type ScriptFn = Arc<dyn Fn(&TurnInput) -> TurnScript + Send + Sync>;

/// One request as received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// The `directory` query parameter.
    pub directory: Option<String>,
    pub body: Bytes,
    /// Whether it passed the auth check (always true without a password).
    pub authorized: bool,
    pub connection_id: u64,
}

impl Recorded {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// One `prompt_async` and what its script did.
#[derive(Debug, Clone)]
pub struct TurnRecord {
    pub input: TurnInput,
    pub received_at: Instant,
    pub responded_at: Option<Instant>,
    pub finished_at: Option<Instant>,
    /// `(time, type)` of every event the script emitted, taken just before
    /// the event went to the streams.
    pub emitted: Vec<(Instant, String)>,
}

impl TurnRecord {
    pub fn first_emitted(&self, kind: &str) -> Option<Instant> {
        self.emitted
            .iter()
            .find(|(_, k)| k == kind)
            .map(|(t, _)| *t)
    }

    pub fn last_emitted(&self, kind: &str) -> Option<Instant> {
        self.emitted
            .iter()
            .rev()
            .find(|(_, k)| k == kind)
            .map(|(t, _)| *t)
    }
}

/// Options of [`FakeOpenCode::start_with`].
#[derive(Debug, Clone)]
pub struct FakeOptions {
    /// Require HTTP Basic `opencode:<password>` on every route.
    pub password: Option<String>,
    /// On abort of a busy session, emit what OpenCode emits (the running
    /// assistant message gets `MessageAbortedError`, `session.error`, idle).
    pub abort_events: bool,
    /// Those events come this long after the abort was answered.
    pub abort_delay: Duration,
    /// `GET /config/providers`: provider id -> model ids.
    pub providers: Vec<(String, Vec<String>)>,
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions {
            password: None,
            abort_events: true,
            abort_delay: Duration::from_millis(20),
            providers: vec![(PROVIDER.to_string(), vec![MODEL.to_string()])],
        }
    }
}

#[derive(Debug, Clone)]
pub struct FakeSession {
    pub id: String,
    pub title: String,
    pub parent_id: Option<String>,
    pub created: u64,
    /// `[{info, parts}]`, sorted by message id.
    pub messages: Vec<Value>,
    pub busy: bool,
}

impl FakeSession {
    pub(super) fn to_json(&self) -> Value {
        let mut v = json!({
            "id": self.id, "slug": "fake-session", "version": VERSION,
            "projectID": "global", "directory": "/tmp/fake-opencode",
            "title": self.title,
            "time": {"created": self.created, "updated": self.created},
        });
        if let Some(p) = &self.parent_id {
            v["parentID"] = json!(p);
        }
        v
    }
}

/// The running fake; dropping it stops the server (scripts still running
/// end on their own, bounded).
pub struct FakeOpenCode {
    server: HttpServer,
    shared: Arc<Shared>,
}

impl FakeOpenCode {
    /// No password, [`default_script`].
    pub async fn start() -> FakeOpenCode {
        Self::start_with(FakeOptions::default()).await
    }

    pub async fn start_with(opts: FakeOptions) -> FakeOpenCode {
        let shared = Arc::new(Shared {
            opts,
            state: Mutex::new(State::default()),
            wire: tokio::sync::Mutex::new(Wire::default()),
            live: AtomicUsize::new(0),
            opened: AtomicU64::new(0),
            prompts: AtomicUsize::new(0),
            script: Mutex::new(Arc::new(default_script)),
        });
        let s = shared.clone();
        let server = HttpServer::start(handler(move |req: Request| {
            let s = s.clone();
            async move { route(s, req).await }
        }))
        .await;
        FakeOpenCode { server, shared }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    pub fn password(&self) -> Option<&str> {
        self.shared.opts.password.as_deref()
    }

    /// Sets the function that scripts every later `prompt_async`.
    pub fn set_script(&self, f: impl Fn(&TurnInput) -> TurnScript + Send + Sync + 'static) {
        *lock(&self.shared.script) = Arc::new(f);
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared.state).requests.clone()
    }

    /// The requests with this method whose path starts with `prefix`.
    pub fn requests_to(&self, method: &str, prefix: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == method && r.path.starts_with(prefix))
            .collect()
    }

    /// The `prompt_async` calls so far.
    pub fn prompts(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == "POST" && r.path.ends_with("/prompt_async"))
            .collect()
    }

    /// Every turn (one per accepted `prompt_async`), in arrival order.
    pub fn turns(&self) -> Vec<TurnRecord> {
        lock(&self.shared.state).turns.clone()
    }

    /// Each turn's delta stream as it ran: from its first delta written to
    /// its last (turns without deltas left out), in the order turns began.
    pub fn delta_windows(&self) -> Vec<(Instant, Instant)> {
        self.turns()
            .iter()
            .filter_map(|t| {
                Some((
                    t.first_emitted("message.part.delta")?,
                    t.last_emitted("message.part.delta")?,
                ))
            })
            .collect()
    }

    pub fn sessions(&self) -> Vec<FakeSession> {
        lock(&self.shared.state).sessions.clone()
    }

    /// How many sessions there are (without copying them).
    pub fn session_count(&self) -> usize {
        lock(&self.shared.state).sessions.len()
    }

    /// Deletes a session (its messages too), as if a user removed it.
    pub fn remove_session(&self, id: &str) -> bool {
        let mut st = lock(&self.shared.state);
        let before = st.sessions.len();
        st.sessions.retain(|s| s.id != id);
        st.sessions.len() != before
    }

    /// A session made outside the bridge (as if left by an earlier run).
    pub fn add_session(&self, title: &str) -> String {
        let s = new_session(title, None);
        let id = s.id.clone();
        lock(&self.shared.state).sessions.push(s);
        id
    }

    /// The message list of a session (empty if unknown).
    pub fn messages(&self, session_id: &str) -> Vec<Value> {
        lock(&self.shared.state)
            .session(session_id)
            .map(|s| s.messages.clone())
            .unwrap_or_default()
    }

    /// Streams connected right now.
    pub async fn live_streams(&self) -> usize {
        self.shared.live_count().await
    }

    /// TCP connections accepted so far (calls and event streams alike).
    pub fn connections_accepted(&self) -> u64 {
        self.server.connections_accepted()
    }

    /// `GET /event` connections accepted so far.
    pub fn streams_opened(&self) -> u64 {
        self.shared.opened.load(Ordering::SeqCst)
    }

    /// Requests refused for want of credentials.
    pub fn unauthorized(&self) -> usize {
        self.requests().iter().filter(|r| !r.authorized).count()
    }

    /// Emits an event now (outside any turn): to every stream, and applied
    /// to the message list.
    pub async fn emit(&self, event: Value) {
        self.shared.emit(event, true, true, None).await;
    }

    /// Raw bytes to every connected stream.
    pub async fn push_raw(&self, bytes: impl Into<Bytes>) {
        self.shared.broadcast(bytes.into()).await;
    }

    /// Drops every connected stream abruptly.
    pub async fn cut_streams(&self) {
        self.shared.drop_streams().await;
    }

    /// Holds (`true`) everything sent to the streams connected now, or
    /// releases it (`false`). Streams connected later are not stalled.
    pub async fn stall(&self, on: bool) {
        self.shared.set_stalled(on).await;
    }

    /// Polls `cond` every 10 ms; panics naming `what` after `timeout`.
    pub async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&FakeOpenCode) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while !cond(self) {
            assert!(
                Instant::now() < deadline,
                "fake OpenCode: {what} not within {timeout:?}; requests: {:#?}",
                self.requests()
                    .iter()
                    .map(|r| format!("{} {}", r.method, r.path))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
