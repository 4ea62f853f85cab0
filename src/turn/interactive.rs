//! Permission requests and questions during a turn.
//!
//! The policy (`[permissions]`) answers most requests at once. When it says
//! `ask` and the prompt is `interactive`, the caller gets a `permission` (or
//! `question`) reply naming a subject to answer on; the answer comes back
//! through [`AnswerRegistry`] (the app routes the NATS messages by request
//! id). Unanswered within `ask_timeout`: rejected. When the turn ends for
//! any reason, whatever is still pending is rejected at OpenCode so it never
//! waits forever.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::bus::Publisher;
use crate::opencode::events::{PermissionAsked, QuestionAsked};
use crate::opencode::OpenCodeClient;
use crate::protocol::interactive::{
    decide, parse_permission_answer, parse_question_answer, Action, QuestionAnswer,
};
use crate::protocol::tenant::Caller;
use crate::protocol::ReplyBody;

use super::sink::ReplySink;

/// An answer as it came off the bus.
#[derive(Debug)]
pub struct AnswerMsg {
    pub payload: Bytes,
    /// Where to acknowledge it (request style), if anywhere.
    pub reply: Option<String>,
}

type Waiter = (Caller, oneshot::Sender<AnswerMsg>);

/// Request id -> the turn waiting for its answer, and who started it.
#[derive(Default)]
pub struct AnswerRegistry {
    waiting: Mutex<HashMap<String, Waiter>>,
}

impl AnswerRegistry {
    fn register(&self, request_id: &str, owner: Caller) -> oneshot::Receiver<AnswerMsg> {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(request_id.to_string(), (owner, tx));
        rx
    }

    fn forget(&self, request_id: &str) {
        self.lock().remove(request_id);
    }

    /// Hands an answer from `from` to the turn waiting for it; gives it
    /// back when no turn waits (unknown or expired request) and when `from`
    /// may not answer it (another tenant's request: the request stays
    /// untouched, and the refusal reads the same as for an unknown id).
    pub fn deliver(
        &self,
        request_id: &str,
        from: &Caller,
        msg: AnswerMsg,
    ) -> Result<(), AnswerMsg> {
        let mut waiting = self.lock();
        match waiting.get(request_id) {
            Some((owner, _)) if from.may_act_for(owner) => {}
            _ => return Err(msg),
        }
        match waiting.remove(request_id) {
            Some((_, tx)) => tx.send(msg),
            None => Err(msg),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Waiter>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Debug, Clone)]
enum Kind {
    Permission { permission: String },
    Question,
}

#[derive(Debug, Clone)]
struct Open {
    id: String,
    session_id: String,
    kind: Kind,
}

type Waiting = BoxFuture<'static, (Open, Option<AnswerMsg>)>;

/// An answer (or a timeout) taken off the queue, not yet applied.
pub struct Answered(Open, Option<AnswerMsg>);

/// One turn's open requests.
pub struct Interactive {
    registry: Arc<AnswerRegistry>,
    client: OpenCodeClient,
    publisher: Publisher,
    rules: Vec<crate::protocol::interactive::Rule>,
    ask_timeout: std::time::Duration,
    allow_always: bool,
    interactive: bool,
    /// Who sent the prompt: the policy's tenant rules, the answer subjects,
    /// and who may answer.
    caller: Caller,
    permission_subject: String,
    question_subject: String,
    waiting: FuturesUnordered<Waiting>,
    open: Vec<Open>,
    /// When the oldest open question started waiting (deadlines pause).
    since: Option<Instant>,
    /// A permission or question was rejected (by the policy, the caller, a
    /// timeout): OpenCode then stops its loop and leaves the last answer
    /// with `finish: "tool-calls"`, which ends the turn once it is idle.
    rejected: bool,
    pub notes: Vec<String>,
}

impl Interactive {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        registry: Arc<AnswerRegistry>,
        client: OpenCodeClient,
        publisher: Publisher,
        cfg: &crate::config::Config,
        interactive: bool,
        caller: Caller,
    ) -> Self {
        let answer_base = |base: &str| match caller.tenant() {
            Some(t) => format!("{base}.{t}"),
            None => base.to_string(),
        };
        Interactive {
            registry,
            client,
            publisher,
            rules: cfg.permissions.rules.clone(),
            ask_timeout: cfg.permissions.ask_timeout,
            allow_always: cfg.permissions.allow_server_wide_always,
            interactive,
            permission_subject: answer_base(&cfg.subjects.permission_reply),
            question_subject: answer_base(&cfg.subjects.question_reply),
            caller,
            waiting: FuturesUnordered::new(),
            open: Vec::new(),
            since: None,
            rejected: false,
            notes: Vec::new(),
        }
    }

    /// Whether the turn waits for a caller (its deadlines are suspended).
    pub fn is_waiting(&self) -> bool {
        !self.open.is_empty()
    }

    /// Whether something was rejected in this turn (see the field).
    pub fn rejected(&self) -> bool {
        self.rejected
    }

    /// When the current wait began.
    pub fn waiting_since(&self) -> Option<Instant> {
        self.since
    }

    fn wait_for(&mut self, open: Open) {
        let rx = self.registry.register(&open.id, self.caller.clone());
        let timeout = self.ask_timeout;
        let o = open.clone();
        self.waiting.push(
            async move {
                let ans = tokio::time::timeout(timeout, rx)
                    .await
                    .ok()
                    .and_then(Result::ok);
                (o, ans)
            }
            .boxed(),
        );
        if self.open.is_empty() {
            self.since = Some(Instant::now());
        }
        self.open.push(open);
    }

    /// Applies the policy to a permission request.
    pub async fn on_permission(&mut self, p: PermissionAsked, sink: &mut ReplySink) {
        let action = decide(
            &self.rules,
            self.caller.tenant(),
            &p.permission,
            &p.patterns,
        );
        let what = format!("`{}` ({})", p.permission, p.patterns.join(", "));
        let what = crate::protocol::redact::strip_data_dirs(&what).into_owned();
        match (action, self.interactive) {
            (Action::Allow, _) => {
                info!(request_id = %p.id, permission = %p.permission, "permission allowed by policy");
                answer_permission(&self.client, &p.session_id, &p.id, "once", None).await;
                self.notes
                    .push(format!("permission {what} allowed by policy"));
            }
            (Action::Ask, true) => {
                let reply_subject = format!("{}.{}", self.permission_subject, p.id);
                let description = match p.patterns.as_slice() {
                    [] => format!("OpenCode asks for permission `{}`", p.permission),
                    pats => format!(
                        "OpenCode asks for permission `{}`: {}",
                        p.permission,
                        pats.join(", ")
                    ),
                };
                info!(request_id = %p.id, permission = %p.permission, "asking the caller for a permission");
                let open = Open {
                    id: p.id.clone(),
                    session_id: p.session_id.clone(),
                    kind: Kind::Permission {
                        permission: p.permission.clone(),
                    },
                };
                self.wait_for(open);
                sink.send(ReplyBody::Permission {
                    request_id: p.id,
                    permission: p.permission,
                    patterns: p.patterns,
                    tool: None,
                    call_id: p.tool.map(|t| t.call_id),
                    description,
                    reply_subject,
                })
                .await;
            }
            (Action::Ask, false) | (Action::Deny, _) => {
                let why = if action == Action::Ask {
                    "the prompt is not interactive"
                } else {
                    "no policy rule allows it"
                };
                warn!(request_id = %p.id, permission = %p.permission, why, "rejecting a permission request");
                answer_permission(&self.client, &p.session_id, &p.id, "reject", None).await;
                self.rejected = true;
                self.notes
                    .push(format!("permission {what} rejected: {why}"));
            }
        }
    }

    /// A question from the agent: asked of an interactive caller, else
    /// rejected.
    pub async fn on_question(&mut self, q: QuestionAsked, sink: &mut ReplySink) {
        if !self.interactive {
            warn!(request_id = %q.id, "rejecting a question: the prompt is not interactive");
            if let Err(e) = self.client.reject_question(&q.id).await {
                warn!(error = %e, "rejecting a question failed");
            }
            self.rejected = true;
            self.notes.push(
                "a question from the agent was rejected: the prompt is not interactive".into(),
            );
            return;
        }
        let reply_subject = format!("{}.{}", self.question_subject, q.id);
        self.wait_for(Open {
            id: q.id.clone(),
            session_id: q.session_id.clone(),
            kind: Kind::Question,
        });
        sink.send(ReplyBody::Question {
            request_id: q.id,
            questions: q.questions,
            call_id: q.tool.map(|t| t.call_id),
            reply_subject,
        })
        .await;
    }

    /// The next answer (or `None`: its timeout). Cancel-safe, for
    /// `select!` with `is_waiting()`; hand the result to
    /// [`resolve`](Self::resolve) outside the `select!`, so applying it at
    /// OpenCode is never cut short by another branch.
    pub async fn next(&mut self) -> Answered {
        match self.waiting.next().await {
            Some((open, ans)) => Answered(open, ans),
            None => std::future::pending().await,
        }
    }

    /// Applies an answer (or its timeout) at OpenCode and acknowledges it.
    pub async fn resolve(&mut self, answered: Answered) {
        let Answered(open, ans) = answered;
        self.open.retain(|o| o.id != open.id);
        if self.open.is_empty() {
            self.since = None;
        }
        self.registry.forget(&open.id);
        match ans {
            None => {
                warn!(request_id = %open.id, "no answer in time; rejecting");
                reject(&self.client, &open).await;
                self.rejected = true;
                self.notes.push(format!(
                    "{} not answered within {}: rejected",
                    open.describe(),
                    humantime::format_duration(self.ask_timeout)
                ));
            }
            Some(msg) => self.apply(&open, msg).await,
        }
    }

    async fn apply(&mut self, open: &Open, msg: AnswerMsg) {
        let ack = match &open.kind {
            Kind::Permission { .. } => match parse_permission_answer(&msg.payload) {
                Ok(a) => {
                    let mut reply = a.reply.clone();
                    let mut note = None;
                    if reply == "always" && !self.allow_always {
                        reply = "once".into();
                        note = Some("`always` was applied as `once`: OpenCode would grant it to every session on the server".to_string());
                    }
                    answer_permission(
                        &self.client,
                        &open.session_id,
                        &open.id,
                        &reply,
                        a.message.as_deref(),
                    )
                    .await;
                    if reply == "reject" && a.message.is_none() {
                        self.rejected = true;
                    }
                    self.notes
                        .push(format!("{} answered `{reply}`", open.describe()));
                    if let Some(n) = &note {
                        self.notes.push(n.clone());
                    }
                    serde_json::json!({"ok": true, "applied": reply, "note": note})
                }
                Err(reason) => {
                    // A garbled answer is a rejection: the turn must not hang.
                    reject(&self.client, open).await;
                    self.rejected = true;
                    self.notes.push(format!(
                        "{} rejected: unreadable answer ({reason})",
                        open.describe()
                    ));
                    serde_json::json!({"ok": false, "applied": "reject", "reason": reason})
                }
            },
            Kind::Question => match parse_question_answer(&msg.payload) {
                Ok(QuestionAnswer::Answers { answers, .. }) => {
                    if let Err(e) = self.client.reply_question(&open.id, &answers).await {
                        warn!(error = %e, "answering a question failed");
                    }
                    self.notes
                        .push("a question from the agent was answered".into());
                    serde_json::json!({"ok": true, "applied": "answers"})
                }
                Ok(QuestionAnswer::Reject { .. }) => {
                    reject(&self.client, open).await;
                    self.rejected = true;
                    self.notes
                        .push("a question from the agent was rejected by the caller".into());
                    serde_json::json!({"ok": true, "applied": "reject"})
                }
                Err(reason) => {
                    reject(&self.client, open).await;
                    self.rejected = true;
                    self.notes.push(format!(
                        "a question was rejected: unreadable answer ({reason})"
                    ));
                    serde_json::json!({"ok": false, "applied": "reject", "reason": reason})
                }
            },
        };
        if let Some(r) = msg.reply {
            if let Err(e) = self
                .publisher
                .publish_raw(&r, ack.to_string().into_bytes())
                .await
            {
                warn!(error = %e, "acknowledging an answer failed");
            }
        }
    }

    /// Rejects everything still open (the turn is ending).
    pub async fn reject_all(&mut self) {
        let open = std::mem::take(&mut self.open);
        for o in &open {
            self.registry.forget(&o.id);
            reject(&self.client, o).await;
        }
        self.waiting.clear();
        self.since = None;
    }
}

async fn answer_permission(
    client: &OpenCodeClient,
    session_id: &str,
    id: &str,
    reply: &str,
    message: Option<&str>,
) {
    if let Err(e) = client
        .reply_permission(session_id, id, reply, message)
        .await
    {
        warn!(request_id = %id, error = %e, "answering a permission request failed");
    }
}

async fn reject(client: &OpenCodeClient, open: &Open) {
    match open.kind {
        Kind::Permission { .. } => {
            answer_permission(client, &open.session_id, &open.id, "reject", None).await
        }
        Kind::Question => {
            if let Err(e) = client.reject_question(&open.id).await {
                warn!(request_id = %open.id, error = %e, "rejecting a question failed");
            }
        }
    }
}

impl Open {
    fn describe(&self) -> String {
        match &self.kind {
            Kind::Permission { permission } => format!("permission `{permission}`"),
            Kind::Question => "a question from the agent".to_string(),
        }
    }
}

impl Drop for Interactive {
    fn drop(&mut self) {
        for o in &self.open {
            self.registry.forget(&o.id);
        }
    }
}
