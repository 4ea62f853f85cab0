//! [pure] Turn states (docs/PROTOCOL.md, "Turn states"): where a turn's
//! state is kept, who may read it, the request and the answer.
//!
//! Every accepted turn has a state in the KV bucket `[cluster]
//! turns_bucket` under a key made of its caller and trace id: `op.<trace>`
//! for the operator's turns, `t.<tenant>.<trace>` for a tenant's, each
//! part escaped to KV key rules. A tenant's request can only name its own
//! keys, so another tenant's trace reads exactly like an unknown one.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::caller::Caller;
use super::reply::ContentObject;
use super::subject::validate_token;
use super::tenant::tail;

/// A turn's state as stored and answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TurnState {
    /// Accepted, waiting behind its conversation's running turn.
    Queued,
    /// OpenCode is working on it.
    Running,
    /// Its terminal reply went out (`terminal`).
    Done,
    /// Never accepted, expired (`[cluster] turn_ttl`), or not the caller's.
    Unknown,
}

/// The answer to a turn state request (what the CLI and clients read).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TurnStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    pub state: TurnState,
    /// The terminal reply exactly as published (state `done`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminal: Option<Value>,
}

/// A turn state request: `{"trace_id": ...}`; the operator may add
/// `"tenant"` to read a tenant's turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusRequest {
    pub trace_id: String,
    /// Whose turn: the caller itself, or (operator only) a tenant.
    pub owner: Caller,
}

/// Who sent a request on `subject`: the bare `base` is the operator's,
/// `<base>.<tenant>` a tenant's; anything else (deeper, a bad token) is
/// nobody's.
pub fn requester(base: &str, subject: &str) -> Option<Caller> {
    match tail(base, subject)? {
        None => Some(Caller::Operator),
        Some(t) if validate_token(t).is_ok() => Some(Caller::Tenant(t.to_string())),
        Some(_) => None,
    }
}

/// Parses a request from `from`; the error is the answer's message.
pub fn parse_request(payload: &[u8], from: &Caller) -> Result<StatusRequest, String> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Raw {
        trace_id: String,
        #[serde(default)]
        tenant: Option<String>,
    }
    let raw: Raw = serde_json::from_slice(payload)
        .map_err(|e| format!("a turn state request is {{\"trace_id\": \"...\"}}: {e}"))?;
    super::subject::validate_trace_id(&raw.trace_id)?;
    let owner = match (from, raw.tenant) {
        (Caller::Operator, Some(t)) => {
            validate_token(&t).map_err(|e| format!("`tenant` {t:?} {e}"))?;
            Caller::Tenant(t)
        }
        (Caller::Tenant(_), Some(_)) => {
            return Err("`tenant` is for the operator; a tenant reads its own turns".into())
        }
        (c, None) => c.clone(),
    };
    Ok(StatusRequest {
        trace_id: raw.trace_id,
        owner,
    })
}

/// One string as a KV key part: letters, digits, `-` and `_` kept, every
/// other byte `=XX` (hex), so distinct strings stay distinct and the
/// result has no `.`, `*`, `>` or space.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(b as char);
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    out
}

/// The KV key of `owner`'s turn `trace_id`.
pub fn state_key(owner: &Caller, trace_id: &str) -> String {
    match owner {
        Caller::Operator => format!("op.{}", escape(trace_id)),
        Caller::Tenant(t) => format!("t.{}.{}", escape(t), escape(trace_id)),
    }
}

/// The object store bucket of `owner`'s large finals: `base` for the
/// operator, `<base>-<tenant>` for a tenant whose name is letters, digits
/// and `-`, else `<base>_<hex of the name>` (never the same for two
/// tenants), so NATS permissions can give each tenant its own bucket.
pub fn finals_bucket(base: &str, owner: &Caller) -> String {
    tenant_bucket(base, owner)
}

/// The bucket of `owner` among buckets named after `base` (large finals,
/// turn states): `base` for the operator, `<base>-<tenant>` or
/// `<base>_<hex>` for a tenant, as [`finals_bucket`] says.
pub fn tenant_bucket(base: &str, owner: &Caller) -> String {
    match owner {
        Caller::Operator => base.to_string(),
        Caller::Tenant(t) if t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') => {
            format!("{base}-{t}")
        }
        Caller::Tenant(t) => {
            let hex: String = t.bytes().map(|b| format!("{b:02x}")).collect();
            format!("{base}_{hex}")
        }
    }
}

/// Where the whole text of `owner`'s turn `trace_id` goes.
pub fn final_object(base: &str, owner: &Caller, trace_id: &str) -> ContentObject {
    ContentObject {
        bucket: finals_bucket(base, owner),
        name: escape(trace_id),
    }
}

/// The stored value (and the answer) for a state without a terminal reply.
pub fn state_doc(trace_id: &str, state: TurnState) -> Vec<u8> {
    serde_json::to_vec(&TurnStatus {
        trace_id: Some(trace_id.to_string()),
        state,
        terminal: None,
    })
    .unwrap_or_default()
}

/// The stored value (and the answer) once the terminal reply `terminal`
/// (its JSON, as published) went out: written around the bytes, not
/// parsed again.
pub fn done_doc(trace_id: &str, terminal: &[u8]) -> Vec<u8> {
    let id = serde_json::to_string(trace_id).unwrap_or_default();
    let mut out = Vec::with_capacity(terminal.len() + id.len() + 48);
    out.extend_from_slice(b"{\"trace_id\":");
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(b",\"state\":\"done\",\"terminal\":");
    out.extend_from_slice(terminal);
    out.push(b'}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(t: &str) -> Caller {
        Caller::Tenant(t.into())
    }

    #[test]
    fn requesters_by_subject() {
        let b = "opencode.turn.status";
        assert_eq!(requester(b, b), Some(Caller::Operator));
        assert_eq!(
            requester(b, "opencode.turn.status.slack"),
            Some(tenant("slack"))
        );
        assert_eq!(requester(b, "opencode.turn.status.slack.x"), None);
        assert_eq!(requester(b, "opencode.turn.statusx"), None);
    }

    #[test]
    fn a_tenant_names_only_its_own_turns() {
        let req = br#"{"trace_id": "t1"}"#;
        let r = parse_request(req, &tenant("discord")).unwrap();
        assert_eq!(r.owner, tenant("discord"));
        let other = br#"{"trace_id": "t1", "tenant": "slack"}"#;
        assert!(parse_request(other, &tenant("discord")).is_err());
        let r = parse_request(other, &Caller::Operator).unwrap();
        assert_eq!(r.owner, tenant("slack"));
        assert_ne!(
            state_key(&tenant("slack"), "t1"),
            state_key(&tenant("discord"), "t1")
        );
        assert_ne!(
            state_key(&tenant("slack"), "t1"),
            state_key(&Caller::Operator, "t1")
        );
        assert!(parse_request(br#"{"trace_id": "a.b"}"#, &Caller::Operator).is_err());
        assert!(parse_request(b"nope", &Caller::Operator).is_err());
    }

    #[test]
    fn keys_follow_kv_rules_and_stay_distinct() {
        let k = state_key(&tenant("sl=ack"), "ü=1/2");
        assert!(k
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_=.".contains(&b)));
        assert_eq!(k, "t.sl=3Dack.=C3=BC=3D1=2F2");
        assert_ne!(escape("=3D"), escape("="));
        assert_eq!(state_key(&Caller::Operator, "abc-1_2"), "op.abc-1_2");
    }

    #[test]
    fn each_tenant_has_its_own_finals_bucket() {
        let b = "opencode_bridge_finals";
        assert_eq!(finals_bucket(b, &Caller::Operator), b);
        assert_eq!(
            finals_bucket(b, &tenant("slack")),
            "opencode_bridge_finals-slack"
        );
        assert_eq!(
            finals_bucket(b, &tenant("a_b")),
            "opencode_bridge_finals_615f62"
        );
        assert_ne!(
            finals_bucket(b, &tenant("a_b")),
            finals_bucket(b, &tenant("a-b"))
        );
    }

    #[test]
    fn documents_read_back() {
        let d: TurnStatus = serde_json::from_slice(&state_doc("t", TurnState::Queued)).unwrap();
        assert_eq!(d.state, TurnState::Queued);
        let d: TurnStatus =
            serde_json::from_slice(&done_doc("t\"", br#"{"kind":"final","seq":3}"#)).unwrap();
        assert_eq!(d.state, TurnState::Done);
        assert_eq!(d.trace_id.as_deref(), Some("t\""));
        assert_eq!(d.terminal.unwrap()["seq"], 3);
    }
}
