//! [pure] OpenCode's bus events, typed.
//!
//! Each SSE `data:` line of `GET /event` is `{"id","type","properties"}`.
//! [`parse_event`] reads the envelope, then the properties of the types a
//! bridge needs; every other type is kept as [`Event::Other`] with only its
//! session id, so new OpenCode versions never break a turn. Shapes are from
//! OpenCode 1.18.34 (see tests/fixtures/opencode-1.18.34/).

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
    MessageUpdated(MessageInfo),
    PartUpdated(Part),
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
    PermissionAsked(PermissionAsked),
    QuestionAsked(QuestionAsked),
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
    pub kind: String,
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

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct PartTime {
    #[serde(default)]
    pub start: Option<f64>,
    #[serde(default)]
    pub end: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ToolState {
    pub status: String,
    #[serde(default)]
    pub input: Value,
    #[serde(default)]
    pub output: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
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
        "message.updated" => Event::MessageUpdated(
            serde_json::from_str::<MessageUpdatedProps>(props)
                .map_err(bad)?
                .info,
        ),
        "message.part.updated" => Event::PartUpdated(
            serde_json::from_str::<PartUpdatedProps>(props)
                .map_err(bad)?
                .part,
        ),
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
        "permission.asked" => Event::PermissionAsked(serde_json::from_str(props).map_err(bad)?),
        "question.asked" => Event::QuestionAsked(serde_json::from_str(props).map_err(bad)?),
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
