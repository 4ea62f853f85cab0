//! Wiring only: connect NATS and OpenCode, start the event-stream reader,
//! serve prompts, and shut down as a tree with a grace period.
//!
//! Shutdown order: stop taking prompts (systemd `STOPPING=1`, leave the
//! micro service, drain the subscriptions and serve what was already
//! delivered) -> let in-flight turns finish within
//! `shutdown.grace` -> cancel the rest (each ends with `shutting_down`) ->
//! flush NATS -> stop the stream reader and the embedded OpenCode.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::bus::{self, BusError, ControlSubscription, Incoming, PromptSubscription, Publisher};
use crate::config::Config;
use crate::opencode::embedded::{EmbeddedError, EmbeddedServer};
use crate::opencode::stream::StreamOptions;
use crate::opencode::{EventHub, OpenCodeClient, OpenCodeError};
use crate::ops::metrics::Metrics;
use crate::ops::status::{Health, Sources};
use crate::ops::{Ops, OpsError};
use crate::protocol::control::parse_abort;
use crate::protocol::{
    parse_prompt, reply_subject, validate_subject, ErrorCode, PromptLimits, ReplyBody,
};
use crate::turn::{Dispatcher, Job, MemoryStore, ReplySink, SessionStore, TurnContext};

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Embedded(#[from] EmbeddedError),
    #[error(transparent)]
    OpenCode(#[from] OpenCodeError),
    #[error(transparent)]
    Ops(#[from] OpsError),
}

/// What a caller learns once the daemon is serving.
#[derive(Debug, Clone)]
pub struct Ready {
    pub opencode_url: String,
}

/// Runs the daemon until `shutdown` resolves. `ready` is told once the
/// prompt subscriptions are live.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
    ready: Option<oneshot::Sender<Ready>>,
) -> Result<(), AppError> {
    let config = Arc::new(config);
    // A signal during start-up (waiting for NATS, OpenCode starting) stops
    // the daemon at once: nothing is serving yet, so nothing is drained.
    tokio::pin!(shutdown);
    let Some(nats) = unless_shutdown(&mut shutdown, bus::connect(&config.nats)).await else {
        info!("stopped during start-up, before NATS was connected");
        return Ok(());
    };
    let nats = nats?;
    let publisher = Publisher::new(nats.clone()).with_reply_headers(config.subjects.reply_headers);

    let (embedded, client) = match &config.opencode.base_url {
        Some(url) => {
            let client = OpenCodeClient::new(
                url,
                config.opencode.resolved_password(),
                config
                    .opencode
                    .directory
                    .as_ref()
                    .map(|d| d.display().to_string()),
                &config.opencode,
            )?;
            (None, client)
        }
        None => {
            // Dropping the start stops the half-started `opencode serve`
            // (its child is killed on drop).
            let Some(started) =
                unless_shutdown(&mut shutdown, EmbeddedServer::start(&config.opencode)).await
            else {
                info!("stopped during start-up, while OpenCode was starting");
                return Ok(());
            };
            let (server, client) = started?;
            (Some(server), client)
        }
    };

    let stream_cancel = CancellationToken::new();
    let embedded_restarts = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let supervisor = embedded.map(|server| {
        tokio::spawn(server.supervise(stream_cancel.clone(), embedded_restarts.clone()))
    });
    let hub = EventHub::new(config.turn.event_buffer);
    let reader = tokio::spawn(hub.clone().run(
        client.clone(),
        StreamOptions {
            max_event_bytes: config.limits.max_event_bytes,
            stall_timeout: config.opencode.stream_stall_timeout,
            reconnect_min: config.opencode.reconnect_min,
            reconnect_max: config.opencode.reconnect_max,
        },
        stream_cancel.clone(),
    ));

    let sessions: Arc<dyn SessionStore> = match MemoryStore::rebuild(
        &client,
        &config.opencode.title_prefix,
    )
    .await
    {
        Ok(s) => {
            info!(
                conversations = s.len(),
                "conversation map rebuilt from OpenCode's sessions"
            );
            Arc::new(s)
        }
        Err(e) => {
            warn!(error = %e, "cannot list OpenCode's sessions; starting with an empty conversation map");
            Arc::new(MemoryStore::default())
        }
    };

    let ctx = Arc::new(TurnContext::new(
        client.clone(),
        hub.clone(),
        publisher.clone(),
        sessions,
        config.clone(),
    ));
    let tracker = TaskTracker::new();
    let turn_cancel = CancellationToken::new();
    let dispatcher = Dispatcher::new(ctx.clone(), tracker.clone(), turn_cancel.clone());
    let in_flight = Arc::new(Semaphore::new(config.turn.max_in_flight));
    let metrics = Metrics::new();

    let subjects = &config.subjects;
    let mut aborts = ControlSubscription::subscribe(
        &nats,
        &[
            subjects.abort.clone(),
            subjects.permission_reply.clone(),
            format!("{}.>", subjects.permission_reply),
            subjects.question_reply.clone(),
            format!("{}.>", subjects.question_reply),
        ],
    )
    .await?;
    let abort_task = {
        let dispatcher = dispatcher.clone();
        let publisher = publisher.clone();
        let cancel = stream_cancel.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break,
                    m = aborts.next() => m,
                };
                let Some(msg) = msg else { break };
                handle_control(&dispatcher, &publisher, msg).await;
            }
        })
    };
    let mut prompts = PromptSubscription::subscribe(&nats, &config.subjects).await?;
    let health = Health::new(
        &config,
        Sources {
            publisher: publisher.clone(),
            hub: hub.clone(),
            dispatcher: dispatcher.clone(),
            metrics: metrics.clone(),
            embedded_restarts: embedded_restarts.clone(),
            opencode_url: client.base_url().to_string(),
            embedded: config.opencode.base_url.is_none(),
        },
    );
    // The micro service, heartbeat, metrics listener; READY=1 to systemd.
    let mut ops = Ops::start(&config, health, publisher.clone()).await?;
    if let Some(r) = ready {
        let _ = r.send(Ready {
            opencode_url: client.base_url().to_string(),
        });
    }
    info!("opencode-nats-bridge is serving");
    info!(
        "try it: opencode-nats-bridge prompt --server {} 'Say hello' (or any NATS client on {}: docs/PROTOCOL.md)",
        config.nats.urls().first().map(String::as_str).unwrap_or_default(),
        config.subjects.prompt
    );

    loop {
        let permit = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            p = in_flight.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let msg = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            m = prompts.next() => m,
        };
        let Some(msg) = msg else {
            warn!("prompt subscriptions ended (NATS connection closed)");
            break;
        };
        accept(&dispatcher, &config, &metrics, msg, Some(permit)).await;
    }

    info!("shutting down: no new prompts");
    ops.stopping().await;
    prompts.drain().await;
    // Serve what the server had already delivered before the drain.
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(2), prompts.next()).await {
        accept(&dispatcher, &config, &metrics, msg, None).await;
    }
    tracker.close();
    let grace = config.shutdown.grace;
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!(
            ?grace,
            "turns still running after the grace period; ending them"
        );
        turn_cancel.cancel();
        let bound = config.turn.abort_timeout + Duration::from_secs(5);
        if tokio::time::timeout(bound, tracker.wait()).await.is_err() {
            warn!("some turns did not end; exiting anyway");
        }
    }
    publisher.flush().await;
    stream_cancel.cancel();
    let _ = reader.await;
    let _ = abort_task.await;
    if let Some(s) = supervisor {
        let _ = s.await;
    }
    ops.stop().await;
    if let Err(e) = nats.drain().await {
        warn!(error = %e, "NATS drain failed");
    }
    info!("stopped");
    Ok(())
}

/// `step`, unless `shutdown` resolves first (then `None`).
async fn unless_shutdown<T>(
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    step: impl Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        biased;
        _ = shutdown.as_mut() => None,
        r = step => Some(r),
    }
}

/// Routes one control message: an abort, or an answer to a permission or
/// question reply.
async fn handle_control(dispatcher: &Arc<Dispatcher>, publisher: &Publisher, msg: Incoming) {
    let subjects = &dispatcher.context().config.subjects;
    let answer_base = [&subjects.permission_reply, &subjects.question_reply]
        .into_iter()
        .find(|b| msg.subject == **b || msg.subject.starts_with(&format!("{b}.")));
    let Some(base) = answer_base else {
        return handle_abort(dispatcher, publisher, msg).await;
    };
    let request_id = msg
        .subject
        .strip_prefix(base.as_str())
        .and_then(|t| t.strip_prefix('.'))
        .map(str::to_string)
        .or_else(|| {
            serde_json::from_slice::<serde_json::Value>(&msg.payload)
                .ok()
                .and_then(|v| v.get("request_id")?.as_str().map(str::to_string))
        });
    let reply = msg.reply.clone().filter(|r| validate_subject(r).is_ok());
    let Some(id) = request_id else {
        warn!(subject = %msg.subject, "an answer without a request id");
        if let Some(r) = reply {
            let body = serde_json::json!({"ok": false, "reason": "no request id: answer on <subject>.<request_id> or put `request_id` in the payload"});
            let _ = publisher
                .publish_raw(&r, body.to_string().into_bytes())
                .await;
        }
        return;
    };
    let answer = crate::turn::interactive::AnswerMsg {
        payload: msg.payload,
        reply,
    };
    if let Err(answer) = dispatcher.context().answers.deliver(&id, answer) {
        // Every daemon hears answers; the one whose turn waits acts. Only a
        // request-style answer to an unknown id gets a refusal.
        info!(request_id = %id, "an answer for a request this bridge is not waiting for");
        if let Some(r) = answer.reply {
            let body = serde_json::json!({"ok": false, "reason": format!("no turn on this bridge waits for request {id}")});
            let _ = publisher
                .publish_raw(&r, body.to_string().into_bytes())
                .await;
        }
    }
}

/// Handles one abort request; answers request-style ones.
async fn handle_abort(dispatcher: &Arc<Dispatcher>, publisher: &Publisher, msg: Incoming) {
    let answer = match parse_abort(&msg.payload) {
        Ok(req) => {
            let a = dispatcher.abort(&req);
            info!(target_turn = ?req.target, aborted = a.aborted, dropped = a.dropped, "abort request");
            serde_json::json!({"aborted": a.aborted, "reason": a.reason, "dropped": a.dropped})
        }
        Err(reason) => {
            warn!(%reason, "bad abort request");
            serde_json::json!({"aborted": false, "reason": reason, "code": "bad_request"})
        }
    };
    if let Some(reply) = msg.reply.as_deref().filter(|r| validate_subject(r).is_ok()) {
        if let Err(e) = publisher
            .publish_raw(reply, answer.to_string().into_bytes())
            .await
        {
            warn!(error = %e, "answering an abort request failed");
        }
    }
}

/// Parses and routes one prompt: a `bad_request` or `session_busy` reply
/// right away, or a queued turn.
async fn accept(
    dispatcher: &Arc<Dispatcher>,
    config: &Config,
    metrics: &Arc<Metrics>,
    msg: Incoming,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    let ctx = dispatcher.context();
    let tail = msg
        .subject
        .strip_prefix(config.subjects.prompt.as_str())
        .and_then(|t| t.strip_prefix('.'))
        .filter(|t| !t.is_empty());
    let limits = PromptLimits {
        max_prompt_bytes: config.limits.max_prompt_bytes,
    };
    let inbox_error = msg.reply.as_deref().and_then(|r| {
        validate_subject(r)
            .err()
            .map(|e| format!("reply subject {r:?} {e}"))
    });
    let inbox = msg.reply.as_deref().filter(|_| inbox_error.is_none());
    let parsed = parse_prompt(&msg.payload, &msg.headers, tail, limits);
    let prompt = match (parsed, inbox_error) {
        (Ok(p), None) => p,
        (Ok(p), Some(reason)) => {
            let subject = reply_subject(
                None,
                p.reply_to.as_deref(),
                &p.trace_id,
                &config.subjects.reply_prefix,
            );
            warn!(trace_id = %p.trace_id, subject = %msg.subject, %reason, "bad prompt");
            let mut sink = ReplySink::new(
                ctx.publisher.clone(),
                subject,
                p.trace_id.clone(),
                p.conversation.clone(),
                config.limits.max_reply_bytes,
            )
            .traced(msg.traceparent.as_deref())
            .observed(metrics);
            sink.send(ReplyBody::error(ErrorCode::BadRequest, reason))
                .await;
            return;
        }
        (Err(rej), _) => {
            let subject = reply_subject(
                inbox,
                rej.reply_to.as_deref(),
                &rej.trace_id,
                &config.subjects.reply_prefix,
            );
            warn!(trace_id = %rej.trace_id, subject = %msg.subject, reason = %rej.reason, bytes = msg.payload.len(), "bad prompt");
            let mut sink = ReplySink::new(
                ctx.publisher.clone(),
                subject,
                rej.trace_id.clone(),
                rej.conversation.clone(),
                config.limits.max_reply_bytes,
            )
            .traced(msg.traceparent.as_deref())
            .observed(metrics);
            sink.send(ReplyBody::error(ErrorCode::BadRequest, rej.reason))
                .await;
            return;
        }
    };
    let subject = reply_subject(
        inbox,
        prompt.reply_to.as_deref(),
        &prompt.trace_id,
        &config.subjects.reply_prefix,
    );
    let sink = ctx
        .sink(&prompt, subject)
        .traced(msg.traceparent.as_deref())
        .observed(metrics);
    let job = Job {
        prompt,
        sink,
        permit,
    };
    if let Err(job) = dispatcher.dispatch(job) {
        let Job {
            prompt, mut sink, ..
        } = *job;
        let reason =
            format!(
            "conversation {} already has a turn running and {} queued (turn.conversation_queue)",
            prompt.conversation.as_deref().or(prompt.session_id.as_deref()).unwrap_or("?"),
            config.turn.conversation_queue
        );
        warn!(trace_id = %prompt.trace_id, %reason, "prompt refused");
        sink.send(ReplyBody::error(ErrorCode::SessionBusy, reason))
            .await;
    }
}
