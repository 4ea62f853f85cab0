//! [pure] Who sent a message: the operator, or a tenant named by the
//! first token of the subject's tail ([`super::tenant`] reads it).

use std::fmt;

/// Who sent a message, read from its subject.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Caller {
    /// The bare subject: trusted, reaches every conversation.
    Operator,
    /// The first token after the base subject.
    Tenant(String),
}

impl Caller {
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Caller::Operator => None,
            Caller::Tenant(t) => Some(t),
        }
    }

    /// Whether this caller may drive `conversation`.
    pub fn owns_conversation(&self, conversation: &str) -> bool {
        match self {
            Caller::Operator => true,
            Caller::Tenant(t) => is_under(conversation, t),
        }
    }

    /// Whether this caller may act on something started by `owner` (a turn,
    /// a permission request): the operator may act on anything, a tenant on
    /// its own.
    pub fn may_act_for(&self, owner: &Caller) -> bool {
        matches!(self, Caller::Operator) || self == owner
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Operator => f.write_str("operator"),
            Caller::Tenant(t) => write!(f, "tenant {t}"),
        }
    }
}

/// `s` is `prefix` or starts with `prefix.`.
pub fn is_under(s: &str, prefix: &str) -> bool {
    s == prefix
        || s.strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('.'))
}
