//! Per-conversation FIFO: two prompts of one conversation never run at
//! once. The second waits in a bounded queue (`turn.conversation_queue`)
//! or gets `session_busy`. Each conversation with work has one worker task
//! that runs its turns in arrival order and exits when the queue is empty.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::context::TurnContext;
use super::driver::run_turn;
use super::sink::ReplySink;
use crate::protocol::control::{AbortAnswer, AbortRequest, AbortTarget};
use crate::protocol::tenant::Caller;
use crate::protocol::turn_state::TurnState;
use crate::protocol::{ErrorCode, Prompt, QueueKey, ReplyBody};

/// One accepted prompt, waiting for its turn.
pub struct Job {
    pub prompt: Prompt,
    pub sink: ReplySink,
    /// Held from acceptance to the terminal reply (`turn.max_in_flight`).
    pub permit: Option<OwnedSemaphorePermit>,
}

/// A turn that is running now, for aborts.
struct Running {
    key: Option<QueueKey>,
    caller: Caller,
    abort: CancellationToken,
}

/// Why a job was not accepted; the job comes back for its error reply.
pub enum Refused {
    /// The conversation's queue is full (`session_busy`).
    Busy(Box<Job>),
    /// Another queued or running turn has the same trace id (`bad_request`):
    /// an abort or a reply subject must name one turn.
    DuplicateTrace(Box<Job>),
    /// The prompt's tenant has `[tenancy] max_turns_per_tenant` turns
    /// queued or running (`overloaded`): one tenant cannot take every slot.
    TenantBusy(Box<Job>),
}

/// The turns queued or running: their trace ids (with their tenant), and
/// how many each tenant has.
#[derive(Default)]
struct Live {
    traces: HashMap<String, Option<String>>,
    per_tenant: HashMap<String, usize>,
}

impl Live {
    /// Takes `job` in, or says why not.
    fn admit(
        &mut self,
        prompt: &crate::protocol::Prompt,
        limit: usize,
    ) -> Result<(), fn(Box<Job>) -> Refused> {
        if self.traces.contains_key(&prompt.trace_id) {
            return Err(Refused::DuplicateTrace);
        }
        let tenant = prompt.caller.tenant().map(str::to_string);
        if let Some(t) = &tenant {
            let n = self.per_tenant.entry(t.clone()).or_default();
            if limit > 0 && *n >= limit {
                return Err(Refused::TenantBusy);
            }
            *n += 1;
        }
        self.traces.insert(prompt.trace_id.clone(), tenant);
        Ok(())
    }

    fn release(&mut self, trace_id: &str) {
        if let Some(Some(t)) = self.traces.remove(trace_id) {
            if let Some(n) = self.per_tenant.get_mut(&t) {
                *n -= 1;
                if *n == 0 {
                    self.per_tenant.remove(&t);
                }
            }
        }
    }
}

pub struct Dispatcher {
    ctx: Arc<TurnContext>,
    queues: Mutex<HashMap<QueueKey, VecDeque<Job>>>,
    running: Mutex<HashMap<String, Running>>,
    /// Every queued or running turn.
    live: Mutex<Live>,
    capacity: usize,
    per_tenant: usize,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Dispatcher {
    /// `cancel` ends running turns (with `shutting_down`); every task is
    /// spawned on `tracker`.
    pub fn new(
        ctx: Arc<TurnContext>,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) -> Arc<Self> {
        let capacity = ctx.config.turn.conversation_queue;
        let per_tenant = ctx.config.tenancy.max_turns_per_tenant;
        Arc::new(Dispatcher {
            ctx,
            queues: Mutex::new(HashMap::new()),
            running: Mutex::new(HashMap::new()),
            live: Mutex::new(Live::default()),
            capacity,
            per_tenant,
            tracker,
            cancel,
        })
    }

    /// Runs `work` as part of the daemon's turns (shutdown waits for it).
    pub fn spawn(&self, work: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tracker.spawn(work);
    }

    pub fn context(&self) -> &Arc<TurnContext> {
        &self.ctx
    }

    /// Accepts a job: runs it now, queues it behind its conversation, or
    /// hands it back when the conversation's queue is full, its trace id
    /// is in use or its tenant has too many turns.
    pub fn dispatch(self: &Arc<Self>, mut job: Job) -> Result<(), Refused> {
        if let Err(refuse) = self.lock_live().admit(&job.prompt, self.per_tenant) {
            return Err(refuse(Box::new(job)));
        }
        if let Some(states) = &self.ctx.states {
            let record = states.record(&job.prompt.caller, &job.prompt.trace_id);
            job.sink.record(record, TurnState::Queued);
        }
        let Some(key) = job.prompt.queue_key() else {
            // A one-off prompt has its own session: nothing to wait for.
            let me = self.clone();
            self.tracker
                .spawn(async move { me.run_job(None, job).await });
            return Ok(());
        };
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        match queues.get_mut(&key) {
            Some(q) => {
                if q.len() >= self.capacity {
                    self.lock_live().release(&job.prompt.trace_id);
                    return Err(Refused::Busy(Box::new(job)));
                }
                q.push_back(job);
            }
            None => {
                // No worker for this conversation: start one with this job.
                queues.insert(key.clone(), VecDeque::new());
                let me = self.clone();
                self.tracker.spawn(async move { me.work(key, job).await });
            }
        }
        Ok(())
    }

    async fn work(self: Arc<Self>, key: QueueKey, first: Job) {
        let mut next = Some(first);
        while let Some(job) = next {
            self.run_job(Some(&key), job).await;
            let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
            next = match queues.get_mut(&key) {
                Some(q) => q.pop_front(),
                None => None,
            };
            if next.is_none() {
                queues.remove(&key);
            }
        }
    }

    async fn run_job(&self, key: Option<&QueueKey>, job: Job) {
        let Job {
            mut prompt,
            sink,
            permit,
        } = job;
        let trace_id = prompt.trace_id.clone();
        let abort = CancellationToken::new();
        self.lock_running().insert(
            trace_id.clone(),
            Running {
                key: key.cloned(),
                caller: prompt.caller.clone(),
                abort: abort.clone(),
            },
        );
        sink.record_state(TurnState::Running);
        // Process mode: the tenant's own server, started if need be.
        match self.ctx.for_prompt(&prompt).await {
            Ok((ctx, placed)) => {
                // The workspace the conversation keeps, for the final.
                if let Some(p) = &placed {
                    prompt.workspace = p.workspace.clone();
                }
                run_turn(&ctx, prompt, sink, self.cancel.child_token(), abort).await
            }
            Err(e) => super::driver::fail_before_start(sink, e).await,
        }
        self.lock_running().remove(&trace_id);
        self.lock_live().release(&trace_id);
        drop(permit);
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Aborts the running turn named by `req` (and, if asked, drops the
    /// prompts queued behind it; a trace id that names a queued prompt drops
    /// that prompt). Dropped prompts get `error` `aborted`. `from` reaches
    /// only its own turns: another tenant's turn or conversation is answered
    /// exactly like one that does not exist.
    pub fn abort(self: &Arc<Self>, req: &AbortRequest, from: &Caller) -> AbortAnswer {
        let (aborted, key) = self.cancel_running(req, from);
        let dropped = self.take_queued(req, from, aborted, key.as_ref());
        let n = dropped.len();
        for job in dropped {
            self.tracker.spawn(async move {
                let Job {
                    mut sink, permit, ..
                } = job;
                sink.send(ReplyBody::error(
                    ErrorCode::Aborted,
                    "dropped from the conversation's queue by an abort request",
                ))
                .await;
                drop(permit);
            });
        }
        let reason = match (aborted, n) {
            (true, 0) => "the running turn is being aborted".to_string(),
            (true, n) => format!("the running turn is being aborted; {n} queued prompt(s) dropped"),
            (false, 0) => "no such turn is running on this bridge".to_string(),
            (false, n) => format!("no turn was running; {n} queued prompt(s) dropped"),
        };
        AbortAnswer {
            aborted,
            reason,
            dropped: n,
        }
    }

    /// Cancels the running turn `req` names, if `from` may reach it:
    /// whether one was, and the queue key of its conversation (also when
    /// none runs, for `drop_queued`).
    fn cancel_running(&self, req: &AbortRequest, from: &Caller) -> (bool, Option<QueueKey>) {
        let key_of_conv = |c: &str| QueueKey::Conversation(c.to_string());
        let reachable = match &req.target {
            AbortTarget::Conversation(c) => from.owns_conversation(c),
            AbortTarget::Trace(_) => true,
        };
        let running = self.lock_running();
        let found = match &req.target {
            _ if !reachable => None,
            AbortTarget::Trace(t) => running.get(t).filter(|r| from.may_act_for(&r.caller)),
            AbortTarget::Conversation(c) => {
                let k = key_of_conv(c);
                running.values().find(|r| r.key.as_ref() == Some(&k))
            }
        };
        match (found, &req.target) {
            (Some(r), _) => {
                r.abort.cancel();
                (true, r.key.clone())
            }
            (None, AbortTarget::Conversation(c)) if reachable => (false, Some(key_of_conv(c))),
            (None, _) => (false, None),
        }
    }

    /// Takes the queued prompts an abort drops: the conversation's queue
    /// with `drop_queued`; the queued prompt a trace id names when no turn
    /// of that id was running. They are no longer live.
    fn take_queued(
        &self,
        req: &AbortRequest,
        from: &Caller,
        aborted: bool,
        key: Option<&QueueKey>,
    ) -> Vec<Job> {
        let mut dropped = Vec::new();
        {
            let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
            if req.drop_queued {
                if let Some(q) = key.and_then(|k| queues.get_mut(k)) {
                    dropped.extend(q.drain(..));
                }
            }
            if let (false, AbortTarget::Trace(t)) = (aborted, &req.target) {
                for q in queues.values_mut() {
                    if let Some(i) = q
                        .iter()
                        .position(|j| &j.prompt.trace_id == t && from.may_act_for(&j.prompt.caller))
                    {
                        dropped.extend(q.remove(i));
                    }
                }
            }
        }
        let mut live = self.lock_live();
        for job in &dropped {
            live.release(&job.prompt.trace_id);
        }
        dropped
    }

    /// Conversations with a worker (running or queued turns).
    pub fn active_conversations(&self) -> usize {
        self.queues.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether `conversation` has a turn running or queued here.
    pub fn is_active(&self, conversation: &str) -> bool {
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&QueueKey::Conversation(conversation.to_string()))
    }
}
