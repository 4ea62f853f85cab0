//! One agent turn, from a validated prompt to its terminal reply.
//!
//! [`begin`](super::begin) (session, events followed, `prompt_async`) ->
//! a [`Turn`] that owns its state and handles one input at a time: a burst
//! of OpenCode events, an answer from a caller, a change of the event
//! stream, a deadline, an abort or a shutdown. When OpenCode says the
//! session is idle, the turn reads the message list and concludes (`final`
//! or `error`) through one path, [`Turn::conclude_from`].
//!
//! Invariant: [`run_turn`] publishes exactly one terminal reply for its
//! sink, whatever happens (the sink refuses anything after it).

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use super::begin::{begin, Accepted};
use super::context::{TurnContext, TurnError};
use super::deadlines::{Deadline, Deadlines};
use super::interactive::{Answered, Interactive};
use super::provider::ProviderRetries;
use super::sink::ReplySink;
use crate::config::OneOffSessions;
use crate::mapper::{Conclusion, Signal, TurnMapper};
use crate::opencode::events::{Event, MessageWithParts, SessionStatus};
use crate::opencode::stream::StreamState;
use crate::opencode::{OpenCodeError, Subscription};
use crate::protocol::reply::FinalReply;
use crate::protocol::{ErrorCode, Prompt, ReplyBody};

/// Runs one turn and publishes its replies, ending with exactly one
/// terminal reply. `cancel` ends the turn with `shutting_down`, `abort` with
/// `aborted`.
pub async fn run_turn(
    ctx: &TurnContext,
    prompt: Prompt,
    mut sink: ReplySink,
    cancel: CancellationToken,
    abort: CancellationToken,
) {
    let span = info_span!("turn", trace_id = %prompt.trace_id, conversation = prompt.conversation.as_deref().unwrap_or(""));
    let one_off = prompt.conversation.is_none()
        && prompt.session_id.is_none()
        && ctx.config.opencode.one_off_sessions == OneOffSessions::Delete;
    let session = async {
        let started = Instant::now();
        info!(reply_subject = sink.subject(), "turn started");
        let outcome = if cancel.is_cancelled() {
            Err(TurnError::new(
                ErrorCode::ShuttingDown,
                "the bridge is shutting down; the prompt was not started",
            ))
        } else {
            let mut inter = Interactive::new(
                ctx.answers.clone(),
                ctx.client.clone(),
                ctx.publisher.clone(),
                &ctx.config,
                prompt.interactive,
                prompt.caller.clone(),
            );
            let r = drive(ctx, &prompt, &mut sink, &cancel, &abort, &mut inter)
                .await
                .map(|mut fin| {
                    fin.workspace = prompt.workspace.clone();
                    fin
                });
            // Nothing may stay pending at OpenCode once the turn is over.
            inter.reject_all().await;
            match r {
                Err(e) => Err(super::provider::explain(ctx, &prompt, sink.session_id(), e).await),
                ok => ok,
            }
        };
        // A job's turn that comes back keeps its session: the next delivery
        // follows (or prompts) it there.
        let comes_back = prompt.job.is_some()
            && outcome.as_ref().err().is_some_and(|e| {
                crate::protocol::job::verdict(Some(e.code), false)
                    != crate::protocol::job::Verdict::Publish
            });
        send_terminal(&mut sink, outcome, started).await;
        sink.session_id()
            .filter(|_| !comes_back)
            .map(str::to_string)
    }
    .instrument(span)
    .await;
    // A one-off prompt's session is of no further use: OpenCode would keep
    // it forever (`[opencode] one_off_sessions`).
    if let (true, Some(id)) = (one_off, session) {
        if let Err(e) = ctx.client.delete_session(&id).await {
            warn!(session_id = %id, error = %e, "deleting a one-off session failed");
        }
    }
}

/// The one terminal reply of a turn that could not start (its tenant's
/// server could not be had).
pub async fn fail_before_start(mut sink: ReplySink, e: TurnError) {
    send_terminal(&mut sink, Err(e), Instant::now()).await;
}

/// The one terminal reply.
async fn send_terminal(
    sink: &mut ReplySink,
    outcome: Result<FinalReply, TurnError>,
    started: Instant,
) {
    match outcome {
        Ok(mut fin) => {
            fin.duration_ms = started.elapsed().as_millis() as u64;
            info!(
                duration_ms = fin.duration_ms,
                replies = sink.count() + 1,
                "turn completed"
            );
            sink.send(ReplyBody::Final(Box::new(fin))).await;
        }
        Err(e) => {
            warn!(code = e.code.as_str(), error = %e.message, "turn failed");
            sink.send(ReplyBody::Error {
                error: e.message,
                code: e.code,
                retryable: e.retryable,
            })
            .await;
        }
    }
}

async fn drive(
    ctx: &TurnContext,
    prompt: &Prompt,
    sink: &mut ReplySink,
    cancel: &CancellationToken,
    abort: &CancellationToken,
    inter: &mut Interactive,
) -> Result<FinalReply, TurnError> {
    let started = Instant::now();
    let accepted = begin(ctx, prompt, sink).await?;
    let mut turn = Turn::new(ctx, prompt, sink, inter, accepted, started);
    let conclusion = turn.run(cancel, abort).await?;
    turn.finish(conclusion).await
}

/// A non-concluding idle is followed by this many looks at the message list.
const MAX_RECHECKS: u32 = 10;
const RECHECK_DELAY: Duration = Duration::from_millis(200);
/// After a `session.error`, the message list is looked at this much later
/// even if no idle follows.
const ERROR_RECHECK: Duration = Duration::from_secs(5);
/// After lost events, an idle session without a complete answer is read
/// again this many times, this far apart (OpenCode announces idle a few ms
/// before it writes the answer's completion), before the turn counts as
/// lost.
const RESYNC_RETRIES: u32 = 5;
const RESYNC_PAUSE: Duration = Duration::from_millis(50);
/// How many queued events a turn takes in one go before it looks at its
/// other inputs (abort, shutdown, deadlines, answers) again.
const DRAIN_BUDGET: usize = 32;

/// What a handler leaves the turn to do next. (Moved once per input,
/// never stored: the size of its `Done` does not matter.)
#[allow(clippy::large_enum_variant)]
enum Step {
    /// Wait for the next input.
    Wait,
    /// OpenCode may be done: read the message list.
    CheckEnd,
    /// The turn is over.
    Done(Conclusion),
}

/// Why a turn aborts its session.
#[derive(Clone, Copy, PartialEq, Eq)]
enum AbortFor {
    /// A caller asked (`opencode.abort`): what arrives meanwhile is mapped.
    Request,
    /// Shutdown, a deadline, the provider retry limit: quietly.
    Bridge,
}

/// One running turn: its state, and one handler per input.
struct Turn<'a> {
    ctx: &'a TurnContext,
    sink: &'a mut ReplySink,
    inter: &'a mut Interactive,
    session_id: String,
    sub: Subscription,
    mapper: TurnMapper,
    out: Vec<ReplyBody>,
    deadlines: Deadlines,
    retries: ProviderRetries,
    rechecks: u32,
    stream: Option<watch::Receiver<StreamState>>,
    epoch: u64,
    /// The embedded server's exits when the prompt was sent.
    exits: u64,
    recreated: bool,
    /// The host the conversation moved from (`Prompt::moved_from`).
    moved_from: Option<String>,
    /// A redelivered job's turn found at OpenCode: catch up first.
    resumed: bool,
    /// A durable job's turn: a shutdown leaves it running at OpenCode, for
    /// the daemon the job goes to next.
    job: bool,
}

impl<'a> Turn<'a> {
    fn new(
        ctx: &'a TurnContext,
        prompt: &Prompt,
        sink: &'a mut ReplySink,
        inter: &'a mut Interactive,
        accepted: Accepted,
        started: Instant,
    ) -> Self {
        let cfg = &ctx.config.turn;
        let Accepted {
            session_id,
            sub,
            message_id,
            recreated,
            stream,
            epoch,
            exits,
            resumed,
        } = accepted;
        Turn {
            mapper: TurnMapper::new(&session_id, &message_id)
                .with_tool_result_limit(ctx.config.limits.max_tool_result_bytes),
            deadlines: Deadlines::new(started, Instant::now(), cfg),
            retries: ProviderRetries::new(cfg.provider_retry_limit, prompt.progress),
            ctx,
            sink,
            inter,
            session_id,
            sub,
            out: Vec::new(),
            rechecks: 0,
            stream: Some(stream),
            epoch,
            exits,
            recreated,
            moved_from: prompt.moved_from.clone(),
            resumed,
            job: prompt.job.is_some(),
        }
    }

    /// Handles inputs until the turn concludes.
    async fn run(
        &mut self,
        cancel: &CancellationToken,
        abort: &CancellationToken,
    ) -> Result<Conclusion, TurnError> {
        if self.sub.take_gap() || std::mem::take(&mut self.resumed) {
            if let Some(c) = self.resync().await? {
                return Ok(c);
            }
        }
        // The futures that outlive one event are made once: re-creating
        // them on every event registered and removed a waiter in both
        // cancellation tokens and a timer-wheel entry per event, a visible
        // share of the daemon's CPU with many slow turns
        // (docs/BENCHMARKS.md). The timer is moved, not re-made.
        let shutdown = cancel.cancelled();
        let aborted = abort.cancelled();
        let timer = sleep_until(self.next_deadline().0);
        let stream = self.stream.take().expect("run once");
        let state_change = next_state_change(stream);
        tokio::pin!(shutdown, aborted, timer, state_change);
        loop {
            let (at, which) = self.next_deadline();
            if timer.deadline() != at {
                timer.as_mut().reset(at);
            }
            let step = tokio::select! {
                biased;
                _ = &mut shutdown => return Err(self.shut_down().await),
                _ = &mut aborted => return Err(self.aborted().await),
                ev = self.sub.recv() => self.on_events(ev).await?,
                answered = self.inter.next(), if self.inter.is_waiting() => {
                    self.on_answer(answered).await
                }
                (rx, changed) = &mut state_change => {
                    if !changed {
                        return Err(TurnError::new(ErrorCode::Internal, "the event stream reader stopped"));
                    }
                    let s = *rx.borrow();
                    state_change.set(next_state_change(rx));
                    self.on_stream(s).await?
                }
                _ = &mut timer => self.on_deadline(which).await?,
            };
            match step {
                Step::Wait => {}
                Step::Done(c) => return Ok(c),
                Step::CheckEnd => {
                    if let Some(c) = self.check_end().await? {
                        return Ok(c);
                    }
                }
            }
        }
    }

    fn next_deadline(&self) -> (Instant, Deadline) {
        self.deadlines.next(Instant::now(), self.inter.is_waiting())
    }

    /// Events: this one and those already queued (a bounded number, so an
    /// abort or a shutdown is still seen soon: a burst costs one pass
    /// through the select, not one each).
    async fn on_events(&mut self, ev: Option<Event>) -> Result<Step, TurnError> {
        let Some(mut ev) = ev else {
            return Err(TurnError::new(
                ErrorCode::Internal,
                "the event router closed",
            ));
        };
        let mut budget = DRAIN_BUDGET;
        loop {
            if self.sub.take_gap_before_last() {
                // Events were lost just before this one: stop trusting live
                // text, catch up over HTTP.
                if let Some(c) = self.resync().await? {
                    return Ok(Step::Done(c));
                }
            }
            let signal = self.mapper.on_event_owned(ev, &mut self.out);
            self.sink.send_all(&mut self.out).await;
            // Follow the subagent sessions this turn starts.
            for (child, _) in self.mapper.child_sessions() {
                self.sub.follow(child);
            }
            if self.on_signal(signal).await? {
                return Ok(Step::CheckEnd);
            }
            budget -= 1;
            if budget == 0 {
                return Ok(Step::Wait);
            }
            match self.sub.try_recv() {
                Some(next) => ev = next,
                None => {
                    // Nothing queued: a loss can only be behind us.
                    if self.sub.take_gap() {
                        if let Some(c) = self.resync().await? {
                            return Ok(Step::Done(c));
                        }
                    }
                    return Ok(Step::Wait);
                }
            }
        }
    }

    /// What one mapped event means for the turn; `true`: it may be over.
    async fn on_signal(&mut self, signal: Signal) -> Result<bool, TurnError> {
        let now = Instant::now();
        match signal {
            Signal::Nothing => {}
            Signal::Progress => self.deadlines.progress(now),
            Signal::Retry { attempt, message } => {
                self.deadlines.progress(now);
                if let Some(e) = self.retries.on_retry(self.sink, attempt, message).await {
                    self.abort_quietly().await;
                    return Err(e);
                }
            }
            Signal::Idle => return Ok(true),
            Signal::Error(e) => {
                self.deadlines.started();
                debug!(name = %e.name, "session.error");
                self.deadlines.recheck_in(now, ERROR_RECHECK);
            }
            Signal::Permission(p) => {
                self.deadlines.progress(now);
                self.inter.on_permission(p, self.sink).await;
            }
            Signal::Question(q) => {
                self.deadlines.progress(now);
                self.inter.on_question(q, self.sink).await;
            }
        }
        Ok(false)
    }

    /// A caller's answer (or its timeout), applied at OpenCode outside the
    /// select so no other input can cut it short.
    async fn on_answer(&mut self, answered: Answered) -> Step {
        let since = self.inter.waiting_since();
        self.inter.resolve(answered).await;
        if !self.inter.is_waiting() {
            if let Some(since) = since {
                self.deadlines.resume(since, Instant::now());
            }
        }
        Step::Wait
    }

    /// The shared event stream dropped or came back. A drop alone is a
    /// blip: the turn waits for the reconnect and resyncs then. OpenCode
    /// is gone only when the reader says it stayed unreachable for
    /// `[opencode] unavailable_after` while its connects kept failing.
    async fn on_stream(&mut self, s: StreamState) -> Result<Step, TurnError> {
        if s.exits != self.exits {
            // Its supervisor saw the server die: nothing of this turn is
            // left to wait for (issue 24: no 30 s wait on the stream).
            warn!("the embedded OpenCode exited during the turn");
            return Err(TurnError::new(
                ErrorCode::OpencodeUnavailable,
                "OpenCode exited during the turn; it is being restarted (retry)",
            ));
        }
        if !s.connected {
            if s.unreachable {
                let after = self.ctx.config.opencode.unavailable_after;
                warn!(?after, "OpenCode went away during the turn");
                return Err(TurnError::new(
                    ErrorCode::OpencodeUnavailable,
                    format!(
                        "OpenCode went away during the turn: unreachable for {}",
                        humantime::format_duration(after)
                    ),
                ));
            }
            debug!("the event stream dropped; waiting for it to reconnect");
            return Ok(Step::Wait);
        }
        if s.epoch != self.epoch {
            self.epoch = s.epoch;
            info!("event stream reconnected; resyncing the turn over HTTP");
            self.sub.take_gap();
            if let Some(c) = self.resync().await? {
                return Ok(Step::Done(c));
            }
        }
        Ok(Step::Wait)
    }

    async fn on_deadline(&mut self, which: Deadline) -> Result<Step, TurnError> {
        if which == Deadline::Recheck {
            self.deadlines.clear_recheck();
            return Ok(Step::CheckEnd);
        }
        // The stream may have lost the end (only heartbeats since): ask
        // OpenCode before giving up.
        if let Some(c) = self.finished_meanwhile().await {
            info!("deadline reached, but OpenCode's message list shows the turn complete");
            return Ok(Step::Done(c));
        }
        self.abort_quietly().await;
        let (name, d) = which.describe(&self.ctx.config.turn);
        Err(TurnError::new(
            ErrorCode::Timeout,
            format!(
                "deadline {name} ({}) expired; the OpenCode session was aborted",
                humantime::format_duration(d)
            ),
        ))
    }

    /// OpenCode said idle (or a recheck is due): conclude if the message
    /// list shows the answer complete, else look again shortly.
    async fn check_end(&mut self) -> Result<Option<Conclusion>, TurnError> {
        let messages = self.ctx.client.messages(&self.session_id).await?;
        if let Some(c) = self.conclude_from(&messages, End::Complete).await {
            return Ok(Some(c));
        }
        if !self.deadlines.recheck_pending()
            && self.rechecks >= MAX_RECHECKS
            && self.mapper.error().is_some()
        {
            // An error with no answer message and no idle to follow.
            return Ok(Some(crate::mapper::classify(
                self.mapper.error().expect("checked"),
            )));
        }
        if self.inter.rejected() && !self.inter.is_waiting() && !self.is_busy().await? {
            // After a rejection OpenCode stops its loop: once the session
            // is idle, the last answer is the end, even with `finish:
            // "tool-calls"`.
            if let Some(c) = self.conclude_from(&messages, End::Stopped).await {
                info!("the turn ended after a rejected permission or question");
                return Ok(Some(c));
            }
        }
        // OpenCode announces idle a few ms before it writes the answer's
        // completion: look again shortly, a few times.
        debug!("idle, but this turn's answer is not complete yet");
        if self.rechecks < MAX_RECHECKS {
            self.rechecks += 1;
            self.deadlines.recheck_in(Instant::now(), RECHECK_DELAY);
        }
        Ok(None)
    }

    /// The one way a turn concludes from OpenCode's message list: when the
    /// turn's answer is complete (as `end` requires), publish what the
    /// stream missed and conclude.
    async fn conclude_from(
        &mut self,
        messages: &[MessageWithParts],
        end: End,
    ) -> Option<Conclusion> {
        let c = match end {
            End::Complete | End::AfterGap => self.mapper.conclude(messages),
            End::Stopped => self.mapper.conclude_stopped(messages),
        }?;
        if end == End::AfterGap {
            self.mapper.mark_gap();
        }
        self.mapper.reconcile(messages, true, &mut self.out);
        self.sink.send_all(&mut self.out).await;
        Some(c)
    }

    async fn is_busy(&mut self) -> Result<bool, OpenCodeError> {
        Ok(self
            .ctx
            .client
            .session_status()
            .await?
            .contains_key(&self.session_id))
    }

    /// Whether OpenCode finished the turn without the stream saying so: the
    /// session is idle and the message list holds the complete answer.
    async fn finished_meanwhile(&mut self) -> Option<Conclusion> {
        if self.is_busy().await.ok()? {
            return None;
        }
        let messages = self.ctx.client.messages(&self.session_id).await.ok()?;
        if let Some(c) = self.conclude_from(&messages, End::AfterGap).await {
            return Some(c);
        }
        if self.inter.rejected() {
            return self.conclude_from(&messages, End::Stopped).await;
        }
        None
    }

    /// After lost events: catch up from the message list; conclude if
    /// OpenCode says the session is idle and the turn's answer is complete.
    /// The status is read first, so a list read after an idle status is the
    /// final one; an idle session without a complete answer is read again
    /// at once a few times (no fixed sleep), then the turn counts as lost.
    async fn resync(&mut self) -> Result<Option<Conclusion>, TurnError> {
        self.mapper.mark_gap();
        for attempt in 0..=RESYNC_RETRIES {
            let busy = self.is_busy().await?;
            let messages = self.ctx.client.messages(&self.session_id).await?;
            let done = self.mapper.reconcile(&messages, false, &mut self.out);
            self.sink.send_all(&mut self.out).await;
            if busy {
                return Ok(None);
            }
            if done {
                return Ok(self.conclude_from(&messages, End::Complete).await);
            }
            if self.inter.rejected() {
                if let Some(c) = self.conclude_from(&messages, End::Stopped).await {
                    return Ok(Some(c));
                }
            }
            if attempt < RESYNC_RETRIES {
                tokio::time::sleep(RESYNC_PAUSE).await;
            }
        }
        Err(TurnError::new(
            ErrorCode::OpencodeUnavailable,
            "OpenCode lost the turn: the session is idle without a complete answer (restarted mid-turn?)",
        ))
    }

    async fn shut_down(&mut self) -> TurnError {
        if !self.job {
            self.abort_quietly().await;
        }
        TurnError::new(
            ErrorCode::ShuttingDown,
            "the bridge is shutting down; the turn was aborted",
        )
    }

    async fn aborted(&mut self) -> TurnError {
        info!(session_id = %self.session_id, "aborting the turn on request");
        let bound = self.ctx.config.turn.abort_timeout;
        let message = match self.abort_session(AbortFor::Request).await {
            Err(e) => format!(
                "aborted on request; OpenCode could not be told: {}",
                e.public()
            ),
            Ok(true) => "aborted on request".to_string(),
            Ok(false) => format!(
                "aborted on request; OpenCode did not confirm within {}",
                humantime::format_duration(bound)
            ),
        };
        TurnError::new(ErrorCode::Aborted, message)
    }

    /// Aborts the session for the bridge's own reasons; a failure is logged.
    async fn abort_quietly(&mut self) {
        let _ = self.abort_session(AbortFor::Bridge).await;
    }

    /// The one abort path: aborts the session at OpenCode and waits
    /// (bounded by `turn.abort_timeout`) until OpenCode confirms it from the
    /// events, so the abort's late events never reach the conversation's
    /// next turn. For a requested abort, what arrives meanwhile is mapped
    /// and published (text streamed before the abort stays published).
    /// `Ok(confirmed)`.
    async fn abort_session(&mut self, why: AbortFor) -> Result<bool, OpenCodeError> {
        let bound = self.ctx.config.turn.abort_timeout;
        if let Err(e) = self.ctx.client.abort(&self.session_id, bound).await {
            warn!(session_id = %self.session_id, error = %e, "aborting the OpenCode session failed");
            return Err(e);
        }
        let (sub, mapper, out, sink) = (
            &mut self.sub,
            &mut self.mapper,
            &mut self.out,
            &mut *self.sink,
        );
        let confirmed = tokio::time::timeout(bound, async {
            while let Some(ev) = sub.recv().await {
                let settled = match why {
                    AbortFor::Request => {
                        let s =
                            matches!(mapper.on_event(&ev, out), Signal::Error(_) | Signal::Idle);
                        sink.send_all(out).await;
                        s
                    }
                    AbortFor::Bridge => is_idle(&ev),
                };
                if settled {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or(false);
        if !confirmed {
            warn!(session_id = %self.session_id, "OpenCode did not confirm the abort in time");
        }
        Ok(confirmed)
    }

    /// The conclusion as the turn's outcome: a subagent's work (its tool
    /// calls, with `parent_call_id`, and its usage) added to a `final`, the
    /// bridge's decisions in its notes.
    async fn finish(mut self, mut conclusion: Conclusion) -> Result<FinalReply, TurnError> {
        if let Conclusion::Final(fin) = &mut conclusion {
            let children = self.mapper.child_sessions().to_vec();
            for (child, call_id) in children {
                match self.ctx.client.messages(&child).await {
                    Ok(msgs) => {
                        self.mapper
                            .child_activity(&call_id, &msgs, fin, &mut self.out);
                        self.sink.send_all(&mut self.out).await;
                    }
                    Err(e) => warn!(%child, error = %e, "cannot read a subagent session"),
                }
            }
        }
        match conclusion {
            Conclusion::Final(mut fin) => {
                fin.notes = std::mem::take(&mut self.inter.notes);
                fin.session_recreated = self.recreated;
                if let Some(host) = &self.moved_from {
                    fin.session_recreated = true;
                    fin.notes.push(format!("this conversation's previous home (host {host}) is gone and this bridge drives another OpenCode server: a new session was started without the earlier turns"));
                }
                Ok(fin)
            }
            Conclusion::Failed {
                code,
                error,
                retryable,
            } => Err(TurnError {
                code,
                message: error,
                retryable,
            }),
        }
    }
}

/// What a turn's end must look like in the message list.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    /// The answer is complete (`finish` is not `tool-calls`).
    Complete,
    /// As `Complete`, read after events were lost.
    AfterGap,
    /// OpenCode stopped after a rejection: complete whatever its `finish`.
    Stopped,
}

fn is_idle(ev: &Event) -> bool {
    matches!(
        ev,
        Event::SessionIdle { .. }
            | Event::SessionStatus {
                status: SessionStatus::Idle,
                ..
            }
    )
}

/// The next change of the event stream's state, owning the receiver so the
/// future can live across the turn's select loop (made once per change, not
/// once per event).
async fn next_state_change(
    mut rx: watch::Receiver<StreamState>,
) -> (watch::Receiver<StreamState>, bool) {
    let ok = rx.changed().await.is_ok();
    rx.borrow_and_update();
    (rx, ok)
}
