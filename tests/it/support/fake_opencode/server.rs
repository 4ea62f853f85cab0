//! The fake's HTTP side: its state, its routes, the turn scripts run.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::support::http::{Request, Response, ABORT};

use super::*;

#[derive(Default)]
pub(super) struct State {
    pub(super) sessions: Vec<FakeSession>,
    pub(super) requests: Vec<Recorded>,
    pub(super) turns: Vec<TurnRecord>,
    /// The running scripts of each session: (turn index, token).
    pub(super) running: HashMap<String, Vec<(usize, CancellationToken)>>,
    pub(super) permissions: HashSet<String>,
    pub(super) questions: HashSet<String>,
}

impl State {
    pub(super) fn session_mut(&mut self, id: &str) -> Option<&mut FakeSession> {
        self.sessions.iter_mut().find(|s| s.id == id)
    }

    pub(super) fn session(&self, id: &str) -> Option<&FakeSession> {
        self.sessions.iter().find(|s| s.id == id)
    }
}

/// One connected `GET /event`.
pub(super) struct Slot {
    pub(super) id: u64,
    pub(super) tx: mpsc::Sender<Bytes>,
    /// `Some` while stalled: what it will get when released.
    pub(super) held: Option<Vec<Bytes>>,
}

#[derive(Default)]
pub(super) struct Wire {
    pub(super) streams: Vec<Slot>,
    pub(super) next_id: u64,
}

pub(super) struct Shared {
    pub(super) opts: FakeOptions,
    pub(super) state: Mutex<State>,
    /// Held while an event is applied and sent, so every stream sees the
    /// events in the order the message list got them.
    pub(super) wire: tokio::sync::Mutex<Wire>,
    pub(super) live: AtomicUsize,
    pub(super) opened: AtomicU64,
    pub(super) prompts: AtomicUsize,
    pub(super) script: Mutex<ScriptFn>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub(super) fn script(&self) -> ScriptFn {
        lock(&self.script).clone()
    }

    /// Applies (`apply`) and sends (`send`) one event, recording it on
    /// `turn`'s record.
    pub(super) async fn emit(
        &self,
        mut event: Value,
        apply: bool,
        send: bool,
        turn: Option<usize>,
    ) {
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

    pub(super) async fn broadcast(&self, bytes: Bytes) {
        let mut wire = self.wire.lock().await;
        self.send_locked(&mut wire, bytes).await;
    }

    pub(super) async fn send_locked(&self, wire: &mut Wire, bytes: Bytes) {
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

    pub(super) async fn drop_streams(&self) {
        let mut wire = self.wire.lock().await;
        for slot in wire.streams.drain(..) {
            let _ = slot.tx.try_send(ABORT);
        }
        self.live.store(0, Ordering::SeqCst);
    }

    /// Stalls every stream connected now (`true`; later connections are
    /// not stalled), or releases what they held (`false`).
    pub(super) async fn set_stalled(&self, on: bool) {
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
    pub(super) async fn live_count(&self) -> usize {
        let mut wire = self.wire.lock().await;
        wire.streams.retain(|s| !s.tx.is_closed());
        self.live.store(wire.streams.len(), Ordering::SeqCst);
        wire.streams.len()
    }

    pub(super) async fn open_stream(&self) -> Response {
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
pub(super) fn apply_event(st: &mut State, event: &Value) {
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

pub(super) fn new_session(title: &str, parent_id: Option<String>) -> FakeSession {
    FakeSession {
        id: descending_id("ses"),
        title: title.to_string(),
        parent_id,
        created: now_ms(),
        messages: Vec::new(),
        busy: false,
    }
}

pub(super) fn not_found(what: &str) -> Response {
    Response::json(
        404,
        &json!({"name": "NotFoundError", "data": {"message": format!("{what} not found")}}),
    )
}

pub(super) fn authorized(opts: &FakeOptions, req: &Request) -> bool {
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

pub(super) async fn route(shared: Arc<Shared>, req: Request) -> Response {
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
        ("PATCH", ["session", id]) => {
            let body: Value = req.json().unwrap_or(Value::Null);
            let mut st = lock(&shared.state);
            match (
                st.sessions.iter_mut().find(|s| s.id == *id),
                body["title"].as_str(),
            ) {
                (Some(s), Some(t)) => {
                    s.title = t.to_string();
                    Response::json(200, &s.to_json())
                }
                (Some(s), None) => Response::json(200, &s.to_json()),
                (None, _) => not_found(&format!("Session not found: {id}")),
            }
        }
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
                     "permission": [{"permission": "*", "pattern": "*", "action": "ask"}]},
                    {"name": "plan", "mode": "primary", "hidden": false,
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

pub(super) async fn prompt_async(shared: Arc<Shared>, sid: String, req: Request) -> Response {
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

pub(super) type Answer = oneshot::Sender<(u16, Option<Value>)>;

pub(super) async fn run_script(
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
pub(super) async fn abort(shared: Arc<Shared>, sid: String) {
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

pub(super) async fn abort_events(shared: &Shared, sid: &str, open: Vec<Value>) {
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
