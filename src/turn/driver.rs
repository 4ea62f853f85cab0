//! One agent turn, from a validated prompt to its terminal reply.
//!
//! resolve the session -> follow its events -> wait for the stream ->
//! `prompt_async` -> map events to replies under three deadlines -> on idle,
//! read the message list and conclude (`final` or `error`).
//!
//! Invariant: [`run_turn`] publishes exactly one terminal reply, whatever
//! happens (it is the only place that sends one, and the sink refuses
//! anything after it).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use super::interactive::{AnswerRegistry, Interactive};
use super::sessions::SessionStore;
use super::sink::ReplySink;
use crate::bus::Publisher;
use crate::config::{Config, OneOffSessions};
use crate::mapper::{Conclusion, Signal, TurnMapper};
use crate::opencode::client::{ModelBody, PromptBody, PromptPart, SessionInfo};
use crate::opencode::stream::StreamState;
use crate::opencode::{EventHub, OpenCodeClient, OpenCodeError, Subscription};
use crate::protocol::reply::FinalReply;
use crate::protocol::{ErrorCode, Prompt, ReplyBody};

/// What every turn shares.
pub struct TurnContext {
    pub client: OpenCodeClient,
    pub hub: Arc<EventHub>,
    pub publisher: Publisher,
    pub sessions: Arc<dyn SessionStore>,
    pub config: Arc<Config>,
    /// Answers to permission / question replies, by request id.
    pub answers: Arc<AnswerRegistry>,
}

impl TurnContext {
    pub fn new(
        client: OpenCodeClient,
        hub: Arc<EventHub>,
        publisher: Publisher,
        sessions: Arc<dyn SessionStore>,
        config: Arc<Config>,
    ) -> Self {
        TurnContext {
            client,
            hub,
            publisher,
            sessions,
            config,
            answers: Arc::new(AnswerRegistry::default()),
        }
    }

    /// A sink for one prompt's replies.
    pub fn sink(&self, prompt: &Prompt, subject: String) -> ReplySink {
        ReplySink::new(
            self.publisher.clone(),
            subject,
            prompt.trace_id.clone(),
            prompt.conversation.clone(),
            self.config.limits.max_reply_bytes,
        )
    }
}

/// Why a turn failed: the `error` reply's fields.
#[derive(Debug, Clone)]
pub struct TurnError {
    pub code: ErrorCode,
    pub message: String,
    pub retryable: bool,
}

impl TurnError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        TurnError {
            code,
            message: message.into(),
            retryable: code.retryable(),
        }
    }
}

impl From<OpenCodeError> for TurnError {
    /// The reply says what failed; the detail (URL, body) is logged only.
    fn from(e: OpenCodeError) -> Self {
        warn!(error = %e, "OpenCode call failed");
        TurnError {
            code: e.code(),
            retryable: e.retryable(),
            message: e.public(),
        }
    }
}

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
    let prompt_one_off = prompt.conversation.is_none() && prompt.session_id.is_none();
    let sink_session = async move {
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
            let r = drive(ctx, &prompt, &mut sink, &cancel, &abort, &mut inter).await;
            // Nothing may stay pending at OpenCode once the turn is over.
            inter.reject_all().await;
            r
        };
        let elapsed = started.elapsed();
        match outcome {
            Ok(mut fin) => {
                fin.duration_ms = elapsed.as_millis() as u64;
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
        sink.session_id().map(str::to_string)
    }
    .instrument(span)
    .await;
    // A one-off prompt's session is of no further use: OpenCode would keep
    // it forever (`[opencode] one_off_sessions`).
    let one_off = prompt_one_off && ctx.config.opencode.one_off_sessions == OneOffSessions::Delete;
    if let (true, Some(id)) = (one_off, sink_session) {
        if let Err(e) = ctx.client.delete_session(&id).await {
            warn!(session_id = %id, error = %e, "deleting a one-off session failed");
        }
    }
}

/// The session this prompt drives, created on first use of a conversation.
async fn resolve_session(ctx: &TurnContext, prompt: &Prompt) -> Result<String, TurnError> {
    if let Some(id) = &prompt.session_id {
        let tenant = prompt.caller.tenant();
        return match ctx.client.get_session(id).await {
            // A tenant drives only sessions of its own conversations (their
            // titles name the conversation); another tenant's session and
            // an unknown one read the same.
            Ok(s) if !session_belongs(&s, tenant, &ctx.config.opencode.title_prefix) => {
                warn!(session_id = %id, caller = %prompt.caller, "a tenant named a session outside its namespace");
                Err(TurnError::new(
                    ErrorCode::Forbidden,
                    format!(
                        "session {id} is not one of {}'s conversations",
                        prompt.caller
                    ),
                ))
            }
            Ok(s) => Ok(s.id),
            Err(OpenCodeError::NotFound { .. }) if tenant.is_some() => Err(TurnError::new(
                ErrorCode::Forbidden,
                format!(
                    "session {id} is not one of {}'s conversations",
                    prompt.caller
                ),
            )),
            Err(OpenCodeError::NotFound { .. }) => Err(TurnError::new(
                ErrorCode::BadRequest,
                format!("OpenCode has no session {id}"),
            )),
            Err(e) => Err(e.into()),
        };
    }
    if let Some(conv) = &prompt.conversation {
        if let Some(id) = ctx.sessions.get(conv).await {
            return Ok(id);
        }
    }
    let title = match &prompt.conversation {
        Some(c) => format!("{}{c}", ctx.config.opencode.title_prefix),
        None => format!(
            "{}one-off {}",
            ctx.config.opencode.title_prefix, prompt.trace_id
        ),
    };
    let s = ctx.client.create_session(&title).await?;
    info!(session_id = %s.id, %title, "created OpenCode session");
    if let Some(conv) = &prompt.conversation {
        ctx.sessions.put(conv, &s.id).await;
    }
    Ok(s.id)
}

/// Whether `s` is a session the tenant may drive: a top-level session whose
/// title names one of the tenant's conversations. The operator may drive any.
fn session_belongs(s: &SessionInfo, tenant: Option<&str>, title_prefix: &str) -> bool {
    let Some(t) = tenant else { return true };
    s.parent_id.is_none()
        && s.title
            .strip_prefix(title_prefix)
            .is_some_and(|conv| crate::protocol::tenant::is_under(conv, t))
}

fn prompt_body(prompt: &Prompt) -> PromptBody {
    PromptBody {
        message_id: crate::opencode::ids::ascending("msg"),
        parts: PromptPart::of(&prompt.text, &prompt.attachments),
        model: prompt.model.as_ref().map(ModelBody::from),
        agent: prompt.agent.clone(),
        system: prompt.system.clone(),
        tools: prompt.tools.clone(),
    }
}

/// A non-concluding idle is followed by this many looks at the message list.
const MAX_RECHECKS: u32 = 10;
const RECHECK_DELAY: Duration = Duration::from_millis(200);

/// Which deadline fired.
#[derive(Debug, Clone, Copy)]
enum Deadline {
    FirstEvent,
    Idle,
    Turn,
    Recheck,
}

async fn drive(
    ctx: &TurnContext,
    prompt: &Prompt,
    sink: &mut ReplySink,
    cancel: &CancellationToken,
    abort: &CancellationToken,
    inter: &mut Interactive,
) -> Result<FinalReply, TurnError> {
    let cfg = &ctx.config.turn;
    let mut turn_deadline = Instant::now() + cfg.turn_timeout;
    let mut session_id = resolve_session(ctx, prompt).await?;
    let mut recreated = false;

    // Follow the session before prompting, so no event is missed.
    let mut sub = subscribe(ctx, &session_id)?;
    if !ctx
        .hub
        .wait_connected(ctx.config.opencode.connect_timeout)
        .await
    {
        warn!(
            base_url = ctx.client.base_url(),
            "the event stream is not connected"
        );
        return Err(TurnError::new(
            ErrorCode::OpencodeUnavailable,
            "OpenCode's event stream is not connected",
        ));
    }

    if let Some(m) = &prompt.model {
        check_model(ctx, m).await?;
    }
    let body = prompt_body(prompt);
    // Watch the stream from before the prompt: a reconnect while OpenCode
    // answers the POST must not go unnoticed.
    let stream_state = ctx.hub.state();
    let mut seen_epoch = stream_state.borrow().epoch;
    loop {
        sink.set_session(&session_id);
        match ctx.client.prompt_async(&session_id, &body).await {
            Ok(()) => break,
            Err(OpenCodeError::NotFound { .. }) if prompt.session_id.is_none() && !recreated => {
                // The session is gone (deleted, data reset). OpenCode never
                // accepted the prompt, so sending it again is safe.
                warn!(%session_id, "OpenCode session is gone; creating a new one");
                if let Some(conv) = &prompt.conversation {
                    ctx.sessions.remove(conv).await;
                }
                drop(sub);
                session_id = resolve_session(ctx, prompt).await?;
                recreated = true;
                sub = subscribe(ctx, &session_id)?;
            }
            Err(OpenCodeError::NotFound { .. }) if prompt.session_id.is_some() => {
                return Err(TurnError::new(
                    ErrorCode::BadRequest,
                    format!("OpenCode has no session {session_id}"),
                ))
            }
            Err(e) => return Err(e.into()),
        }
    }
    debug!(%session_id, "prompt accepted by OpenCode");

    let mut mapper = TurnMapper::new(&session_id, &body.message_id)
        .with_tool_result_limit(ctx.config.limits.max_tool_result_bytes);
    let mut out = Vec::new();
    if sub.take_gap() {
        if let Some(c) = resync(ctx, &mut mapper, &session_id, sink, &mut out).await? {
            return finish(c, inter, recreated);
        }
    }
    let mut got_first = false;
    let mut idle_deadline = Instant::now() + cfg.first_event_timeout;
    // When to look at the message list again without waiting for an event.
    let mut recheck_at: Option<Instant> = None;
    let mut rechecks = 0;

    // The futures that outlive one event are made once: re-creating them on
    // every event registered and removed a waiter in both cancellation
    // tokens and a timer-wheel entry per event, a visible share of the
    // daemon's CPU with many slow turns (docs/BENCHMARKS.md). The timer is
    // moved, not re-made: moving it later is a lock-free update.
    let shutdown = cancel.cancelled();
    let aborted = abort.cancelled();
    let timer = sleep_until(idle_deadline);
    let state_change = next_state_change(stream_state);
    tokio::pin!(shutdown, aborted, timer, state_change);
    let conclusion = 'turn: loop {
        let waiting_since = inter.waiting_since();
        let (deadline, which) = next_deadline(
            turn_deadline,
            idle_deadline,
            recheck_at,
            got_first,
            inter.is_waiting(),
        );
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        let check_end: bool;
        tokio::select! {
            biased;
            _ = &mut shutdown => {
                abort_quietly(ctx, &mut sub, &session_id).await;
                return Err(TurnError::new(ErrorCode::ShuttingDown, "the bridge is shutting down; the turn was aborted"));
            }
            _ = &mut aborted => {
                return Err(abort_turn(ctx, &mut mapper, &mut sub, &session_id, sink, &mut out).await);
            }
            ev = sub.recv() => {
                let Some(mut ev) = ev else {
                    return Err(TurnError::new(ErrorCode::Internal, "the event router closed"));
                };
                // Events already queued are taken here too (a bounded
                // number, so an abort or a shutdown is still seen soon):
                // a burst costs one pass through the select, not one each.
                let mut budget = DRAIN_BUDGET;
                check_end = loop {
                    if sub.take_gap_before_last() {
                        // Events were lost just before this one: stop
                        // trusting live text, catch up over HTTP.
                        if let Some(c) = resync(ctx, &mut mapper, &session_id, sink, &mut out).await? {
                            break 'turn c;
                        }
                    }
                    let signal = mapper.on_event_owned(ev, &mut out);
                    sink.send_all(&mut out).await;
                    // Follow the subagent sessions this turn starts.
                    for (child, _) in mapper.child_sessions() {
                        sub.follow(child);
                    }
                    let end = match signal {
                        Signal::Nothing => false,
                        Signal::Progress => {
                            got_first = true;
                            idle_deadline = Instant::now() + cfg.idle_timeout;
                            false
                        }
                        Signal::Retry { attempt, message } => {
                            got_first = true;
                            idle_deadline = Instant::now() + cfg.idle_timeout;
                            info!(?attempt, message = message.as_deref().unwrap_or(""), "OpenCode is retrying the provider");
                            false
                        }
                        Signal::Idle => true,
                        Signal::Error(e) => {
                            got_first = true;
                            debug!(name = %e.name, "session.error");
                            recheck_at = Some(Instant::now() + Duration::from_secs(5));
                            false
                        }
                        Signal::Permission(p) => {
                            got_first = true;
                            idle_deadline = Instant::now() + cfg.idle_timeout;
                            inter.on_permission(p, sink).await;
                            false
                        }
                        Signal::Question(q) => {
                            got_first = true;
                            idle_deadline = Instant::now() + cfg.idle_timeout;
                            inter.on_question(q, sink).await;
                            false
                        }
                    };
                    budget -= 1;
                    if end || budget == 0 {
                        break end;
                    }
                    match sub.try_recv() {
                        Some(next) => ev = next,
                        None => {
                            // Nothing queued: a loss can only be behind us.
                            if sub.take_gap() {
                                if let Some(c) = resync(ctx, &mut mapper, &session_id, sink, &mut out).await? {
                                    break 'turn c;
                                }
                            }
                            break false;
                        }
                    }
                };
            }
            answered = inter.next(), if inter.is_waiting() => {
                inter.resolve(answered).await;
                if !inter.is_waiting() {
                    // The caller answered (or time ran out): the deadlines
                    // resume, the whole-turn one moved by the wait.
                    if let Some(since) = waiting_since {
                        turn_deadline += since.elapsed();
                    }
                    idle_deadline = Instant::now() + cfg.idle_timeout;
                }
                check_end = false;
            }
            (rx, changed) = &mut state_change => {
                if !changed {
                    return Err(TurnError::new(ErrorCode::Internal, "the event stream reader stopped"));
                }
                let s = *rx.borrow();
                state_change.set(next_state_change(rx));
                if !s.connected {
                    // The stream dropped: is OpenCode itself gone?
                    if let Err(e) = ctx.client.health(ctx.config.opencode.connect_timeout).await {
                        if matches!(e, OpenCodeError::Unavailable { .. }) {
                            warn!(error = %e, "OpenCode went away during the turn");
                            return Err(TurnError::new(
                                ErrorCode::OpencodeUnavailable,
                                format!("OpenCode went away during the turn: {}", e.public()),
                            ));
                        }
                    }
                }
                if s.connected && s.epoch != seen_epoch {
                    seen_epoch = s.epoch;
                    info!("event stream reconnected; resyncing the turn over HTTP");
                    sub.take_gap();
                    if let Some(c) = resync(ctx, &mut mapper, &session_id, sink, &mut out).await? {
                        break c;
                    }
                }
                check_end = false;
            }
            _ = &mut timer => {
                match which {
                    Deadline::Recheck => { check_end = true; recheck_at = None; }
                    _ => {
                        // The stream may have lost the end (only heartbeats
                        // since): ask OpenCode before giving up.
                        if let Some(c) = finished_meanwhile(ctx, &mut mapper, &session_id, sink, &mut out).await {
                            info!("deadline reached, but OpenCode's message list shows the turn complete");
                            break c;
                        }
                        abort_quietly(ctx, &mut sub, &session_id).await;
                        let (name, d) = match which {
                            Deadline::FirstEvent => ("first_event_timeout", cfg.first_event_timeout),
                            Deadline::Idle => ("idle_timeout", cfg.idle_timeout),
                            _ => ("turn_timeout", cfg.turn_timeout),
                        };
                        return Err(TurnError::new(
                            ErrorCode::Timeout,
                            format!("deadline {name} ({}) expired; the OpenCode session was aborted", humantime::format_duration(d)),
                        ));
                    }
                }
            }
        }
        if check_end {
            let messages = ctx.client.messages(&session_id).await?;
            match mapper.conclude(&messages) {
                Some(c) => {
                    mapper.reconcile(&messages, true, &mut out);
                    sink.send_all(&mut out).await;
                    break c;
                }
                None if recheck_at.is_none()
                    && mapper.error().is_some()
                    && rechecks >= MAX_RECHECKS =>
                {
                    // An error with no answer message and no idle to follow.
                    break crate::mapper::classify(mapper.error().expect("checked"));
                }
                None if inter.rejected() && !inter.is_waiting() => {
                    // After a rejection OpenCode stops its loop: once the
                    // session is idle, the last answer is the end, even
                    // with `finish: "tool-calls"`.
                    if let Some(c) = stopped_after_rejection(
                        ctx,
                        &mut mapper,
                        &session_id,
                        &messages,
                        sink,
                        &mut out,
                    )
                    .await?
                    {
                        info!("the turn ended after a rejected permission or question");
                        break c;
                    }
                    if rechecks < MAX_RECHECKS {
                        rechecks += 1;
                        recheck_at = Some(Instant::now() + RECHECK_DELAY);
                    }
                }
                None => {
                    // OpenCode announces idle a few ms before it writes the
                    // answer's completion: look again shortly, a few times.
                    debug!("idle, but this turn's answer is not complete yet");
                    if rechecks < MAX_RECHECKS {
                        rechecks += 1;
                        recheck_at = Some(Instant::now() + RECHECK_DELAY);
                    }
                }
            }
        }
    };

    let mut conclusion = conclusion;
    if let Conclusion::Final(fin) = &mut conclusion {
        // Subagent work: its tool calls (with parent_call_id) and its usage.
        let children = mapper.child_sessions().to_vec();
        for (child, call_id) in children {
            match ctx.client.messages(&child).await {
                Ok(msgs) => {
                    mapper.child_activity(&call_id, &msgs, fin, &mut out);
                    sink.send_all(&mut out).await;
                }
                Err(e) => warn!(%child, error = %e, "cannot read a subagent session"),
            }
        }
    }
    finish(conclusion, inter, recreated)
}

fn finish(
    conclusion: Conclusion,
    inter: &mut Interactive,
    recreated: bool,
) -> Result<FinalReply, TurnError> {
    match conclusion {
        Conclusion::Final(mut fin) => {
            fin.notes = std::mem::take(&mut inter.notes);
            fin.session_recreated = recreated;
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

fn subscribe(ctx: &TurnContext, session_id: &str) -> Result<Subscription, TurnError> {
    ctx.hub
        .subscribe(session_id)
        .map_err(|e| TurnError::new(ErrorCode::SessionBusy, e.to_string()))
}

/// How many queued events a turn takes in one go before it looks at its
/// other inputs (abort, shutdown, deadlines, answers) again.
const DRAIN_BUDGET: usize = 32;

/// The next change of the event stream's state, owning the receiver so the
/// future can live across the turn's select loop (made once per change, not
/// once per event).
async fn next_state_change(
    mut rx: tokio::sync::watch::Receiver<StreamState>,
) -> (tokio::sync::watch::Receiver<StreamState>, bool) {
    let ok = rx.changed().await.is_ok();
    rx.borrow_and_update();
    (rx, ok)
}

fn next_deadline(
    turn: Instant,
    idle: Instant,
    recheck_at: Option<Instant>,
    got_first: bool,
    waiting_for_caller: bool,
) -> (Instant, Deadline) {
    // While a caller is asked, the turn and idle deadlines are suspended
    // (the ask has its own timeout).
    let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
    let (turn, idle) = if waiting_for_caller {
        (far, far)
    } else {
        (turn, idle)
    };
    let mut best = (turn, Deadline::Turn);
    if idle < best.0 {
        best = (
            idle,
            if got_first {
                Deadline::Idle
            } else {
                Deadline::FirstEvent
            },
        );
    }
    if let Some(e) = recheck_at {
        if e < best.0 {
            best = (e, Deadline::Recheck);
        }
    }
    best
}

/// OpenCode accepts an unknown model with 204, fails later, and leaves the
/// session pinned to it: check it first.
async fn check_model(ctx: &TurnContext, m: &crate::protocol::ModelRef) -> Result<(), TurnError> {
    let providers = ctx.client.providers().await?;
    match providers.get(&m.provider) {
        None => {
            let mut known: Vec<&String> = providers.keys().collect();
            known.sort();
            Err(TurnError::new(
                ErrorCode::BadRequest,
                format!(
                    "unknown model {m}: OpenCode has no provider {:?} (it has {known:?})",
                    m.provider
                ),
            ))
        }
        Some(models) if !models.contains(&m.model) => Err(TurnError::new(
            ErrorCode::BadRequest,
            format!(
                "unknown model {m}: provider {:?} has no model {:?}",
                m.provider, m.model
            ),
        )),
        Some(_) => Ok(()),
    }
}

/// The end of a turn whose permission or question was rejected: the session
/// is idle and the last answer message is complete (whatever its `finish`).
async fn stopped_after_rejection(
    ctx: &TurnContext,
    mapper: &mut TurnMapper,
    session_id: &str,
    messages: &[crate::opencode::events::MessageWithParts],
    sink: &mut ReplySink,
    out: &mut Vec<ReplyBody>,
) -> Result<Option<Conclusion>, TurnError> {
    if ctx.client.session_status().await?.contains_key(session_id) {
        return Ok(None);
    }
    let Some(c) = mapper.conclude_stopped(messages) else {
        return Ok(None);
    };
    mapper.reconcile(messages, true, out);
    sink.send_all(out).await;
    Ok(Some(c))
}

/// Whether OpenCode finished the turn without the stream saying so: the
/// session is idle and the message list holds the complete answer.
async fn finished_meanwhile(
    ctx: &TurnContext,
    mapper: &mut TurnMapper,
    session_id: &str,
    sink: &mut ReplySink,
    out: &mut Vec<ReplyBody>,
) -> Option<Conclusion> {
    let busy = ctx
        .client
        .session_status()
        .await
        .ok()?
        .contains_key(session_id);
    if busy {
        return None;
    }
    let messages = ctx.client.messages(session_id).await.ok()?;
    let c = mapper.conclude(&messages)?;
    mapper.mark_gap();
    mapper.reconcile(&messages, true, out);
    sink.send_all(out).await;
    Some(c)
}

/// After lost events: catch up from the message list; conclude if OpenCode
/// says the session is idle and the turn's answer is complete.
async fn resync(
    ctx: &TurnContext,
    mapper: &mut TurnMapper,
    session_id: &str,
    sink: &mut ReplySink,
    out: &mut Vec<ReplyBody>,
) -> Result<Option<Conclusion>, TurnError> {
    mapper.mark_gap();
    let messages = ctx.client.messages(session_id).await?;
    let mut done = mapper.reconcile(&messages, false, out);
    sink.send_all(out).await;
    let mut busy = ctx.client.session_status().await?.contains_key(session_id);
    if busy {
        return Ok(None);
    }
    let mut messages = messages;
    if !done {
        // Idle with no complete answer: OpenCode may be a moment from
        // writing it, or it lost the turn (restarted mid-turn). Look again.
        tokio::time::sleep(Duration::from_secs(1)).await;
        messages = ctx.client.messages(session_id).await?;
        done = mapper.reconcile(&messages, false, out);
        sink.send_all(out).await;
        busy = ctx.client.session_status().await?.contains_key(session_id);
        if busy {
            return Ok(None);
        }
        if !done {
            return Err(TurnError::new(
                ErrorCode::OpencodeUnavailable,
                "OpenCode lost the turn: the session is idle without a complete answer (restarted mid-turn?)",
            ));
        }
    }
    let c = mapper.conclude(&messages);
    if c.is_some() {
        mapper.reconcile(&messages, true, out);
        sink.send_all(out).await;
    }
    Ok(c)
}

/// Aborts the session on request and waits (bounded) for OpenCode to
/// confirm it from the events: `session.error` (MessageAbortedError) or the
/// session going idle. Text streamed before the abort stays published.
async fn abort_turn(
    ctx: &TurnContext,
    mapper: &mut TurnMapper,
    sub: &mut Subscription,
    session_id: &str,
    sink: &mut ReplySink,
    out: &mut Vec<ReplyBody>,
) -> TurnError {
    let bound = ctx.config.turn.abort_timeout;
    info!(%session_id, "aborting the turn on request");
    if let Err(e) = ctx.client.abort(session_id, bound).await {
        warn!(%session_id, error = %e, "the abort call failed");
        return TurnError::new(
            ErrorCode::Aborted,
            format!("aborted on request; OpenCode could not be told: {e}"),
        );
    }
    let confirmed = tokio::time::timeout(bound, async {
        while let Some(ev) = sub.recv().await {
            match mapper.on_event(&ev, out) {
                Signal::Error(_) | Signal::Idle => return true,
                _ => {}
            }
            sink.send_all(out).await;
        }
        false
    })
    .await
    .unwrap_or(false);
    sink.send_all(out).await;
    let message = if confirmed {
        "aborted on request".to_string()
    } else {
        format!(
            "aborted on request; OpenCode did not confirm within {}",
            humantime::format_duration(bound)
        )
    };
    TurnError::new(ErrorCode::Aborted, message)
}

/// Aborts the session and waits (bounded) until OpenCode confirms it, so
/// the abort's late events never reach the conversation's next turn.
async fn abort_quietly(ctx: &TurnContext, sub: &mut Subscription, session_id: &str) {
    let bound = ctx.config.turn.abort_timeout;
    if let Err(e) = ctx.client.abort(session_id, bound).await {
        warn!(%session_id, error = %e, "aborting the OpenCode session failed");
        return;
    }
    let settled = tokio::time::timeout(bound, async {
        while let Some(ev) = sub.recv().await {
            if matches!(
                ev,
                crate::opencode::events::Event::SessionIdle { .. }
                    | crate::opencode::events::Event::SessionStatus {
                        status: crate::opencode::events::SessionStatus::Idle,
                        ..
                    }
            ) {
                return;
            }
        }
    })
    .await;
    if settled.is_err() {
        warn!(%session_id, "OpenCode did not confirm the abort in time");
    }
}
