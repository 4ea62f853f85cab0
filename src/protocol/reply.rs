//! Replies: one JSON object per NATS message, in a fixed vocabulary.

use crate::jsonscan::next_special;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The reply vocabulary. `Final` and `Error` are terminal: exactly one of
/// them ends every turn and nothing follows it. The one definition of the
/// contract: the bridge writes it, the CLI and the tests read it back
/// ([`ReplyOwned`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ReplyBody {
    /// Answer text to append.
    Delta { content: String, part_id: String },
    /// Reasoning text to append (shown dimmed by chat front-ends).
    Reasoning { content: String, part_id: String },
    /// A tool call; exactly one per `call_id`.
    ToolCall {
        call_id: String,
        tool: String,
        args: Value,
        /// Set for a call made inside a subagent (child) session: the
        /// `call_id` of the parent's `task` call that started it.
        #[serde(skip_serializing_if = "Option::is_none")]
        parent_call_id: Option<String>,
        /// The arguments' longest strings were cut to fit
        /// `limits.max_tool_result_bytes` (a 1.5 MB `write`, say).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        truncated: bool,
    },
    /// The outcome of a tool call; exactly one per `call_id`, after its call.
    ToolResult {
        call_id: String,
        tool: String,
        success: bool,
        result: String,
        /// The result was cut at `limits.max_tool_result_bytes`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        truncated: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        parent_call_id: Option<String>,
    },
    /// Extension kind, only for `interactive` prompts: OpenCode asks for a
    /// permission; answer on `reply_subject`.
    Permission {
        request_id: String,
        permission: String,
        patterns: Vec<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        tool: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        call_id: Option<String>,
        description: String,
        reply_subject: String,
    },
    /// Extension kind, only for `interactive` prompts: the agent asks the
    /// user questions; answer on `reply_subject`.
    Question {
        request_id: String,
        questions: Value,
        #[serde(skip_serializing_if = "Option::is_none")]
        call_id: Option<String>,
        reply_subject: String,
    },
    /// Extension kind, only for prompts with `"progress": true`: what the
    /// turn is waiting on. `event` is `provider_retry`: the model provider
    /// failed and OpenCode retries it (`attempt` from 1, OpenCode's
    /// `reason`); at attempt `retry_limit` the bridge ends the turn with a
    /// `provider_error` (`retry_limit` 0: it waits for OpenCode to give up).
    Status {
        event: StatusEvent,
        attempt: u64,
        reason: String,
        retry_limit: u32,
    },
    /// The authoritative end of a successful turn.
    Final(Box<FinalReply>),
    /// The end of a failed turn.
    Error {
        error: String,
        code: ErrorCode,
        retryable: bool,
    },
}

impl ReplyBody {
    /// The `kind` field's value (also the `Reply-Kind` header).
    pub fn kind(&self) -> &'static str {
        match self {
            ReplyBody::Delta { .. } => "delta",
            ReplyBody::Reasoning { .. } => "reasoning",
            ReplyBody::ToolCall { .. } => "tool_call",
            ReplyBody::ToolResult { .. } => "tool_result",
            ReplyBody::Permission { .. } => "permission",
            ReplyBody::Question { .. } => "question",
            ReplyBody::Status { .. } => "status",
            ReplyBody::Final(_) => "final",
            ReplyBody::Error { .. } => "error",
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(self, ReplyBody::Final(_) | ReplyBody::Error { .. })
    }

    pub fn error(code: ErrorCode, error: impl Into<String>) -> Self {
        ReplyBody::Error {
            error: error.into(),
            code,
            retryable: code.retryable(),
        }
    }
}

/// What a `status` reply is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatusEvent {
    /// The model provider failed and OpenCode retries the call.
    ProviderRetry,
}

/// The body of a `final` reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct FinalReply {
    /// The full text of the assistant's answer to this prompt, read from
    /// OpenCode's message history once the turn was over.
    pub content: String,
    /// `provider/model` that actually answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The agent that answered (e.g. `build`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    pub usage: Usage,
    pub cost: f64,
    pub duration_ms: u64,
    /// Why the model stopped (`stop`, `length`, ...), as OpenCode reports it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finish: Option<String>,
    /// Notes about decisions the bridge took during the turn (for example a
    /// permission request it rejected by policy).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// The conversation's OpenCode session was gone and a new one was made
    /// for this prompt (earlier context is lost).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub session_recreated: bool,
    /// `content` was cut to fit the payload limit (the deltas are whole).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub content_truncated: bool,
    /// With `content_truncated`, when the daemon has JetStream: the NATS
    /// object store object that holds the whole `content` (UTF-8 text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_object: Option<Box<ContentObject>>,
    /// The named workspace the turn worked in (`[workspaces]`; absent for
    /// the tenant's own directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
}

/// Where the whole text of a cut `final` is: an object in a NATS object
/// store bucket (kept `[cluster] turn_ttl`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentObject {
    pub bucket: String,
    pub name: String,
}

/// Token counts summed over the turn's assistant messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Usage {
    pub input: u64,
    pub output: u64,
    pub reasoning: u64,
    pub cache_read: u64,
    pub cache_write: u64,
}

/// Stable error codes (snake_case on the wire). Documented in docs/PROTOCOL.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The prompt itself is unusable; resending it unchanged fails again.
    BadRequest,
    /// The conversation already has a turn running and its queue is full.
    SessionBusy,
    /// OpenCode could not be reached (connection refused, reset, stream down).
    OpencodeUnavailable,
    /// OpenCode answered with something unexpected (a 4xx/5xx, bad JSON).
    OpencodeError,
    /// The model provider failed (auth, rate limit, overload).
    ProviderError,
    /// A deadline fired (first event, idle, whole turn).
    Timeout,
    /// The turn was aborted.
    Aborted,
    /// The daemon is shutting down and the turn could not finish in the grace.
    ShuttingDown,
    /// The daemon has too many turns in flight.
    Overloaded,
    /// The caller may not do this: another tenant's conversation, session or
    /// reply space, a tool, agent or model the policy keeps closed.
    Forbidden,
    /// A bug in the bridge.
    Internal,
    /// A durable job was delivered `[jetstream] max_deliver` times and
    /// never ran to its end (OpenCode unavailable each time, or daemons
    /// stopping under it); it is removed from the stream.
    Undeliverable,
}

impl ErrorCode {
    /// Every code (metrics show each one, even at 0).
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::BadRequest,
        ErrorCode::SessionBusy,
        ErrorCode::OpencodeUnavailable,
        ErrorCode::OpencodeError,
        ErrorCode::ProviderError,
        ErrorCode::Timeout,
        ErrorCode::Aborted,
        ErrorCode::ShuttingDown,
        ErrorCode::Overloaded,
        ErrorCode::Forbidden,
        ErrorCode::Internal,
        ErrorCode::Undeliverable,
    ];

    /// Whether the same prompt, sent again later, can succeed. Specific
    /// errors may override this (a provider auth error is not retryable).
    pub fn retryable(self) -> bool {
        match self {
            ErrorCode::BadRequest
            | ErrorCode::Internal
            | ErrorCode::Aborted
            | ErrorCode::Forbidden
            | ErrorCode::Undeliverable => false,
            ErrorCode::SessionBusy
            | ErrorCode::OpencodeUnavailable
            | ErrorCode::OpencodeError
            | ErrorCode::ProviderError
            | ErrorCode::Timeout
            | ErrorCode::ShuttingDown
            | ErrorCode::Overloaded => true,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::SessionBusy => "session_busy",
            ErrorCode::OpencodeUnavailable => "opencode_unavailable",
            ErrorCode::OpencodeError => "opencode_error",
            ErrorCode::ProviderError => "provider_error",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Aborted => "aborted",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Internal => "internal",
            ErrorCode::Undeliverable => "undeliverable",
        }
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char
/// boundary.
pub fn floor_char_boundary(s: &str, max: usize) -> usize {
    if max >= s.len() {
        return s.len();
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    cut
}

/// A reply as it goes on the wire: the body stamped with the turn's identity.
#[derive(Debug, Clone, Serialize)]
pub struct Reply<'a> {
    pub trace_id: &'a str,
    pub seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conversation: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<&'a str>,
    #[serde(flatten)]
    pub body: &'a ReplyBody,
}

impl Reply<'_> {
    pub fn to_json(&self) -> Vec<u8> {
        match self.body {
            // The hot path: written directly, byte for byte what serde
            // writes below (tested), without the flatten's map serialiser.
            ReplyBody::Delta { content, part_id } => self.text_json("delta", content, part_id),
            ReplyBody::Reasoning { content, part_id } => {
                self.text_json("reasoning", content, part_id)
            }
            // Serialising these plain structs cannot fail (no maps with
            // non-string keys, no failing Serialize impls).
            _ => serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec()),
        }
    }

    fn text_json(&self, kind: &str, content: &str, part_id: &str) -> Vec<u8> {
        let strings = [
            Some(self.trace_id),
            self.conversation,
            self.session_id,
            Some(content),
            Some(part_id),
        ];
        let len: usize = strings.iter().flatten().map(|s| s.len()).sum();
        let mut out = Vec::with_capacity(len + 128);
        out.extend_from_slice(b"{\"trace_id\":");
        push_json_str(&mut out, self.trace_id);
        out.extend_from_slice(b",\"seq\":");
        push_u64(&mut out, self.seq);
        if let Some(c) = self.conversation {
            out.extend_from_slice(b",\"conversation\":");
            push_json_str(&mut out, c);
        }
        if let Some(s) = self.session_id {
            out.extend_from_slice(b",\"session_id\":");
            push_json_str(&mut out, s);
        }
        out.extend_from_slice(b",\"kind\":\"");
        out.extend_from_slice(kind.as_bytes());
        out.extend_from_slice(b"\",\"content\":");
        push_json_str(&mut out, content);
        out.extend_from_slice(b",\"part_id\":");
        push_json_str(&mut out, part_id);
        out.push(b'}');
        out
    }
}

/// A reply as it is read off the wire: [`Reply`] with owned fields, the same
/// JSON both ways (tested for every kind). Fields it does not know are
/// ignored, so a reader keeps up with additions to the contract.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplyOwned {
    pub trace_id: String,
    pub seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(flatten)]
    pub body: ReplyBody,
}

impl ReplyOwned {
    /// Reads one reply's payload.
    pub fn from_json(bytes: &[u8]) -> serde_json::Result<Self> {
        serde_json::from_slice(bytes)
    }

    /// The borrowed form the bridge writes.
    pub fn as_reply(&self) -> Reply<'_> {
        Reply {
            trace_id: &self.trace_id,
            seq: self.seq,
            conversation: self.conversation.as_deref(),
            session_id: self.session_id.as_deref(),
            body: &self.body,
        }
    }
}

/// Decimal digits, without the allocation of `to_string`.
fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// A JSON string exactly as serde_json writes one: `"` and `\` escaped,
/// control characters as `\b \t \n \f \r` or `\u00xx`, the rest verbatim.
fn push_json_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.push(b'"');
    let mut start = 0;
    while let Some(p) = next_special(bytes, start) {
        out.extend_from_slice(&bytes[start..p]);
        match bytes[p] {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]),
        }
        start = p + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Splits `content` into pieces of at most `max` bytes on UTF-8 boundaries
/// (used to keep every reply under the server's `max_payload`).
pub fn split_utf8(content: &str, max: usize) -> Vec<&str> {
    let max = max.max(4);
    let mut out = Vec::new();
    let mut rest = content;
    while rest.len() > max {
        let cut = floor_char_boundary(rest, max);
        out.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    out.push(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn wire_shape_of_each_kind() {
        let d = ReplyBody::Delta {
            content: "Hi".into(),
            part_id: "prt_1".into(),
        };
        let r = Reply {
            trace_id: "t1",
            seq: 3,
            conversation: Some("slack.C1"),
            session_id: Some("ses_1"),
            body: &d,
        };
        let v: Value = serde_json::from_slice(&r.to_json()).unwrap();
        assert_eq!(
            v,
            json!({"kind":"delta","trace_id":"t1","seq":3,"conversation":"slack.C1",
                   "session_id":"ses_1","content":"Hi","part_id":"prt_1"})
        );
        let e = ReplyBody::error(ErrorCode::SessionBusy, "busy");
        let r = Reply {
            trace_id: "t1",
            seq: 0,
            conversation: None,
            session_id: None,
            body: &e,
        };
        let v: Value = serde_json::from_slice(&r.to_json()).unwrap();
        assert_eq!(
            v,
            json!({"kind":"error","trace_id":"t1","seq":0,"error":"busy","code":"session_busy","retryable":true})
        );
        let f = ReplyBody::Final(Box::new(FinalReply {
            content: "x".into(),
            model: Some("p/m".into()),
            ..Default::default()
        }));
        let v: Value = serde_json::from_slice(
            &Reply {
                trace_id: "t",
                seq: 1,
                conversation: None,
                session_id: None,
                body: &f,
            }
            .to_json(),
        )
        .unwrap();
        assert_eq!(v["kind"], "final");
        assert_eq!(v["usage"]["cache_read"], 0);
        assert_eq!(v["model"], "p/m");
        assert!(v.get("notes").is_none());
    }

    /// The hand-written `delta`/`reasoning` JSON is byte for byte serde's.
    #[test]
    fn text_replies_are_what_serde_writes() {
        let mut texts: Vec<String> = (0u8..0x80).map(|b| format!("a{}b", b as char)).collect();
        texts.extend(
            [
                "",
                "Hello ",
                "caf\u{e9} \u{20ac} \u{1f600}",
                "\"quoted\" \\ back\\slash\n\r\t",
                "\u{7f}\u{80}\u{2028}\u{2029}",
                "0123456789abcdef0123456789abcdef\"0123456789abcdef\u{1}",
            ]
            .map(String::from),
        );
        texts.push("x".repeat(100) + "\n" + &"\u{e9}".repeat(40));
        for (i, t) in texts.iter().enumerate() {
            for body in [
                ReplyBody::Delta {
                    content: t.clone(),
                    part_id: "prt_1".into(),
                },
                ReplyBody::Reasoning {
                    content: "r".into(),
                    part_id: t.clone(),
                },
            ] {
                for (conversation, session_id) in [(Some(t.as_str()), Some("ses_1")), (None, None)]
                {
                    let r = Reply {
                        trace_id: t,
                        seq: [0, 7, 10, 99, 12345, u64::MAX][i % 6],
                        conversation,
                        session_id,
                        body: &body,
                    };
                    assert_eq!(
                        String::from_utf8(r.to_json()).unwrap(),
                        serde_json::to_string(&r).unwrap()
                    );
                }
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn any_text_reply_is_what_serde_writes(content in "\\PC*|[\\x00-\\x7f]*", part in ".*", seq: u64) {
            let body = ReplyBody::Delta { content, part_id: part };
            let r = Reply { trace_id: "t", seq, conversation: Some("c.d"), session_id: None, body: &body };
            proptest::prop_assert_eq!(r.to_json(), serde_json::to_vec(&r).unwrap());
        }
    }

    #[test]
    fn error_codes_serialise_as_documented() {
        for code in ErrorCode::ALL {
            assert_eq!(serde_json::to_value(code).unwrap(), json!(code.as_str()));
            assert_eq!(
                serde_json::from_value::<ErrorCode>(json!(code.as_str())).unwrap(),
                code
            );
        }
        assert!(serde_json::from_value::<ErrorCode>(json!("no_such_code")).is_err());
    }

    /// Which kind a body is, as a number: a new kind fails to compile here
    /// until the round-trip tests cover it.
    fn kind_index(body: &ReplyBody) -> usize {
        match body {
            ReplyBody::Delta { .. } => 0,
            ReplyBody::Reasoning { .. } => 1,
            ReplyBody::ToolCall { .. } => 2,
            ReplyBody::ToolResult { .. } => 3,
            ReplyBody::Permission { .. } => 4,
            ReplyBody::Question { .. } => 5,
            ReplyBody::Status { .. } => 6,
            ReplyBody::Final(_) => 7,
            ReplyBody::Error { .. } => 8,
        }
    }
    const KINDS: usize = 9;

    /// One body of every kind, with its optional fields set, and where a
    /// kind has some, once more with them unset.
    fn every_kind() -> Vec<ReplyBody> {
        let s = |t: &str| t.to_string();
        vec![
            ReplyBody::Delta {
                content: s("Hel\"lo\n"),
                part_id: s("prt_1"),
            },
            ReplyBody::Reasoning {
                content: s("Thinking \u{e9}"),
                part_id: s("prt_2"),
            },
            ReplyBody::ToolCall {
                call_id: s("call_1"),
                tool: s("bash"),
                args: json!({"command": "ls", "n": [1, 2.5, null]}),
                parent_call_id: Some(s("call_0")),
                truncated: true,
            },
            ReplyBody::ToolCall {
                call_id: s("call_1"),
                tool: s("bash"),
                args: json!({}),
                parent_call_id: None,
                truncated: false,
            },
            ReplyBody::ToolResult {
                call_id: s("call_1"),
                tool: s("bash"),
                success: true,
                result: s("a\nb\n"),
                truncated: true,
                parent_call_id: Some(s("call_0")),
            },
            ReplyBody::ToolResult {
                call_id: s("call_1"),
                tool: s("bash"),
                success: false,
                result: s("tool failed"),
                truncated: false,
                parent_call_id: None,
            },
            ReplyBody::Permission {
                request_id: s("per_1"),
                permission: s("bash"),
                patterns: vec![s("rm *"), s("ls")],
                tool: Some(s("bash")),
                call_id: Some(s("call_2")),
                description: s("run rm"),
                reply_subject: s("opencode.answer.t1.per_1"),
            },
            ReplyBody::Permission {
                request_id: s("per_1"),
                permission: s("webfetch"),
                patterns: Vec::new(),
                tool: None,
                call_id: None,
                description: String::new(),
                reply_subject: s("opencode.answer.t1.per_1"),
            },
            ReplyBody::Question {
                request_id: s("que_1"),
                questions: json!([{"question": "Which?", "options": [{"label": "a"}]}]),
                call_id: Some(s("call_3")),
                reply_subject: s("opencode.answer.t1.que_1"),
            },
            ReplyBody::Question {
                request_id: s("que_1"),
                questions: json!([]),
                call_id: None,
                reply_subject: s("opencode.answer.t1.que_1"),
            },
            ReplyBody::Status {
                event: StatusEvent::ProviderRetry,
                attempt: 2,
                reason: s("Internal Server Error"),
                retry_limit: 3,
            },
            ReplyBody::Final(Box::new(FinalReply {
                content: s("Hello world"),
                model: Some(s("p/m")),
                agent: Some(s("build")),
                usage: Usage {
                    input: 1,
                    output: 2,
                    reasoning: 3,
                    cache_read: 4,
                    cache_write: 5,
                },
                cost: 0.0125,
                duration_ms: 1500,
                finish: Some(s("stop")),
                notes: vec![s("a permission was rejected")],
                session_recreated: true,
                content_truncated: true,
                content_object: Some(Box::new(ContentObject {
                    bucket: s("opencode_bridge_finals"),
                    name: s("t1"),
                })),
                workspace: Some(s("repo")),
            })),
            ReplyBody::Final(Box::default()),
            ReplyBody::error(ErrorCode::Timeout, "late"),
            ReplyBody::Error {
                error: s("auth"),
                code: ErrorCode::ProviderError,
                retryable: false,
            },
        ]
    }

    /// Writes `body` as the bridge does and reads it back; the same value
    /// and the same JSON again.
    fn round_trip(body: &ReplyBody, conversation: Option<&str>, session_id: Option<&str>) {
        let r = Reply {
            trace_id: "t1",
            seq: 7,
            conversation,
            session_id,
            body,
        };
        let wire = r.to_json();
        let back = ReplyOwned::from_json(&wire)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&wire)));
        assert_eq!(&back.body, body);
        assert_eq!(back.body.kind(), body.kind());
        assert_eq!(
            (back.trace_id.as_str(), back.seq),
            (r.trace_id, r.seq),
            "{back:?}"
        );
        assert_eq!(back.conversation.as_deref(), conversation);
        assert_eq!(back.session_id.as_deref(), session_id);
        assert_eq!(back.as_reply().to_json(), wire);
        assert_eq!(serde_json::to_vec(&back).unwrap(), wire);
    }

    #[test]
    fn every_kind_reads_back_as_written() {
        let bodies = every_kind();
        let mut seen = [false; KINDS];
        for body in &bodies {
            seen[kind_index(body)] = true;
            round_trip(body, Some("slack.C1"), Some("ses_1"));
            round_trip(body, None, None);
        }
        assert_eq!(seen, [true; KINDS], "every kind is covered");
    }

    #[test]
    fn a_reply_missing_a_field_does_not_read() {
        for bad in [
            json!({"trace_id": "t", "seq": 0, "kind": "delta", "content": "x"}),
            json!({"trace_id": "t", "seq": 0, "kind": "nope"}),
            json!({"seq": 0, "kind": "error", "error": "x", "code": "timeout", "retryable": true}),
            json!({"trace_id": "t", "seq": 0, "kind": "final", "content": "x"}),
            json!({"trace_id": "t", "seq": 0, "kind": "status", "event": "later", "attempt": 1, "reason": "", "retry_limit": 0}),
        ] {
            assert!(
                ReplyOwned::from_json(bad.to_string().as_bytes()).is_err(),
                "{bad}"
            );
        }
        // Fields the reader does not know are ignored.
        let newer = json!({"trace_id": "t", "seq": 0, "kind": "delta", "content": "x",
                           "part_id": "p", "since": "v2"});
        assert!(ReplyOwned::from_json(newer.to_string().as_bytes()).is_ok());
    }

    mod arbitrary {
        use super::super::*;
        use proptest::prelude::*;
        use proptest::strategy::BoxedStrategy;
        use serde_json::json;

        fn text() -> BoxedStrategy<String> {
            "\\PC{0,12}|[\\x00-\\x7f]{0,8}".boxed()
        }

        fn opt() -> BoxedStrategy<Option<String>> {
            proptest::option::of(text()).boxed()
        }

        fn final_reply() -> impl Strategy<Value = FinalReply> {
            (
                (text(), opt(), opt(), opt()),
                proptest::array::uniform5(any::<u64>()),
                (0u32..1 << 20, any::<u64>()),
                (
                    proptest::collection::vec(text(), 0..3),
                    any::<bool>(),
                    any::<bool>(),
                ),
            )
                .prop_map(
                    |((content, model, agent, finish), u, (cost, duration_ms), (notes, r, t))| {
                        FinalReply {
                            content,
                            model,
                            agent,
                            usage: Usage {
                                input: u[0],
                                output: u[1],
                                reasoning: u[2],
                                cache_read: u[3],
                                cache_write: u[4],
                            },
                            // Dyadic fractions: exact in decimal, so the
                            // float reads back bit for bit.
                            cost: f64::from(cost) / 64.0,
                            duration_ms,
                            finish,
                            notes,
                            session_recreated: r,
                            content_truncated: t,
                            content_object: t.then(|| {
                                Box::new(ContentObject {
                                    bucket: "opencode_bridge_finals".into(),
                                    name: "t".into(),
                                })
                            }),
                            workspace: None,
                        }
                    },
                )
        }

        pub fn body() -> impl Strategy<Value = ReplyBody> {
            prop_oneof![
                (text(), text())
                    .prop_map(|(content, part_id)| ReplyBody::Delta { content, part_id }),
                (text(), text())
                    .prop_map(|(content, part_id)| ReplyBody::Reasoning { content, part_id }),
                (text(), text(), text(), opt(), any::<bool>()).prop_map(
                    |(call_id, tool, arg, parent_call_id, truncated)| ReplyBody::ToolCall {
                        call_id,
                        tool,
                        args: json!({ "command": arg }),
                        parent_call_id,
                        truncated,
                    }
                ),
                (text(), text(), any::<bool>(), text(), any::<bool>(), opt()).prop_map(
                    |(call_id, tool, success, result, truncated, parent_call_id)| {
                        ReplyBody::ToolResult {
                            call_id,
                            tool,
                            success,
                            result,
                            truncated,
                            parent_call_id,
                        }
                    }
                ),
                (
                    (text(), text(), proptest::collection::vec(text(), 0..3)),
                    (opt(), opt(), text(), text())
                )
                    .prop_map(
                        |(
                            (request_id, permission, patterns),
                            (tool, call_id, description, reply_subject),
                        )| {
                            ReplyBody::Permission {
                                request_id,
                                permission,
                                patterns,
                                tool,
                                call_id,
                                description,
                                reply_subject,
                            }
                        }
                    ),
                (text(), text(), opt(), text()).prop_map(
                    |(request_id, q, call_id, reply_subject)| ReplyBody::Question {
                        request_id,
                        questions: json!([{ "question": q }]),
                        call_id,
                        reply_subject,
                    }
                ),
                (any::<u64>(), text(), any::<u32>()).prop_map(|(attempt, reason, retry_limit)| {
                    ReplyBody::Status {
                        event: StatusEvent::ProviderRetry,
                        attempt,
                        reason,
                        retry_limit,
                    }
                }),
                final_reply().prop_map(|f| ReplyBody::Final(Box::new(f))),
                (0..ErrorCode::ALL.len(), text(), any::<bool>()).prop_map(
                    |(i, error, retryable)| ReplyBody::Error {
                        error,
                        code: ErrorCode::ALL[i],
                        retryable,
                    }
                ),
            ]
        }
    }

    proptest::proptest! {
        /// Any reply of any kind reads back as the value it was written from.
        #[test]
        fn any_reply_reads_back_as_written(
            body in arbitrary::body(),
            conversation in proptest::option::of("[a-z.]{1,8}"),
            session_id in proptest::option::of("ses_[a-z0-9]{1,8}"),
        ) {
            round_trip(&body, conversation.as_deref(), session_id.as_deref());
        }
    }

    #[test]
    fn split_on_char_boundaries() {
        let s = "aé€😀".repeat(100);
        for max in [4, 5, 7, 64] {
            let parts = split_utf8(&s, max);
            assert!(parts.iter().all(|p| p.len() <= max && !p.is_empty()));
            assert_eq!(parts.concat(), s);
        }
        assert_eq!(split_utf8("", 10), vec![""]);
    }
}
