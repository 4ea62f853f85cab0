//! `[controls]`: the conversation control API (docs/PROTOCOL.md,
//! "Conversation controls"): `new`, `undo`, `redo`, `compact`, `diff`,
//! `fork`, `history`, `list`, `info` on `<subject>.<tenant>.<op>`.

use serde::Deserialize;

use super::ConfigError;
use crate::protocol::subject::validate_subject;

/// What `new` does with the conversation's old OpenCode session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnNew {
    /// Kept in OpenCode (its history stays readable there); only the
    /// conversation moves on to a new session.
    #[default]
    Keep,
    /// Deleted in OpenCode (`DELETE /session/{id}`).
    Delete,
}

/// `[controls]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlsConfig {
    /// Control requests arrive on `<subject>.<op>` (the operator) and
    /// `<subject>.<tenant>.<op>` (a tenant, its own conversations only);
    /// one daemon answers each (queue group `[subjects] queue_group`).
    pub subject: String,
    /// What `new` does with the old session: `keep` or `delete`.
    pub on_new: OnNew,
    /// The largest `diff` answer's `files[].patch` text in all (bytes);
    /// beyond it the patches are cut and the answer says `truncated`.
    pub max_diff_bytes: usize,
    /// The most turns one `history` page holds (`limit` is capped here).
    pub max_history_turns: usize,
    /// The most conversations one `list` page holds.
    pub max_list: usize,
    /// Control requests handled at once by one daemon; more wait (in
    /// arrival order) for one to finish.
    pub max_concurrent: usize,
}

impl Default for ControlsConfig {
    fn default() -> Self {
        ControlsConfig {
            subject: "opencode.control".into(),
            on_new: OnNew::Keep,
            max_diff_bytes: 256 * 1024,
            max_history_turns: 50,
            max_list: 100,
            max_concurrent: 16,
        }
    }
}

impl ControlsConfig {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: String| Err(ConfigError::Invalid { key, reason });
        if let Err(e) = validate_subject(&self.subject) {
            return invalid("controls.subject", format!("{:?} {e}", self.subject));
        }
        for (key, v) in [
            ("controls.max_diff_bytes", self.max_diff_bytes),
            ("controls.max_history_turns", self.max_history_turns),
            ("controls.max_list", self.max_list),
            ("controls.max_concurrent", self.max_concurrent),
        ] {
            if v == 0 {
                return invalid(key, "must be at least 1".into());
            }
        }
        Ok(())
    }
}
