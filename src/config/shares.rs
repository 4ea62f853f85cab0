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
    /// turns, and their finals' `notes` say so), never another's. The
    /// operator's bucket has the same bound.
    pub turn_states_bytes: u64,
    /// Bytes of the object store bucket that keeps one tenant's large
    /// finals (`<[limits] large_final_bucket>-<tenant>`, created with this
    /// `max_bytes`): when it is full, that tenant's next large final goes
    /// out cut without `content_object`, and its `notes` say why and what
    /// to do. The operator's bucket has the same bound.
    pub finals_bytes: u64,
    /// Tenants whose durable jobs go to a stream of their own,
    /// `<[jetstream] jobs_stream>_<tenant>` capturing
    /// `<jobs_subject>.<tenant>` and `<jobs_subject>.<tenant>.>`, bounded
    /// by `jobs_bytes`: a tenant that fills its stream has only its own
    /// publishes refused, and `Nats-Msg-Id` deduplication is per stream, so
    /// one tenant's id never shadows another's. Empty (default): one
    /// stream for everyone, as before. When set, `jobs_stream` captures
    /// only the operator's `<jobs_subject>`, and a tenant not listed has
    /// no jobs stream (its job publish gets no JetStream answer). NATS
    /// streams may not overlap: an existing `jobs_stream` that captures
    /// `<jobs_subject>.>` must be drained and deleted first.
    pub job_tenants: Vec<String>,
    /// `max_bytes` of each tenant's jobs stream (`job_tenants`); a full
    /// stream refuses that tenant's next job (its publish ack says
    /// "maximum bytes exceeded") until its jobs have run.
    pub jobs_bytes: u64,
}

impl SharesConfig {
    /// Each of `job_tenants` is one subject token usable in a stream name
    /// (letters, digits, `-`, `_`); the `Err` names the bad one.
    pub fn check_job_tenants(&self) -> Result<(), String> {
        for t in &self.job_tenants {
            let ok = !t.is_empty()
                && t.len() <= 64
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                return Err(format!(
                    "{t:?} is not a tenant name a stream can carry (letters, digits, - and _, at most 64)"
                ));
            }
        }
        Ok(())
    }
}

impl Default for SharesConfig {
    fn default() -> Self {
        SharesConfig {
            attachment_bytes_in_flight: 4 * 1024 * 1024,
            turn_states_bytes: 64 * 1024 * 1024,
            finals_bytes: 256 * 1024 * 1024,
            job_tenants: Vec::new(),
            jobs_bytes: 64 * 1024 * 1024,
        }
    }
}
