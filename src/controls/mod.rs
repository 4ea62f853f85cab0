//! The conversation control API (docs/PROTOCOL.md, "Conversation
//! controls"): a request on `<[controls] subject>.<tenant>.<op>` is parsed
//! by pure code ([`crate::protocol::controls`]), checked against its caller
//! (a tenant reaches only its own conversations), served at the
//! conversation's home in a cluster (forwarded there like a prompt), and
//! answered once with one JSON object.
//!
//! Serialized with the conversation's turns: an op that changes the
//! conversation (`new`, `undo`, `redo`, `compact`, `fork`) is refused with
//! `session_busy` while a turn runs or waits (`new` with `"abort": true`
//! aborts it first) and holds the conversation while it acts, so a prompt
//! that arrives meanwhile queues behind it. Reading ops (`diff`, `history`,
//! `list`, `info`, `commands`) act at once.

mod history;
mod ops;

use std::sync::Arc;

use serde_json::Value;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::bus::{ControlSubscription, Incoming, Publisher};
use crate::cluster::{Cluster, Place};
use crate::config::Config;
use crate::protocol::controls::{
    control_route, parse_control, refusal, ControlOp, ControlRequest, ControlRoute,
};
use crate::protocol::tenant::Caller;
use crate::protocol::{validate_subject, ErrorCode};
use crate::turn::Dispatcher;

/// An op's outcome: the `ok` answer's fields, or a typed refusal.
type Outcome = Result<Value, (ErrorCode, String)>;

/// Serves control requests.
pub struct Controls {
    dispatcher: Arc<Dispatcher>,
    publisher: Publisher,
    config: Arc<Config>,
    cluster: Option<Arc<Cluster>>,
    /// `[controls] max_concurrent`.
    permits: Arc<Semaphore>,
}

impl Controls {
    /// Answers go out with the turns' publisher.
    pub fn new(
        dispatcher: Arc<Dispatcher>,
        config: Arc<Config>,
        cluster: Option<Arc<Cluster>>,
    ) -> Arc<Self> {
        let publisher = dispatcher.context().publisher.clone();
        Arc::new(Controls {
            permits: Arc::new(Semaphore::new(config.controls.max_concurrent)),
            dispatcher,
            publisher,
            config,
            cluster,
        })
    }

    /// The subjects to listen on: `<base>.*` (the operator) and
    /// `<base>.*.*` (tenants).
    pub fn subjects(config: &Config) -> Vec<String> {
        let base = &config.controls.subject;
        vec![format!("{base}.*"), format!("{base}.*.*")]
    }

    /// Whether `subject` is a control request (a forwarded message is
    /// handed here by its original subject).
    pub fn is_control(&self, subject: &str) -> bool {
        control_route(&self.config.controls.subject, subject).is_some()
    }

    /// Reads `sub` until `cancel`; each request is served on its own task,
    /// at most `[controls] max_concurrent` at once (the next is read when
    /// one ends).
    pub async fn serve(self: Arc<Self>, mut sub: ControlSubscription, cancel: CancellationToken) {
        loop {
            let permit = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                p = self.permits.clone().acquire_owned() => p.expect("never closed"),
            };
            let msg = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                m = sub.next() => m,
            };
            let Some(msg) = msg else { break };
            let me = self.clone();
            self.dispatcher.spawn(async move {
                me.handle(msg).await;
                drop(permit);
            });
        }
    }

    /// A request another daemon forwarded here (this is the home of its
    /// conversation).
    pub fn take_forwarded(self: &Arc<Self>, msg: Incoming) {
        let me = self.clone();
        self.dispatcher.spawn(async move {
            let _permit = me.permits.clone().acquire_owned().await;
            me.handle(msg).await;
        });
    }

    /// One request, answered once (unless forwarded to the home, which
    /// answers).
    async fn handle(&self, msg: Incoming) {
        let Some(ControlRoute { caller, op }) =
            control_route(&self.config.controls.subject, &msg.subject)
        else {
            warn!(subject = %msg.subject, "an unroutable control request");
            return;
        };
        let reply = self.answer_subject(&caller, &msg);
        let outcome = match op {
            Err(token) => Err((
                ErrorCode::BadRequest,
                format!("unknown control {token:?} (one of new, undo, redo, compact, diff, fork, history, list, info, commands)"),
            )),
            Ok(op) => match parse_control(op, &caller, &msg.payload) {
                Err(r) => Err((r.code, r.reason)),
                Ok(req) => match self.home(&req, &msg).await {
                    Home::Forwarded => return,
                    Home::Busy(reason) => Err((ErrorCode::SessionBusy, reason)),
                    Home::Here => self.act(&caller, &req).await,
                },
            },
        };
        match &outcome {
            Ok(_) => info!(%caller, subject = %msg.subject, "control request served"),
            Err((code, reason)) => {
                warn!(%caller, subject = %msg.subject, code = code.as_str(), %reason, "control request refused")
            }
        }
        let body = match outcome {
            Ok(mut v) => {
                v["ok"] = Value::Bool(true);
                v
            }
            Err((code, reason)) => refusal(code, &reason),
        };
        self.answer(reply, body).await;
    }

    /// Runs an admitted request here.
    async fn act(&self, caller: &Caller, req: &ControlRequest) -> Outcome {
        // The controls drive the shared OpenCode in its own directory; with
        // workspaces a conversation lives in another directory and, in the
        // process and sandbox modes, on its tenant's own server, where a
        // session id learned there must never be looked up on the shared,
        // unconfined one. Refused until they are routed like turns.
        if self.ctx().isolation.is_some() {
            return Err((ErrorCode::BadRequest, ISOLATED.to_string()));
        }
        let conversation = req.conversation.as_deref().unwrap_or_default();
        match req.op {
            ControlOp::List => history::list(self, caller, req).await,
            ControlOp::Commands => ops::commands(self).await,
            ControlOp::History => history::history(self, conversation, req).await,
            ControlOp::Info => ops::info(self, conversation).await,
            ControlOp::Diff => ops::diff(self, caller, conversation, req).await,
            ControlOp::New => ops::new(self, caller, conversation, req.abort).await,
            op => {
                let Some(_hold) = self.dispatcher.hold(conversation) else {
                    return Err(busy(conversation, op));
                };
                match op {
                    ControlOp::Undo => ops::undo(self, conversation).await,
                    ControlOp::Redo => ops::redo(self, conversation).await,
                    ControlOp::Compact => ops::compact(self, conversation).await,
                    ControlOp::Fork => ops::fork(self, caller, conversation, req).await,
                    _ => unreachable!("handled above"),
                }
            }
        }
    }

    /// Where a request on one conversation is served: here, or at its
    /// home daemon (forwarded; the home answers the caller).
    async fn home(&self, req: &ControlRequest, msg: &Incoming) -> Home {
        let (Some(cluster), Some(conversation)) = (&self.cluster, &req.conversation) else {
            return Home::Here;
        };
        let sessions = self.dispatcher.context().sessions.as_ref();
        let forwarded = msg.forwarded_by.is_some();
        match cluster.place(conversation, forwarded, sessions).await {
            Place::Here { .. } => Home::Here,
            Place::Busy { reason } => Home::Busy(reason),
            Place::There { instance } => match cluster.forward(&instance, msg).await {
                Ok(()) => {
                    info!(%conversation, home = %instance, op = req.op.as_str(), "control request forwarded to its conversation's home");
                    Home::Forwarded
                }
                Err(e) => {
                    warn!(%conversation, home = %instance, error = %e, "the conversation's home did not take the control request");
                    Home::Busy(format!(
                        "the home bridge of conversation {conversation} ({instance}) does not answer; send again"
                    ))
                }
            },
        }
    }

    /// The NATS reply subject of a request, if the daemon may answer there
    /// (valid, not its own, and in strict mode in the caller's inbox).
    fn answer_subject(&self, caller: &Caller, msg: &Incoming) -> Option<String> {
        let r = msg.reply.as_deref()?;
        validate_subject(r).ok()?;
        match self
            .config
            .reply_rules()
            .route(caller, Some(r), None, "control")
        {
            Ok(s) => Some(s),
            Err((reason, _)) => {
                warn!(subject = %msg.subject, %reason, "not answering a control request there");
                None
            }
        }
    }

    async fn answer(&self, subject: Option<String>, body: Value) {
        let Some(r) = subject else { return };
        if let Err(e) = self
            .publisher
            .publish_raw(&r, body.to_string().into_bytes())
            .await
        {
            warn!(error = %e, "answering a control request failed");
        }
    }

    fn ctx(&self) -> &crate::turn::TurnContext {
        self.dispatcher.context()
    }

    /// The conversation's session, if it has one.
    async fn session_of(&self, conversation: &str) -> Option<String> {
        self.ctx().sessions.get(conversation).await
    }

    /// The session, or `bad_request` saying there is none yet.
    async fn session_or_refuse(&self, conversation: &str) -> Result<String, (ErrorCode, String)> {
        self.session_of(conversation).await.ok_or_else(|| {
            (
                ErrorCode::BadRequest,
                format!(
                    "conversation {conversation} has no session (no prompt yet, or `new` since)"
                ),
            )
        })
    }
}

/// Where a request is served.
enum Home {
    Here,
    Forwarded,
    Busy(String),
}

/// The refusal of an op that changes a busy conversation.
/// The refusal of every control where `[workspaces] root` is set.
pub const ISOLATED: &str = "conversation controls are not available on a bridge with workspaces ([workspaces] root, the process and sandbox isolation modes): they would act on the shared OpenCode, not on the conversation's workspace or its tenant's server";

fn busy(conversation: &str, op: ControlOp) -> (ErrorCode, String) {
    (
        ErrorCode::SessionBusy,
        format!(
            "conversation {conversation} has a turn running or queued; `{}` waits until it is idle (send again, or abort it first)",
            op.as_str()
        ),
    )
}

/// An OpenCode failure as a refusal (its public wording, never its URL).
fn opencode(e: crate::opencode::OpenCodeError) -> (ErrorCode, String) {
    (e.code(), e.public())
}

/// Subscribes to the control subjects (queue group `[subjects]
/// queue_group`: one daemon answers each) and serves them until `cancel`.
pub async fn start(
    controls: Arc<Controls>,
    nats: &crate::bus::Connection,
    cancel: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, crate::bus::BusError> {
    let config = &controls.config;
    let subjects = Controls::subjects(config);
    let sub =
        ControlSubscription::subscribe_in(nats, &subjects, Some(&config.subjects.queue_group))
            .await?;
    info!(subjects = ?subjects, "listening for conversation controls");
    Ok(tokio::spawn(controls.serve(sub, cancel)))
}
