//! Conversation controls: what chat users ask besides prompts (`new`,
//! `undo`, `redo`, `compact`, `diff`, `fork`, `history`, `list`, `info`, `commands`), as typed commands parsed from the subject and the payload.
//!
//! `<base>.<op>` is the operator's, `<base>.<tenant>.<op>` a tenant's; the
//! payload is a JSON object naming the conversation as replies show it
//! (`{"conversation": "slack.C042"}`). Every request gets one JSON answer:
//! `{"ok": true, ...}` or [`refusal`] (docs/PROTOCOL.md, "Conversation
//! controls").

use serde::Deserialize;
use serde_json::{json, Value};

use super::caller::Caller;
use super::reply::ErrorCode;
use super::subject::{validate_subject, validate_token};
use super::tenant::tail;

/// One control operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlOp {
    New,
    Undo,
    Redo,
    Compact,
    Diff,
    Fork,
    History,
    List,
    Info,
    Commands,
}

impl ControlOp {
    /// Every op, in the order the docs list them.
    pub const ALL: [ControlOp; 10] = [
        ControlOp::New,
        ControlOp::Undo,
        ControlOp::Redo,
        ControlOp::Compact,
        ControlOp::Diff,
        ControlOp::Fork,
        ControlOp::History,
        ControlOp::List,
        ControlOp::Info,
        ControlOp::Commands,
    ];

    /// The op a subject token names.
    pub fn from_token(token: &str) -> Option<ControlOp> {
        Self::ALL.into_iter().find(|op| op.as_str() == token)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ControlOp::New => "new",
            ControlOp::Undo => "undo",
            ControlOp::Redo => "redo",
            ControlOp::Compact => "compact",
            ControlOp::Diff => "diff",
            ControlOp::Fork => "fork",
            ControlOp::History => "history",
            ControlOp::List => "list",
            ControlOp::Info => "info",
            ControlOp::Commands => "commands",
        }
    }

    /// Whether it changes the conversation: refused (`session_busy`) while
    /// a turn runs or waits, and holds the conversation while it acts.
    pub fn changes_conversation(self) -> bool {
        matches!(
            self,
            ControlOp::New
                | ControlOp::Undo
                | ControlOp::Redo
                | ControlOp::Compact
                | ControlOp::Fork
        )
    }

    /// Whether it names one conversation (and so runs at its home).
    pub fn needs_conversation(self) -> bool {
        !matches!(self, ControlOp::List | ControlOp::Commands)
    }
}

/// What a prompt does when its conversation is busy (`"when_busy"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WhenBusy {
    /// Wait in the conversation's FIFO (the default).
    #[default]
    Queue,
    /// Abort the running turn (it ends `aborted`, `reason: "superseded"`)
    /// and run this one next, ahead of any queued.
    Steer,
    /// `session_busy` at once; nothing is queued.
    Reject,
}

impl WhenBusy {
    /// The `when_busy` field of a JSON prompt.
    pub fn parse(v: Option<Value>) -> Result<WhenBusy, String> {
        match v {
            None | Some(Value::Null) => Ok(WhenBusy::Queue),
            Some(Value::String(s)) => match s.as_str() {
                "queue" => Ok(WhenBusy::Queue),
                "steer" => Ok(WhenBusy::Steer),
                "reject" => Ok(WhenBusy::Reject),
                other => Err(format!(
                    "`when_busy` must be \"queue\", \"steer\" or \"reject\", got {other:?}"
                )),
            },
            Some(_) => Err("`when_busy` must be a string".into()),
        }
    }
}

/// An OpenCode command a prompt runs instead of text (`"command": {"name",
/// "arguments"}`): `POST /session/{id}/command`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandRef {
    pub name: String,
    pub arguments: String,
}

impl CommandRef {
    /// The `command` field of a JSON prompt.
    pub fn parse(v: Option<Value>) -> Result<Option<CommandRef>, String> {
        let obj = match v {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Object(o)) => o,
            Some(_) => return Err("`command` must be an object {\"name\", \"arguments\"}".into()),
        };
        let name = match obj.get("name") {
            Some(Value::String(n)) => n.trim_start_matches('/').to_string(),
            _ => return Err("`command.name` must be a string".into()),
        };
        let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ':' | '.');
        if name.is_empty() || name.len() > 128 || !name.chars().all(ok) {
            return Err(format!(
                "`command.name` {name:?} must be 1-128 letters, digits, `-`, `_`, `:` or `.`"
            ));
        }
        let arguments = match obj.get("arguments") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(a)) => a.clone(),
            Some(_) => return Err("`command.arguments` must be a string".into()),
        };
        // OpenCode puts the arguments into the command's template, then runs
        // every !`...` in it as shell (no permission asked) and reads every
        // @path into the prompt: from a tenant, either would step around the
        // permission policy.
        if let Some(c) = arguments.chars().find(|c| matches!(c, '`' | '@')) {
            return Err(format!(
                "`command.arguments` may not contain {c:?}: OpenCode would run !`...` as shell and read @files without asking"
            ));
        }
        Ok(Some(CommandRef { name, arguments }))
    }

    /// The text the turn stands for (logs, the `text` of a command prompt).
    pub fn text(&self) -> String {
        format!("/{} {}", self.name, self.arguments)
            .trim_end()
            .to_string()
    }
}

/// A control message classified by its subject: who sent it and which op
/// it asks for (`Err`: the op token, unknown).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlRoute {
    pub caller: Caller,
    pub op: Result<ControlOp, String>,
}

/// Classifies `subject` under the control base: `<base>.<op>` is the
/// operator's, `<base>.<tenant>.<op>` a tenant's; anything else is `None`.
pub fn control_route(base: &str, subject: &str) -> Option<ControlRoute> {
    let rest = tail(base, subject)??;
    let mut tokens = rest.split('.');
    let (first, second, more) = (tokens.next()?, tokens.next(), tokens.next());
    let op = |t: &str| ControlOp::from_token(t).ok_or_else(|| t.to_string());
    match (second, more) {
        (None, _) => Some(ControlRoute {
            caller: Caller::Operator,
            op: op(first),
        }),
        (Some(o), None) if validate_token(first).is_ok() => Some(ControlRoute {
            caller: Caller::Tenant(first.to_string()),
            op: op(o),
        }),
        _ => None,
    }
}

/// A parsed control request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlRequest {
    pub op: ControlOp,
    /// The conversation (required by every op but `list` and `commands`).
    pub conversation: Option<String>,
    /// `new`: abort a running turn (and drop the queued ones) first.
    pub abort: bool,
    /// `fork`: the new conversation's key (under the caller's namespace);
    /// generated when absent.
    pub to: Option<String>,
    /// `fork`: the last message the fork keeps (`msg_...`); `diff`: the
    /// turn whose changes to show. Absent: the whole conversation.
    pub message: Option<String>,
    /// `history`: turns before this user message id (the `next` of the
    /// previous page).
    pub before: Option<String>,
    /// `list`: conversations after this key (the `next` of the previous
    /// page).
    pub after: Option<String>,
    /// Page size (capped by the operator's bound).
    pub limit: Option<usize>,
}

/// Why a control request is refused, before anything is looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlRefusal {
    pub code: ErrorCode,
    pub reason: String,
}

impl ControlRefusal {
    fn bad(reason: impl Into<String>) -> Self {
        ControlRefusal {
            code: ErrorCode::BadRequest,
            reason: reason.into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    conversation: Option<String>,
    #[serde(default)]
    abort: bool,
    to: Option<String>,
    message: Option<String>,
    before: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

/// Parses the payload of `op` from `caller`. An empty payload is `{}`.
/// A conversation outside the caller's namespace is `forbidden`.
pub fn parse_control(
    op: ControlOp,
    caller: &Caller,
    payload: &[u8],
) -> Result<ControlRequest, ControlRefusal> {
    let blank = payload.iter().all(u8::is_ascii_whitespace);
    let raw: Raw = if blank {
        serde_json::from_str("{}").expect("an empty object parses")
    } else {
        serde_json::from_slice(payload)
            .map_err(|e| ControlRefusal::bad(format!("a control request is a JSON object: {e}")))?
    };
    let conversation = key(caller, "conversation", raw.conversation)?;
    if op.needs_conversation() && conversation.is_none() {
        return Err(ControlRefusal::bad(format!(
            "`{}` needs `conversation`",
            op.as_str()
        )));
    }
    let to = key(caller, "to", raw.to)?;
    if let Some(a) = &raw.after {
        validate_subject(a).map_err(|e| ControlRefusal::bad(format!("`after` {a:?} {e}")))?;
    }
    for (field, v) in [("message", &raw.message), ("before", &raw.before)] {
        if let Some(v) = v {
            validate_token(v).map_err(|e| ControlRefusal::bad(format!("`{field}` {v:?} {e}")))?;
        }
    }
    if let Some(m) = &raw.message {
        if !m.starts_with("msg") {
            return Err(ControlRefusal::bad(format!(
                "`message` {m:?} is not an OpenCode message id (msg_...)"
            )));
        }
    }
    if raw.limit == Some(0) {
        return Err(ControlRefusal::bad("`limit` must be at least 1"));
    }
    Ok(ControlRequest {
        op,
        conversation,
        abort: raw.abort,
        to,
        message: raw.message,
        before: raw.before,
        after: raw.after,
        limit: raw.limit,
    })
}

/// A conversation key from the payload: subject-safe, and the caller's.
fn key(caller: &Caller, field: &str, v: Option<String>) -> Result<Option<String>, ControlRefusal> {
    let Some(c) = v else { return Ok(None) };
    validate_subject(&c).map_err(|e| ControlRefusal::bad(format!("`{field}` {c:?} {e}")))?;
    if !caller.owns_conversation(&c) {
        return Err(ControlRefusal {
            code: ErrorCode::Forbidden,
            reason: format!(
                "conversation {c:?} is not in the namespace of {caller} (it must be {t:?} or start with \"{t}.\")",
                t = caller.tenant().unwrap_or_default()
            ),
        });
    }
    Ok(Some(c))
}

/// The one answer to a refused control request.
pub fn refusal(code: ErrorCode, reason: &str) -> Value {
    json!({"ok": false, "code": code.as_str(), "error": reason, "retryable": code.retryable()})
}

/// Cuts each patch so that all of them fit in `budget` bytes (on a char
/// boundary); whether anything was cut.
pub fn cut_patches(patches: &mut [String], budget: usize) -> bool {
    let mut left = budget;
    let mut cut = false;
    for p in patches.iter_mut() {
        if p.len() <= left {
            left -= p.len();
            continue;
        }
        let mut end = left;
        while !p.is_char_boundary(end) {
            end -= 1;
        }
        p.truncate(end);
        left -= end;
        cut = true;
    }
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(t: &str) -> Caller {
        Caller::Tenant(t.into())
    }

    #[test]
    fn routes_operator_and_tenant_ops() {
        let r = control_route("opencode.control", "opencode.control.undo").unwrap();
        assert_eq!((r.caller, r.op), (Caller::Operator, Ok(ControlOp::Undo)));
        let r = control_route("opencode.control", "opencode.control.slack.history").unwrap();
        assert_eq!((r.caller, r.op), (tenant("slack"), Ok(ControlOp::History)));
        let r = control_route("opencode.control", "opencode.control.slack.nope").unwrap();
        assert_eq!(r.op, Err("nope".to_string()));
        assert_eq!(control_route("opencode.control", "opencode.control"), None);
        assert_eq!(
            control_route("opencode.control", "opencode.control.a.b.c"),
            None
        );
        assert_eq!(control_route("opencode.control", "opencode.prompt.a"), None);
    }

    #[test]
    fn a_tenant_reaches_only_its_own_conversations() {
        let ok = parse_control(ControlOp::Undo, &tenant("a"), br#"{"conversation":"a.c1"}"#);
        assert_eq!(ok.unwrap().conversation.as_deref(), Some("a.c1"));
        for payload in [
            r#"{"conversation":"b.c1"}"#,
            r#"{"conversation":"ab"}"#,
            r#"{"conversation":"a.c1","to":"b.x"}"#,
        ] {
            let e = parse_control(ControlOp::Fork, &tenant("a"), payload.as_bytes()).unwrap_err();
            assert_eq!(e.code, ErrorCode::Forbidden, "{payload}");
        }
        // The operator reaches any.
        assert!(parse_control(
            ControlOp::Undo,
            &Caller::Operator,
            br#"{"conversation":"b.c1"}"#
        )
        .is_ok());
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let bad = |op, p: &str| parse_control(op, &Caller::Operator, p.as_bytes()).unwrap_err();
        assert!(bad(ControlOp::Undo, "")
            .reason
            .contains("needs `conversation`"));
        assert!(bad(ControlOp::Undo, "nope").reason.contains("JSON object"));
        assert!(bad(ControlOp::Undo, r#"{"conversation":"a.*"}"#)
            .reason
            .contains("wildcard"));
        assert!(
            bad(ControlOp::Fork, r#"{"conversation":"a","message":"x1"}"#)
                .reason
                .contains("msg_")
        );
        assert!(bad(ControlOp::History, r#"{"conversation":"a","limit":0}"#)
            .reason
            .contains("limit"));
        assert!(bad(ControlOp::Info, r#"{"conversation":"a","typo":1}"#)
            .reason
            .contains("typo"));
        // `list` needs nothing.
        assert!(parse_control(ControlOp::List, &tenant("a"), b"").is_ok());
        assert!(parse_control(ControlOp::List, &tenant("a"), b" ").is_ok());
    }

    #[test]
    fn a_command_names_one_command() {
        let c = CommandRef::parse(Some(json!({"name": "/init", "arguments": "x y"})));
        let c = c.unwrap().unwrap();
        assert_eq!(
            (c.name.as_str(), c.text()),
            ("init", "/init x y".to_string())
        );
        assert_eq!(CommandRef::parse(None), Ok(None));
        for bad in [
            json!("init"),
            json!({"name": "a b"}),
            json!({"name": ""}),
            json!({"name": "x", "arguments": 1}),
            // Shell and file references OpenCode would expand unasked.
            json!({"name": "init", "arguments": "!`cat /proc/self/environ`"}),
            json!({"name": "init", "arguments": "see @/etc/passwd"}),
        ] {
            assert!(CommandRef::parse(Some(bad.clone())).is_err(), "{bad}");
        }
    }

    #[test]
    fn when_busy_is_one_of_three_words() {
        assert_eq!(WhenBusy::parse(None), Ok(WhenBusy::Queue));
        assert_eq!(WhenBusy::parse(Some(json!("steer"))), Ok(WhenBusy::Steer));
        assert_eq!(WhenBusy::parse(Some(json!("reject"))), Ok(WhenBusy::Reject));
        assert!(WhenBusy::parse(Some(json!("later")))
            .unwrap_err()
            .contains("later"));
        assert!(WhenBusy::parse(Some(json!(1))).is_err());
    }

    #[test]
    fn patches_are_cut_to_the_budget_on_char_boundaries() {
        let mut p = vec!["abc".to_string(), "déf".to_string(), "ghi".to_string()];
        assert!(cut_patches(&mut p, 5));
        assert_eq!(p, vec!["abc", "d", "g"]);
        let mut p = vec!["abc".to_string()];
        assert!(!cut_patches(&mut p, 3));
    }
}
