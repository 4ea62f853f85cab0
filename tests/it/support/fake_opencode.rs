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
//! | `GET /agent` | one agent, `build`, whose rules ask for every permission |
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

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::http::{handler, HttpServer, Request, Response, ABORT};

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
    fn to_json(&self) -> Value {
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

#[derive(Default)]
struct State {
    sessions: Vec<FakeSession>,
    requests: Vec<Recorded>,
    turns: Vec<TurnRecord>,
    /// The running scripts of each session: (turn index, token).
    running: HashMap<String, Vec<(usize, CancellationToken)>>,
    permissions: HashSet<String>,
    questions: HashSet<String>,
}

impl State {
    fn session_mut(&mut self, id: &str) -> Option<&mut FakeSession> {
        self.sessions.iter_mut().find(|s| s.id == id)
    }

    fn session(&self, id: &str) -> Option<&FakeSession> {
        self.sessions.iter().find(|s| s.id == id)
    }
}

/// One connected `GET /event`.
struct Slot {
    id: u64,
    tx: mpsc::Sender<Bytes>,
    /// `Some` while stalled: what it will get when released.
    held: Option<Vec<Bytes>>,
}

#[derive(Default)]
struct Wire {
    streams: Vec<Slot>,
    next_id: u64,
}

struct Shared {
    opts: FakeOptions,
    state: Mutex<State>,
    /// Held while an event is applied and sent, so every stream sees the
    /// events in the order the message list got them.
    wire: tokio::sync::Mutex<Wire>,
    live: AtomicUsize,
    opened: AtomicU64,
    prompts: AtomicUsize,
    script: Mutex<ScriptFn>,
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

    pub fn sessions(&self) -> Vec<FakeSession> {
        lock(&self.shared.state).sessions.clone()
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn script(&self) -> ScriptFn {
        lock(&self.script).clone()
    }

    /// Applies (`apply`) and sends (`send`) one event, recording it on
    /// `turn`'s record.
    async fn emit(&self, mut event: Value, apply: bool, send: bool, turn: Option<usize>) {
        if let Some(o) = event.as_object_mut() {
            if !o.contains_key("id") {
                // The envelope's `id` comes first, as OpenCode writes it.
                let mut with_id = serde_json::Map::new();
                with_id.insert("id".into(), json!(next_id("evt")));
                with_id.extend(std::mem::take(o));
                *o = with_id;
            }
        }
        let mut wire = self.wire.lock().await;
        {
            let mut st = lock(&self.state);
            if apply {
                apply_event(&mut st, &event);
            }
            if let Some(t) = turn.and_then(|i| st.turns.get_mut(i)) {
                let kind = event["type"].as_str().unwrap_or("").to_string();
                t.emitted.push((Instant::now(), kind));
            }
        }
        if send {
            let bytes = Bytes::from(format!("data: {event}\n\n"));
            self.send_locked(&mut wire, bytes).await;
        }
    }

    async fn broadcast(&self, bytes: Bytes) {
        let mut wire = self.wire.lock().await;
        self.send_locked(&mut wire, bytes).await;
    }

    async fn send_locked(&self, wire: &mut Wire, bytes: Bytes) {
        let mut dead = Vec::new();
        for slot in &mut wire.streams {
            if let Some(held) = &mut slot.held {
                held.push(bytes.clone());
                continue;
            }
            let ok = matches!(
                tokio::time::timeout(SEND_TIMEOUT, slot.tx.send(bytes.clone())).await,
                Ok(Ok(()))
            );
            if !ok {
                dead.push(slot.id);
            }
        }
        wire.streams
            .retain(|s| !dead.contains(&s.id) && !s.tx.is_closed());
        self.live.store(wire.streams.len(), Ordering::SeqCst);
    }

    async fn drop_streams(&self) {
        let mut wire = self.wire.lock().await;
        for slot in wire.streams.drain(..) {
            let _ = slot.tx.try_send(ABORT);
        }
        self.live.store(0, Ordering::SeqCst);
    }

    /// Stalls every stream connected now (`true`; later connections are
    /// not stalled), or releases what they held (`false`).
    async fn set_stalled(&self, on: bool) {
        let mut wire = self.wire.lock().await;
        let mut dead = Vec::new();
        for slot in &mut wire.streams {
            if on {
                slot.held.get_or_insert_with(Vec::new);
                continue;
            }
            for b in slot.held.take().unwrap_or_default() {
                let ok = matches!(
                    tokio::time::timeout(SEND_TIMEOUT, slot.tx.send(b)).await,
                    Ok(Ok(()))
                );
                if !ok {
                    dead.push(slot.id);
                    break;
                }
            }
        }
        wire.streams
            .retain(|s| !dead.contains(&s.id) && !s.tx.is_closed());
        self.live.store(wire.streams.len(), Ordering::SeqCst);
    }

    /// Streams connected now (closed ones pruned).
    async fn live_count(&self) -> usize {
        let mut wire = self.wire.lock().await;
        wire.streams.retain(|s| !s.tx.is_closed());
        self.live.store(wire.streams.len(), Ordering::SeqCst);
        wire.streams.len()
    }

    async fn open_stream(&self) -> Response {
        let (tx, rx) = mpsc::channel(16 * 1024);
        let mut wire = self.wire.lock().await;
        let connected = json!({"id": next_id("evt"), "type": "server.connected", "properties": {}});
        let _ = tx.try_send(Bytes::from(format!("data: {connected}\n\n")));
        wire.next_id += 1;
        let id = wire.next_id;
        wire.streams.push(Slot { id, tx, held: None });
        self.live.store(wire.streams.len(), Ordering::SeqCst);
        self.opened.fetch_add(1, Ordering::SeqCst);
        Response::Stream {
            status: 200,
            headers: vec![
                ("content-type".into(), "text/event-stream".into()),
                ("cache-control".into(), "no-cache".into()),
            ],
            body: rx,
        }
    }
}

/// Applies one event to the message lists, as OpenCode's store would.
fn apply_event(st: &mut State, event: &Value) {
    let props = &event["properties"];
    match event["type"].as_str().unwrap_or("") {
        "message.updated" => {
            let info = &props["info"];
            let (Some(sid), Some(mid)) = (info["sessionID"].as_str(), info["id"].as_str()) else {
                return;
            };
            let Some(s) = st.session_mut(sid) else { return };
            match s.messages.iter_mut().find(|m| m["info"]["id"] == mid) {
                Some(m) => m["info"] = info.clone(),
                None => {
                    s.messages.push(json!({"info": info, "parts": []}));
                    s.messages.sort_by(|a, b| {
                        a["info"]["id"]
                            .as_str()
                            .unwrap_or("")
                            .cmp(b["info"]["id"].as_str().unwrap_or(""))
                    });
                }
            }
        }
        "message.part.updated" => {
            let part = &props["part"];
            let (Some(sid), Some(mid), Some(pid)) = (
                part["sessionID"].as_str(),
                part["messageID"].as_str(),
                part["id"].as_str(),
            ) else {
                return;
            };
            let Some(s) = st.session_mut(sid) else { return };
            let Some(m) = s.messages.iter_mut().find(|m| m["info"]["id"] == mid) else {
                return;
            };
            let Some(parts) = m["parts"].as_array_mut() else {
                return;
            };
            match parts.iter_mut().find(|p| p["id"] == pid) {
                Some(p) => *p = part.clone(),
                None => parts.push(part.clone()),
            }
        }
        "message.part.delta" => {
            let (Some(sid), Some(mid), Some(pid), Some(delta)) = (
                props["sessionID"].as_str(),
                props["messageID"].as_str(),
                props["partID"].as_str(),
                props["delta"].as_str(),
            ) else {
                return;
            };
            let field = props["field"].as_str().unwrap_or("text");
            let Some(s) = st.session_mut(sid) else { return };
            let Some(m) = s.messages.iter_mut().find(|m| m["info"]["id"] == mid) else {
                return;
            };
            let Some(p) = m["parts"]
                .as_array_mut()
                .and_then(|ps| ps.iter_mut().find(|p| p["id"] == pid))
            else {
                return;
            };
            let mut text = p[field].as_str().unwrap_or("").to_string();
            text.push_str(delta);
            p[field] = json!(text);
        }
        "session.status" => {
            let busy = props["status"]["type"] != "idle";
            if let Some(s) = props["sessionID"]
                .as_str()
                .and_then(|id| st.session_mut(id))
            {
                s.busy = busy;
            }
        }
        "session.idle" => {
            if let Some(s) = props["sessionID"]
                .as_str()
                .and_then(|id| st.session_mut(id))
            {
                s.busy = false;
            }
        }
        "permission.asked" => {
            if let Some(id) = props["id"].as_str() {
                st.permissions.insert(id.to_string());
            }
        }
        "question.asked" => {
            if let Some(id) = props["id"].as_str() {
                st.questions.insert(id.to_string());
            }
        }
        _ => {}
    }
}

fn new_session(title: &str, parent_id: Option<String>) -> FakeSession {
    FakeSession {
        id: descending_id("ses"),
        title: title.to_string(),
        parent_id,
        created: now_ms(),
        messages: Vec::new(),
        busy: false,
    }
}

fn not_found(what: &str) -> Response {
    Response::json(
        404,
        &json!({"name": "NotFoundError", "data": {"message": format!("{what} not found")}}),
    )
}

fn authorized(opts: &FakeOptions, req: &Request) -> bool {
    let Some(pw) = &opts.password else {
        return true;
    };
    let want = base64::engine::general_purpose::STANDARD.encode(format!("{USERNAME}:{pw}"));
    let header_ok = req
        .header("authorization")
        .and_then(|h| h.strip_prefix("Basic "))
        .is_some_and(|v| v.trim() == want);
    header_ok || req.query_param("auth_token").as_deref() == Some(want.as_str())
}

async fn route(shared: Arc<Shared>, req: Request) -> Response {
    let ok = authorized(&shared.opts, &req);
    lock(&shared.state).requests.push(Recorded {
        at: Instant::now(),
        method: req.method.clone(),
        path: req.path().to_string(),
        query: req.query().map(str::to_string),
        directory: req.query_param("directory"),
        body: req.body.clone(),
        authorized: ok,
        connection_id: req.connection_id,
    });
    if !ok {
        return Response::empty(401);
    }
    let path = req.path().to_string();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method.as_str(), segs.as_slice()) {
        ("GET", ["global", "health"]) => {
            Response::json(200, &json!({"healthy": true, "version": VERSION}))
        }
        ("GET", ["event"]) => shared.open_stream().await,
        ("GET", ["config", "providers"]) => {
            let providers: Vec<Value> = shared
                .opts
                .providers
                .iter()
                .map(|(id, models)| {
                    let models: serde_json::Map<String, Value> = models
                        .iter()
                        .map(|m| (m.clone(), json!({"id": m, "name": m, "providerID": id})))
                        .collect();
                    json!({"id": id, "name": id, "source": "config", "models": models})
                })
                .collect();
            let default: serde_json::Map<String, Value> = shared
                .opts
                .providers
                .iter()
                .filter_map(|(id, models)| Some((id.clone(), json!(models.first()?))))
                .collect();
            Response::json(200, &json!({"providers": providers, "default": default}))
        }
        ("POST", ["session"]) => {
            let body: Value = req.json().unwrap_or(Value::Null);
            let title = body["title"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("New session - {}", now_ms()));
            let parent = body["parentID"].as_str().map(str::to_string);
            let s = new_session(&title, parent);
            let v = s.to_json();
            lock(&shared.state).sessions.push(s);
            Response::json(200, &v)
        }
        ("GET", ["session"]) => {
            let st = lock(&shared.state);
            let list: Vec<Value> = st.sessions.iter().map(FakeSession::to_json).collect();
            Response::json(200, &Value::Array(list))
        }
        ("GET", ["session", "status"]) => {
            let st = lock(&shared.state);
            let map: serde_json::Map<String, Value> = st
                .sessions
                .iter()
                .filter(|s| s.busy)
                .map(|s| (s.id.clone(), json!({"type": "busy"})))
                .collect();
            Response::json(200, &Value::Object(map))
        }
        ("GET", ["session", id]) => match lock(&shared.state).session(id) {
            Some(s) => Response::json(200, &s.to_json()),
            None => not_found(&format!("Session not found: {id}")),
        },
        ("GET", ["session", id, "message"]) => match lock(&shared.state).session(id) {
            Some(s) => Response::json(200, &Value::Array(s.messages.clone())),
            None => not_found(&format!("Session not found: {id}")),
        },
        ("POST", ["session", id, "prompt_async"]) => {
            let id = id.to_string();
            prompt_async(shared, id, req).await
        }
        ("DELETE", ["session", id]) => {
            let mut st = lock(&shared.state);
            let before = st.sessions.len();
            st.sessions.retain(|s| s.id != *id);
            if st.sessions.len() != before {
                Response::json(200, &json!(true))
            } else {
                not_found(&format!("Session not found: {id}"))
            }
        }
        // Every agent asks for every permission, as the bridge wants.
        ("GET", ["agent"]) => Response::json(
            200,
            &json!([{"name": "build", "mode": "primary", "hidden": false,
                     "permission": [{"permission": "*", "pattern": "*", "action": "ask"}]}]),
        ),
        ("POST", ["session", id, "abort"]) => {
            let id = id.to_string();
            abort(shared, id).await;
            Response::json(200, &json!(true))
        }
        ("POST", ["permission", id, "reply"]) | ("POST", ["session", _, "permissions", id]) => {
            if lock(&shared.state).permissions.remove(*id) {
                Response::json(200, &json!(true))
            } else {
                Response::json(
                    404,
                    &json!({"_tag": "PermissionNotFoundError", "message": format!("no permission {id}")}),
                )
            }
        }
        ("POST", ["question", id, "reject" | "reply"]) => {
            if lock(&shared.state).questions.remove(*id) {
                Response::json(200, &json!(true))
            } else {
                Response::json(
                    404,
                    &json!({"_tag": "QuestionNotFoundError", "message": format!("no question {id}")}),
                )
            }
        }
        _ => not_found(&format!("route {} {}", req.method, path)),
    }
}

async fn prompt_async(shared: Arc<Shared>, sid: String, req: Request) -> Response {
    let nth_in_session = {
        let st = lock(&shared.state);
        if st.session(&sid).is_none() {
            return not_found(&format!("Session not found: {sid}"));
        }
        st.turns
            .iter()
            .filter(|t| t.input.session_id == sid)
            .count()
    };
    let body: Value = req.json().unwrap_or(Value::Null);
    let Some(parts) = body["parts"].as_array() else {
        return Response::json(
            400,
            &json!({"name": "BadRequest", "data": {"message": "parts is required"}}),
        );
    };
    let text: String = parts
        .iter()
        .filter(|p| p["type"] == "text")
        .filter_map(|p| p["text"].as_str())
        .collect();
    // OpenCode takes the client's `messageID` for the user message.
    let user_id = match body["messageID"].as_str() {
        Some(id) if id.starts_with("msg") => {
            observe_id(id);
            id.to_string()
        }
        _ => next_id("msg"),
    };
    let asst_id = next_id("msg");
    let input = TurnInput {
        session_id: sid.clone(),
        text,
        body: body.clone(),
        user_id,
        asst_id,
        nth: shared.prompts.fetch_add(1, Ordering::SeqCst),
        nth_in_session,
        directory: req.query_param("directory"),
    };
    let script = (shared.script())(&input);
    let cancel = CancellationToken::new();
    let idx = {
        let mut st = lock(&shared.state);
        st.turns.push(TurnRecord {
            input: input.clone(),
            received_at: Instant::now(),
            responded_at: None,
            finished_at: None,
            emitted: Vec::new(),
        });
        let idx = st.turns.len() - 1;
        st.running
            .entry(sid.clone())
            .or_default()
            .push((idx, cancel.clone()));
        idx
    };
    let (tx, rx) = oneshot::channel();
    tokio::spawn(run_script(shared.clone(), idx, input, script, tx, cancel));
    let answer = tokio::time::timeout(RESPOND_TIMEOUT, rx).await;
    if let Some(t) = lock(&shared.state).turns.get_mut(idx) {
        t.responded_at = Some(Instant::now());
    }
    match answer {
        Ok(Ok((status, Some(body)))) => Response::json(status, &body),
        Ok(Ok((status, None))) => Response::empty(status),
        _ => Response::empty(204),
    }
}

type Answer = oneshot::Sender<(u16, Option<Value>)>;

async fn run_script(
    shared: Arc<Shared>,
    idx: usize,
    input: TurnInput,
    script: TurnScript,
    respond: Answer,
    cancel: CancellationToken,
) {
    let mut respond = Some(respond);
    let explicit = script
        .steps
        .iter()
        .any(|s| matches!(s, Step::Respond | Step::RespondWith(..)));
    if !explicit {
        if let Some(r) = respond.take() {
            let _ = r.send((204, None));
        }
    }
    let since = lock(&shared.state).turns[idx].received_at;
    for step in script.steps {
        if cancel.is_cancelled() {
            break;
        }
        match step {
            Step::Emit(v) => {
                shared
                    .emit(substitute(v, &input), true, true, Some(idx))
                    .await
            }
            Step::EmitOnly(v) => {
                shared
                    .emit(substitute(v, &input), false, true, Some(idx))
                    .await
            }
            Step::StoreOnly(v) => {
                shared
                    .emit(substitute(v, &input), true, false, Some(idx))
                    .await
            }
            Step::Raw(b) => shared.broadcast(b).await,
            Step::Sleep(d) => {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(d) => {}
                }
            }
            Step::Respond => {
                if let Some(r) = respond.take() {
                    let _ = r.send((204, None));
                }
            }
            Step::RespondWith(status, body) => {
                if let Some(r) = respond.take() {
                    let _ = r.send((status, Some(body)));
                }
            }
            Step::DropStreams => shared.drop_streams().await,
            Step::WaitForStream(timeout) => {
                let deadline = Instant::now() + timeout;
                while shared.live_count().await == 0 && Instant::now() < deadline {
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                    }
                }
            }
            Step::WaitForRequest {
                method,
                path,
                timeout,
            } => {
                let deadline = Instant::now() + timeout;
                loop {
                    let seen = lock(&shared.state)
                        .requests
                        .iter()
                        .any(|r| r.at >= since && r.method == method && r.path.starts_with(&path));
                    if seen || Instant::now() >= deadline {
                        break;
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                    }
                }
            }
            Step::SetMessages(list) => {
                let _wire = shared.wire.lock().await;
                if let Some(s) = lock(&shared.state).session_mut(&input.session_id) {
                    s.messages = list.into_iter().map(|m| substitute(m, &input)).collect();
                }
            }
            Step::Heartbeats { every, total } => {
                let end = Instant::now() + total;
                while Instant::now() < end {
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(every) => {}
                    }
                    shared
                        .emit(
                            json!({"type": "server.heartbeat", "properties": {}}),
                            false,
                            true,
                            None,
                        )
                        .await;
                }
            }
            Step::Stall(on) => shared.set_stalled(on).await,
        }
    }
    if let Some(r) = respond.take() {
        let _ = r.send((204, None));
    }
    let mut st = lock(&shared.state);
    if let Some(t) = st.turns.get_mut(idx) {
        t.finished_at = Some(Instant::now());
    }
    if let Some(tokens) = st.running.get_mut(&input.session_id) {
        tokens.retain(|(i, _)| *i != idx);
    }
}

/// `POST /session/{id}/abort`: stops the session's scripts; if the session
/// was busy, emits what OpenCode 1.18.34 emits on abort.
async fn abort(shared: Arc<Shared>, sid: String) {
    let (tokens, busy, open) = {
        let mut st = lock(&shared.state);
        let tokens = st.running.remove(&sid).unwrap_or_default();
        let (busy, open) = match st.session(&sid) {
            Some(s) => (
                s.busy,
                s.messages
                    .iter()
                    .filter(|m| {
                        m["info"]["role"] == "assistant"
                            && m["info"]["time"]["completed"].is_null()
                            && m["info"]["error"].is_null()
                    })
                    .map(|m| m["info"].clone())
                    .collect::<Vec<_>>(),
            ),
            None => (false, Vec::new()),
        };
        (tokens, busy, open)
    };
    for (_, t) in &tokens {
        t.cancel();
    }
    if !shared.opts.abort_events || !busy {
        return;
    }
    // OpenCode answers `true` at once; the events follow.
    tokio::spawn(async move {
        tokio::time::sleep(shared.opts.abort_delay).await;
        abort_events(&shared, &sid, open).await;
    });
}

async fn abort_events(shared: &Shared, sid: &str, open: Vec<Value>) {
    let aborted = json!({"name": "MessageAbortedError", "data": {"message": "Aborted"}});
    shared
        .emit(
            json!({"type": "session.error", "properties": {"sessionID": sid, "error": aborted}}),
            true,
            true,
            None,
        )
        .await;
    for e in ev::idle(sid) {
        shared.emit(e, true, true, None).await;
    }
    for mut info in open {
        info["time"]["completed"] = json!(now_ms());
        info["error"] = aborted.clone();
        shared
            .emit(
                json!({"type": "message.updated", "properties": {"sessionID": sid, "info": info}}),
                true,
                true,
                None,
            )
            .await;
    }
    for e in ev::idle(sid) {
        shared.emit(e, true, true, None).await;
    }
}

/// Replaces `{sid}`, `{user}` and `{asst}` in every string of `v`.
pub fn substitute(v: Value, input: &TurnInput) -> Value {
    match v {
        Value::String(s) if s.contains('{') => Value::String(
            s.replace("{sid}", &input.session_id)
                .replace("{user}", &input.user_id)
                .replace("{asst}", &input.asst_id),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(|x| substitute(x, input)).collect()),
        Value::Object(o) => Value::Object(
            o.into_iter()
                .map(|(k, x)| (k, substitute(x, input)))
                .collect(),
        ),
        other => other,
    }
}

/// Unix time in ms.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// The last id value handed out or seen (client-chosen `messageID`s
/// included), so the fake's ids always sort after them.
static LAST_ID: AtomicU64 = AtomicU64::new(0);

/// An ascending OpenCode id: `prefix_` + 12 hex digits of
/// `unix_ms * 0x1000 + counter` + 14 base62 characters, strictly above every
/// id made or [`observe_id`]d before.
pub fn next_id(prefix: &str) -> String {
    let candidate = now_ms().wrapping_mul(0x1000) & 0xffff_ffff_ffff;
    let mut last = LAST_ID.load(Ordering::SeqCst);
    let value = loop {
        let v = candidate.max(last + 1) & 0xffff_ffff_ffff;
        match LAST_ID.compare_exchange(last, v, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => break v,
            Err(l) => last = l,
        }
    };
    format!("{prefix}_{value:012x}{}", base62_tail())
}

/// Raises the id floor to `id` (an id chosen by a client), so later
/// [`next_id`]s sort after it.
pub fn observe_id(id: &str) {
    let hex = id.split_once('_').map(|(_, rest)| rest).unwrap_or("");
    if let Some(v) = hex.get(..12).and_then(|h| u64::from_str_radix(h, 16).ok()) {
        LAST_ID.fetch_max(v, Ordering::SeqCst);
    }
}

fn base62_tail() -> String {
    const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    (0..14)
        .map(|_| BASE62[rand::random_range(0..BASE62.len())] as char)
        .collect()
}

/// A descending id, as OpenCode makes session ids (newer sort first).
pub fn descending_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst) & 0xfff;
    let value = (now_ms().wrapping_mul(0x1000).wrapping_add(n)) & 0xffff_ffff_ffff;
    format!(
        "{prefix}_{:012x}{}",
        !value & 0xffff_ffff_ffff,
        base62_tail()
    )
}

/// An `APIError` as OpenCode reports a provider's HTTP error.
pub fn api_error(status: u16, message: &str, retryable: bool) -> Value {
    let body = json!({"error": {"message": message, "type": "fake_error"}}).to_string();
    json!({"name": "APIError", "data": {
        "message": message, "statusCode": status, "isRetryable": retryable,
        "responseHeaders": {"content-type": "application/json"},
        "responseBody": body,
        "metadata": {"url": "http://127.0.0.1:1/v1/chat/completions"}
    }})
}

/// Single OpenCode events, shaped as OpenCode 1.18.34 sends them (the
/// envelope `id` is added when emitted).
pub mod ev {
    use super::*;

    fn envelope(kind: &str, props: Value) -> Value {
        json!({"type": kind, "properties": props})
    }

    pub fn tokens() -> Value {
        json!({"total": TOKENS_INPUT + TOKENS_OUTPUT + TOKENS_REASONING + TOKENS_CACHE_READ,
               "input": TOKENS_INPUT, "output": TOKENS_OUTPUT, "reasoning": TOKENS_REASONING,
               "cache": {"write": 0, "read": TOKENS_CACHE_READ}})
    }

    pub fn zero_tokens() -> Value {
        json!({"input": 0, "output": 0, "reasoning": 0, "cache": {"read": 0, "write": 0}})
    }

    pub fn heartbeat() -> Value {
        envelope("server.heartbeat", json!({}))
    }

    pub fn user_message(sid: &str, user: &str, created: u64, model: &(String, String)) -> Value {
        envelope(
            "message.updated",
            json!({"sessionID": sid, "info": {
                "id": user, "role": "user", "sessionID": sid, "time": {"created": created},
                "agent": "build", "model": {"providerID": model.0, "modelID": model.1}}}),
        )
    }

    /// The user message again, with its summary (OpenCode re-sends it
    /// mid-turn).
    pub fn user_summary(sid: &str, user: &str, created: u64, model: &(String, String)) -> Value {
        let mut v = user_message(sid, user, created, model);
        v["properties"]["info"]["summary"] = json!({"diffs": []});
        v
    }

    pub fn part(sid: &str, part: Value) -> Value {
        envelope(
            "message.part.updated",
            json!({"sessionID": sid, "part": part, "time": now_ms()}),
        )
    }

    pub fn user_text(sid: &str, user: &str, part_id: &str, text: &str) -> Value {
        part(
            sid,
            json!({"type": "text", "text": text, "messageID": user, "sessionID": sid, "id": part_id}),
        )
    }

    pub fn status(sid: &str, kind: &str) -> Value {
        envelope(
            "session.status",
            json!({"sessionID": sid, "status": {"type": kind}}),
        )
    }

    pub fn retry(sid: &str, attempt: u64, message: &str) -> Value {
        envelope(
            "session.status",
            json!({"sessionID": sid, "status": {"type": "retry", "attempt": attempt, "message": message, "next": now_ms() + 1000}}),
        )
    }

    pub fn session_idle(sid: &str) -> Value {
        envelope("session.idle", json!({"sessionID": sid}))
    }

    /// `session.status {idle}` then `session.idle`.
    pub fn idle(sid: &str) -> Vec<Value> {
        vec![status(sid, "idle"), session_idle(sid)]
    }

    pub fn session_error(sid: &str, error: Value) -> Value {
        envelope("session.error", json!({"sessionID": sid, "error": error}))
    }

    /// An assistant message's info: `completed` and `finish` when given.
    #[allow(clippy::too_many_arguments)]
    pub fn assistant_info(
        sid: &str,
        asst: &str,
        parent: &str,
        model: &(String, String),
        created: u64,
        completed: Option<u64>,
        finish: Option<&str>,
        cost: f64,
    ) -> Value {
        let mut info = json!({
            "id": asst, "parentID": parent, "role": "assistant", "mode": "build", "agent": "build",
            "path": {"cwd": "/tmp/fake-opencode", "root": "/"},
            "cost": if completed.is_some() { cost } else { 0.0 },
            "tokens": if completed.is_some() { tokens() } else { zero_tokens() },
            "modelID": model.1, "providerID": model.0,
            "time": {"created": created}, "sessionID": sid});
        if let Some(c) = completed {
            info["time"]["completed"] = json!(c);
        }
        if let Some(f) = finish {
            info["finish"] = json!(f);
        }
        info
    }

    pub fn message_updated(sid: &str, info: Value) -> Value {
        envelope("message.updated", json!({"sessionID": sid, "info": info}))
    }

    pub fn delta(sid: &str, asst: &str, part_id: &str, delta: &str) -> Value {
        envelope(
            "message.part.delta",
            json!({"sessionID": sid, "messageID": asst, "partID": part_id, "field": "text", "delta": delta}),
        )
    }

    pub fn step_start(sid: &str, asst: &str) -> Value {
        part(
            sid,
            json!({"id": next_id("prt"), "messageID": asst, "sessionID": sid, "type": "step-start"}),
        )
    }

    pub fn step_finish(sid: &str, asst: &str, reason: &str, cost: f64) -> Value {
        part(
            sid,
            json!({"id": next_id("prt"), "reason": reason, "messageID": asst, "sessionID": sid,
                   "type": "step-finish", "tokens": tokens(), "cost": cost}),
        )
    }

    /// A `text` or `reasoning` part; `end` set when it is finished.
    pub fn text_part(
        sid: &str,
        asst: &str,
        part_id: &str,
        kind: &str,
        text: &str,
        start: u64,
        end: Option<u64>,
    ) -> Value {
        let mut time = json!({"start": start});
        if let Some(e) = end {
            time["end"] = json!(e);
        }
        part(
            sid,
            json!({"id": part_id, "messageID": asst, "sessionID": sid, "type": kind, "text": text, "time": time}),
        )
    }

    /// A `tool` part in state `status` (`pending`, `running`, `completed`,
    /// `error`); `outcome` is the output (completed) or the error.
    #[allow(clippy::too_many_arguments)]
    pub fn tool_part(
        sid: &str,
        asst: &str,
        part_id: &str,
        call_id: &str,
        tool: &str,
        status: &str,
        input: &Value,
        outcome: Option<&str>,
        start: u64,
    ) -> Value {
        let state = match status {
            "pending" => json!({"status": "pending", "input": {}, "raw": ""}),
            "running" => json!({"status": "running", "input": input, "time": {"start": start}}),
            "completed" => {
                let out = outcome.unwrap_or("");
                json!({"status": "completed", "input": input, "output": out,
                       "metadata": {"output": out, "exit": 0, "truncated": false},
                       "title": tool, "time": {"start": start, "end": now_ms()}})
            }
            _ => {
                json!({"status": "error", "input": input, "error": outcome.unwrap_or("tool failed"),
                        "time": {"start": start, "end": now_ms()}})
            }
        };
        part(
            sid,
            json!({"type": "tool", "tool": tool, "callID": call_id, "state": state,
                   "id": part_id, "sessionID": sid, "messageID": asst}),
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub fn permission_asked(
        sid: &str,
        id: &str,
        permission: &str,
        patterns: &[&str],
        asst: &str,
        call_id: &str,
    ) -> Value {
        envelope(
            "permission.asked",
            json!({"id": id, "sessionID": sid, "permission": permission, "patterns": patterns,
                   "metadata": {"command": patterns.first().copied().unwrap_or("")},
                   "always": patterns, "tool": {"messageID": asst, "callID": call_id}}),
        )
    }

    pub fn permission_replied(sid: &str, id: &str, reply: &str) -> Value {
        envelope(
            "permission.replied",
            json!({"sessionID": sid, "requestID": id, "reply": reply}),
        )
    }

    /// Events that belong to no turn (OpenCode sends plenty).
    pub fn noise(sid: &str) -> Vec<Value> {
        vec![
            envelope("plugin.added", json!({"id": "core/config-reference"})),
            envelope("session.diff", json!({"sessionID": sid, "diff": []})),
            envelope(
                "session.updated",
                json!({"sessionID": sid, "info": {"id": sid, "title": "x", "version": VERSION}}),
            ),
        ]
    }
}

/// Writes one turn's realistic event sequence (see the module docs).
pub struct TurnBuilder {
    pub sid: String,
    pub user: String,
    pub text: String,
    pub model: (String, String),
    /// The cost of each finished step.
    pub cost: f64,
    /// Sleep after each delta.
    pub gap: Duration,
    user_created: u64,
    steps: Vec<Step>,
    created: HashMap<String, u64>,
    parts: HashMap<String, (String, u64)>,
}

impl TurnBuilder {
    pub fn new(input: &TurnInput) -> Self {
        TurnBuilder {
            sid: input.session_id.clone(),
            user: input.user_id.clone(),
            text: input.text.clone(),
            model: input.model(),
            cost: 0.0012,
            gap: Duration::ZERO,
            user_created: now_ms(),
            steps: Vec::new(),
            created: HashMap::new(),
            parts: HashMap::new(),
        }
    }

    pub fn gap_ms(&mut self, ms: u64) -> &mut Self {
        self.gap = Duration::from_millis(ms);
        self
    }

    pub fn push(&mut self, step: Step) -> &mut Self {
        self.steps.push(step);
        self
    }

    pub fn emit(&mut self, event: Value) -> &mut Self {
        self.push(Step::Emit(event))
    }

    pub fn sleep_ms(&mut self, ms: u64) -> &mut Self {
        self.push(Step::Sleep(Duration::from_millis(ms)))
    }

    /// The user message and its text part, noise, `session.status busy`.
    pub fn begin(&mut self) -> &mut Self {
        let (sid, user) = (self.sid.clone(), self.user.clone());
        self.emit(ev::user_message(
            &sid,
            &user,
            self.user_created,
            &self.model,
        ));
        self.emit(ev::user_text(
            &sid,
            &user,
            &next_id("prt"),
            &self.text.clone(),
        ));
        for n in ev::noise(&sid) {
            self.emit(n);
        }
        self.emit(ev::status(&sid, "busy"))
    }

    /// A new assistant message answering the user message (no parts yet).
    pub fn assistant_bare(&mut self) -> String {
        let asst = next_id("msg");
        let created = now_ms();
        self.created.insert(asst.clone(), created);
        let info = ev::assistant_info(
            &self.sid,
            &asst,
            &self.user,
            &self.model,
            created,
            None,
            None,
            self.cost,
        );
        self.emit(ev::message_updated(&self.sid.clone(), info));
        asst
    }

    /// A new assistant message, the user message re-sent, busy, step-start.
    pub fn assistant(&mut self) -> String {
        let asst = self.assistant_bare();
        let sid = self.sid.clone();
        self.emit(ev::user_summary(
            &sid,
            &self.user.clone(),
            self.user_created,
            &self.model,
        ));
        self.emit(ev::status(&sid, "busy"));
        self.emit(ev::step_start(&sid, &asst));
        asst
    }

    /// Opens an empty part of `kind` (`text` / `reasoning`); returns its id.
    pub fn part_start(&mut self, asst: &str, kind: &str) -> String {
        let id = next_id("prt");
        let start = now_ms();
        self.parts.insert(id.clone(), (kind.to_string(), start));
        self.emit(ev::text_part(
            &self.sid.clone(),
            asst,
            &id,
            kind,
            "",
            start,
            None,
        ));
        id
    }

    /// One delta of a part opened by [`part_start`](Self::part_start).
    pub fn delta(&mut self, asst: &str, part_id: &str, delta: &str) -> &mut Self {
        self.emit(ev::delta(&self.sid.clone(), asst, part_id, delta));
        if !self.gap.is_zero() {
            let g = self.gap;
            self.push(Step::Sleep(g));
        }
        self
    }

    /// Finishes a part with its full text (`time.end`).
    pub fn part_end(&mut self, asst: &str, part_id: &str, full: &str) -> &mut Self {
        let (kind, start) = self
            .parts
            .get(part_id)
            .cloned()
            .unwrap_or_else(|| ("text".into(), now_ms()));
        self.emit(ev::text_part(
            &self.sid.clone(),
            asst,
            part_id,
            &kind,
            full,
            start,
            Some(now_ms()),
        ))
    }

    /// A whole text part: empty, the deltas, the full text.
    pub fn text(&mut self, asst: &str, deltas: &[&str]) -> String {
        self.streamed_part(asst, "text", deltas)
    }

    /// A whole reasoning part (its deltas say `field: "text"` too).
    pub fn reasoning(&mut self, asst: &str, deltas: &[&str]) -> String {
        self.streamed_part(asst, "reasoning", deltas)
    }

    fn streamed_part(&mut self, asst: &str, kind: &str, deltas: &[&str]) -> String {
        let p = self.part_start(asst, kind);
        for d in deltas {
            self.delta(asst, &p, d);
        }
        self.part_end(asst, &p, &deltas.concat());
        p
    }

    /// A tool part going `pending` -> `running` (twice, as OpenCode does);
    /// returns the part id. Finish it with [`tool_end`](Self::tool_end).
    pub fn tool_start(&mut self, asst: &str, call_id: &str, tool: &str, args: &Value) -> String {
        let id = next_id("prt");
        let sid = self.sid.clone();
        let start = now_ms();
        self.parts.insert(id.clone(), ("tool".into(), start));
        for status in ["pending", "running", "running"] {
            self.emit(ev::tool_part(
                &sid, asst, &id, call_id, tool, status, args, None, start,
            ));
        }
        id
    }

    /// Completes (`Ok(output)`) or fails (`Err(error)`) a tool part.
    #[allow(clippy::too_many_arguments)]
    pub fn tool_end(
        &mut self,
        asst: &str,
        part_id: &str,
        call_id: &str,
        tool: &str,
        args: &Value,
        outcome: Result<&str, &str>,
    ) -> &mut Self {
        let start = self.parts.get(part_id).map(|p| p.1).unwrap_or_else(now_ms);
        let (status, text) = match outcome {
            Ok(o) => ("completed", o),
            Err(e) => ("error", e),
        };
        self.emit(ev::tool_part(
            &self.sid.clone(),
            asst,
            part_id,
            call_id,
            tool,
            status,
            args,
            Some(text),
            start,
        ))
    }

    /// A whole tool call.
    pub fn tool(
        &mut self,
        asst: &str,
        call_id: &str,
        tool: &str,
        args: &Value,
        outcome: Result<&str, &str>,
    ) -> String {
        let p = self.tool_start(asst, call_id, tool, args);
        self.tool_end(asst, &p, call_id, tool, args, outcome);
        p
    }

    /// `step-finish`, then the completed assistant message (twice, as
    /// OpenCode sends it) with `finish` (`stop`, `tool-calls`...).
    pub fn finish(&mut self, asst: &str, finish: &str) -> &mut Self {
        let sid = self.sid.clone();
        let reason = if finish == "tool-calls" {
            "tool-calls"
        } else {
            "stop"
        };
        self.emit(ev::step_finish(&sid, asst, reason, self.cost));
        let info = self.completed_info(asst, finish);
        self.emit(ev::message_updated(&sid, info.clone()));
        self.emit(ev::message_updated(&sid, info))
    }

    /// The completed info of an assistant message of this turn.
    pub fn completed_info(&self, asst: &str, finish: &str) -> Value {
        ev::assistant_info(
            &self.sid,
            asst,
            &self.user,
            &self.model,
            self.created.get(asst).copied().unwrap_or_else(now_ms),
            Some(now_ms()),
            Some(finish),
            self.cost,
        )
    }

    /// A provider error as OpenCode 1.18.34 reports it: `session.error`,
    /// idle, then the assistant message completed with `error`, idle again.
    pub fn fail(&mut self, asst: &str, error: Value) -> &mut Self {
        let sid = self.sid.clone();
        self.emit(ev::session_error(&sid, error.clone()));
        for e in ev::idle(&sid) {
            self.emit(e);
        }
        let mut info = ev::assistant_info(
            &sid,
            asst,
            &self.user,
            &self.model,
            self.created.get(asst).copied().unwrap_or_else(now_ms),
            Some(now_ms()),
            None,
            self.cost,
        );
        info["tokens"] = ev::zero_tokens();
        info["cost"] = json!(0);
        info["error"] = error;
        self.emit(ev::message_updated(&sid, info));
        for e in ev::idle(&sid) {
            self.emit(e);
        }
        self
    }

    /// `busy`, `session.status idle`, `session.idle` (the end of a turn).
    pub fn end(&mut self) -> &mut Self {
        let sid = self.sid.clone();
        self.emit(ev::status(&sid, "busy"));
        for e in ev::idle(&sid) {
            self.emit(e);
        }
        self
    }

    pub fn build(self) -> TurnScript {
        TurnScript { steps: self.steps }
    }
}

/// A plain text answer streamed as `deltas`.
pub fn text_turn(input: &TurnInput, deltas: &[&str]) -> TurnScript {
    let mut t = TurnBuilder::new(input);
    t.begin();
    let a = t.assistant();
    t.text(&a, deltas);
    t.finish(&a, "stop");
    t.end();
    t.build()
}

/// Reasoning, then a text answer.
pub fn reasoning_turn(input: &TurnInput, reasoning: &[&str], text: &[&str]) -> TurnScript {
    let mut t = TurnBuilder::new(input);
    t.begin();
    let a = t.assistant();
    t.reasoning(&a, reasoning);
    t.text(&a, text);
    t.finish(&a, "stop");
    t.end();
    t.build()
}

/// One assistant message calling `calls` (`(call id, tool, args, output)`),
/// finishing with `tool-calls`, then a second one answering with `text`.
pub fn tool_turn(
    input: &TurnInput,
    calls: &[(&str, &str, Value, &str)],
    text: &[&str],
) -> TurnScript {
    let mut t = TurnBuilder::new(input);
    t.begin();
    let a1 = t.assistant();
    for (call, tool, args, out) in calls {
        t.tool(&a1, call, tool, args, Ok(out));
    }
    t.finish(&a1, "tool-calls");
    let a2 = t.assistant();
    t.text(&a2, text);
    t.finish(&a2, "stop");
    t.end();
    t.build()
}

/// The provider fails (`error`, e.g. [`api_error`]) before any output.
pub fn error_turn(input: &TurnInput, error: Value) -> TurnScript {
    let mut t = TurnBuilder::new(input);
    t.begin();
    let a = t.assistant_bare();
    let sid = t.sid.clone();
    let user = t.user.clone();
    let model = t.model.clone();
    t.emit(ev::user_summary(&sid, &user, now_ms(), &model));
    t.emit(ev::status(&sid, "busy"));
    t.fail(&a, error);
    t.build()
}

/// Splits `text` into word-sized deltas (spaces kept).
pub fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in text.chars() {
        cur.push(c);
        if c == ' ' {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The answer of [`default_script`] to a plain prompt.
pub fn echo_reply(prompt: &str) -> String {
    format!("Fake OpenCode heard: {prompt}")
}

/// The script used unless a test sets one, chosen by a marker in the text:
///
/// | marker | turn |
/// |---|---|
/// | none | text [`echo_reply`]`(text)`, a word per delta |
/// | `[reasoning]` | reasoning `"Thinking it over."`, then text `"The answer is 42."` |
/// | `[tool]` | a `bash` call (`echo tool-ok`, output `tool-ok\n`), then text `"The tool said tool-ok"` |
/// | `[error401]` | `APIError` 401 (not retryable) |
/// | `[error503]` | `APIError` 503 (retryable) |
/// | `[slow]` | 20 deltas `"slow-N "` 100 ms apart |
/// | `[hang]` | the turn starts, then only heartbeats (200 ms) for 60 s |
pub fn default_script(input: &TurnInput) -> TurnScript {
    let text = input.text.as_str();
    if text.contains("[reasoning]") {
        reasoning_turn(
            input,
            &["Thinking ", "it ", "over."],
            &["The answer ", "is 42."],
        )
    } else if text.contains("[tool]") {
        tool_turn(
            input,
            &[(
                "call_fake_1",
                "bash",
                json!({"command": "echo tool-ok", "description": "echo"}),
                "tool-ok\n",
            )],
            &["The tool ", "said tool-ok"],
        )
    } else if text.contains("[error401]") {
        error_turn(input, api_error(401, "Incorrect API key provided", false))
    } else if text.contains("[error503]") {
        error_turn(input, api_error(503, "Service overloaded", true))
    } else if text.contains("[slow]") {
        let deltas: Vec<String> = (1..=20).map(|i| format!("slow-{i} ")).collect();
        let refs: Vec<&str> = deltas.iter().map(String::as_str).collect();
        let mut t = TurnBuilder::new(input);
        t.gap_ms(100);
        t.begin();
        let a = t.assistant();
        t.text(&a, &refs);
        t.finish(&a, "stop");
        t.end();
        t.build()
    } else if text.contains("[hang]") {
        hang_turn(input, Duration::from_millis(200), Duration::from_secs(60))
    } else {
        let w = words(&echo_reply(text));
        let refs: Vec<&str> = w.iter().map(String::as_str).collect();
        text_turn(input, &refs)
    }
}

/// The turn starts (user message, assistant message, a first delta), then
/// only `server.heartbeat` every `every` for `total`.
pub fn hang_turn(input: &TurnInput, every: Duration, total: Duration) -> TurnScript {
    let mut t = TurnBuilder::new(input);
    t.begin();
    let a = t.assistant();
    let p = t.part_start(&a, "text");
    t.delta(&a, &p, "Starting... ");
    t.push(Step::Heartbeats { every, total });
    t.build()
}
