//! Per-conversation FIFO: two prompts of one conversation never run at
//! once. The second waits in a bounded queue (`turn.conversation_queue`)
//! or gets `session_busy`. Each conversation with work has one worker task
//! that runs its turns in arrival order and exits when the queue is empty.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::driver::{run_turn, TurnContext};
use super::sink::ReplySink;
use crate::protocol::Prompt;

/// One accepted prompt, waiting for its turn.
pub struct Job {
    pub prompt: Prompt,
    pub sink: ReplySink,
    /// Held from acceptance to the terminal reply (`turn.max_in_flight`).
    pub permit: Option<OwnedSemaphorePermit>,
}

pub struct Dispatcher {
    ctx: Arc<TurnContext>,
    queues: Mutex<HashMap<String, VecDeque<Job>>>,
    capacity: usize,
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
        Arc::new(Dispatcher {
            ctx,
            queues: Mutex::new(HashMap::new()),
            capacity,
            tracker,
            cancel,
        })
    }

    pub fn context(&self) -> &Arc<TurnContext> {
        &self.ctx
    }

    /// Accepts a job: runs it now, queues it behind its conversation, or
    /// hands it back when the conversation's queue is full.
    pub fn dispatch(self: &Arc<Self>, job: Job) -> Result<(), Box<Job>> {
        let Some(key) = job.prompt.queue_key() else {
            // A one-off prompt has its own session: nothing to wait for.
            let me = self.clone();
            self.tracker.spawn(async move {
                let Job {
                    prompt,
                    sink,
                    permit,
                } = job;
                run_turn(&me.ctx, prompt, sink, me.cancel.child_token()).await;
                drop(permit);
            });
            return Ok(());
        };
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        match queues.get_mut(&key) {
            Some(q) => {
                if q.len() >= self.capacity {
                    return Err(Box::new(job));
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

    async fn work(self: Arc<Self>, key: String, first: Job) {
        let mut next = Some(first);
        while let Some(job) = next {
            let Job {
                prompt,
                sink,
                permit,
            } = job;
            run_turn(&self.ctx, prompt, sink, self.cancel.child_token()).await;
            drop(permit);
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

    /// Conversations with a worker (running or queued turns).
    pub fn active_conversations(&self) -> usize {
        self.queues.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}
