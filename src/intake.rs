//! Intake: what turns an incoming NATS message into work.
//!
//! A message is classified by its subject alone ([`Route`], pure), its
//! payload parsed by pure code in `protocol/`, checked against its caller
//! (the tenant rules of [`crate::protocol::tenant`]), and only then handed
//! to the [`Dispatcher`]: a prompt becomes a queued turn, an abort reaches
//! the caller's own turns, an answer the caller's own permission request.
//! Every refusal is a typed reply (`bad_request`, `forbidden`,
//! `session_busy`) and a log line; nothing is dropped silently.

use std::sync::Arc;

use tokio::sync::OwnedSemaphorePermit;
use tracing::{info, warn};

use crate::bus::{Incoming, JobMessage, Publisher};
use crate::cluster::{Cluster, Place};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::protocol::agent;
use crate::protocol::control::parse_abort;
use crate::protocol::tenant::{authorize, Caller, Route};
use crate::protocol::{parse_prompt, validate_subject, ErrorCode, Prompt, ReplyBody};
use crate::turn::interactive::{AnswerMsg, AnswerRegistry};
use crate::turn::queue::Refused;
use crate::turn::shares::AttachmentShares;
use crate::turn::{Dispatcher, Job, ReplySink};

/// Where an admitted prompt goes, in a cluster.
enum Placed {
    /// Served here (see [`Place::Here`]).
    Here { moved_from: Option<String> },
    /// Taken by the conversation's home daemon, which answers the caller.
    Forwarded,
    /// Not now (`session_busy`).
    Busy { reason: String },
    /// The home daemon `instance` did not take it.
    Silent { instance: String },
}

/// Where a pulled job runs ([`Intake::job_home`]).
pub enum JobHome {
    Here {
        moved_from: Option<String>,
    },
    /// Its conversation's home took it and settles it.
    Forwarded,
    /// Not now: hand it back, delivered again after `retry_delay`.
    Later,
}

/// A prompt that will not run: its one reply and where it goes.
struct Refusal {
    subject: String,
    trace_id: String,
    conversation: Option<String>,
    code: ErrorCode,
    reason: String,
}

/// Turns incoming messages into work for the dispatcher.
pub struct Intake {
    dispatcher: Arc<Dispatcher>,
    answers: Arc<AnswerRegistry>,
    publisher: Publisher,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    /// Conversation homes across daemons, when in a cluster.
    cluster: Option<Arc<Cluster>>,
    /// Each tenant's share of attachment bytes in flight (`[shares]`).
    shares: AttachmentShares,
}

impl Intake {
    /// Answers to permission requests go to the dispatcher's turns.
    pub fn new(
        dispatcher: Arc<Dispatcher>,
        publisher: Publisher,
        config: Arc<Config>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Intake {
            shares: AttachmentShares::new(config.shares.attachment_bytes_in_flight),
            answers: dispatcher.context().answers.clone(),
            dispatcher,
            publisher,
            config,
            metrics,
            cluster: None,
        }
    }

    pub fn dispatcher(&self) -> &Arc<Dispatcher> {
        &self.dispatcher
    }

    /// Serves each conversation at its home in `cluster` (forwarding
    /// prompts there).
    pub fn in_cluster(mut self, cluster: Option<Arc<Cluster>>) -> Self {
        self.cluster = cluster;
        self
    }

    /// A sink for replies that go out before (or instead of) a turn.
    fn sink(
        &self,
        subject: String,
        trace_id: &str,
        conversation: Option<&str>,
        msg: &Incoming,
    ) -> ReplySink {
        ReplySink::new(
            self.publisher.clone(),
            subject,
            trace_id.to_string(),
            conversation.map(str::to_string),
            self.config.limits.max_reply_bytes,
        )
        .traced(msg.traceparent.as_deref())
        .observed(&self.metrics)
    }

    /// The pace of a prompt's text: its own `"stream"`, else its tenant's
    /// default (`[tenancy.stream]`).
    fn pace(&self, prompt: &Prompt) -> crate::protocol::StreamMode {
        prompt
            .stream
            .unwrap_or_else(|| self.config.tenancy.stream_default(&prompt.caller))
    }

    /// Refuses a prompt with one terminal reply.
    async fn refuse(&self, msg: &Incoming, r: Refusal) {
        warn!(trace_id = %r.trace_id, subject = %msg.subject, reply_subject = %r.subject, code = r.code.as_str(), reason = %r.reason, "prompt refused");
        self.sink(r.subject, &r.trace_id, r.conversation.as_deref(), msg)
            .send(ReplyBody::error(r.code, r.reason))
            .await;
    }

    /// Parses, checks and queues one prompt; every refusal is answered.
    pub async fn prompt(self: &Arc<Self>, msg: Incoming, permit: Option<OwnedSemaphorePermit>) {
        let (caller, tail) = match Route::of(&self.config.route_subjects(), &msg.subject) {
            Route::Prompt {
                caller,
                conversation,
            } => (caller, conversation),
            other => {
                warn!(subject = %msg.subject, ?other, "a message on the prompt subscription that is not a prompt");
                return;
            }
        };
        let (prompt, subject) = match self.admit(&msg, &caller, tail.as_deref()) {
            Ok(admitted) => admitted,
            Err(r) => return self.refuse(&msg, r).await,
        };
        match self.place(&msg, &prompt).await {
            Placed::Silent { instance } => {
                // The home did not take it: wait (off the intake's path)
                // until it may be taken over, then decide again, never
                // forwarding twice.
                let me = self.clone();
                self.dispatcher.spawn(async move {
                    let placed = me.place_after(&instance, &prompt).await;
                    me.serve_at(&msg, prompt, subject, permit, placed).await
                });
            }
            placed => self.serve_at(&msg, prompt, subject, permit, placed).await,
        }
    }

    /// Serves an admitted prompt where it was placed.
    async fn serve_at(
        &self,
        msg: &Incoming,
        mut prompt: Prompt,
        subject: String,
        permit: Option<OwnedSemaphorePermit>,
        placed: Placed,
    ) {
        let reason = match placed {
            Placed::Here { moved_from } => {
                prompt.moved_from = moved_from;
                return self.dispatch(msg, prompt, subject, permit).await;
            }
            Placed::Forwarded => return,
            Placed::Busy { reason } => reason,
            Placed::Silent { instance } => format!(
                "the home bridge of conversation {} ({instance}) does not take prompts; send again",
                prompt.conversation.as_deref().unwrap_or("?")
            ),
        };
        let r = Refusal {
            subject,
            trace_id: prompt.trace_id,
            conversation: prompt.conversation,
            code: ErrorCode::SessionBusy,
            reason,
        };
        self.refuse(msg, r).await
    }

    /// Where a conversation's prompt is served: here, or forwarded to the
    /// conversation's home (which then answers the caller). A prompt
    /// forwarded here once is never forwarded again.
    async fn place(&self, msg: &Incoming, prompt: &Prompt) -> Placed {
        let (Some(cluster), Some(conversation)) = (&self.cluster, &prompt.conversation) else {
            return Placed::Here { moved_from: None };
        };
        let sessions = self.dispatcher.context().sessions.as_ref();
        let forwarded = msg.forwarded_by.is_some();
        let instance = match cluster.place(conversation, forwarded, sessions).await {
            Place::Here { moved_from } => return Placed::Here { moved_from },
            Place::Busy { reason } => return Placed::Busy { reason },
            Place::There { instance } => instance,
        };
        match cluster.forward(&instance, msg).await {
            Ok(()) => {
                info!(trace_id = %prompt.trace_id, %conversation, home = %instance, "prompt forwarded to its conversation's home");
                Placed::Forwarded
            }
            Err(e) => {
                warn!(trace_id = %prompt.trace_id, %conversation, home = %instance, error = %e, "the conversation's home did not take the prompt; waiting until it may be taken over");
                Placed::Silent { instance }
            }
        }
    }

    /// Decides again once the silent home `instance` has lost its lease
    /// (or the lease TTL has passed): taken over, or `session_busy`.
    async fn place_after(&self, instance: &str, prompt: &Prompt) -> Placed {
        let (Some(cluster), Some(conversation)) = (&self.cluster, &prompt.conversation) else {
            return Placed::Here { moved_from: None };
        };
        cluster.wait_for_home(instance, conversation).await;
        let sessions = self.dispatcher.context().sessions.as_ref();
        match cluster.place(conversation, true, sessions).await {
            Place::Here { moved_from } => Placed::Here { moved_from },
            Place::Busy { .. } | Place::There { .. } => Placed::Silent {
                instance: instance.to_string(),
            },
        }
    }

    /// A prompt that finds the daemon full (`turn.max_in_flight` turns and
    /// `turn.max_waiting` prompts waiting): `overloaded` (retryable) on the
    /// subject its replies would have gone to; a prompt that would have
    /// been refused anyway gets that refusal instead.
    pub async fn overloaded(&self, msg: Incoming, reason: String) {
        let Route::Prompt {
            caller,
            conversation,
        } = Route::of(&self.config.route_subjects(), &msg.subject)
        else {
            warn!(subject = %msg.subject, "a message on the prompt subscription that is not a prompt");
            return;
        };
        let refusal = match self.admit(&msg, &caller, conversation.as_deref()) {
            Ok((prompt, subject)) => Refusal {
                subject,
                trace_id: prompt.trace_id,
                conversation: prompt.conversation,
                code: ErrorCode::Overloaded,
                reason,
            },
            Err(r) => r,
        };
        self.refuse(&msg, refusal).await
    }

    /// The prompt and where its replies go, or why it is refused. Where the
    /// replies go is decided first: a refusal must not land on a subject
    /// the caller may not name.
    fn admit(
        &self,
        msg: &Incoming,
        caller: &Caller,
        tail: Option<&str>,
    ) -> Result<(Prompt, String), Refusal> {
        let config = &self.config;
        let limits = config.limits.prompt_limits();
        let inbox_error = msg.reply.as_deref().and_then(|r| {
            validate_subject(r)
                .err()
                .map(|e| format!("reply subject {r:?} {e}"))
        });
        let inbox = msg.reply.as_deref().filter(|_| inbox_error.is_none());
        let parsed = parse_prompt(&msg.payload, &msg.headers, tail, limits);
        let (trace_id, reply_to, conversation) = match &parsed {
            Ok(p) => (&p.trace_id, &p.reply_to, &p.conversation),
            Err(r) => (&r.trace_id, &r.reply_to, &r.conversation),
        };
        let refusal = |subject: String, code, reason| Refusal {
            subject,
            trace_id: trace_id.clone(),
            conversation: conversation.clone(),
            code,
            reason,
        };
        let subject = config
            .reply_rules()
            .route(caller, inbox, reply_to.as_deref(), trace_id)
            .map_err(|(reason, own)| refusal(own, ErrorCode::Forbidden, reason))?;
        let prompt = match (&parsed, inbox_error) {
            (Ok(_), Some(reason)) => return Err(refusal(subject, ErrorCode::BadRequest, reason)),
            (Err(rej), _) => {
                return Err(refusal(subject, ErrorCode::BadRequest, rej.reason.clone()))
            }
            (Ok(p), None) => p,
        };
        if let Err(reason) = authorize(caller, prompt, &config.prompt_policy()) {
            return Err(refusal(subject, ErrorCode::Forbidden, reason));
        }
        let prompt = parsed.expect("checked above");
        Ok((prompt, subject))
    }

    /// A prompt on the Synadia Agent Protocol `prompt` endpoint: `ack`
    /// first, then the checks and the queue of the bridge's own prompts
    /// (as the operator: the registration has no tenant), its replies a
    /// protocol reply stream on the request's reply subject. Interactive
    /// (permissions and questions as `query` chunks); `reply_to` is ignored.
    pub async fn agent_prompt(&self, msg: Incoming, permit: Option<OwnedSemaphorePermit>) {
        let Some((mut sink, checked)) = self.agent_admit(&msg).await else {
            return;
        };
        match checked {
            Ok(mut prompt) => {
                prompt.reply_to = None;
                // Permissions and questions become `query` chunks.
                prompt.interactive = true;
                self.dispatch_with(prompt, sink, permit).await
            }
            Err((code, reason)) => {
                warn!(trace_id = %sink.trace_id(), subject = %msg.subject, code = code.as_str(), %reason, "agent prompt refused");
                sink.send(ReplyBody::error(code, reason)).await;
            }
        }
    }

    /// An agent protocol prompt that finds the daemon full: `overloaded`.
    pub async fn agent_overloaded(&self, msg: Incoming, reason: String) {
        let Some((mut sink, checked)) = self.agent_admit(&msg).await else {
            return;
        };
        let (code, reason) = checked.err().unwrap_or((ErrorCode::Overloaded, reason));
        warn!(trace_id = %sink.trace_id(), subject = %msg.subject, code = code.as_str(), %reason, "agent prompt refused");
        sink.send(ReplyBody::error(code, reason)).await;
    }

    /// An agent protocol prompt's reply stream (acknowledged) and the
    /// prompt, or why it is refused; `None` when it cannot be answered.
    async fn agent_admit(
        &self,
        msg: &Incoming,
    ) -> Option<(ReplySink, Result<Prompt, (ErrorCode, String)>)> {
        let Some(inbox) = msg
            .reply
            .clone()
            .filter(|r| validate_subject(r).is_ok() && !self.config.reply_rules().is_own(r))
        else {
            warn!(subject = %msg.subject, reply = ?msg.reply, "an agent prompt without a usable reply subject: not answered");
            return None;
        };
        let limits = self.config.limits.prompt_limits();
        let parsed = agent::check_request(&msg.payload)
            .map_err(|r| (r, None))
            .and_then(|()| {
                parse_prompt(&msg.payload, &msg.headers, None, limits)
                    .map_err(|r| (r.reason, Some(r.trace_id)))
            });
        let trace_id = match &parsed {
            Ok(p) => p.trace_id.clone(),
            Err((_, t)) => t
                .clone()
                .or_else(|| msg.headers.trace_id.clone())
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        };
        let conversation = parsed.as_ref().ok().and_then(|p| p.conversation.clone());
        let mut sink = self
            .sink(inbox, &trace_id, conversation.as_deref(), msg)
            .agent_protocol();
        sink.ack(self.config.agent_protocol.ack_interval).await;
        let checked = parsed
            .map_err(|(reason, _)| (ErrorCode::BadRequest, reason))
            .and_then(|p| {
                authorize(&Caller::Operator, &p, &self.config.prompt_policy())
                    .map(|()| p)
                    .map_err(|reason| (ErrorCode::Forbidden, reason))
            });
        Some((sink, checked))
    }

    /// Queues an admitted prompt; a full conversation queue or a trace id
    /// in use is answered at once.
    async fn dispatch(
        &self,
        msg: &Incoming,
        prompt: Prompt,
        subject: String,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        let share = match self.shares.take(&prompt) {
            Ok(share) => share,
            Err(reason) => {
                let r = Refusal {
                    subject,
                    trace_id: prompt.trace_id,
                    conversation: prompt.conversation,
                    code: ErrorCode::Overloaded,
                    reason,
                };
                return self.refuse(msg, r).await;
            }
        };
        let sink = self
            .sink(
                subject,
                &prompt.trace_id,
                prompt.conversation.as_deref(),
                msg,
            )
            .streaming(self.pace(&prompt))
            .holding(share);
        self.dispatch_with(prompt, sink, permit).await
    }

    /// Queues a prompt with its sink; a full conversation queue or a trace
    /// id in use is answered at once.
    async fn dispatch_with(
        &self,
        prompt: Prompt,
        sink: ReplySink,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        let job = Job {
            prompt,
            sink,
            permit,
        };
        let (code, reason, job) = match self.dispatcher.dispatch(job) {
            Ok(()) => return,
            Err(Refused::Busy(job)) => {
                let p = &job.prompt;
                let reason = format!(
                    "conversation {} already has a turn running and {} queued (turn.conversation_queue)",
                    p.conversation.as_deref().or(p.session_id.as_deref()).unwrap_or("?"),
                    self.config.turn.conversation_queue
                );
                (ErrorCode::SessionBusy, reason, job)
            }
            Err(Refused::Rejected(job)) => {
                let p = &job.prompt;
                let reason = format!(
                    "conversation {} is busy and the prompt said \"when_busy\": \"reject\"; nothing was queued",
                    p.conversation.as_deref().or(p.session_id.as_deref()).unwrap_or("?"),
                );
                (ErrorCode::SessionBusy, reason, job)
            }
            Err(Refused::TenantBusy(job)) => {
                let reason = format!(
                    "{} has {} turns queued or running ([tenancy] max_turns_per_tenant); send again when one has ended",
                    job.prompt.caller, self.config.tenancy.max_turns_per_tenant
                );
                (ErrorCode::Overloaded, reason, job)
            }
            Err(Refused::DuplicateTrace(job)) => {
                let reason = format!(
                    "trace_id {:?} is already used by a queued or running turn; each live turn needs its own",
                    job.prompt.trace_id
                );
                (ErrorCode::BadRequest, reason, job)
            }
        };
        let Job {
            prompt, mut sink, ..
        } = *job;
        warn!(trace_id = %prompt.trace_id, code = code.as_str(), %reason, "prompt refused");
        sink.send(ReplyBody::error(code, reason)).await;
    }

    /// Where a pulled job runs, in a cluster: here, or at its
    /// conversation's home (forwarded there, which then settles it), or
    /// later (the home did not take it, or the conversation is moving:
    /// delivered again after `retry_delay`). The last delivery goes to its
    /// home too, and runs here only if the home does not take it.
    pub async fn job_home(&self, job: &JobMessage, route: &Route, last: bool) -> JobHome {
        let here = JobHome::Here { moved_from: None };
        let (
            Some(cluster),
            Route::Prompt {
                caller,
                conversation,
            },
        ) = (&self.cluster, route)
        else {
            return here;
        };
        let Ok((prompt, _)) = self.admit(&job.incoming, caller, conversation.as_deref()) else {
            return here; // refused where it is, by `job`
        };
        let Some(conversation) = prompt.conversation.as_deref() else {
            return here;
        };
        // The last delivery runs here if its home cannot take it: a job is
        // never lost to a home that bounces it.
        let later = if last { here } else { JobHome::Later };
        let sessions = self.dispatcher.context().sessions.as_ref();
        let forwarded = job.incoming.forwarded_by.is_some();
        match cluster.place(conversation, forwarded, sessions).await {
            Place::Here { moved_from } => JobHome::Here { moved_from },
            Place::Busy { reason } => {
                info!(%conversation, %reason, last, "a job's conversation is moving");
                later
            }
            Place::There { instance } => match cluster.forward_job(&instance, job).await {
                Ok(()) => {
                    info!(%conversation, home = %instance, sequence = job.sequence, "job forwarded to its conversation's home");
                    JobHome::Forwarded
                }
                Err(e) => {
                    warn!(%conversation, home = %instance, error = %e, last, "the conversation's home did not take the job");
                    later
                }
            },
        }
    }

    /// A durable job (`crate::jobs`), checked as a prompt from `caller`
    /// (its subject's tenant). It has no NATS reply subject: its replies go
    /// to `reply_to` or the default reply subject, never into the jobs
    /// stream. Its sink asks `hook` about the terminal reply. A refusal
    /// (`bad_request`, `forbidden`) is answered here: `Err((code, hook))`.
    pub async fn job(
        &self,
        msg: Incoming,
        (caller, tail): (Caller, Option<String>),
        job: crate::protocol::job::JobTurn,
        hook: crate::turn::job::JobHook,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Result<(), (ErrorCode, crate::turn::job::JobHook)> {
        let refusal = match self.admit(&msg, &caller, tail.as_deref()) {
            Ok((prompt, subject))
                if crate::protocol::job::is_job_subject(
                    &self.config.jetstream.jobs_subject,
                    &subject,
                ) =>
            {
                Refusal {
                    reason: format!("reply_to {subject:?} is in the jobs stream"),
                    subject: self
                        .config
                        .reply_rules()
                        .default_subject(&caller, &prompt.trace_id),
                    trace_id: prompt.trace_id,
                    conversation: prompt.conversation,
                    code: ErrorCode::Forbidden,
                }
            }
            Ok((mut prompt, subject)) => {
                prompt.moved_from = job.moved_from.clone();
                prompt.job = Some(job);
                let sink = self
                    .sink(
                        subject,
                        &prompt.trace_id,
                        prompt.conversation.as_deref(),
                        &msg,
                    )
                    .streaming(self.pace(&prompt))
                    .job(hook);
                self.dispatch_with(prompt, sink, permit).await;
                return Ok(());
            }
            Err(r) => r,
        };
        let code = refusal.code;
        self.refuse(&msg, refusal).await;
        Err((code, hook))
    }

    /// The NATS reply subject of a control message, if the daemon may
    /// answer there: valid, not one of its own subjects, and (strict) in
    /// the caller's inbox space.
    fn answer_subject(&self, caller: &Caller, msg: &Incoming) -> Option<String> {
        let r = msg.reply.as_deref()?;
        if validate_subject(r).is_err() {
            return None;
        }
        match self
            .config
            .reply_rules()
            .route(caller, Some(r), None, "control")
        {
            Ok(s) => Some(s),
            Err((reason, _)) => {
                warn!(subject = %msg.subject, %reason, "not answering a control message there");
                None
            }
        }
    }

    async fn answer(&self, subject: Option<String>, body: serde_json::Value) {
        if let Some(r) = subject {
            if let Err(e) = self
                .publisher
                .publish_raw(&r, body.to_string().into_bytes())
                .await
            {
                warn!(error = %e, "answering a control message failed");
            }
        }
    }

    /// An abort, or an answer to a permission or question reply.
    pub async fn control(&self, msg: Incoming) {
        match Route::of(&self.config.route_subjects(), &msg.subject) {
            Route::Abort { caller } => self.abort(caller, msg).await,
            Route::Answer {
                caller, request_id, ..
            } => self.answer_request(caller, request_id, msg).await,
            other => warn!(subject = %msg.subject, ?other, "an unroutable control message"),
        }
    }

    async fn abort(&self, caller: Caller, msg: Incoming) {
        let reply = self.answer_subject(&caller, &msg);
        let body = match parse_abort(&msg.payload) {
            Ok(req) => {
                let a = self.dispatcher.abort(&req, &caller);
                info!(%caller, target_turn = ?req.target, aborted = a.aborted, dropped = a.dropped, "abort request");
                serde_json::json!({"aborted": a.aborted, "reason": a.reason, "dropped": a.dropped})
            }
            Err(reason) => {
                warn!(%caller, %reason, "bad abort request");
                serde_json::json!({"aborted": false, "reason": reason, "code": "bad_request"})
            }
        };
        self.answer(reply, body).await;
    }

    async fn answer_request(&self, caller: Caller, request_id: Option<String>, msg: Incoming) {
        let reply = self.answer_subject(&caller, &msg);
        // On the bare subject the request id may be in the payload.
        let request_id = request_id.or_else(|| {
            serde_json::from_slice::<serde_json::Value>(&msg.payload)
                .ok()
                .and_then(|v| v.get("request_id")?.as_str().map(str::to_string))
        });
        let Some(id) = request_id else {
            warn!(subject = %msg.subject, "an answer without a request id");
            let body = serde_json::json!({"ok": false, "reason": "no request id: answer on <subject>.<request_id> or put `request_id` in the payload"});
            return self.answer(reply, body).await;
        };
        let answer = AnswerMsg {
            payload: msg.payload,
            reply,
        };
        if let Err(answer) = self.answers.deliver(&id, &caller, answer) {
            // Every daemon hears answers; the one whose turn waits acts. An
            // unknown id and another tenant's request read the same.
            info!(request_id = %id, %caller, "an answer for a request this caller cannot answer here");
            let body = serde_json::json!({"ok": false, "reason": format!("no turn on this bridge waits for request {id}")});
            self.answer(answer.reply, body).await;
        }
    }
}
