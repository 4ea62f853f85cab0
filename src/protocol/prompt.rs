//! Prompts: a NATS message (subject, headers, payload) in, a validated
//! [`Prompt`] or a [`Rejection`] out.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

pub use super::attachment::{parse_attachments, Attachment};
use super::caller::Caller;
use super::subject::{validate_subject, validate_token, SubjectError};

/// What a prompt asks for, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    /// Echoed on every reply; generated (UUID v4) when the caller gave none.
    pub trace_id: String,
    pub text: String,
    /// The conversation key (`slack.C042`): turns with the same key share one
    /// OpenCode session. `None` with no `session_id`: a one-off session.
    pub conversation: Option<String>,
    /// Drive this existing OpenCode session instead of the conversation map.
    pub session_id: Option<String>,
    pub model: Option<ModelRef>,
    pub agent: Option<String>,
    pub system: Option<String>,
    pub tools: Option<BTreeMap<String, bool>>,
    /// Where replies go when the message has no NATS reply subject.
    pub reply_to: Option<String>,
    /// The caller answers permission requests and questions over NATS
    /// (`permission` / `question` replies); else the policy decides alone.
    pub interactive: bool,
    /// Who sent it: the tenant named by the subject's first tail token, or
    /// the operator on the bare subject ([`super::tenant`]).
    pub caller: Caller,
    /// The caller wants `status` replies (provider retries) while it waits.
    pub progress: bool,
    /// Files sent with the text, in order ([`parse_attachments`]).
    pub attachments: Vec<Attachment>,
    /// At what pace the caller wants the turn's text (`"stream"`); `None`
    /// when the prompt does not say (the tenant's default applies,
    /// `[tenancy] stream`).
    pub stream: Option<StreamMode>,
    /// Never parsed; set by the cluster when the conversation's previous
    /// home (this host) is gone and this daemon drives another OpenCode:
    /// the turn starts a new session and its final says so
    /// (`session_recreated`, a note naming the host).
    pub moved_from: Option<String>,
    /// Set by the bridge for a durable job (never from the payload).
    pub job: Option<super::job::JobTurn>,
    /// `"workspace"`: a named workspace, `<root>/<tenant>/<name>` (one
    /// path segment, checked here; `[workspaces] allow_named`).
    pub workspace: Option<String>,
}

/// At what pace a caller wants a turn's replies (`"stream"` in the prompt).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StreamMode {
    /// Every delta as it comes (`"full"`, the default).
    #[default]
    Full,
    /// Text of one part merged and sent at most every `ms` milliseconds:
    /// the first at once, what is held goes out before any other reply and
    /// before the terminal one (`{"coalesce_ms": N}`).
    Coalesce { ms: u64 },
    /// Only the terminal reply, and the replies that ask the caller
    /// something (`permission`, `question`) or tell it why it waits
    /// (`status`): no `delta`, `reasoning`, `tool_call`, `tool_result`
    /// (`"final"`).
    Final,
}

/// The longest `coalesce_ms` accepted (a minute).
pub const MAX_COALESCE_MS: u64 = 60_000;

fn stream_mode(v: Option<Value>) -> Result<Option<StreamMode>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => parse_stream_mode(v).map(Some),
    }
}

/// A `"stream"` value: `"full"`, `"final"` or `{"coalesce_ms": N}`.
pub fn parse_stream_mode(v: Value) -> Result<StreamMode, String> {
    let bad = |v: &Value| {
        format!(
            "`stream` must be \"full\", \"final\" or {{\"coalesce_ms\": 0..={MAX_COALESCE_MS}}}, got {v}"
        )
    };
    match v {
        Value::String(s) if s == "full" => Ok(StreamMode::Full),
        Value::String(s) if s == "final" => Ok(StreamMode::Final),
        Value::Object(m) => match (m.len(), m.get("coalesce_ms").and_then(Value::as_u64)) {
            (1, Some(0)) => Ok(StreamMode::Full),
            (1, Some(ms)) if ms <= MAX_COALESCE_MS => Ok(StreamMode::Coalesce { ms }),
            _ => Err(bad(&Value::Object(m))),
        },
        other => Err(bad(&other)),
    }
}

impl Prompt {
    /// The key that serialises turns: the conversation, else the session;
    /// `None` for a one-off prompt (its own session, nothing to wait for).
    pub fn queue_key(&self) -> Option<QueueKey> {
        match (&self.conversation, &self.session_id) {
            (Some(c), _) => Some(QueueKey::Conversation(c.clone())),
            (None, Some(s)) => Some(QueueKey::Session(s.clone())),
            (None, None) => None,
        }
    }
}

/// What two prompts share when they must not run at once: prompts with the
/// same key run one after another, in arrival order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum QueueKey {
    /// The conversation key (`slack.C042`).
    Conversation(String),
    /// An OpenCode session driven directly (`session_id`, no conversation).
    Session(String),
}

/// `provider/model`, split at the first `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRef {
    pub provider: String,
    pub model: String,
}

impl ModelRef {
    pub fn parse(s: &str) -> Option<ModelRef> {
        let (provider, model) = s.split_once('/')?;
        let (provider, model) = (provider.trim(), model.trim());
        if provider.is_empty() || model.is_empty() {
            return None;
        }
        Some(ModelRef {
            provider: provider.to_string(),
            model: model.to_string(),
        })
    }
}

impl std::fmt::Display for ModelRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.provider, self.model)
    }
}

/// Metadata headers a plain-text prompt may carry (JSON fields win).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PromptHeaders {
    pub trace_id: Option<String>,
    pub conversation: Option<String>,
    pub model: Option<String>,
    pub agent: Option<String>,
}

#[derive(Debug, Clone, Copy)]
pub struct PromptLimits {
    pub max_prompt_bytes: usize,
    /// Decoded size of one attachment.
    pub max_attachment_bytes: usize,
    /// Decoded size of all the attachments of one prompt.
    pub max_attachments_bytes: usize,
}

impl PromptLimits {
    /// The payload limit alone; attachments bounded only by it.
    pub const fn payload(max_prompt_bytes: usize) -> PromptLimits {
        PromptLimits {
            max_prompt_bytes,
            max_attachment_bytes: max_prompt_bytes,
            max_attachments_bytes: max_prompt_bytes,
        }
    }
}

/// A prompt that cannot be served, with whatever could be salvaged to route
/// the `bad_request` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: String,
    /// A valid trace id from the prompt or a header, else a generated one.
    pub trace_id: String,
    /// A valid `reply_to` from the prompt, if one could be read.
    pub reply_to: Option<String>,
    pub conversation: Option<String>,
}

#[derive(Deserialize)]
struct JsonPrompt {
    text: Option<Value>,
    prompt: Option<Value>,
    trace_id: Option<Value>,
    conversation: Option<Value>,
    session_id: Option<Value>,
    model: Option<Value>,
    agent: Option<Value>,
    system: Option<Value>,
    tools: Option<Value>,
    reply_to: Option<Value>,
    interactive: Option<Value>,
    progress: Option<Value>,
    stream: Option<Value>,
    attachments: Option<Value>,
    workspace: Option<Value>,
}

/// Parses a prompt message.
///
/// `subject_conversation` is the conversation named by the subject's `>`
/// tail (`opencode.prompt.slack.C042` -> `slack.C042`), if any.
pub fn parse_prompt(
    payload: &[u8],
    headers: &PromptHeaders,
    subject_conversation: Option<&str>,
    limits: PromptLimits,
) -> Result<Prompt, Rejection> {
    let mut salvage = Salvage::from_headers(headers);
    if payload.len() > limits.max_prompt_bytes {
        return Err(salvage.reject(format!(
            "prompt is {} bytes, above the limit of {} bytes (max_prompt_bytes)",
            payload.len(),
            limits.max_prompt_bytes
        )));
    }
    let Ok(body) = std::str::from_utf8(payload) else {
        return Err(salvage.reject("prompt is not valid UTF-8"));
    };
    let trimmed = body.trim_start();
    if trimmed.is_empty() {
        return Err(salvage.reject("prompt is empty"));
    }

    let mut fields = Fields {
        trace_id: headers.trace_id.clone(),
        conversation: headers.conversation.clone(),
        model: headers.model.clone(),
        agent: headers.agent.clone(),
        ..Fields::default()
    };

    if trimmed.starts_with('{') {
        let json: JsonPrompt = match serde_json::from_str(body) {
            Ok(j) => j,
            Err(e) => {
                // A JSON object that is not valid: try to salvage routing
                // fields from a looser parse before giving up.
                if let Ok(Value::Object(map)) = serde_json::from_str::<Value>(body) {
                    salvage.absorb(&map);
                }
                return Err(salvage.reject(format!("prompt is not a valid JSON object: {e}")));
            }
        };
        salvage.absorb_json(&json);
        fields
            .absorb(json, &limits)
            .map_err(|r| salvage.reject(r))?;
    } else {
        fields.text = Some(body.to_string());
    }

    if fields.conversation.is_none() {
        fields.conversation = subject_conversation.map(str::to_string);
    }
    let caller = match subject_conversation {
        Some(tail) => Caller::Tenant(tail.split('.').next().unwrap_or(tail).to_string()),
        None => Caller::Operator,
    };
    fields.validate(salvage, caller)
}

#[derive(Default)]
struct Fields {
    text: Option<String>,
    trace_id: Option<String>,
    conversation: Option<String>,
    session_id: Option<String>,
    model: Option<String>,
    agent: Option<String>,
    system: Option<String>,
    tools: Option<BTreeMap<String, bool>>,
    reply_to: Option<String>,
    interactive: bool,
    progress: bool,
    stream: Option<StreamMode>,
    attachments: Vec<Attachment>,
    workspace: Option<String>,
}

fn string_field(name: &str, v: Option<Value>) -> Result<Option<String>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!(
            "`{name}` must be a string, got {}",
            json_type(&other)
        )),
    }
}

/// `tools`: an object of tool name to boolean.
fn tools_field(v: Option<Value>) -> Result<Option<BTreeMap<String, bool>>, String> {
    Ok(match v {
        None | Some(Value::Null) => None,
        Some(Value::Object(map)) => {
            let mut tools = BTreeMap::new();
            for (k, v) in map {
                match v {
                    Value::Bool(b) => {
                        tools.insert(k, b);
                    }
                    other => {
                        return Err(format!(
                            "`tools.{k}` must be a boolean, got {}",
                            json_type(&other)
                        ))
                    }
                }
            }
            Some(tools)
        }
        Some(other) => {
            return Err(format!(
                "`tools` must be an object of name to boolean, got {}",
                json_type(&other)
            ))
        }
    })
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl Fields {
    fn absorb(&mut self, j: JsonPrompt, limits: &PromptLimits) -> Result<(), String> {
        let (name, text) = match (j.text, j.prompt) {
            (Some(t), _) => ("text", Some(t)),
            (None, Some(p)) => ("prompt", Some(p)),
            (None, None) => ("text", None),
        };
        self.text = match text {
            None | Some(Value::Null) => return Err("`text` is required".to_string()),
            Some(Value::String(s)) => Some(s),
            Some(other) => {
                return Err(format!(
                    "`{name}` must be a non-empty string, got {}",
                    json_type(&other)
                ))
            }
        };
        if let Some(t) = string_field("trace_id", j.trace_id)? {
            self.trace_id = Some(t);
        }
        if let Some(c) = string_field("conversation", j.conversation)? {
            self.conversation = Some(c);
        }
        self.session_id = string_field("session_id", j.session_id)?;
        if let Some(m) = string_field("model", j.model)? {
            self.model = Some(m);
        }
        if let Some(a) = string_field("agent", j.agent)? {
            self.agent = Some(a);
        }
        self.system = string_field("system", j.system)?;
        self.reply_to = string_field("reply_to", j.reply_to)?;
        self.interactive = match j.interactive {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => b,
            Some(other) => {
                return Err(format!(
                    "`interactive` must be a boolean, got {}",
                    json_type(&other)
                ))
            }
        };
        self.stream = stream_mode(j.stream)?;
        self.progress = match j.progress {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => b,
            Some(other) => {
                return Err(format!(
                    "`progress` must be a boolean, got {}",
                    json_type(&other)
                ))
            }
        };
        self.tools = tools_field(j.tools)?;
        self.attachments = parse_attachments(j.attachments, limits)?;
        self.workspace = string_field("workspace", j.workspace)?;
        if let Some(w) = &self.workspace {
            super::workspace::check_segment(w).map_err(|e| format!("`workspace` {w:?} {e}"))?;
        }
        Ok(())
    }

    fn validate(self, salvage: Salvage, caller: Caller) -> Result<Prompt, Rejection> {
        let text = self.text.unwrap_or_default();
        if text.trim().is_empty() {
            return Err(salvage.reject("`text` must be a non-empty string"));
        }
        let trace_id = match self.trace_id {
            Some(t) => {
                // One token: a dotted trace id would reach into another
                // caller's reply space (`<reply_prefix>.<trace_id>`).
                validate_token(&t).map_err(|e| {
                    salvage.reject(format!(
                        "`trace_id` {t:?} {e} (it must be one subject token, no dots)"
                    ))
                })?;
                t
            }
            None => salvage.trace_id.clone(),
        };
        if let Some(c) = &self.conversation {
            check_subjectish("conversation", c).map_err(|r| salvage.reject(r))?;
        }
        if let Some(r) = &self.reply_to {
            check_subjectish("reply_to", r).map_err(|r| salvage.reject(r))?;
        }
        if let Some(s) = &self.session_id {
            if !is_session_id(s) {
                return Err(salvage.reject(format!(
                    "`session_id` {s:?} is not an OpenCode session id (ses_ followed by letters and digits)"
                )));
            }
        }
        let model = match &self.model {
            None => None,
            Some(m) => Some(ModelRef::parse(m).ok_or_else(|| {
                salvage.reject(format!("`model` {m:?} must look like \"provider/model\""))
            })?),
        };
        if let Some(a) = &self.agent {
            if a.trim().is_empty() {
                return Err(salvage.reject("`agent` must not be empty"));
            }
        }
        Ok(Prompt {
            trace_id,
            text,
            conversation: self.conversation,
            session_id: self.session_id,
            model,
            agent: self.agent,
            system: self.system,
            tools: self.tools,
            reply_to: self.reply_to,
            interactive: self.interactive,
            caller,
            progress: self.progress,
            stream: self.stream,
            attachments: self.attachments,
            moved_from: None,
            job: None,
            workspace: self.workspace,
        })
    }
}

fn check_subjectish(name: &str, v: &str) -> Result<(), String> {
    validate_subject(v).map_err(|e: SubjectError| format!("`{name}` {v:?} {e}"))
}

/// OpenCode session ids are `ses_` plus base62; anything else could escape
/// the URL path it is put in.
pub fn is_session_id(s: &str) -> bool {
    s.len() <= 128
        && s.starts_with("ses")
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Routing data collected as far as the payload could be read.
struct Salvage {
    trace_id: String,
    reply_to: Option<String>,
    conversation: Option<String>,
}

impl Salvage {
    fn from_headers(h: &PromptHeaders) -> Salvage {
        let trace_id = h
            .trace_id
            .clone()
            .filter(|t| validate_token(t).is_ok())
            .unwrap_or_else(new_trace_id);
        Salvage {
            trace_id,
            reply_to: None,
            conversation: h
                .conversation
                .clone()
                .filter(|c| validate_subject(c).is_ok()),
        }
    }

    fn absorb_json(&mut self, j: &JsonPrompt) {
        let str_of = |v: &Option<Value>| match v {
            Some(Value::String(s)) if validate_subject(s).is_ok() => Some(s.clone()),
            _ => None,
        };
        if let Some(t) = str_of(&j.trace_id).filter(|t| validate_token(t).is_ok()) {
            self.trace_id = t;
        }
        if let Some(r) = str_of(&j.reply_to) {
            self.reply_to = Some(r);
        }
        if let Some(c) = str_of(&j.conversation) {
            self.conversation = Some(c);
        }
    }

    fn absorb(&mut self, map: &serde_json::Map<String, Value>) {
        let get = |k: &str| map.get(k).cloned();
        self.absorb_json(&JsonPrompt {
            text: None,
            prompt: None,
            trace_id: get("trace_id"),
            conversation: get("conversation"),
            session_id: None,
            model: None,
            agent: None,
            system: None,
            tools: None,
            reply_to: get("reply_to"),
            interactive: None,
            progress: None,
            stream: None,
            attachments: None,
            workspace: None,
        });
    }

    fn reject(&self, reason: impl Into<String>) -> Rejection {
        Rejection {
            reason: reason.into(),
            trace_id: self.trace_id.clone(),
            reply_to: self.reply_to.clone(),
            conversation: self.conversation.clone(),
        }
    }
}

/// A fresh trace id (UUID v4, hyphenated).
pub fn new_trace_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: PromptLimits = PromptLimits::payload(1024);

    fn parse(payload: &str) -> Result<Prompt, Rejection> {
        parse_prompt(payload.as_bytes(), &PromptHeaders::default(), None, LIMITS)
    }

    #[test]
    fn plain_text_with_headers() {
        let h = PromptHeaders {
            trace_id: Some("t-1".into()),
            conversation: Some("slack.C1".into()),
            model: Some("anthropic/claude-x/y".into()),
            agent: Some("plan".into()),
        };
        let p = parse_prompt(b"  hello there", &h, Some("ignored.tail"), LIMITS).unwrap();
        assert_eq!(p.text, "  hello there");
        assert_eq!(p.trace_id, "t-1");
        assert_eq!(p.conversation.as_deref(), Some("slack.C1"));
        assert_eq!(
            p.model,
            Some(ModelRef {
                provider: "anthropic".into(),
                model: "claude-x/y".into()
            })
        );
        assert_eq!(p.agent.as_deref(), Some("plan"));
    }

    #[test]
    fn the_stream_mode_is_parsed() {
        let mode = |json: &str| parse(json).map(|p| p.stream.unwrap_or_default());
        // Not given: the tenant's default applies (`[tenancy] stream`).
        assert_eq!(parse(r#"{"text":"x"}"#).unwrap().stream, None);
        assert_eq!(
            mode(r#"{"text":"x","stream":"final"}"#).unwrap(),
            StreamMode::Final
        );
        assert_eq!(
            mode(r#"{"text":"x","stream":"full"}"#).unwrap(),
            StreamMode::Full
        );
        assert_eq!(
            mode(r#"{"text":"x","stream":{"coalesce_ms":500}}"#).unwrap(),
            StreamMode::Coalesce { ms: 500 }
        );
        assert_eq!(
            mode(r#"{"text":"x","stream":{"coalesce_ms":0}}"#).unwrap(),
            StreamMode::Full
        );
        for bad in [
            r#""fast""#,
            "5",
            r#"{"coalesce_ms":-1}"#,
            r#"{"coalesce_ms":60001}"#,
            r#"{"coalesce_ms":5,"x":1}"#,
        ] {
            let r = parse(&format!(r#"{{"text":"x","stream":{bad}}}"#)).unwrap_err();
            assert!(r.reason.contains("`stream`"), "{bad}: {}", r.reason);
        }
    }

    #[test]
    fn progress_is_asked_for_with_a_boolean() {
        assert!(!parse("hi").unwrap().progress);
        assert!(!parse(r#"{"text":"hi"}"#).unwrap().progress);
        assert!(parse(r#"{"text":"hi","progress":true}"#).unwrap().progress);
        let r = parse(r#"{"text":"hi","progress":"yes"}"#).unwrap_err();
        assert_eq!(r.reason, "`progress` must be a boolean, got a string");
    }

    #[test]
    fn subject_tail_names_the_conversation() {
        let p = parse_prompt(b"hi", &PromptHeaders::default(), Some("slack.C042"), LIMITS).unwrap();
        assert_eq!(p.conversation.as_deref(), Some("slack.C042"));
        assert!(uuid::Uuid::parse_str(&p.trace_id).is_ok());
        let p = parse_prompt(
            br#"{"text":"hi","conversation":"own"}"#,
            &PromptHeaders::default(),
            Some("slack.C042"),
            LIMITS,
        )
        .unwrap();
        assert_eq!(p.conversation.as_deref(), Some("own"));
    }

    #[test]
    fn full_json() {
        let p = parse(
            r#"{"text":"hi","trace_id":"abc","conversation":"c.1","session_id":"ses_9Zx",
                "model":"fake/m1","agent":"build","system":"be brief","tools":{"bash":false},
                "reply_to":"my.replies","unknown":42}"#,
        )
        .unwrap();
        assert_eq!(p.trace_id, "abc");
        assert_eq!(p.session_id.as_deref(), Some("ses_9Zx"));
        assert_eq!(p.model.unwrap().to_string(), "fake/m1");
        assert_eq!(p.system.as_deref(), Some("be brief"));
        assert_eq!(p.tools.unwrap().get("bash"), Some(&false));
        assert_eq!(p.reply_to.as_deref(), Some("my.replies"));
    }

    #[test]
    fn attachments_ride_along_and_their_errors_are_bad_requests() {
        let p = parse(
            r#"{"text":"look","attachments":[{"filename":"a.png","content":"iVBORw=="},
                {"filename":"b.txt","content":"aGk=","mime":"text/plain"}]}"#,
        )
        .unwrap();
        let names: Vec<&str> = p.attachments.iter().map(|a| a.filename.as_str()).collect();
        assert_eq!(names, ["a.png", "b.txt"]);
        assert_eq!(p.attachments[0].mime, "image/png");
        assert!(parse("plain text").unwrap().attachments.is_empty());
        let r = rejected(
            br#"{"text":"x","trace_id":"t-att","attachments":[{"filename":"e.txt","content":""}]}"#,
        );
        assert!(r.reason.contains("empty"), "{}", r.reason);
        assert_eq!(r.trace_id, "t-att");
        let tight = PromptLimits {
            max_attachment_bytes: 3,
            ..LIMITS
        };
        let r = parse_prompt(
            br#"{"text":"x","attachments":[{"filename":"big","content":"aGVsbG8="}]}"#,
            &PromptHeaders::default(),
            None,
            tight,
        )
        .unwrap_err();
        assert!(r.reason.contains("max_attachment_bytes"), "{}", r.reason);
    }

    #[test]
    fn the_conversation_then_the_session_is_the_queue_key() {
        let key = |payload: &str| parse(payload).unwrap().queue_key();
        assert_eq!(key(r#"{"text":"hi"}"#), None);
        assert_eq!(
            key(r#"{"text":"hi","session_id":"ses_9Zx"}"#),
            Some(QueueKey::Session("ses_9Zx".into()))
        );
        assert_eq!(
            key(r#"{"text":"hi","conversation":"c.1","session_id":"ses_9Zx"}"#),
            Some(QueueKey::Conversation("c.1".into()))
        );
        // A conversation named like a session id is still a conversation.
        assert_ne!(
            key(r#"{"text":"hi","conversation":"ses_9Zx"}"#),
            key(r#"{"text":"hi","session_id":"ses_9Zx"}"#)
        );
    }

    #[test]
    fn prompt_is_a_synonym_of_text() {
        assert_eq!(parse(r#"{"prompt":"yo"}"#).unwrap().text, "yo");
    }

    fn rejected(payload: &[u8]) -> Rejection {
        parse_prompt(payload, &PromptHeaders::default(), None, LIMITS).unwrap_err()
    }

    #[test]
    fn every_bad_input_is_rejected_with_a_reason() {
        let cases: Vec<(&[u8], &str)> = vec![
            (b"", "empty"),
            (b"   \n\t ", "empty"),
            (b"{not json", "not a valid JSON"),
            (b"{\"text\": \"x\"", "not a valid JSON"),
            (b"\xff\xfe hello", "UTF-8"),
            (b"{}", "`text` is required"),
            (br#"{"text": null}"#, "`text` is required"),
            (br#"{"text": ""}"#, "non-empty"),
            (br#"{"text": "   "}"#, "non-empty"),
            (br#"{"text": 42}"#, "non-empty string"),
            (br#"{"text": ["a"]}"#, "non-empty string"),
            (br#"{"text": "x", "model": "nomodel"}"#, "provider/model"),
            (br#"{"text": "x", "model": "/m"}"#, "provider/model"),
            (br#"{"text": "x", "model": 3}"#, "must be a string"),
            (br#"{"text": "x", "tools": {"bash": "yes"}}"#, "boolean"),
            (br#"{"text": "x", "tools": []}"#, "object"),
            (br#"{"text": "x", "session_id": "../../etc"}"#, "session id"),
            (br#"{"text": "x", "agent": ""}"#, "agent"),
        ];
        for (payload, needle) in cases {
            let r = rejected(payload);
            assert!(
                r.reason.contains(needle),
                "{:?}: {:?} does not mention {needle:?}",
                String::from_utf8_lossy(payload),
                r.reason
            );
        }
    }

    #[test]
    fn oversized_payload() {
        let big = vec![b'a'; LIMITS.max_prompt_bytes + 1];
        assert!(rejected(&big).reason.contains("max_prompt_bytes"));
        let exact = vec![b'a'; LIMITS.max_prompt_bytes];
        assert!(parse_prompt(&exact, &PromptHeaders::default(), None, LIMITS).is_ok());
    }

    #[test]
    fn subject_injection_is_refused() {
        for field in ["trace_id", "conversation", "reply_to"] {
            for bad in ["a.*", ">", "a b", "a..b", "$SYS.x", "x.>", "a\r\nPUB"] {
                let payload = serde_json::json!({"text": "x", field: bad}).to_string();
                let r = rejected(payload.as_bytes());
                assert!(r.reason.contains(field), "{field}={bad:?}: {}", r.reason);
            }
        }
        let h = PromptHeaders {
            conversation: Some("a.*".into()),
            ..Default::default()
        };
        assert!(parse_prompt(b"hi", &h, None, LIMITS).is_err());
        assert!(parse_prompt(b"hi", &PromptHeaders::default(), Some("a b"), LIMITS).is_err());
    }

    #[test]
    fn rejection_salvages_routing() {
        let r = rejected(br#"{"text": 1, "trace_id": "t9", "reply_to": "back.here"}"#);
        assert_eq!(r.trace_id, "t9");
        assert_eq!(r.reply_to.as_deref(), Some("back.here"));
        // A bad reply_to is never salvaged.
        let r = rejected(br#"{"text": 1, "reply_to": "back.*"}"#);
        assert_eq!(r.reply_to, None);
        // Invalid JSON: nothing salvaged, a fresh trace id.
        let r = rejected(b"{oops");
        assert!(uuid::Uuid::parse_str(&r.trace_id).is_ok());
        // Header trace id survives a payload that is not UTF-8.
        let h = PromptHeaders {
            trace_id: Some("hdr".into()),
            ..Default::default()
        };
        let r = parse_prompt(b"\xff", &h, None, LIMITS).unwrap_err();
        assert_eq!(r.trace_id, "hdr");
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn any_bytes_parse_or_reject_cleanly(payload in proptest::collection::vec(any::<u8>(), 0..300),
                                             tail in proptest::option::of("[a-z.*> $]{0,12}"),
                                             trace in proptest::option::of("[a-z.*> $]{0,12}")) {
            let h = PromptHeaders { trace_id: trace, ..Default::default() };
            match parse_prompt(&payload, &h, tail.as_deref(), PromptLimits::payload(200)) {
                Ok(p) => {
                    prop_assert!(!p.text.trim().is_empty());
                    prop_assert!(validate_subject(&p.trace_id).is_ok());
                    if let Some(c) = &p.conversation { prop_assert!(validate_subject(c).is_ok()); }
                    if let Some(r) = &p.reply_to { prop_assert!(validate_subject(r).is_ok()); }
                }
                Err(r) => {
                    prop_assert!(!r.reason.is_empty());
                    prop_assert!(validate_subject(&r.trace_id).is_ok());
                    if let Some(r) = &r.reply_to { prop_assert!(validate_subject(r).is_ok()); }
                }
            }
        }

        #[test]
        fn json_shaped_prompts(text in proptest::option::of(".{0,20}"), conv in proptest::option::of("[a-zA-Z0-9.*> ]{0,10}"), model in proptest::option::of("[a-z/]{0,8}")) {
            let mut m = serde_json::Map::new();
            if let Some(t) = text { m.insert("text".into(), t.into()); }
            if let Some(c) = conv { m.insert("conversation".into(), c.into()); }
            if let Some(x) = model { m.insert("model".into(), x.into()); }
            let payload = serde_json::Value::Object(m).to_string();
            let _ = parse_prompt(payload.as_bytes(), &PromptHeaders::default(), None, PromptLimits::payload(1000));
        }
    }
}
