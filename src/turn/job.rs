//! A turn that is a durable job (`crate::jobs`): its terminal reply
//! decides the job's fate ([`crate::protocol::job::verdict`]). The sink
//! asks its [`JobHook`] before publishing a terminal reply: publish it (the
//! job is done), hold it back (the job is delivered again: OpenCode was
//! unavailable, the daemon is stopping), or publish `undeliverable` in its
//! place (the last delivery). The job's side learns the end on a oneshot.

use tokio::sync::oneshot;

use crate::protocol::job::{undeliverable_message, verdict, RetryAfter, Verdict};
use crate::protocol::{ErrorCode, ReplyBody};

/// How a job's turn ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEnd {
    /// Its terminal reply went out (`code`: `None` for a `final`).
    Answered { code: Option<ErrorCode> },
    /// Nothing went out; deliver the job again.
    Retry(RetryAfter),
}

/// What the sink does with a terminal reply of a job.
pub enum Gate {
    Publish(ReplyBody),
    /// Publish nothing (the reply is handed back, for the metrics); the
    /// turn is over.
    Hold(ReplyBody),
}

/// The job side of a turn's sink.
pub struct JobHook {
    tx: Option<oneshot::Sender<JobEnd>>,
    delivered: u64,
    last: bool,
}

impl JobHook {
    /// A hook for delivery number `delivered`; `last`: no delivery follows.
    pub fn new(delivered: u64, last: bool) -> (JobHook, oneshot::Receiver<JobEnd>) {
        let (tx, rx) = oneshot::channel();
        let hook = JobHook {
            tx: Some(tx),
            delivered,
            last,
        };
        (hook, rx)
    }

    /// The verdict on a terminal reply about to go out.
    pub fn gate(&mut self, body: ReplyBody) -> Gate {
        let code = match &body {
            ReplyBody::Error { code, .. } => Some(*code),
            _ => None,
        };
        match verdict(code, self.last) {
            Verdict::Publish => Gate::Publish(body),
            Verdict::Retry(after) => {
                self.end(JobEnd::Retry(after));
                Gate::Hold(body)
            }
            Verdict::Undeliverable => {
                let why = match &body {
                    ReplyBody::Error { error, .. } => error.as_str(),
                    _ => "",
                };
                let message =
                    undeliverable_message(self.delivered, code.unwrap_or(ErrorCode::Internal), why);
                Gate::Publish(ReplyBody::error(ErrorCode::Undeliverable, message))
            }
        }
    }

    /// A terminal reply went out.
    pub fn published(&mut self, body: &ReplyBody) {
        let code = match body {
            ReplyBody::Error { code, .. } => Some(*code),
            _ => None,
        };
        self.end(JobEnd::Answered { code });
    }

    /// The intake refused the job, and answered it with `code`.
    pub fn refused(&mut self, code: ErrorCode) {
        self.end(JobEnd::Answered { code: Some(code) });
    }

    /// The job never reached a turn (the daemon is stopping): back at once.
    pub fn give_back(&mut self) {
        self.end(JobEnd::Retry(RetryAfter::Now));
    }

    fn end(&mut self, end: JobEnd) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(end);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_delivery_gives_up_with_undeliverable() {
        let (mut hook, mut rx) = JobHook::new(3, true);
        let body = ReplyBody::error(ErrorCode::OpencodeUnavailable, "down");
        let Gate::Publish(b) = hook.gate(body) else {
            panic!("published")
        };
        assert!(matches!(
            b,
            ReplyBody::Error {
                code: ErrorCode::Undeliverable,
                retryable: false,
                ..
            }
        ));
        hook.published(&b);
        assert_eq!(
            rx.try_recv().unwrap(),
            JobEnd::Answered {
                code: Some(ErrorCode::Undeliverable)
            }
        );
    }

    #[test]
    fn an_earlier_delivery_holds_the_reply_back() {
        let (mut hook, mut rx) = JobHook::new(1, false);
        let body = ReplyBody::error(ErrorCode::ShuttingDown, "stopping");
        assert!(matches!(hook.gate(body), Gate::Hold(_)));
        assert_eq!(rx.try_recv().unwrap(), JobEnd::Retry(RetryAfter::Now));
    }
}
