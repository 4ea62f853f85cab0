//! [pure] The Synadia Agent Protocol v0.3 profile (docs/PROTOCOL.md,
//! "Agent protocol profile"): subjects, request checks, and the encoding
//! of a turn's replies as the protocol's reply stream.
//!
//! The same [`ReplyBody`] values a turn sends on the bridge's own subjects
//! become `{"type","data"}` chunks here: answer text as `response`, tool
//! activity, reasoning, retries and usage as `status` tokens
//! (`tool_use:{json}`, `tool_result:{json}`, `reasoning:{json}`,
//! `retry:{json}`, `note:{json}`, `usage:{json}`), an error as one message with the
//! micro service error headers; a permission request or a question as a
//! `query` chunk whose `reply_subject` is the bridge's own answer subject. The terminator (an empty message without
//! headers) is the sink's to send.

use serde_json::{json, Value};

use super::{ErrorCode, ReplyBody};

/// The micro service name every agent registers (`$SRV.INFO.agents`).
pub const SERVICE_NAME: &str = "agents";
/// The queue group of the `prompt` and `status` endpoints.
pub const QUEUE_GROUP: &str = "agents";
/// The protocol version this profile implements (`metadata.protocol_version`).
pub const PROTOCOL_VERSION: &str = "0.3";
/// `metadata.agent`, and the 3rd token of every subject.
pub const AGENT: &str = "opencode";

/// One agent registration: `agents.<verb>.opencode.<owner>.<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub owner: String,
    pub name: String,
}

impl Identity {
    /// The default subject of `verb` (`prompt`, `status`, `hb`).
    pub fn subject(&self, verb: &str) -> String {
        format!("agents.{verb}.{AGENT}.{}.{}", self.owner, self.name)
    }

    /// A heartbeat (and `status` reply) payload, §8.3.
    pub fn heartbeat(&self, instance_id: &str, ts: &str, interval_s: u64) -> Value {
        json!({
            "agent": AGENT,
            "owner": self.owner,
            "instance_id": instance_id,
            "ts": ts,
            "interval_s": interval_s,
        })
    }
}

/// A host name as a subject token: lowercase, anything but letters,
/// digits, `-` and `_` as `-`, at most 63 bytes.
pub fn name_token(host: &str) -> String {
    let t = super::subject::to_token(host, 63);
    if t.is_empty() {
        "default".into()
    } else {
        t
    }
}

/// `max_payload` endpoint metadata (`1MB`-style) for a byte count.
pub fn size_label(bytes: usize) -> String {
    if bytes >= 1 << 20 && bytes % (1 << 20) == 0 {
        format!("{}MB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes % (1 << 10) == 0 {
        format!("{}KB", bytes >> 10)
    } else {
        format!("{bytes}B")
    }
}

/// The checks of §5.3 the bridge's own prompt parser does not make: an
/// empty payload, and a JSON envelope without a non-empty `prompt` string.
/// Everything else (`attachments`, size limits) the prompt parser checks.
pub fn check_request(payload: &[u8]) -> Result<(), String> {
    if payload.is_empty() {
        return Err("empty request (the protocol needs a prompt)".into());
    }
    let start = payload
        .iter()
        .position(|b| !matches!(b, b'\t' | b'\n' | b'\r' | b' '));
    let Some(start) = start else {
        return Err("the request is only whitespace".into());
    };
    if payload[start] != b'{' {
        return Ok(());
    }
    let v: Value = serde_json::from_slice(payload)
        .map_err(|e| format!("the request starts with {{ but is not valid JSON: {e}"))?;
    match v.get("prompt") {
        Some(Value::String(p)) if !p.is_empty() => Ok(()),
        Some(Value::String(_)) => Err("`prompt` is empty".into()),
        _ => Err("a JSON request needs a `prompt` string".into()),
    }
}

/// The protocol's status code (§9.2) for one of the bridge's error codes.
pub fn status_code(code: ErrorCode) -> u16 {
    match code {
        ErrorCode::BadRequest => 400,
        ErrorCode::Forbidden => 403,
        ErrorCode::SessionBusy | ErrorCode::Aborted => 409,
        ErrorCode::Overloaded => 429,
        ErrorCode::OpencodeUnavailable
        | ErrorCode::OpencodeError
        | ErrorCode::ProviderError
        | ErrorCode::Timeout
        | ErrorCode::ShuttingDown
        | ErrorCode::Undeliverable
        | ErrorCode::Internal => 500,
    }
}

/// One message of a reply stream (before the terminator).
#[derive(Debug, Clone, PartialEq)]
pub enum Chunk {
    /// A `{"type","data"}` chunk, headerless.
    Data(Vec<u8>),
    /// The error message: `Nats-Service-Error-Code: <code>`,
    /// `Nats-Service-Error: <description>` and a JSON body.
    Error {
        code: u16,
        description: String,
        body: Vec<u8>,
    },
}

/// The first message of every stream: `{"type":"status","data":"ack"}`.
pub fn ack() -> Chunk {
    chunk("status", json!("ack"))
}

fn chunk(kind: &str, data: Value) -> Chunk {
    Chunk::Data(json!({"type": kind, "data": data}).to_string().into_bytes())
}

fn status(token: &str, detail: Value) -> Chunk {
    chunk("status", Value::String(format!("{token}:{detail}")))
}

/// Encodes one turn's replies, in order; remembers whether answer text
/// went out, so the final's text goes out only when no delta carried it
/// (the answer exactly once).
#[derive(Debug, Default)]
pub struct Encoder {
    answered: bool,
}

impl Encoder {
    /// The chunks of one reply (none for kinds the profile does not carry).
    pub fn encode(&mut self, body: &ReplyBody) -> Vec<Chunk> {
        match body {
            ReplyBody::Delta { content, .. } => {
                self.answered |= !content.is_empty();
                vec![chunk("response", json!(content))]
            }
            ReplyBody::Reasoning { content, part_id } => {
                vec![status("reasoning", json!({"id": part_id, "text": content}))]
            }
            ReplyBody::ToolCall {
                call_id,
                tool,
                args,
                parent_call_id,
                ..
            } => {
                let mut d = json!({"id": call_id, "name": tool, "input": args});
                if let Some(p) = parent_call_id {
                    d["parent_id"] = json!(p);
                }
                vec![status("tool_use", d)]
            }
            ReplyBody::ToolResult {
                call_id,
                tool,
                success,
                result,
                truncated,
                ..
            } => vec![status(
                "tool_result",
                json!({"id": call_id, "name": tool, "ok": success, "output": result, "truncated": truncated}),
            )],
            ReplyBody::Status {
                attempt, reason, ..
            } => vec![status(
                "retry",
                json!({"attempt": attempt, "reason": reason}),
            )],
            ReplyBody::Permission { .. } | ReplyBody::Question { .. } => query(body),
            ReplyBody::Final(fin) => {
                let mut out = Vec::new();
                if !self.answered && !fin.content.is_empty() {
                    self.answered = true;
                    out.push(chunk("response", json!(fin.content)));
                }
                for note in &fin.notes {
                    out.push(status("note", json!({"text": note})));
                }
                out.push(status(
                    "usage",
                    json!({"model": fin.model, "tokens": fin.usage, "cost": fin.cost, "duration_ms": fin.duration_ms, "finish": fin.finish}),
                ));
                out
            }
            ReplyBody::Error {
                error,
                code,
                retryable,
            } => vec![Chunk::Error {
                code: status_code(*code),
                description: first_line(error),
                body: json!({"error": code.as_str(), "message": error, "retryable": retryable})
                    .to_string()
                    .into_bytes(),
            }],
        }
    }
}

/// A permission request or a question as a `query` chunk (§7); its
/// `reply_subject` is the bridge's own answer subject.
fn query(body: &ReplyBody) -> Vec<Chunk> {
    match body {
        ReplyBody::Permission {
            request_id,
            permission,
            patterns,
            tool,
            description,
            reply_subject,
            ..
        } => {
            let what = if patterns.is_empty() {
                String::new()
            } else {
                format!(" ({})", patterns.join(", "))
            };
            let prompt = format!(
                "OpenCode asks permission `{permission}`{what}: {description}. Answer yes (once), always or no."
            );
            vec![chunk(
                "query",
                json!({"id": request_id, "reply_subject": reply_subject, "prompt": prompt,
                       "kind": "permission", "permission": permission, "patterns": patterns, "tool": tool}),
            )]
        }
        ReplyBody::Question {
            request_id,
            questions,
            reply_subject,
            ..
        } => vec![chunk(
            "query",
            json!({"id": request_id, "reply_subject": reply_subject,
                   "prompt": question_text(questions), "kind": "question", "questions": questions}),
        )],
        _ => Vec::new(),
    }
}

/// OpenCode's questions as one text: each question and its options.
fn question_text(questions: &Value) -> String {
    let mut out = Vec::new();
    for q in questions.as_array().into_iter().flatten() {
        let mut line = q["question"].as_str().unwrap_or_default().to_string();
        let labels: Vec<&str> = q["options"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| o["label"].as_str())
            .collect();
        if !labels.is_empty() {
            line.push_str(&format!(" ({})", labels.join(" / ")));
        }
        out.push(line);
    }
    out.join("\n")
}

/// A header value: one line, at most 200 bytes.
fn first_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or_default();
    let cut = super::reply::floor_char_boundary(line, 200);
    line[..cut].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::reply::FinalReply;

    fn data(c: &Chunk) -> Value {
        match c {
            Chunk::Data(b) => serde_json::from_slice(b).unwrap(),
            Chunk::Error { .. } => panic!("an error chunk"),
        }
    }

    fn fin(content: &str) -> ReplyBody {
        ReplyBody::Final(Box::new(FinalReply {
            content: content.into(),
            model: Some("p/m".into()),
            agent: None,
            usage: Default::default(),
            cost: 0.5,
            duration_ms: 7,
            finish: None,
            notes: vec![],
            session_recreated: false,
            content_truncated: false,
            content_object: None,
            workspace: None,
        }))
    }

    #[test]
    fn subjects_follow_the_verb_first_hierarchy() {
        let id = Identity {
            owner: "ops".into(),
            name: "box-1".into(),
        };
        assert_eq!(id.subject("prompt"), "agents.prompt.opencode.ops.box-1");
        assert_eq!(id.subject("hb"), "agents.hb.opencode.ops.box-1");
        let hb = id.heartbeat("ID", "2026-01-01T00:00:00Z", 30);
        assert_eq!(hb["agent"], "opencode");
        assert_eq!(hb["instance_id"], "ID");
        assert_eq!(hb["interval_s"], 30);
        assert_eq!(name_token("My.Host"), "my-host");
        assert_eq!(size_label(1 << 20), "1MB");
        assert_eq!(size_label(8 << 20), "8MB");
        assert_eq!(size_label(1500), "1500B");
    }

    #[test]
    fn requests_are_checked_as_section_5_3_says() {
        assert!(check_request(b"").is_err());
        assert!(check_request(b"  \n").is_err());
        assert!(check_request(b"hello").is_ok());
        assert!(check_request(b" \n{\"prompt\":\"hi\",\"x\":1}").is_ok());
        assert!(check_request(b"{\"text\":\"hi\"}").is_err());
        assert!(check_request(b"{\"prompt\":\"\"}").is_err());
        assert!(check_request(b"{\"prompt\":").is_err());
    }

    #[test]
    fn ack_is_the_status_chunk() {
        assert_eq!(data(&ack()), json!({"type": "status", "data": "ack"}));
    }

    #[test]
    fn answer_text_goes_out_once() {
        let mut e = Encoder::default();
        let d = e.encode(&ReplyBody::Delta {
            content: "Hel".into(),
            part_id: "p".into(),
        });
        assert_eq!(data(&d[0]), json!({"type": "response", "data": "Hel"}));
        let f = e.encode(&fin("Hello"));
        assert_eq!(f.len(), 1, "the final adds only usage after deltas");
        let usage = data(&f[0]);
        assert_eq!(usage["type"], "status");
        assert!(usage["data"].as_str().unwrap().starts_with("usage:{"));
        // Without deltas the final carries the text.
        let f = Encoder::default().encode(&fin("Hello"));
        assert_eq!(data(&f[0]), json!({"type": "response", "data": "Hello"}));
        // The bridge's notes are status tokens before the usage.
        let mut noted = fin("x");
        if let ReplyBody::Final(f) = &mut noted {
            f.notes.push("denied by policy".into());
        }
        let f = Encoder::default().encode(&noted);
        assert_eq!(data(&f[1])["data"], r#"note:{"text":"denied by policy"}"#);
        assert!(data(&f[2])["data"].as_str().unwrap().starts_with("usage:"));
    }

    #[test]
    fn tools_are_status_tokens_with_json() {
        let mut e = Encoder::default();
        let c = e.encode(&ReplyBody::ToolCall {
            call_id: "c1".into(),
            tool: "bash".into(),
            args: json!({"command": "ls"}),
            parent_call_id: None,
            truncated: false,
        });
        let s = data(&c[0])["data"].as_str().unwrap().to_string();
        let detail: Value = serde_json::from_str(s.strip_prefix("tool_use:").unwrap()).unwrap();
        assert_eq!(
            detail,
            json!({"id": "c1", "name": "bash", "input": {"command": "ls"}})
        );
        let r = e.encode(&ReplyBody::ToolResult {
            call_id: "c1".into(),
            tool: "bash".into(),
            success: true,
            result: "a\nb".into(),
            truncated: false,
            parent_call_id: None,
        });
        let s = data(&r[0])["data"].as_str().unwrap().to_string();
        assert!(s.starts_with("tool_result:{"));
    }

    #[test]
    fn permissions_and_questions_are_queries() {
        let mut e = Encoder::default();
        let q = e.encode(&ReplyBody::Permission {
            request_id: "per_1".into(),
            permission: "bash".into(),
            patterns: vec!["ls".into()],
            tool: None,
            call_id: None,
            description: "run ls".into(),
            reply_subject: "opencode.permission.reply.per_1".into(),
        });
        let q = data(&q[0]);
        assert_eq!(q["type"], "query");
        assert_eq!(q["data"]["id"], "per_1");
        assert_eq!(
            q["data"]["reply_subject"],
            "opencode.permission.reply.per_1"
        );
        assert!(q["data"]["prompt"]
            .as_str()
            .unwrap()
            .contains("`bash` (ls)"));
        let q = e.encode(&ReplyBody::Question {
            request_id: "que_1".into(),
            questions: json!([{"question": "Which?", "options": [{"label": "a"}, {"label": "b"}]}]),
            call_id: None,
            reply_subject: "opencode.question.reply.que_1".into(),
        });
        assert_eq!(data(&q[0])["data"]["prompt"], "Which? (a / b)");
    }

    #[test]
    fn errors_carry_a_status_code_and_a_json_body() {
        let c = Encoder::default().encode(&ReplyBody::error(
            ErrorCode::SessionBusy,
            "busy\nsecond line".to_string(),
        ));
        let Chunk::Error {
            code,
            description,
            body,
        } = &c[0]
        else {
            panic!("not an error")
        };
        assert_eq!(*code, 409);
        assert_eq!(description, "busy");
        let body: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(body["error"], "session_busy");
        assert_eq!(body["message"], "busy\nsecond line");
        for code in ErrorCode::ALL {
            assert!([400, 403, 409, 429, 500].contains(&status_code(code)));
        }
    }
}
