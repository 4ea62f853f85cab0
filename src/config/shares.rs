//! `[shares]`: what one tenant may hold of what all tenants share, so that
//! no tenant can fill it for the others (issue 22). Each share has a
//! default; each refusal is a typed reply that says what to do. The
//! operator (prompts without a tenant) has no share limit.

use serde::Deserialize;

/// `[shares]`: per-tenant budgets.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SharesConfig {
    /// Decoded attachment bytes one tenant may have in turns queued or
    /// running at once (they stay in the daemon's memory until the turn
    /// ends). One more prompt with attachments gets `overloaded`
    /// (retryable: send again when one of its turns has ended). 0: no
    /// limit.
    pub attachment_bytes_in_flight: usize,
    /// Bytes of the KV bucket that keeps one tenant's turn states
    /// (`<[cluster] turns_bucket>-<tenant>`, each tenant its own bucket,
    /// created with this `max_bytes`): a tenant that fills it loses its
    /// own turn states (`opencode.turn.status` reads `unknown` for its new
    /// turns), never another's. The operator's bucket has the same bound.
    pub turn_states_bytes: u64,
    /// Bytes of the object store bucket that keeps one tenant's large
    /// finals (`<[limits] large_final_bucket>-<tenant>`, created with this
    /// `max_bytes`): when it is full, that tenant's next large final goes
    /// out cut without `content_object`, and its `notes` say why and what
    /// to do. The operator's bucket has the same bound.
    pub finals_bytes: u64,
}

impl Default for SharesConfig {
    fn default() -> Self {
        SharesConfig {
            attachment_bytes_in_flight: 4 * 1024 * 1024,
            turn_states_bytes: 64 * 1024 * 1024,
            finals_bytes: 256 * 1024 * 1024,
        }
    }
}
