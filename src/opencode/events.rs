//! [pure] OpenCode's bus events, typed.
//!
//! Each SSE `data:` line of `GET /event` is `{"id","type","properties"}`.
//! [`parse_event`] reads the envelope, then the properties of the types a
//! bridge needs; every other type is kept as [`Event::Other`] with only its
//! session id, so new OpenCode versions never break a turn. Shapes are from
//! OpenCode 1.18.34 (see tests/fixtures/opencode-1.18.34/).

use crate::jsonscan::next_special;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

/// One event from OpenCode's bus.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// First event on every `/event` connection.
    ServerConnected,
    /// Every ~10 s; proves the stream is alive, means nothing to a turn.
    Heartbeat,
    // The large variants are boxed: an `Event` is 128 bytes instead of 352,
    // and every turn's event queue holds them in blocks of 32.
    MessageUpdated(Box<MessageInfo>),
    PartUpdated(Box<Part>),
    PartDelta(PartDelta),
    SessionStatus {
        session_id: String,
        status: SessionStatus,
    },
    SessionIdle {
        session_id: String,
    },
    SessionError {
        session_id: Option<String>,
        error: Option<MessageError>,
    },
    PermissionAsked(Box<PermissionAsked>),
    QuestionAsked(Box<QuestionAsked>),
    /// Any other type: kept for its session id only.
    Other {
        kind: String,
        session_id: Option<String>,
    },
}

impl Event {
    /// The session this event belongs to, if any.
    pub fn session_id(&self) -> Option<&str> {
        match self {
            Event::ServerConnected | Event::Heartbeat => None,
            Event::MessageUpdated(m) => Some(&m.session_id),
            Event::PartUpdated(p) => Some(&p.session_id),
            Event::PartDelta(d) => Some(&d.session_id),
            Event::SessionStatus { session_id, .. } | Event::SessionIdle { session_id } => {
                Some(session_id)
            }
            Event::SessionError { session_id, .. } => session_id.as_deref(),
            Event::PermissionAsked(p) => Some(&p.session_id),
            Event::QuestionAsked(q) => Some(&q.session_id),
            Event::Other { session_id, .. } => session_id.as_deref(),
        }
    }

    /// Whether the event says something about a turn's progress (deadlines
    /// ignore heartbeats and other `server.*` events).
    pub fn is_meaningful(&self) -> bool {
        !matches!(self, Event::ServerConnected | Event::Heartbeat)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageInfo {
    pub id: String,
    #[serde(rename = "sessionID")]
    pub session_id: String,
    pub role: Role,
    #[serde(default, rename = "parentID")]
    pub parent_id: Option<String>,
    #[serde(default)]
    pub time: MessageTime,
    #[serde(default, rename = "providerID")]
    pub provider_id: Option<String>,
    #[serde(default, rename = "modelID")]
    pub model_id: Option<String>,
    #[serde(default)]
    pub agent: Option<String>,
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub tokens: Option<Tokens>,
    #[serde(default)]
    pub cost: Option<f64>,
    #[serde(default)]
    pub finish: Option<String>,
    #[serde(default)]
    pub error: Option<MessageError>,
}

impl MessageInfo {
    /// An assistant message that will get no more parts: completed (and not
    /// merely paused for tool calls) or failed.
    pub fn is_done(&self) -> bool {
        if self.error.is_some() {
            return true;
        }
        self.time.completed.is_some()
            && !matches!(self.finish.as_deref(), Some("tool-calls") | Some("unknown"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
    #[serde(other)]
    Other,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct MessageTime {
    #[serde(default)]
    pub created: Option<f64>,
    #[serde(default)]
    pub completed: Option<f64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
pub struct Tokens {
    #[serde(default)]
    pub input: f64,
    #[serde(default)]
    pub output: f64,
    #[serde(default)]
    pub reasoning: f64,
    #[serde(default)]
    pub cache: CacheTokens,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
pub struct CacheTokens {
    #[serde(default)]
    pub read: f64,
    #[serde(default)]
    pub write: f64,
}

/// `{name, data: {message, statusCode?, isRetryable?}}` as OpenCode sends it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MessageError {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub data: Value,
}

impl MessageError {
    pub fn message(&self) -> String {
        match self.data.get("message").and_then(Value::as_str) {
            Some(m) if !m.is_empty() => m.to_string(),
            _ if !self.name.is_empty() => self.name.clone(),
            _ => "unknown error".to_string(),
        }
    }

    pub fn status_code(&self) -> Option<u64> {
        self.data.get("statusCode").and_then(Value::as_u64)
    }

    pub fn is_retryable(&self) -> Option<bool> {
        self.data.get("isRetryable").and_then(Value::as_bool)
    }
}

/// A part of a message: text, reasoning, a tool call, a step marker...
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Part {
    pub id: String,
    #[serde(rename = "sessionID")]
    pub session_id: String,
    #[serde(rename = "messageID")]
    pub message_id: String,
    #[serde(rename = "type")]
    pub kind: PartKind,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub synthetic: Option<bool>,
    #[serde(default)]
    pub time: Option<PartTime>,
    #[serde(default, rename = "callID")]
    pub call_id: Option<String>,
    #[serde(default)]
    pub tool: Option<String>,
    #[serde(default)]
    pub state: Option<ToolState>,
}

/// What a [`Part`] is (its `type`). OpenCode has more kinds (`step-start`,
/// `patch`, `file`, ...) and adds new ones: those are kept by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartKind {
    /// Answer text.
    Text,
    /// The model's reasoning.
    Reasoning,
    /// A tool call, with its [`ToolState`].
    Tool,
    /// Any other `type`, by name (nothing for a turn to relay).
    Other(String),
}

impl PartKind {
    fn from_name(name: &str) -> Self {
        match name {
            "text" => PartKind::Text,
            "reasoning" => PartKind::Reasoning,
            "tool" => PartKind::Tool,
            other => PartKind::Other(other.to_string()),
        }
    }

    /// The name OpenCode gives it.
    pub fn as_str(&self) -> &str {
        match self {
            PartKind::Text => "text",
            PartKind::Reasoning => "reasoning",
            PartKind::Tool => "tool",
            PartKind::Other(name) => name,
        }
    }
}

impl<'de> Deserialize<'de> for PartKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(ByName(PartKind::from_name))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct PartTime {
    #[serde(default)]
    pub start: Option<f64>,
    #[serde(default)]
    pub end: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ToolState {
    pub status: ToolStatus,
    #[serde(default)]
    pub input: Value,
    #[serde(default)]
    pub output: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    /// Tool-specific; the `task` tool puts its child session's id here
    /// (`sessionId`).
    #[serde(default)]
    pub metadata: Value,
}

/// Where a tool call is (`state.status`); a status OpenCode adds later is
/// kept by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolStatus {
    /// Announced; no arguments yet.
    Pending,
    /// Has its arguments and runs.
    Running,
    /// Ended with `output`.
    Completed,
    /// Ended with `error`.
    Error,
    /// Any other status, by name (the mapper waits for one it knows).
    Other(String),
}

impl ToolStatus {
    fn from_name(name: &str) -> Self {
        match name {
            "pending" => ToolStatus::Pending,
            "running" => ToolStatus::Running,
            "completed" => ToolStatus::Completed,
            "error" => ToolStatus::Error,
            other => ToolStatus::Other(other.to_string()),
        }
    }

    /// The name OpenCode gives it.
    pub fn as_str(&self) -> &str {
        match self {
            ToolStatus::Pending => "pending",
            ToolStatus::Running => "running",
            ToolStatus::Completed => "completed",
            ToolStatus::Error => "error",
            ToolStatus::Other(name) => name,
        }
    }
}

impl<'de> Deserialize<'de> for ToolStatus {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(ByName(ToolStatus::from_name))
    }
}

/// Reads a JSON string through `.0`: the names a bridge knows without an
/// allocation, any other kept. Anything but a string is the error reading
/// a `String` gives.
struct ByName<T>(fn(&str) -> T);

impl<T> serde::de::Visitor<'_> for ByName<T> {
    type Value = T;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
        Ok((self.0)(v))
    }
}

/// `message.part.delta`: text to append to one field of a part. Reasoning
/// deltas also say `field: "text"`; only the part's type tells them apart.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PartDelta {
    #[serde(rename = "sessionID")]
    pub session_id: String,
    #[serde(rename = "messageID")]
    pub message_id: String,
    #[serde(rename = "partID")]
    pub part_id: String,
    #[serde(default)]
    pub field: String,
    pub delta: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SessionStatus {
    Idle,
    Busy,
    Retry {
        #[serde(default)]
        attempt: Option<u64>,
        #[serde(default)]
        message: Option<String>,
    },
    #[serde(other)]
    Other,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ToolRef {
    #[serde(rename = "messageID")]
    pub message_id: String,
    #[serde(rename = "callID")]
    pub call_id: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PermissionAsked {
    pub id: String,
    #[serde(rename = "sessionID")]
    pub session_id: String,
    #[serde(default)]
    pub permission: String,
    #[serde(default)]
    pub patterns: Vec<String>,
    #[serde(default)]
    pub tool: Option<ToolRef>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct QuestionAsked {
    pub id: String,
    #[serde(rename = "sessionID")]
    pub session_id: String,
    #[serde(default)]
    pub questions: Value,
    #[serde(default)]
    pub tool: Option<ToolRef>,
}

/// A message with its parts, as `GET /session/{id}/message` lists them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MessageWithParts {
    pub info: MessageInfo,
    #[serde(default)]
    pub parts: Vec<Part>,
}

/// Why an SSE data line could not be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EventError {
    #[error("event is not a JSON envelope: {0}")]
    Envelope(String),
    #[error("`{kind}` event has unexpected properties: {error}")]
    Properties { kind: String, error: String },
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    properties: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct MessageUpdatedProps {
    info: MessageInfo,
}

#[derive(Deserialize)]
struct PartUpdatedProps {
    part: Part,
}

#[derive(Deserialize)]
struct SessionStatusProps {
    #[serde(rename = "sessionID")]
    session_id: String,
    status: SessionStatus,
}

#[derive(Deserialize)]
struct SessionIdProps {
    #[serde(rename = "sessionID")]
    session_id: String,
}

#[derive(Deserialize)]
struct SessionErrorProps {
    #[serde(default, rename = "sessionID")]
    session_id: Option<String>,
    #[serde(default)]
    error: Option<MessageError>,
}

/// For unknown types: the session id wherever OpenCode puts it.
#[derive(Deserialize, Default)]
struct AnySessionRef {
    #[serde(default, rename = "sessionID")]
    session_id: Option<String>,
    #[serde(default)]
    part: Option<Box<AnySessionRef>>,
    #[serde(default)]
    info: Option<Box<AnySessionRef>>,
}

/// Parses one SSE `data` payload.
pub fn parse_event(data: &str) -> Result<Event, EventError> {
    // Most of a stream is text deltas: read them by hand when they are
    // exactly as OpenCode writes them. Otherwise one pass over the JSON when
    // it has OpenCode's usual shape (`type` before `properties`, keys and
    // type without escapes). Anything else, and every error, goes through
    // the two-pass reading below, which decides the result: the fast paths
    // only ever agree with it (tested).
    if let Some(delta) = parse_delta(data) {
        return Ok(Event::PartDelta(delta));
    }
    if let Ok(OnePass(event)) = serde_json::from_str(data) {
        return Ok(event);
    }
    parse_two_pass(data)
}

/// `{"id":"..","type":"message.part.delta","properties":{"sessionID":"..",
/// "messageID":"..","partID":"..","field":"..","delta":".."}}` byte for byte
/// (no whitespace, no `\u` escapes); `None` for anything else.
fn parse_delta(data: &str) -> Option<PartDelta> {
    let mut s = Scan(data);
    s.lit("{\"id\":")?;
    s.raw()?;
    s.lit(",\"type\":\"message.part.delta\",\"properties\":{\"sessionID\":")?;
    let session_id = s.string()?;
    s.lit(",\"messageID\":")?;
    let message_id = s.string()?;
    s.lit(",\"partID\":")?;
    let part_id = s.string()?;
    s.lit(",\"field\":")?;
    let field = s.string()?;
    s.lit(",\"delta\":")?;
    let delta = s.string()?;
    s.lit("}}")?;
    s.0.is_empty().then_some(PartDelta {
        session_id,
        message_id,
        part_id,
        field,
        delta,
    })
}

/// What is left of the input of [`parse_delta`].
struct Scan<'a>(&'a str);

impl<'a> Scan<'a> {
    fn lit(&mut self, lit: &str) -> Option<()> {
        self.0 = self.0.strip_prefix(lit)?;
        Some(())
    }

    /// The inside of a JSON string, raw, and whether it has escapes; `None`
    /// for a control character or no closing quote.
    fn raw(&mut self) -> Option<(&'a str, bool)> {
        let rest = self.0.strip_prefix('"')?;
        let bytes = rest.as_bytes();
        let mut i = 0;
        let mut escaped = false;
        loop {
            let p = next_special(bytes, i)?;
            match bytes[p] {
                b'"' => {
                    i = p;
                    break;
                }
                b'\\' => {
                    escaped = true;
                    i = p + 2;
                }
                _ => return None,
            }
        }
        // `i` is at the closing quote: a char boundary.
        self.0 = &rest[i + 1..];
        Some((&rest[..i], escaped))
    }

    /// A JSON string decoded as serde_json decodes it; `None` for a `\u`
    /// escape (left to serde) or anything [`raw`](Self::raw) refuses.
    fn string(&mut self) -> Option<String> {
        let (mut rest, escaped) = self.raw()?;
        if !escaped {
            return Some(rest.to_string());
        }
        let mut out = String::with_capacity(rest.len());
        while let Some(p) = rest.find('\\') {
            out.push_str(&rest[..p]);
            out.push(match rest.as_bytes().get(p + 1)? {
                b'"' => '"',
                b'\\' => '\\',
                b'/' => '/',
                b'b' => '\u{8}',
                b'f' => '\u{c}',
                b'n' => '\n',
                b'r' => '\r',
                b't' => '\t',
                _ => return None,
            });
            // The escaped byte is ASCII: `p + 2` is a char boundary.
            rest = &rest[p + 2..];
        }
        out.push_str(rest);
        Some(out)
    }
}

/// The envelope read in one pass: `properties` is deserialised straight
/// into the type's struct instead of being captured and parsed again.
struct OnePass(Event);

impl<'de> Deserialize<'de> for OnePass {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(OnePassVisitor)
    }
}

struct OnePassVisitor;

impl<'de> serde::de::Visitor<'de> for OnePassVisitor {
    type Value = OnePass;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an OpenCode event with `type` before `properties`")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<OnePass, A::Error> {
        use serde::de::{Error, IgnoredAny};
        let mut kind: Option<&'de str> = None;
        let mut event = None;
        while let Some(key) = map.next_key::<&'de str>()? {
            match key {
                "type" if kind.is_none() => kind = Some(map.next_value()?),
                "properties" if event.is_none() => match kind {
                    Some(k) => event = Some(map.next_value_seed(Props(k))?),
                    None => return Err(A::Error::custom("properties before type")),
                },
                "type" | "properties" => return Err(A::Error::custom("duplicate field")),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        event
            .map(OnePass)
            .ok_or_else(|| A::Error::custom("no properties"))
    }
}

/// The properties of an event of type `.0`, as [`parse_two_pass`] reads them.
struct Props<'a>(&'a str);

impl<'de> serde::de::DeserializeSeed<'de> for Props<'_> {
    type Value = Event;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Event, D::Error> {
        Ok(match self.0 {
            "server.connected" => {
                serde::de::IgnoredAny::deserialize(d)?;
                Event::ServerConnected
            }
            "server.heartbeat" => {
                serde::de::IgnoredAny::deserialize(d)?;
                Event::Heartbeat
            }
            "message.updated" => {
                Event::MessageUpdated(Box::new(MessageUpdatedProps::deserialize(d)?.info))
            }
            "message.part.updated" => {
                Event::PartUpdated(Box::new(PartUpdatedProps::deserialize(d)?.part))
            }
            "message.part.delta" => Event::PartDelta(PartDelta::deserialize(d)?),
            "session.status" => {
                let p = SessionStatusProps::deserialize(d)?;
                Event::SessionStatus {
                    session_id: p.session_id,
                    status: p.status,
                }
            }
            "session.idle" => Event::SessionIdle {
                session_id: SessionIdProps::deserialize(d)?.session_id,
            },
            "session.error" => {
                let p = SessionErrorProps::deserialize(d)?;
                Event::SessionError {
                    session_id: p.session_id,
                    error: p.error,
                }
            }
            "permission.asked" => {
                Event::PermissionAsked(Box::new(PermissionAsked::deserialize(d)?))
            }
            "question.asked" => Event::QuestionAsked(Box::new(QuestionAsked::deserialize(d)?)),
            other => {
                let r = AnySessionRef::deserialize(d)?;
                Event::Other {
                    kind: other.to_string(),
                    session_id: r
                        .session_id
                        .or_else(|| r.part.and_then(|p| p.session_id))
                        .or_else(|| r.info.and_then(|i| i.session_id)),
                }
            }
        })
    }
}

/// The reference reading: the envelope with `properties` kept raw, then
/// the properties of the type.
fn parse_two_pass(data: &str) -> Result<Event, EventError> {
    let env: Envelope<'_> =
        serde_json::from_str(data).map_err(|e| EventError::Envelope(e.to_string()))?;
    let props = env.properties.map(RawValue::get).unwrap_or("{}");
    let kind = env.kind.as_ref();
    let bad = |e: serde_json::Error| EventError::Properties {
        kind: kind.to_string(),
        error: e.to_string(),
    };
    Ok(match kind {
        "server.connected" => Event::ServerConnected,
        "server.heartbeat" => Event::Heartbeat,
        "message.updated" => Event::MessageUpdated(Box::new(
            serde_json::from_str::<MessageUpdatedProps>(props)
                .map_err(bad)?
                .info,
        )),
        "message.part.updated" => Event::PartUpdated(Box::new(
            serde_json::from_str::<PartUpdatedProps>(props)
                .map_err(bad)?
                .part,
        )),
        "message.part.delta" => Event::PartDelta(serde_json::from_str(props).map_err(bad)?),
        "session.status" => {
            let p: SessionStatusProps = serde_json::from_str(props).map_err(bad)?;
            Event::SessionStatus {
                session_id: p.session_id,
                status: p.status,
            }
        }
        "session.idle" => Event::SessionIdle {
            session_id: serde_json::from_str::<SessionIdProps>(props)
                .map_err(bad)?
                .session_id,
        },
        "session.error" => {
            let p: SessionErrorProps = serde_json::from_str(props).map_err(bad)?;
            Event::SessionError {
                session_id: p.session_id,
                error: p.error,
            }
        }
        "permission.asked" => {
            Event::PermissionAsked(Box::new(serde_json::from_str(props).map_err(bad)?))
        }
        "question.asked" => {
            Event::QuestionAsked(Box::new(serde_json::from_str(props).map_err(bad)?))
        }
        other => {
            let r: AnySessionRef = serde_json::from_str(props).unwrap_or_default();
            let session_id = r
                .session_id
                .or_else(|| r.part.and_then(|p| p.session_id))
                .or_else(|| r.info.and_then(|i| i.session_id));
            Event::Other {
                kind: other.to_string(),
                session_id,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_core_types() {
        assert_eq!(
            parse_event(r#"{"id":"evt_1","type":"server.connected","properties":{}}"#),
            Ok(Event::ServerConnected)
        );
        assert_eq!(
            parse_event(r#"{"type":"server.heartbeat"}"#),
            Ok(Event::Heartbeat)
        );
        let d = parse_event(
            r#"{"type":"message.part.delta","properties":{"sessionID":"ses_a","messageID":"msg_b","partID":"prt_c","field":"text","delta":"Hel"}}"#,
        )
        .unwrap();
        assert_eq!(d.session_id(), Some("ses_a"));
        let Event::PartDelta(d) = d else { panic!() };
        assert_eq!(d.delta, "Hel");
        let s = parse_event(
            r#"{"type":"session.status","properties":{"sessionID":"ses_a","status":{"type":"retry","attempt":2,"message":"overloaded","next":1}}}"#,
        )
        .unwrap();
        assert_eq!(
            s,
            Event::SessionStatus {
                session_id: "ses_a".into(),
                status: SessionStatus::Retry {
                    attempt: Some(2),
                    message: Some("overloaded".into())
                }
            }
        );
    }

    #[test]
    fn unknown_types_keep_their_session() {
        assert_eq!(
            parse_event(r#"{"type":"session.diff","properties":{"sessionID":"ses_x","diff":[]}}"#),
            Ok(Event::Other {
                kind: "session.diff".into(),
                session_id: Some("ses_x".into())
            })
        );
        assert_eq!(
            parse_event(r#"{"type":"future.thing","properties":{"info":{"sessionID":"ses_y"}}}"#)
                .unwrap()
                .session_id(),
            Some("ses_y")
        );
        assert_eq!(
            parse_event(r#"{"type":"catalog.updated","properties":[1,2]}"#)
                .unwrap()
                .session_id(),
            None
        );
    }

    #[test]
    fn part_kinds_and_tool_statuses_are_typed_and_new_ones_still_parse() {
        let part = |kind: &str, status: &str| {
            let data = format!(
                r#"{{"type":"message.part.updated","properties":{{"part":{{"id":"prt_1","sessionID":"s","messageID":"m","type":"{kind}","callID":"c","tool":"bash","state":{{"status":"{status}"}}}}}}}}"#
            );
            match parse_event(&data) {
                Ok(Event::PartUpdated(p)) => p,
                other => panic!("{other:?}"),
            }
        };
        for (name, kind) in [
            ("text", PartKind::Text),
            ("reasoning", PartKind::Reasoning),
            ("tool", PartKind::Tool),
            ("step-start", PartKind::Other("step-start".into())),
            ("future-kind", PartKind::Other("future-kind".into())),
        ] {
            let p = part(name, "running");
            assert_eq!(p.kind.as_str(), name);
            assert_eq!(p.kind, kind);
        }
        for (name, status) in [
            ("pending", ToolStatus::Pending),
            ("running", ToolStatus::Running),
            ("completed", ToolStatus::Completed),
            ("error", ToolStatus::Error),
            ("queued", ToolStatus::Other("queued".into())),
        ] {
            let state = part("tool", name).state.unwrap();
            assert_eq!(state.status.as_str(), name);
            assert_eq!(state.status, status);
        }
        // Not a string: the same error as for a `String` field.
        let bad = r#"{"type":"message.part.updated","properties":{"part":{"id":"p","sessionID":"s","messageID":"m","type":5}}}"#;
        match parse_event(bad) {
            Err(EventError::Properties { error, .. }) => {
                assert!(error.contains("expected a string"), "{error}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_data_is_an_error_not_a_panic() {
        assert!(matches!(
            parse_event("not json"),
            Err(EventError::Envelope(_))
        ));
        assert!(matches!(parse_event("{}"), Err(EventError::Envelope(_))));
        assert!(matches!(
            parse_event(r#"{"type":"message.part.delta","properties":{"sessionID":"s"}}"#),
            Err(EventError::Properties { .. })
        ));
        assert!(matches!(
            parse_event(r#"{"type":"session.idle","properties":{"sessionID":5}}"#),
            Err(EventError::Properties { .. })
        ));
    }

    /// Every recorded event, and shapes the one pass leaves to the two-pass
    /// reading: both give the same result.
    #[test]
    fn one_pass_agrees_with_two_passes() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/opencode-1.18.34"
        );
        let (mut n, mut deltas) = (0, 0);
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("sse") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for data in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
                if let Some(d) = parse_delta(data) {
                    assert_eq!(Ok(Event::PartDelta(d)), parse_two_pass(data), "{data}");
                    deltas += 1;
                }
                let one = serde_json::from_str::<OnePass>(data).map(|o| o.0);
                assert_eq!(
                    one.as_ref().ok(),
                    parse_two_pass(data).as_ref().ok(),
                    "{data}"
                );
                assert!(one.is_ok(), "recorded events take the one pass: {data}");
                n += 1;
            }
        }
        assert!(n > 250, "{n} events");
        assert_eq!(
            deltas, 55,
            "every recorded delta takes the hand-written path"
        );
        let edge = [
            r#"{"properties":{"sessionID":"s","messageID":"m","partID":"p","delta":"x"},"type":"message.part.delta"}"#,
            r#"{"type":"message.part.delta","properties":null}"#,
            r#"{"type":"session.error","properties":null}"#,
            r#"{"type":"session.error"}"#,
            r#"{"type":"server.connected","properties":null}"#,
            r#"{"type":"server.connected"}"#,
            r#"{"type":"session.idle","type":"session.idle","properties":{"sessionID":"s"}}"#,
            r#"{"type":"session.idle","properties":{"sessionID":"s"},"properties":{}}"#,
            r#"{"type":"session\u002eidle","properties":{"sessionID":"s"}}"#,
            r#"{"typ\u0065":"session.idle","properties":{"sessionID":"s"}}"#,
            r#"["session.idle",{"sessionID":"s"}]"#,
            r#"{"type":"x.y","properties":[1,2]}"#,
            r#"{"type":"x.y","properties":{"sessionID":7}}"#,
            r#"{"type":"session.idle","properties":{"sessionID":"s"}} x"#,
            r#"{"type":5,"properties":{}}"#,
        ];
        for data in edge {
            if let Some(d) = parse_delta(data) {
                assert_eq!(Ok(Event::PartDelta(d)), parse_two_pass(data), "{data}");
            }
            let one = serde_json::from_str::<OnePass>(data).map(|o| o.0);
            if let Ok(e) = &one {
                assert_eq!(Ok(e), parse_two_pass(data).as_ref(), "{data}");
            }
            assert_eq!(parse_event(data), parse_two_pass(data), "{data}");
        }
    }

    proptest::proptest! {
        /// Mutated recorded events: `parse_event` is the two-pass reading.
        #[test]
        fn parse_event_is_the_two_pass_reading(
            pick in 0usize..6,
            at in 0usize..4000,
            cut in 0usize..40,
            insert in "[\\-\"{}\\[\\]:,a-z0-9 ]{0,6}",
        ) {
            let samples = [
                r#"{"id":"evt_1","type":"message.part.delta","properties":{"sessionID":"ses_a","messageID":"msg_b","partID":"prt_c","field":"text","delta":"Hel\nlo"}}"#,
                r#"{"id":"evt_2","type":"message.updated","properties":{"sessionID":"ses_a","info":{"id":"msg_b","parentID":"msg_u","role":"assistant","sessionID":"ses_a","time":{"created":1,"completed":2},"finish":"stop","tokens":{"input":1,"output":2,"reasoning":0,"cache":{"read":0,"write":0}},"cost":0.5}}}"#,
                r#"{"id":"evt_3","type":"message.part.updated","properties":{"sessionID":"ses_a","part":{"id":"prt_c","sessionID":"ses_a","messageID":"msg_b","type":"tool","callID":"c1","tool":"bash","state":{"status":"completed","input":{"command":"ls"},"output":"ok"}}}}"#,
                r#"{"id":"evt_4","type":"session.status","properties":{"sessionID":"ses_a","status":{"type":"retry","attempt":2,"message":"m"}}}"#,
                r#"{"id":"evt_5","type":"session.error","properties":{"sessionID":"ses_a","error":{"name":"APIError","data":{"message":"x","statusCode":401}}}}"#,
                r#"{"id":"evt_6","type":"session.diff","properties":{"part":{"sessionID":"ses_z"},"diff":[]}}"#,
            ];
            let s = samples[pick];
            let at = at % (s.len() + 1);
            let end = (at + cut).min(s.len());
            let mut mutated = String::new();
            mutated.push_str(&s[..at]);
            mutated.push_str(&insert);
            mutated.push_str(&s[end..]);
            proptest::prop_assert_eq!(parse_event(&mutated), parse_two_pass(&mutated));
            if let Some(d) = parse_delta(&mutated) {
                proptest::prop_assert_eq!(Ok(Event::PartDelta(d)), parse_two_pass(&mutated));
            }
            if let Ok(OnePass(e)) = serde_json::from_str::<OnePass>(&mutated) {
                proptest::prop_assert_eq!(Ok(e), parse_two_pass(&mutated));
            }
        }
    }

    #[test]
    fn done_means_completed_and_not_paused_for_tools() {
        let mut m: MessageInfo = serde_json::from_str(
            r#"{"id":"msg_1","sessionID":"s","role":"assistant","time":{"created":1,"completed":2},"finish":"tool-calls"}"#,
        )
        .unwrap();
        assert!(!m.is_done());
        m.finish = Some("stop".into());
        assert!(m.is_done());
        m.time.completed = None;
        assert!(!m.is_done());
        m.error = Some(MessageError {
            name: "MessageAbortedError".into(),
            data: Value::Null,
        });
        assert!(m.is_done());
    }
}
