//! Subject validation: client text never becomes a wildcard.
//!
//! NATS subjects are `.`-separated tokens; `*` matches one token and `>` the
//! tail, and `$`-prefixed roots are reserved for the server. A trace id,
//! conversation key or `reply_to` that a client sends is only used after
//! [`validate_subject`] (or [`validate_token`]) accepted it.

use std::fmt;

/// Why a piece of client text cannot be used in a subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubjectError {
    Empty,
    EmptyToken,
    Wildcard,
    Whitespace,
    Reserved,
    TooLong { limit: usize },
}

impl fmt::Display for SubjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubjectError::Empty => f.write_str("is empty"),
            SubjectError::EmptyToken => f.write_str("has an empty token"),
            SubjectError::Wildcard => f.write_str("contains a wildcard (`*` or `>`)"),
            SubjectError::Whitespace => f.write_str("contains whitespace or a control character"),
            SubjectError::Reserved => f.write_str("starts with the reserved `$`"),
            SubjectError::TooLong { limit } => write!(f, "is longer than {limit} bytes"),
        }
    }
}

/// The longest client-supplied subject fragment accepted.
pub const MAX_SUBJECT_BYTES: usize = 256;

/// Validates a full subject or a dotted fragment of one (a conversation key
/// such as `slack.C042`, a `reply_to`, a trace id).
pub fn validate_subject(s: &str) -> Result<(), SubjectError> {
    if s.is_empty() {
        return Err(SubjectError::Empty);
    }
    if s.len() > MAX_SUBJECT_BYTES {
        return Err(SubjectError::TooLong {
            limit: MAX_SUBJECT_BYTES,
        });
    }
    if s.starts_with('$') {
        return Err(SubjectError::Reserved);
    }
    for token in s.split('.') {
        validate_token_chars(token)?;
    }
    Ok(())
}

/// Validates one token (no `.` allowed).
pub fn validate_token(s: &str) -> Result<(), SubjectError> {
    if s.contains('.') {
        return Err(SubjectError::EmptyToken);
    }
    validate_subject(s)
}

/// The longest trace id taken (bytes).
pub const MAX_TRACE_ID_BYTES: usize = 128;

/// A trace id: one subject token (no dots) of printable ASCII (`!` to
/// `~`), at most [`MAX_TRACE_ID_BYTES`]: it names reply subjects, KV keys
/// and log lines, where a control character or a bidirectional override
/// could forge or hide text. The `Err` says why, the id shown escaped.
pub fn validate_trace_id(s: &str) -> Result<(), String> {
    let shown = || format!("\"{}\"", super::logsafe::escaped(s));
    if s.is_empty() || s.len() > MAX_TRACE_ID_BYTES || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "`trace_id` {} must be 1 to {MAX_TRACE_ID_BYTES} printable ASCII characters (no spaces or control characters)",
            shown()
        ));
    }
    validate_token(s).map_err(|e| {
        format!(
            "`trace_id` {} {e} (it must be one subject token, no dots)",
            shown()
        )
    })
}

fn validate_token_chars(token: &str) -> Result<(), SubjectError> {
    if token.is_empty() {
        return Err(SubjectError::EmptyToken);
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(SubjectError::Whitespace);
    }
    if token.contains(['*', '>']) {
        return Err(SubjectError::Wildcard);
    }
    Ok(())
}

/// `s` as one subject token, at most `max_chars` characters: lowercase
/// letters, digits, `-` and `_`; anything else becomes `-`
/// (`build-01.Example.com` -> `build-01-example-com`). Empty for empty `s`.
pub fn to_token(s: &str, max_chars: usize) -> String {
    s.chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '-' | '_' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .take(max_chars)
        .collect()
}

/// Where a turn's replies go: the NATS reply subject (request style), else
/// the prompt's `reply_to`, else `<reply_prefix>.<trace_id>`. Callers pass
/// only validated values.
pub fn reply_subject(
    nats_reply: Option<&str>,
    reply_to: Option<&str>,
    trace_id: &str,
    reply_prefix: &str,
) -> String {
    match (nats_reply, reply_to) {
        (Some(r), _) => r.to_string(),
        (None, Some(r)) => r.to_string(),
        (None, None) => format!("{reply_prefix}.{trace_id}"),
    }
}

/// Whether `subject` is matched by a subscription `pattern` (`*` and `>`).
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_and_dotted() {
        assert_eq!(validate_subject("abc"), Ok(()));
        assert_eq!(validate_subject("slack.C042"), Ok(()));
        assert_eq!(validate_subject("_INBOX.abc.def"), Ok(()));
        assert_eq!(validate_subject("trace-1_x"), Ok(()));
    }

    #[test]
    fn refuses_injection() {
        assert_eq!(validate_subject(""), Err(SubjectError::Empty));
        assert_eq!(validate_subject("a.*"), Err(SubjectError::Wildcard));
        assert_eq!(validate_subject(">"), Err(SubjectError::Wildcard));
        assert_eq!(validate_subject("a.b>"), Err(SubjectError::Wildcard));
        assert_eq!(validate_subject("a b"), Err(SubjectError::Whitespace));
        assert_eq!(validate_subject("a\tb"), Err(SubjectError::Whitespace));
        assert_eq!(
            validate_subject("a\r\nPUB x 1"),
            Err(SubjectError::Whitespace)
        );
        assert_eq!(validate_subject("a..b"), Err(SubjectError::EmptyToken));
        assert_eq!(validate_subject(".a"), Err(SubjectError::EmptyToken));
        assert_eq!(validate_subject("a."), Err(SubjectError::EmptyToken));
        assert_eq!(validate_subject("$SYS.x"), Err(SubjectError::Reserved));
        assert_eq!(validate_subject("$JS.API.x"), Err(SubjectError::Reserved));
        let long = "a".repeat(MAX_SUBJECT_BYTES + 1);
        assert!(matches!(
            validate_subject(&long),
            Err(SubjectError::TooLong { .. })
        ));
        assert_eq!(validate_token("a.b"), Err(SubjectError::EmptyToken));
    }

    #[test]
    fn reply_routing_order() {
        assert_eq!(
            reply_subject(Some("_INBOX.1"), Some("r"), "t", "p"),
            "_INBOX.1"
        );
        assert_eq!(reply_subject(None, Some("r.x"), "t", "p"), "r.x");
        assert_eq!(
            reply_subject(None, None, "t-1", "opencode.reply"),
            "opencode.reply.t-1"
        );
    }

    #[test]
    fn matching() {
        assert!(subject_matches("opencode.prompt.>", "opencode.prompt.a.b"));
        assert!(!subject_matches("opencode.prompt.>", "opencode.prompt"));
        assert!(subject_matches("opencode.prompt", "opencode.prompt"));
        assert!(subject_matches("a.*.c", "a.b.c"));
        assert!(!subject_matches("a.*.c", "a.b.d"));
    }
}
