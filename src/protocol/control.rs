//! Control messages: aborting a turn.
//!
//! `opencode.abort` takes `{"trace_id": "..."}` or `{"conversation": "..."}`
//! (plus `"drop_queued": true` to also drop the prompts queued behind it); a
//! request-style message gets an [`AbortAnswer`] back.

use serde::{Deserialize, Serialize};

use super::subject::validate_subject;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AbortTarget {
    Trace(String),
    Conversation(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbortRequest {
    pub target: AbortTarget,
    pub drop_queued: bool,
}

#[derive(Deserialize)]
struct Raw {
    trace_id: Option<String>,
    conversation: Option<String>,
    #[serde(default)]
    drop_queued: bool,
}

/// Parses an abort request; the error says what is wrong.
pub fn parse_abort(payload: &[u8]) -> Result<AbortRequest, String> {
    let raw: Raw = serde_json::from_slice(payload)
        .map_err(|e| format!("abort request is not a valid JSON object: {e}"))?;
    let target = match (raw.trace_id, raw.conversation) {
        (Some(t), _) => {
            validate_subject(&t).map_err(|e| format!("`trace_id` {t:?} {e}"))?;
            if !t.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!(
                    "`trace_id` \"{}\" must be printable ASCII",
                    super::logsafe::escaped(&t)
                ));
            }
            AbortTarget::Trace(t)
        }
        (None, Some(c)) => {
            validate_subject(&c).map_err(|e| format!("`conversation` {c:?} {e}"))?;
            AbortTarget::Conversation(c)
        }
        (None, None) => return Err("abort request needs `trace_id` or `conversation`".into()),
    };
    Ok(AbortRequest {
        target,
        drop_queued: raw.drop_queued,
    })
}

/// The answer to a request-style abort.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AbortAnswer {
    /// Whether a running turn was told to abort.
    pub aborted: bool,
    pub reason: String,
    /// Queued prompts dropped (`drop_queued`), or the queued prompt itself
    /// when the trace id named one that had not started.
    pub dropped: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        assert_eq!(
            parse_abort(br#"{"trace_id":"t1"}"#),
            Ok(AbortRequest {
                target: AbortTarget::Trace("t1".into()),
                drop_queued: false
            })
        );
        assert_eq!(
            parse_abort(br#"{"conversation":"slack.C1","drop_queued":true}"#),
            Ok(AbortRequest {
                target: AbortTarget::Conversation("slack.C1".into()),
                drop_queued: true
            })
        );
        assert!(parse_abort(b"{}").unwrap_err().contains("needs"));
        assert!(parse_abort(b"nope").is_err());
        assert!(parse_abort(br#"{"trace_id":"a.*"}"#)
            .unwrap_err()
            .contains("wildcard"));
    }
}
