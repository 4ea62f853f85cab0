//! [pure] Durable jobs (docs/PROTOCOL.md, "Jobs"): a prompt published on
//! a JetStream work-queue stream instead of core NATS.
//!
//! A job subject is read as the prompt subject it mirrors
//! (`opencode.job.slack.C042` as `opencode.prompt.slack.C042`), so the
//! tenant rules of [`super::tenant`] apply to jobs unchanged. What a job's
//! terminal reply means for the job (publish and acknowledge, deliver again
//! later without a reply, or give up with `undeliverable`) is decided here.

use super::reply::ErrorCode;
use super::tenant::{is_under, tail, Route, Subjects};

/// The prompt subject a job subject mirrors: `<jobs>` -> `<prompt>`,
/// `<jobs>.<tail>` -> `<prompt>.<tail>`; `None` for a subject that is not
/// a job subject.
pub fn as_prompt_subject(
    jobs_subject: &str,
    prompt_subject: &str,
    subject: &str,
) -> Option<String> {
    match tail(jobs_subject, subject)? {
        None => Some(prompt_subject.to_string()),
        Some(t) => Some(format!("{prompt_subject}.{t}")),
    }
}

/// Classifies a job by its subject exactly as the prompt it mirrors:
/// [`Route::Prompt`] with the same caller and conversation, or
/// [`Route::Unknown`].
pub fn route(jobs_subject: &str, subjects: &Subjects<'_>, subject: &str) -> Route {
    match as_prompt_subject(jobs_subject, subjects.prompt, subject) {
        Some(p) => match Route::of(subjects, &p) {
            r @ Route::Prompt { .. } => r,
            _ => Route::Unknown,
        },
        None => Route::Unknown,
    }
}

/// Whether replies sent to `subject` would land in the jobs stream (and
/// come back as jobs): never a job's reply subject.
pub fn is_job_subject(jobs_subject: &str, subject: &str) -> bool {
    is_under(subject, jobs_subject)
}

/// What a turn knows of the job it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobTurn {
    /// The tag of the turn's user message id (`opencode::ids::tag` of the
    /// job's stream, sequence and publish time): the same on every
    /// delivery of the job.
    pub tag: String,
    /// An earlier delivery may have prompted OpenCode already: look for the
    /// tagged user message before prompting, and follow it if found.
    pub redelivered: bool,
    /// The host the job's conversation moved from (`Prompt::moved_from`).
    pub moved_from: Option<String>,
}

/// The seed of a job's tag: its stream, stream sequence and publish time
/// (nanoseconds), which every delivery of the job shares.
pub fn tag_seed(stream: &str, sequence: u64, published_nanos: i128) -> Vec<u8> {
    format!("{stream}/{sequence}/{published_nanos}").into_bytes()
}

/// When a job that was not served comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAfter {
    /// `[jetstream] retry_delay` later (OpenCode down, the conversation or
    /// the tenant full).
    Delay,
    /// At once, to another daemon (this one is stopping).
    Now,
}

/// What a job's terminal reply means for the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Publish it; the job is done (acknowledged, or terminated when
    /// refused).
    Publish,
    /// Publish nothing; the job is delivered again.
    Retry(RetryAfter),
    /// Publish `error` `undeliverable` instead; the job is done.
    Undeliverable,
}

/// The verdict on a terminal reply with `code` (`None`: a `final`) on a
/// job's delivery; `last`: the job has had `max_deliver` deliveries.
pub fn verdict(code: Option<ErrorCode>, last: bool) -> Verdict {
    let retry = match code {
        Some(ErrorCode::OpencodeUnavailable | ErrorCode::SessionBusy | ErrorCode::Overloaded) => {
            RetryAfter::Delay
        }
        Some(ErrorCode::ShuttingDown) => RetryAfter::Now,
        _ => return Verdict::Publish,
    };
    if last {
        Verdict::Undeliverable
    } else {
        Verdict::Retry(retry)
    }
}

/// The message of a job's `undeliverable` error.
pub fn undeliverable_message(deliveries: u64, last: ErrorCode, why: &str) -> String {
    format!(
        "the job was delivered {deliveries} times ([jetstream] max_deliver) and never ran to its end; the last delivery ended {}: {why}",
        last.as_str()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::tenant::Caller;

    use crate::protocol::tenant::tests::S;

    #[test]
    fn a_job_is_routed_as_the_prompt_it_mirrors() {
        assert_eq!(
            route("opencode.job", &S, "opencode.job"),
            Route::Prompt {
                caller: Caller::Operator,
                conversation: None
            }
        );
        assert_eq!(
            route("opencode.job", &S, "opencode.job.slack.C042"),
            Route::Prompt {
                caller: Caller::Tenant("slack".into()),
                conversation: Some("slack.C042".into())
            }
        );
        assert_eq!(
            route("opencode.job", &S, "opencode.job.slack"),
            Route::Prompt {
                caller: Caller::Tenant("slack".into()),
                conversation: Some("slack".into())
            }
        );
        for not_a_job in [
            "opencode.jobs.x",
            "opencode.prompt.slack",
            "opencode.job.*.x",
            "opencode.job.",
        ] {
            assert_eq!(
                route("opencode.job", &S, not_a_job),
                Route::Unknown,
                "{not_a_job}"
            );
        }
        assert_eq!(
            as_prompt_subject("opencode.job", "opencode.prompt", "opencode.job.a.b").as_deref(),
            Some("opencode.prompt.a.b")
        );
        assert!(is_job_subject("opencode.job", "opencode.job.slack.x"));
        assert!(is_job_subject("opencode.job", "opencode.job"));
        assert!(!is_job_subject("opencode.job", "opencode.jobs"));
        assert!(!is_job_subject("opencode.job", "opencode.reply.slack.t1"));
    }

    #[test]
    fn only_a_turn_that_could_not_run_comes_back() {
        assert_eq!(verdict(None, false), Verdict::Publish);
        assert_eq!(verdict(None, true), Verdict::Publish);
        for done in [
            ErrorCode::BadRequest,
            ErrorCode::Forbidden,
            ErrorCode::Timeout,
            ErrorCode::ProviderError,
            ErrorCode::OpencodeError,
            ErrorCode::Aborted,
            ErrorCode::Internal,
        ] {
            assert_eq!(verdict(Some(done), false), Verdict::Publish, "{done:?}");
        }
        assert_eq!(
            verdict(Some(ErrorCode::OpencodeUnavailable), false),
            Verdict::Retry(RetryAfter::Delay)
        );
        assert_eq!(
            verdict(Some(ErrorCode::SessionBusy), false),
            Verdict::Retry(RetryAfter::Delay)
        );
        assert_eq!(
            verdict(Some(ErrorCode::ShuttingDown), false),
            Verdict::Retry(RetryAfter::Now)
        );
        assert_eq!(
            verdict(Some(ErrorCode::OpencodeUnavailable), true),
            Verdict::Undeliverable
        );
        assert!(!ErrorCode::Undeliverable.retryable());
    }

    #[test]
    fn every_delivery_of_a_job_has_the_same_seed() {
        assert_eq!(tag_seed("J", 7, 12), tag_seed("J", 7, 12));
        assert_ne!(tag_seed("J", 7, 12), tag_seed("J", 7, 13));
        assert_ne!(tag_seed("J", 7, 12), tag_seed("J", 8, 12));
    }
}
