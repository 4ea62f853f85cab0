//! [pure] OpenCode events -> the reply vocabulary, for one turn.
//!
//! A [`TurnMapper`] follows one turn of one session: it learns which user
//! message is this turn's, which assistant messages answer it (their
//! `parentID`), and what each part is (text, reasoning, tool). From that it
//! emits `delta`, `reasoning`, `tool_call` and `tool_result` bodies, and at
//! the end [`TurnMapper::conclude`] reads OpenCode's message list (the truth)
//! into the `final` body or an error.
//!
//! Rules that keep text exact:
//! - deltas are appended exactly as received; a delta is emitted only for a
//!   part already known to be this turn's text or reasoning;
//! - a snapshot (a part's full text) is only used to reconcile, and only once
//!   the part is finished: whatever lies beyond the bytes already emitted is
//!   emitted once. Nothing is ever deduplicated by comparing text.
//!
//! The mapper never awaits and never does I/O.

use std::collections::HashMap;

use serde_json::Value;

use crate::opencode::events::{
    Event, MessageError, MessageInfo, MessageWithParts, Part, PartKind, PermissionAsked,
    QuestionAsked, Role, SessionStatus, ToolStatus,
};
use crate::protocol::reply::{floor_char_boundary, FinalReply};
use crate::protocol::{ErrorCode, ReplyBody, Usage};

/// What an event means for the turn's control flow (the replies it produced
/// are pushed to the output vector separately).
#[derive(Debug, Clone, PartialEq)]
pub enum Signal {
    /// Not this turn's business (or noise).
    Nothing,
    /// The turn made progress (resets the idle deadline).
    Progress,
    /// The session went idle: time to check whether the turn is over.
    Idle,
    /// OpenCode reported an error for this session.
    Error(MessageError),
    /// OpenCode is retrying the provider call.
    Retry {
        attempt: Option<u64>,
        message: Option<String>,
    },
    Permission(PermissionAsked),
    Question(QuestionAsked),
}

#[derive(Debug)]
struct PartTrack {
    kind: PartKind,
    /// Bytes of this part's text already emitted.
    emitted: usize,
    /// Live deltas may have been lost for this part: it is only brought up
    /// to date from snapshots from now on.
    frozen: bool,
}

#[derive(Debug, Default)]
struct ToolTrack {
    call_emitted: bool,
    result_emitted: bool,
}

/// The end of a turn as read from OpenCode's message list.
#[derive(Debug, Clone, PartialEq)]
pub enum Conclusion {
    Final(FinalReply),
    Failed {
        code: ErrorCode,
        error: String,
        retryable: bool,
    },
}

/// One turn's mapping state.
#[derive(Debug)]
pub struct TurnMapper {
    session_id: String,
    /// This turn's user message: the bridge chose its id (`messageID` of
    /// `prompt_async`), so attribution never guesses.
    user_message_id: String,
    /// This turn's assistant messages, by id.
    assistant: HashMap<String, MessageInfo>,
    parts: HashMap<String, PartTrack>,
    tools: HashMap<String, ToolTrack>,
    error: Option<MessageError>,
    /// Tool results above this many bytes are cut (`truncated: true`).
    max_tool_result: usize,
    /// Subagent sessions started by this turn's `task` calls.
    children: Vec<(String, String)>,
}

impl TurnMapper {
    /// `user_message_id`: the id the bridge gave this turn's user message.
    pub fn new(session_id: impl Into<String>, user_message_id: impl Into<String>) -> Self {
        TurnMapper {
            session_id: session_id.into(),
            user_message_id: user_message_id.into(),
            assistant: HashMap::new(),
            parts: HashMap::new(),
            tools: HashMap::new(),
            error: None,
            max_tool_result: usize::MAX,
            children: Vec::new(),
        }
    }

    /// Cuts tool results above `bytes` (on a UTF-8 boundary).
    pub fn with_tool_result_limit(mut self, bytes: usize) -> Self {
        self.max_tool_result = bytes;
        self
    }

    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    /// This turn's user message id.
    pub fn user_message_id(&self) -> &str {
        &self.user_message_id
    }

    /// The error OpenCode reported for this session during the turn, if any.
    pub fn error(&self) -> Option<&MessageError> {
        self.error.as_ref()
    }

    fn is_ours(&self, message_id: &str) -> bool {
        self.assistant.contains_key(message_id)
    }

    /// [`on_event`](Self::on_event), taking the event by value: a delta's
    /// text and part id move into its reply instead of being copied (the
    /// hot path: most events of a long answer are deltas).
    pub fn on_event_owned(&mut self, event: Event, out: &mut Vec<ReplyBody>) -> Signal {
        match event {
            Event::PartDelta(d) if d.session_id == self.session_id => {
                self.on_delta(d.part_id, &d.field, d.delta, out)
            }
            other => self.on_event(&other, out),
        }
    }

    /// A text or reasoning delta of one of this turn's parts. Owned strings
    /// move into the reply; borrowed ones are copied only when a reply is
    /// made.
    fn on_delta<S: AsRef<str> + Into<String>>(
        &mut self,
        part_id: S,
        field: &str,
        delta: S,
        out: &mut Vec<ReplyBody>,
    ) -> Signal {
        if let Some(track) = self.parts.get_mut(part_id.as_ref()) {
            if field == "text" && !delta.as_ref().is_empty() && !track.frozen {
                match track.kind {
                    PartKind::Text => {
                        track.emitted += delta.as_ref().len();
                        out.push(ReplyBody::Delta {
                            content: delta.into(),
                            part_id: part_id.into(),
                        });
                    }
                    PartKind::Reasoning => {
                        track.emitted += delta.as_ref().len();
                        out.push(ReplyBody::Reasoning {
                            content: delta.into(),
                            part_id: part_id.into(),
                        });
                    }
                    PartKind::Tool | PartKind::Other(_) => {}
                }
            }
        }
        Signal::Progress
    }

    /// Feeds one event; pushes the replies it produces onto `out`.
    pub fn on_event(&mut self, event: &Event, out: &mut Vec<ReplyBody>) -> Signal {
        let Some(sid) = event.session_id() else {
            return Signal::Nothing;
        };
        if sid != self.session_id {
            let Some(parent_call) = self
                .children
                .iter()
                .find(|(c, _)| c == sid)
                .map(|(_, call)| call.clone())
            else {
                return Signal::Nothing;
            };
            return self.on_child_event(event, &parent_call, out);
        }
        match event {
            Event::MessageUpdated(info) => {
                self.on_message(info);
                Signal::Progress
            }
            Event::PartUpdated(part) => {
                self.on_part(part, out);
                Signal::Progress
            }
            Event::PartDelta(d) => self.on_delta(&d.part_id, &d.field, &d.delta, out),
            Event::SessionStatus { status, .. } => match status {
                SessionStatus::Idle => Signal::Idle,
                SessionStatus::Retry { attempt, message } => Signal::Retry {
                    attempt: *attempt,
                    message: message.clone(),
                },
                SessionStatus::Busy | SessionStatus::Other => Signal::Progress,
            },
            Event::SessionIdle { .. } => Signal::Idle,
            Event::SessionError { error, .. } => {
                let error = error.clone().unwrap_or(MessageError {
                    name: "UnknownError".into(),
                    data: Value::Null,
                });
                // An abort on the stream may be a late echo of the previous
                // turn's abort: an abort of this turn shows on its own
                // assistant message (or the driver asked for it).
                if error.name != "MessageAbortedError" {
                    self.error = Some(error.clone());
                }
                Signal::Error(error)
            }
            Event::PermissionAsked(p) => Signal::Permission(p.as_ref().clone()),
            Event::QuestionAsked(q) => Signal::Question(q.as_ref().clone()),
            Event::Other { .. } => Signal::Progress,
            Event::ServerConnected | Event::Heartbeat => Signal::Nothing,
        }
    }

    /// An event of a subagent session this turn started: its tool calls
    /// are relayed with `parent_call_id`, its permission requests and
    /// questions handled like the turn's own, and any of its activity keeps
    /// the turn alive.
    fn on_child_event(
        &mut self,
        event: &Event,
        parent_call: &str,
        out: &mut Vec<ReplyBody>,
    ) -> Signal {
        match event {
            Event::PartUpdated(p) if p.kind == PartKind::Tool => {
                tool_replies(
                    p,
                    &mut self.tools,
                    self.max_tool_result,
                    Some(parent_call),
                    out,
                );
                Signal::Progress
            }
            Event::PermissionAsked(p) => Signal::Permission(p.as_ref().clone()),
            Event::QuestionAsked(q) => Signal::Question(q.as_ref().clone()),
            _ => Signal::Progress,
        }
    }

    fn on_message(&mut self, info: &MessageInfo) {
        // Only assistant messages answering this turn's user message count;
        // user messages (ours reappears mid-turn) carry nothing to relay.
        if info.role == Role::Assistant
            && info.parent_id.as_deref() == Some(self.user_message_id.as_str())
        {
            self.assistant.insert(info.id.clone(), info.clone());
        }
    }

    fn on_part(&mut self, part: &Part, out: &mut Vec<ReplyBody>) {
        if !self.is_ours(&part.message_id) {
            return;
        }
        let track = self
            .parts
            .entry(part.id.clone())
            .or_insert_with(|| PartTrack {
                kind: part.kind.clone(),
                emitted: 0,
                frozen: false,
            });
        match part.kind {
            PartKind::Text | PartKind::Reasoning => {
                let finished = part.time.as_ref().is_some_and(|t| t.end.is_some());
                if finished {
                    if let Some(text) = &part.text {
                        emit_suffix(track, &part.id, text, out);
                    }
                }
            }
            PartKind::Tool => self.on_tool(part, out),
            PartKind::Other(_) => {}
        }
    }

    fn on_tool(&mut self, part: &Part, out: &mut Vec<ReplyBody>) {
        if let (Some("task"), Some(call_id), Some(state)) =
            (part.tool.as_deref(), &part.call_id, &part.state)
        {
            if let Some(child) = state.metadata.get("sessionId").and_then(Value::as_str) {
                if !self.children.iter().any(|(c, _)| c == child) {
                    self.children.push((child.to_string(), call_id.clone()));
                }
            }
        }
        tool_replies(part, &mut self.tools, self.max_tool_result, None, out);
    }

    /// The subagent (child) sessions this turn's `task` calls started, as
    /// seen so far: `(child session id, the parent's call id)`.
    pub fn child_sessions(&self) -> &[(String, String)] {
        &self.children
    }

    /// A child session's work, read from its message list once the turn is
    /// over: its tool calls and results (with `parent_call_id`) are pushed
    /// onto `out`, its usage and cost added to `fin`.
    pub fn child_activity(
        &mut self,
        parent_call_id: &str,
        child: &[MessageWithParts],
        fin: &mut FinalReply,
        out: &mut Vec<ReplyBody>,
    ) {
        let mut usage = UsageSum::from(fin.usage);
        for m in child {
            if m.info.role != Role::Assistant {
                continue;
            }
            if let Some(t) = &m.info.tokens {
                usage.add(t);
            }
            fin.cost += m.info.cost.unwrap_or(0.0);
            for p in &m.parts {
                if p.kind == PartKind::Tool {
                    tool_replies(
                        p,
                        &mut self.tools,
                        self.max_tool_result,
                        Some(parent_call_id),
                        out,
                    );
                }
            }
        }
        fin.usage = usage.into();
    }

    /// The slice of `messages` that is this turn: its user message and what
    /// follows (empty if the list does not hold it yet).
    fn turn_slice<'m>(&self, messages: &'m [MessageWithParts]) -> &'m [MessageWithParts] {
        match messages
            .iter()
            .position(|m| m.info.id == self.user_message_id)
        {
            Some(i) => &messages[i..],
            None => &[],
        }
    }

    /// Events were lost (a full channel, a reconnect): stop trusting live
    /// deltas for every part seen so far; they are brought up to date from
    /// snapshots instead.
    pub fn mark_gap(&mut self) {
        for t in self.parts.values_mut() {
            t.frozen = true;
        }
    }

    /// Brings the emitted stream up to date with OpenCode's message list
    /// (after a gap, or at the end of the turn): the text beyond what was
    /// emitted, and tool calls and results not yet emitted. A part still
    /// followed live is only touched once it is finished, or `at_end` (when
    /// no delta can follow any more). Returns whether the turn is over
    /// according to the list.
    pub fn reconcile(
        &mut self,
        messages: &[MessageWithParts],
        at_end: bool,
        out: &mut Vec<ReplyBody>,
    ) -> bool {
        let slice = self.turn_slice(messages);
        let user_id = self.user_message_id.clone();
        let mut last_done = None;
        for m in slice.iter().skip(1) {
            if m.info.role != Role::Assistant || m.info.parent_id.as_deref() != Some(&user_id) {
                continue;
            }
            self.assistant.insert(m.info.id.clone(), m.info.clone());
            for part in &m.parts {
                match part.kind {
                    PartKind::Text | PartKind::Reasoning => {
                        // A part first seen here had its live events lost.
                        let track =
                            self.parts
                                .entry(part.id.clone())
                                .or_insert_with(|| PartTrack {
                                    kind: part.kind.clone(),
                                    emitted: 0,
                                    frozen: true,
                                });
                        let finished = part.time.as_ref().is_some_and(|t| t.end.is_some());
                        if at_end || finished || track.frozen {
                            if let Some(text) = &part.text {
                                emit_suffix(track, &part.id, text, out);
                            }
                        }
                    }
                    PartKind::Tool => self.on_tool(part, out),
                    PartKind::Other(_) => {}
                }
            }
            last_done = Some(m.info.is_done());
        }
        last_done.unwrap_or(false)
    }

    /// Reads the end of the turn from OpenCode's message list. `None`: the
    /// list shows the turn still running (a late `session.idle` of an
    /// earlier turn, say). When it returns `Some`, call
    /// [`reconcile`](Self::reconcile) with `at_end` and publish what it
    /// emits before the final, so the deltas add up to the final text.
    pub fn conclude(&mut self, messages: &[MessageWithParts]) -> Option<Conclusion> {
        self.conclude_with(messages, false)
    }

    /// As [`conclude`](Self::conclude), for a turn whose loop OpenCode
    /// stopped after a rejected permission or question: its last answer is
    /// complete with `finish: "tool-calls"`, and that is the end.
    pub fn conclude_stopped(&mut self, messages: &[MessageWithParts]) -> Option<Conclusion> {
        self.conclude_with(messages, true)
    }

    fn conclude_with(
        &mut self,
        messages: &[MessageWithParts],
        stopped: bool,
    ) -> Option<Conclusion> {
        let slice = self.turn_slice(messages);
        let user_id = self.user_message_id.clone();
        let answers: Vec<&MessageWithParts> = slice
            .iter()
            .skip(1)
            .filter(|m| {
                m.info.role == Role::Assistant && m.info.parent_id.as_deref() == Some(&user_id)
            })
            .collect();
        let Some(last) = answers.last() else {
            // No answer at all: only an error reported on the stream ends it
            // (and only once OpenCode has the user message).
            return if slice.is_empty() {
                None
            } else {
                self.error.as_ref().map(classify)
            };
        };
        let complete = last.info.is_done() || (stopped && last.info.time.completed.is_some());
        if !complete {
            return None;
        }
        if let Some(e) = &last.info.error {
            return Some(classify(e));
        }
        let mut fin = FinalReply {
            model: match (&last.info.provider_id, &last.info.model_id) {
                (Some(p), Some(m)) => Some(format!("{p}/{m}")),
                _ => None,
            },
            agent: last.info.agent.clone().or_else(|| last.info.mode.clone()),
            finish: last.info.finish.clone(),
            ..FinalReply::default()
        };
        let mut usage = UsageSum::default();
        for m in &answers {
            for p in &m.parts {
                if p.kind == PartKind::Text {
                    if let Some(t) = &p.text {
                        fin.content.push_str(t);
                    }
                }
            }
            if let Some(t) = &m.info.tokens {
                usage.add(t);
            }
            fin.cost += m.info.cost.unwrap_or(0.0);
        }
        fin.usage = usage.into();
        Some(Conclusion::Final(fin))
    }
}

/// `tool_call` once a call has its arguments, `tool_result` once it ends;
/// each at most once per call id.
fn tool_replies(
    part: &Part,
    tools: &mut HashMap<String, ToolTrack>,
    max_tool_result: usize,
    parent_call_id: Option<&str>,
    out: &mut Vec<ReplyBody>,
) {
    let (Some(call_id), Some(state)) = (&part.call_id, &part.state) else {
        return;
    };
    let tool = part.tool.clone().unwrap_or_default();
    let track = tools.entry(call_id.clone()).or_default();
    let parent = parent_call_id.map(str::to_string);
    let emit_call = |track: &mut ToolTrack, out: &mut Vec<ReplyBody>| {
        if !track.call_emitted {
            track.call_emitted = true;
            let mut args = match &state.input {
                Value::Object(_) => state.input.clone(),
                Value::Null => Value::Object(Default::default()),
                other => serde_json::json!({ "input": other }),
            };
            let truncated = shrink_args(&mut args, max_tool_result);
            out.push(ReplyBody::ToolCall {
                call_id: call_id.clone(),
                tool: tool.clone(),
                args,
                parent_call_id: parent.clone(),
                truncated,
            });
        }
    };
    match state.status {
        // `pending` carries no arguments yet.
        ToolStatus::Pending => {}
        ToolStatus::Running => emit_call(track, out),
        ToolStatus::Completed | ToolStatus::Error => {
            emit_call(track, out);
            if !track.result_emitted {
                track.result_emitted = true;
                let success = state.status == ToolStatus::Completed;
                let mut result = if success {
                    state.output.clone().unwrap_or_default()
                } else {
                    state.error.clone().unwrap_or_else(|| "tool failed".into())
                };
                // A cut output's hint names the saved file: without the
                // host's path to it.
                if let std::borrow::Cow::Owned(s) =
                    crate::protocol::redact::strip_data_dirs(&result)
                {
                    result = s;
                }
                let truncated = result.len() > max_tool_result;
                result.truncate(floor_char_boundary(&result, max_tool_result));
                out.push(ReplyBody::ToolResult {
                    call_id: call_id.clone(),
                    tool: tool.clone(),
                    success,
                    result,
                    truncated,
                    parent_call_id: parent.clone(),
                });
            }
        }
        ToolStatus::Other(_) => {}
    }
}

/// Cuts the longest strings of a tool call's arguments (halving the longest,
/// on a char boundary, until the whole fits `max` bytes as JSON), so a call
/// too large to publish still goes out before its result. Whether anything
/// was cut.
fn shrink_args(args: &mut Value, max: usize) -> bool {
    fn longest(v: &mut Value) -> Option<&mut String> {
        match v {
            Value::String(s) => Some(s),
            Value::Array(a) => a.iter_mut().filter_map(longest).max_by_key(|s| s.len()),
            Value::Object(o) => o.values_mut().filter_map(longest).max_by_key(|s| s.len()),
            _ => None,
        }
    }
    let size = |v: &Value| serde_json::to_vec(v).map_or(0, |b| b.len());
    let mut cut = false;
    while size(args) > max {
        match longest(args) {
            Some(s) if !s.is_empty() => {
                let keep = floor_char_boundary(s, s.len() / 2);
                s.truncate(keep);
                cut = true;
            }
            // Nothing left to cut (many keys or numbers): say so plainly.
            _ => {
                *args = serde_json::json!({});
                return true;
            }
        }
    }
    cut
}

fn emit_suffix(track: &mut PartTrack, part_id: &str, text: &str, out: &mut Vec<ReplyBody>) {
    if text.len() <= track.emitted || !text.is_char_boundary(track.emitted) {
        return;
    }
    let content = text[track.emitted..].to_string();
    track.emitted = text.len();
    out.push(match track.kind {
        PartKind::Reasoning => ReplyBody::Reasoning {
            content,
            part_id: part_id.to_string(),
        },
        _ => ReplyBody::Delta {
            content,
            part_id: part_id.to_string(),
        },
    });
}

#[derive(Default)]
struct UsageSum {
    input: f64,
    output: f64,
    reasoning: f64,
    cache_read: f64,
    cache_write: f64,
}

impl UsageSum {
    fn add(&mut self, t: &crate::opencode::events::Tokens) {
        self.input += t.input;
        self.output += t.output;
        self.reasoning += t.reasoning;
        self.cache_read += t.cache.read;
        self.cache_write += t.cache.write;
    }
}

impl From<Usage> for UsageSum {
    fn from(u: Usage) -> UsageSum {
        UsageSum {
            input: u.input as f64,
            output: u.output as f64,
            reasoning: u.reasoning as f64,
            cache_read: u.cache_read as f64,
            cache_write: u.cache_write as f64,
        }
    }
}

impl From<UsageSum> for Usage {
    fn from(s: UsageSum) -> Usage {
        let n = |f: f64| {
            if f.is_finite() && f > 0.0 {
                f as u64
            } else {
                0
            }
        };
        Usage {
            input: n(s.input),
            output: n(s.output),
            reasoning: n(s.reasoning),
            cache_read: n(s.cache_read),
            cache_write: n(s.cache_write),
        }
    }
}

/// Classifies an OpenCode error into the wire's error codes.
pub fn classify(e: &MessageError) -> Conclusion {
    let message = e.message();
    let (code, retryable) = match e.name.as_str() {
        "MessageAbortedError" => (ErrorCode::Aborted, false),
        "ProviderAuthError" => (ErrorCode::ProviderError, false),
        "MessageOutputLengthError" | "ContextOverflowError" => (ErrorCode::ProviderError, false),
        "APIError" => {
            let auth = matches!(e.status_code(), Some(401) | Some(403));
            let retryable = !auth && e.is_retryable().unwrap_or(true);
            (ErrorCode::ProviderError, retryable)
        }
        "UnknownError" | "" => (ErrorCode::OpencodeError, true),
        _ => (ErrorCode::ProviderError, e.is_retryable().unwrap_or(true)),
    };
    let error = if e.name.is_empty() || message == e.name {
        message
    } else {
        format!("{}: {message}", e.name)
    };
    Conclusion::Failed {
        code,
        error,
        retryable,
    }
}

#[cfg(test)]
mod tests;
