//! Durable jobs (docs/CLUSTER.md, "Durable jobs"): prompts published on
//! the JetStream work-queue stream `[jetstream] jobs_stream`, read by one
//! durable pull consumer that every daemon shares.
//!
//! A feed task pulls one job at a time, and only while this daemon has a
//! free `turn.max_in_flight` slot and no prompt waits: a job never gets
//! `overloaded`, it waits in the stream. Each delivery is then checked and
//! queued by the intake as a prompt of the caller its subject names
//! ([`crate::protocol::job`]), its replies on `reply_to` or the default
//! reply subject. A settle task marks it in progress every third of
//! `ack_wait` until its turn ends, then settles it by how the turn ended
//! ([`crate::turn::job`]): acknowledged after its terminal reply,
//! terminated after a refusal, handed back (nak) when it did not run.
//!
//! Architecture invariant: a job is acknowledged or terminated only after
//! its terminal reply was published, and handed back only when none was.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::bus::{BusError, Incoming, JetStream, JobMessage, JobQueue, JobSettings};
use crate::config::Config;
use crate::intake::{Intake, JobHome};
use crate::metrics::{JobEvent, Metrics};
use crate::protocol::job::{self, JobTurn, RetryAfter};
use crate::protocol::tenant::Route;
use crate::protocol::ErrorCode;
use crate::turn::answered::Answered;
use crate::turn::job::{JobEnd, JobHook};

/// How long one pull waits for a job before the feed looks at the slots
/// again.
const PULL_WAIT: Duration = Duration::from_secs(2);
/// How often the feed looks again while prompts wait or a job is parked.
const BUSY_POLL: Duration = Duration::from_millis(50);
/// Pause after a failed pull (the server restarting, a permission).
const PULL_BACKOFF: Duration = Duration::from_secs(1);

/// A job taken, not yet handed to the intake: its message, checked route,
/// the turn's view of it, and its hook.
struct Pending {
    incoming: Incoming,
    route: Route,
    turn: JobTurn,
    hook: JobHook,
}

/// This daemon's side of the jobs stream.
pub struct Jobs {
    rx: mpsc::Receiver<JobMessage>,
    feed: JoinHandle<()>,
    stop: CancellationToken,
    /// A job that arrived when every slot had just been taken; it runs at
    /// the next free slot (its settle task keeps it marked in progress).
    parked: Option<Pending>,
    parked_flag: Arc<AtomicBool>,
    intake: Arc<Intake>,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    tracker: TaskTracker,
    /// Jobs answered here, so a redelivery of one is not answered twice.
    answered: Arc<Answered>,
}

impl Jobs {
    /// The jobs stream and its consumer (created when missing), and the
    /// feed. `None` when `[jetstream] jobs` is off or there is no
    /// JetStream.
    pub async fn start(
        js: Option<&JetStream>,
        config: Arc<Config>,
        intake: Arc<Intake>,
        in_flight: Arc<Semaphore>,
        metrics: Arc<Metrics>,
        tracker: TaskTracker,
    ) -> Result<Option<Jobs>, BusError> {
        let j = &config.jetstream;
        let Some(js) = js.filter(|_| j.jobs != crate::config::Switch::Off) else {
            return Ok(None);
        };
        let settings = JobSettings {
            stream: j.jobs_stream.clone(),
            subject: j.jobs_subject.clone(),
            consumer: j.jobs_consumer.clone(),
            ack_wait: j.ack_wait,
            max_deliver: j.max_deliver,
            max_bytes: j.jobs_max_bytes,
            tenants: config.shares.job_tenants.clone(),
            tenant_bytes: config.shares.jobs_bytes,
        };
        let queue = JobQueue::open(js, &settings).await?;
        info!(stream = %settings.stream, subject = %settings.subject, consumer = %settings.consumer, "taking durable jobs");
        let (tx, rx) = mpsc::channel(1);
        let stop = CancellationToken::new();
        let parked_flag = Arc::new(AtomicBool::new(false));
        let ready = Ready {
            in_flight,
            metrics: metrics.clone(),
            parked: parked_flag.clone(),
        };
        let feed = tokio::spawn(feed(queue, ready, tx, stop.clone()));
        Ok(Some(Jobs {
            rx,
            feed,
            stop,
            parked: None,
            parked_flag,
            intake,
            config,
            metrics,
            tracker,
            answered: Arc::new(Answered::default()),
        }))
    }

    /// The next job the feed pulled (cancel-safe); never, once it stopped.
    pub async fn next(&mut self) -> JobMessage {
        match self.rx.recv().await {
            Some(m) => m,
            None => std::future::pending().await,
        }
    }

    pub fn has_parked(&self) -> bool {
        self.parked.is_some()
    }

    /// A job just pulled: its settle task starts now; it runs at once with
    /// `permit`, else it is parked until a slot frees.
    pub async fn arrived(&mut self, msg: JobMessage, permit: Option<OwnedSemaphorePermit>) {
        self.metrics.job(JobEvent::Taken);
        if self.answered_before(&msg).await {
            return;
        }
        let j = &self.config.jetstream;
        let last = j.max_deliver > 0 && msg.delivered >= j.max_deliver as u64;
        let route = job::route(
            &j.jobs_subject,
            &self.config.route_subjects(),
            &msg.incoming.subject,
        );
        let moved_from = match self.intake.job_home(&msg, &route, last).await {
            JobHome::Here { moved_from } => moved_from,
            JobHome::Forwarded => return,
            JobHome::Later => {
                match msg.nak(Some(j.retry_delay)).await {
                    Ok(()) => self.metrics.job(JobEvent::Naked),
                    Err(e) => {
                        warn!(error = %e, "handing a job back failed; it comes back after ack_wait")
                    }
                }
                return;
            }
        };
        let pending = self.settle(msg, route, moved_from);
        match permit {
            Some(p) => self.run(pending, Some(p)).await,
            None => {
                debug!("a job arrived as the last slot was taken; it runs at the next free one");
                self.parked = Some(pending);
                self.parked_flag.store(true, Ordering::Relaxed);
            }
        }
    }

    /// A redelivery of a job this daemon answered: acknowledged again,
    /// not answered twice (`turn::answered`).
    async fn answered_before(&self, msg: &JobMessage) -> bool {
        if msg.delivered < 2 || !self.answered.contains(&msg.stream, msg.sequence) {
            return false;
        }
        match msg.ack().await {
            Ok(()) => {
                warn!(sequence = msg.sequence, delivered = msg.delivered, "a job answered here came again (its acknowledgement was lost): acknowledged again, not answered twice");
                self.metrics.job(JobEvent::Acked);
            }
            Err(e) => {
                warn!(sequence = msg.sequence, error = %e, "acknowledging a job answered here again failed; it comes back after ack_wait")
            }
        }
        true
    }

    /// Whether `msg` is its job's last allowed delivery.
    pub fn is_last(&self, msg: &JobMessage) -> bool {
        let max = self.config.jetstream.max_deliver;
        max > 0 && msg.delivered >= max as u64
    }

    /// A job forwarded here on its last delivery while every slot is taken
    /// and a job is parked: it runs now, beyond `max_in_flight`, rather
    /// than be lost or run away from its conversation's home.
    pub async fn arrived_over_limit(&mut self, msg: JobMessage) {
        self.metrics.job(JobEvent::Taken);
        if self.answered_before(&msg).await {
            return;
        }
        let j = &self.config.jetstream;
        let route = job::route(
            &j.jobs_subject,
            &self.config.route_subjects(),
            &msg.incoming.subject,
        );
        let pending = self.settle(msg, route, None);
        self.run(pending, None).await;
    }

    /// Runs the parked job in `permit`'s slot.
    pub async fn run_parked(&mut self, permit: OwnedSemaphorePermit) {
        if let Some(p) = self.parked.take() {
            self.parked_flag.store(false, Ordering::Relaxed);
            self.run(p, Some(permit)).await;
        }
    }

    /// Spawns the job's settle task; the job as the intake will take it.
    fn settle(&self, msg: JobMessage, route: Route, moved_from: Option<String>) -> Pending {
        let j = &self.config.jetstream;
        let last = j.max_deliver > 0 && msg.delivered >= j.max_deliver as u64;
        let (hook, end) = JobHook::new(msg.delivered, last);
        let tag = crate::opencode::ids::tag(&job::tag_seed(
            &msg.stream,
            msg.sequence,
            msg.published_nanos,
        ));
        let pending = Pending {
            route,
            incoming: msg.incoming.clone(),
            turn: JobTurn {
                tag,
                redelivered: msg.delivered > 1,
                moved_from,
            },
            hook,
        };
        info!(subject = %msg.incoming.subject, sequence = msg.sequence, delivered = msg.delivered, "job taken");
        let timing = Timing {
            ack_wait: j.ack_wait,
            retry_delay: j.retry_delay,
        };
        let answered = self.answered.clone();
        self.tracker
            .spawn(settle(msg, end, timing, self.metrics.clone(), answered));
        pending
    }

    /// Hands a job to the intake; a refusal (answered there) ends it.
    async fn run(&self, p: Pending, permit: Option<OwnedSemaphorePermit>) {
        let Pending {
            incoming,
            route,
            turn,
            mut hook,
        } = p;
        let Route::Prompt {
            caller,
            conversation,
        } = route
        else {
            // `opencode.job.*`-like subjects never reach a stream; nobody
            // could be answered.
            warn!(subject = %incoming.subject, "a job on a subject that names no caller: terminated without a reply");
            hook.refused(ErrorCode::BadRequest);
            return;
        };
        let route = (caller, conversation);
        if let Err((code, mut hook)) = self.intake.job(incoming, route, turn, hook, permit).await {
            hook.refused(code);
        }
    }

    /// Stops pulling; a parked job and one still in the channel are
    /// handed back at once, for another daemon.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(mut p) = self.parked.take() {
            p.hook.give_back();
        }
        let _ = self.feed.await;
        while let Ok(msg) = self.rx.try_recv() {
            give_back(&msg, &self.metrics).await;
        }
    }
}

/// When the feed may pull: a slot is free, no prompt waits, no job is
/// parked.
struct Ready {
    in_flight: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    parked: Arc<AtomicBool>,
}

impl Ready {
    /// Waits for a moment when a job could start at once (`false`: stop).
    /// It looks rather than takes a slot, so a prompt never finds its slot
    /// held by the feed.
    async fn wait(&self, stop: &CancellationToken) -> bool {
        loop {
            if self.in_flight.available_permits() > 0
                && self.metrics.waiting() == 0
                && !self.parked.load(Ordering::Relaxed)
            {
                return true;
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => return false,
                _ = tokio::time::sleep(BUSY_POLL) => {}
            }
        }
    }
}

/// Pulls one job at a time when one could start at once, and hands it to
/// the serve loop; a job that arrives after `stop` goes back at once.
async fn feed(
    queue: JobQueue,
    ready: Ready,
    tx: mpsc::Sender<JobMessage>,
    stop: CancellationToken,
) {
    loop {
        if !ready.wait(&stop).await {
            return;
        }
        let slot = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            s = tx.reserve() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
        };
        // A stop cuts the pull short: its inbox goes, so the server drops
        // the request (it delivers only to a pull with interest).
        let pulled = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = queue.next(PULL_WAIT) => r,
        };
        match pulled {
            Ok(Some(msg)) if stop.is_cancelled() => {
                give_back(&msg, &ready.metrics).await;
                return;
            }
            Ok(Some(msg)) => slot.send(msg),
            Ok(None) => {}
            Err(e) => {
                warn!(error = %e, "pulling a job failed; trying again");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(PULL_BACKOFF) => {}
                }
            }
        }
    }
}

/// A job this daemon will not run (it is stopping): back to the stream at
/// once, for another daemon; counted as taken and handed back.
pub async fn give_back(msg: &JobMessage, metrics: &Metrics) {
    metrics.job(JobEvent::Taken);
    match msg.nak(None).await {
        Ok(()) => metrics.job(JobEvent::Naked),
        Err(e) => warn!(error = %e, "handing a job back failed; it comes back after ack_wait"),
    }
}

#[derive(Clone, Copy)]
struct Timing {
    ack_wait: Duration,
    retry_delay: Duration,
}

/// Keeps the job marked in progress until its turn ends, then settles it.
async fn settle(
    msg: JobMessage,
    mut end: oneshot::Receiver<JobEnd>,
    timing: Timing,
    metrics: Arc<Metrics>,
    answered: Arc<Answered>,
) {
    let every = (timing.ack_wait / 3).max(Duration::from_millis(100));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let end = loop {
        tokio::select! {
            e = &mut end => break e,
            _ = tick.tick() => {
                if let Err(e) = msg.in_progress().await {
                    warn!(sequence = msg.sequence, error = %e, "marking a job in progress failed");
                }
            }
        }
    };
    let (event, result) = match end {
        Ok(JobEnd::Answered { code }) if is_refusal(code) => {
            answered.insert(&msg.stream, msg.sequence);
            (JobEvent::Terminated, msg.term().await)
        }
        Ok(JobEnd::Answered { .. }) => {
            answered.insert(&msg.stream, msg.sequence);
            (JobEvent::Acked, msg.ack().await)
        }
        Ok(JobEnd::Retry(RetryAfter::Now)) => (JobEvent::Naked, msg.nak(None).await),
        Ok(JobEnd::Retry(RetryAfter::Delay)) => {
            (JobEvent::Naked, msg.nak(Some(timing.retry_delay)).await)
        }
        Err(_) => {
            warn!(
                sequence = msg.sequence,
                "a job's turn ended without a verdict; handing it back"
            );
            (JobEvent::Naked, msg.nak(Some(timing.retry_delay)).await)
        }
    };
    match result {
        Ok(()) => {
            info!(sequence = msg.sequence, delivered = msg.delivered, outcome = ?event, "job settled");
            metrics.job(event);
        }
        Err(e) => {
            warn!(sequence = msg.sequence, error = %e, outcome = ?event, "settling a job failed; it comes back after ack_wait")
        }
    }
}

/// A terminal reply that removes the job for good, not as done.
fn is_refusal(code: Option<ErrorCode>) -> bool {
    matches!(
        code,
        Some(ErrorCode::BadRequest | ErrorCode::Forbidden | ErrorCode::Undeliverable)
    )
}
