//! Turn states (issue 12, "Results can be fetched again"): every accepted
//! turn's state (queued, running, its terminal reply) goes to the KV bucket
//! `[cluster] turns_bucket`, and one daemon answers each request on
//! `[subjects] turn_status` from it. A final too long for one message has
//! its whole text put in an object store bucket (`[limits]
//! large_final_bucket`).
//!
//! Writes never slow a turn down: a turn hands its state to a bounded
//! channel ([`QUEUE`]) and one writer task puts it in KV; a full channel
//! drops the write (counted, logged). The writer takes what is waiting in
//! one batch, keeps the last state of each key and puts them at once: the
//! states of one turn go through the one channel in order, so the last
//! write of a key is its latest state. A dropped write leaves the key's
//! previous state until the next one (or `turn_ttl`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::bus::{Bucket, ControlSubscription, Incoming, JetStream, Objects, Publisher};
use crate::config::Config;
use crate::protocol::reply::ContentObject;
use crate::protocol::tenant::Caller;
use crate::protocol::turn_state::{
    done_doc, final_object, parse_request, requester, state_doc, state_key, tenant_bucket,
    TurnState,
};

/// State writes waiting for the writer; beyond it they are dropped.
pub const QUEUE: usize = 4096;
/// Most writes the writer puts at once.
const BATCH: usize = 256;
/// Bound on one KV put or read, and on storing a final's whole text.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Tries of one state write refused by the server, and the pause between:
/// 30 s, the default `ack_wait` (a leader election can outlast 6 s on a
/// loaded machine: docs/RELIABILITY.md, run 2).
const PUT_ATTEMPTS: u32 = 60;
const PUT_PAUSE: Duration = Duration::from_millis(500);
/// Object store buckets kept open (one per tenant with a large final).
const MAX_BUCKETS: usize = 256;

/// One state write: the owner's bucket, the key, the document.
type Write = (String, String, Vec<u8>);

/// The turn state writer's side for turns, and the large finals' store.
pub struct TurnStates {
    tx: mpsc::Sender<Write>,
    dropped: AtomicU64,
    js: JetStream,
    finals_base: String,
    /// Each tenant's finals bucket holds at most this (`[shares]`).
    finals_bytes: u64,
    ttl: Duration,
    finals: Mutex<HashMap<String, Objects>>,
    /// Each owner's turn states bucket (`[shares] turn_states_bytes`).
    buckets: Arc<StateBuckets>,
}

/// The turn states buckets, one per owner (`<turns_bucket>-<tenant>`, the
/// operator's `<turns_bucket>`), each bounded, opened when first used.
pub struct StateBuckets {
    js: JetStream,
    base: String,
    ttl: Duration,
    max_bytes: u64,
    open: Mutex<HashMap<String, Bucket>>,
    /// Buckets whose last write was refused for want of room (a tenant's
    /// share used up), until a write succeeds again.
    full: Mutex<std::collections::HashSet<String>>,
}

impl StateBuckets {
    /// The bucket named `name`, opened (created when missing) once.
    async fn get(&self, name: &str) -> Result<Bucket, crate::bus::BusError> {
        if let Some(b) = self.lock().get(name) {
            return Ok(b.clone());
        }
        let b = self.js.bucket(name, self.ttl, Some(self.max_bytes)).await?;
        let mut open = self.lock();
        if open.len() >= MAX_BUCKETS {
            open.clear();
        }
        open.insert(name.to_string(), b.clone());
        Ok(b)
    }

    /// Whether the bucket `name` refused its last write for want of room.
    pub fn is_full(&self, name: &str) -> bool {
        self.full
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name)
    }

    /// Records how the last write to `name` went (`refused`: the error's
    /// text, when there was one).
    fn wrote(&self, name: &str, refused: Option<&str>) {
        let mut full = self.full.lock().unwrap_or_else(|p| p.into_inner());
        match refused.map(is_out_of_room) {
            Some(true) => {
                full.insert(name.to_string());
            }
            Some(false) => {}
            None => {
                full.remove(name);
            }
        }
    }

    /// The name of `owner`'s bucket.
    fn name_for(&self, owner: &Caller) -> String {
        tenant_bucket(&self.base, owner)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Bucket>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One turn's handle on its state (held by its [`ReplySink`](super::ReplySink)).
#[derive(Clone)]
pub struct TurnRecord {
    states: Arc<TurnStates>,
    bucket: String,
    key: String,
    owner: Caller,
    trace_id: String,
}

impl TurnStates {
    /// Opens the turns bucket and starts the writer (until `cancel`, then
    /// it writes what is waiting and ends).
    pub async fn start(
        js: &JetStream,
        config: &Config,
        cancel: CancellationToken,
    ) -> Result<(Arc<TurnStates>, Arc<StateBuckets>, JoinHandle<()>), crate::bus::BusError> {
        let c = &config.cluster;
        let buckets = Arc::new(StateBuckets {
            js: js.clone(),
            base: c.turns_bucket.clone(),
            ttl: c.turn_ttl,
            max_bytes: config.shares.turn_states_bytes,
            open: Mutex::new(HashMap::new()),
            full: Mutex::new(Default::default()),
        });
        // The operator's bucket now: a JetStream that refuses it stops
        // the turn states at start-up, not at the first turn.
        buckets.get(&c.turns_bucket).await?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let writer = tokio::spawn(write(rx, buckets.clone(), cancel));
        info!(bucket = %c.turns_bucket, ttl = ?c.turn_ttl, "turn states are kept in KV ({} on request)", config.subjects.turn_status);
        let states = Arc::new(TurnStates {
            tx,
            dropped: AtomicU64::new(0),
            js: js.clone(),
            finals_base: config.limits.large_final_bucket.clone(),
            finals_bytes: config.shares.finals_bytes,
            ttl: c.turn_ttl,
            finals: Mutex::new(HashMap::new()),
            buckets: buckets.clone(),
        });
        Ok((states, buckets, writer))
    }

    /// The record of `owner`'s turn `trace_id`.
    pub fn record(self: &Arc<Self>, owner: &Caller, trace_id: &str) -> TurnRecord {
        TurnRecord {
            states: self.clone(),
            bucket: self.buckets.name_for(owner),
            key: state_key(owner, trace_id),
            owner: owner.clone(),
            trace_id: trace_id.to_string(),
        }
    }

    fn send(&self, bucket: String, key: String, value: Vec<u8>) {
        if self.tx.try_send((bucket, key, value)).is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                warn!(
                    dropped_total = n,
                    "turn state writes dropped: the KV writer is behind ({QUEUE} waiting); those turns keep their previous state"
                );
            }
        }
    }

    /// Turn state writes dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    async fn finals_bucket(&self, name: &str) -> Result<Objects, String> {
        if let Some(o) = self.lock_finals().get(name) {
            return Ok(o.clone());
        }
        let o = self
            .js
            .objects(name, self.ttl, self.finals_bytes)
            .await
            .map_err(|e| e.to_string())?;
        let mut finals = self.lock_finals();
        if finals.len() >= MAX_BUCKETS {
            finals.clear();
        }
        finals.insert(name.to_string(), o.clone());
        Ok(o)
    }

    fn lock_finals(&self) -> std::sync::MutexGuard<'_, HashMap<String, Objects>> {
        self.finals.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether a JetStream error says the bucket or stream has no room left
/// (its `max_bytes`, or the server's store).
pub fn is_out_of_room(error: &str) -> bool {
    let e = error.to_ascii_lowercase();
    e.contains("maximum bytes") || e.contains("insufficient resources")
}

impl TurnRecord {
    /// Whether this turn's owner has used up its share of the turn states
    /// (`[shares] turn_states_bytes`): its states are not being kept.
    pub fn states_full(&self) -> bool {
        self.states.buckets.is_full(&self.bucket)
    }

    /// The turn is queued or running now.
    pub fn set(&self, state: TurnState) {
        self.states.send(
            self.bucket.clone(),
            self.key.clone(),
            state_doc(&self.trace_id, state),
        );
    }

    /// The terminal reply `terminal` (its JSON, as published) went out.
    pub fn done(&self, terminal: &[u8]) {
        self.states.send(
            self.bucket.clone(),
            self.key.clone(),
            done_doc(&self.trace_id, terminal),
        );
    }

    /// Puts the whole text of the turn's final in its owner's object store
    /// bucket (bounded by [`IO_TIMEOUT`]); where it is, or why not.
    pub async fn store_final(&self, content: &str) -> Result<ContentObject, String> {
        let s = &self.states;
        let object = final_object(&s.finals_base, &self.owner, &self.trace_id);
        let put = async {
            let bucket = s.finals_bucket(&object.bucket).await?;
            bucket
                .put(&object.name, content.as_bytes())
                .await
                .map_err(|e| e.to_string())
        };
        match tokio::time::timeout(IO_TIMEOUT, put).await {
            Ok(Ok(())) => Ok(object),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("no answer within {IO_TIMEOUT:?}")),
        }
    }
}

/// The writer: batches of the latest state per key, put at once.
async fn write(
    mut rx: mpsc::Receiver<Write>,
    buckets: Arc<StateBuckets>,
    cancel: CancellationToken,
) {
    loop {
        // Biased to the channel: on `cancel` what waits is written first.
        let first = tokio::select! {
            biased;
            w = rx.recv() => match w { Some(w) => w, None => break },
            _ = cancel.cancelled() => break,
        };
        let (b, k, v) = first;
        let mut batch: HashMap<(String, String), Vec<u8>> = HashMap::from([((b, k), v)]);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok((b, k, v)) => {
                    batch.insert((b, k), v);
                }
                Err(_) => break,
            }
        }
        let puts = batch.into_iter().map(|((name, key), value)| {
            let buckets = buckets.clone();
            async move {
                let bucket = match tokio::time::timeout(IO_TIMEOUT, buckets.get(&name)).await {
                    Ok(Ok(b)) => b,
                    Ok(Err(e)) => {
                        warn!(%key, bucket = %name, error = %e, "writing a turn state failed: its bucket cannot be opened");
                        return;
                    }
                    Err(_) => {
                        warn!(%key, bucket = %name, "writing a turn state timed out opening its bucket");
                        return;
                    }
                };
                let refused = put(&bucket, key, value.into()).await.err();
                buckets.wrote(&name, refused.as_deref());
            }
        });
        futures::future::join_all(puts).await;
    }
}

/// Writes one state, again after a refusal while the bucket has no leader
/// (a nats-server of the cluster restarting: "no stream found", "no
/// responders") for up to [`PUT_ATTEMPTS`] x [`PUT_PAUSE`]: a turn's
/// `done` must not be lost to a leader election (docs/RELIABILITY.md). A
/// full share ([`is_out_of_room`]) is not tried again. `Err`: the last
/// refusal.
async fn put(bucket: &Bucket, key: String, value: bytes::Bytes) -> Result<(), String> {
    let mut last = String::new();
    for attempt in 1..=PUT_ATTEMPTS {
        match tokio::time::timeout(IO_TIMEOUT, bucket.put(&key, value.clone())).await {
            Ok(Ok(_)) => {
                debug!(%key, attempt, "turn state written");
                return Ok(());
            }
            Ok(Err(e)) => {
                last = e.to_string();
                if is_out_of_room(&last) || attempt == PUT_ATTEMPTS {
                    warn!(%key, attempts = attempt, error = %e, "writing a turn state failed");
                    break;
                }
                debug!(%key, attempt, error = %e, "writing a turn state failed; trying again");
                tokio::time::sleep(PUT_PAUSE).await;
            }
            Err(_) => {
                warn!(%key, "writing a turn state timed out");
                return Err(format!("no answer within {IO_TIMEOUT:?}"));
            }
        }
    }
    Err(last)
}

/// Answers turn state requests (`<turn_status>`, `<turn_status>.<tenant>`,
/// queue group) from the bucket, one at a time, until `cancel`.
pub async fn spawn_status(
    nats: &crate::bus::Connection,
    config: Arc<Config>,
    buckets: Arc<StateBuckets>,
    publisher: Publisher,
    cancel: CancellationToken,
) -> Result<JoinHandle<()>, crate::bus::BusError> {
    let s = &config.subjects;
    let subjects = [s.turn_status.clone(), format!("{}.*", s.turn_status)];
    let mut sub = ControlSubscription::subscribe_in(nats, &subjects, Some(&s.queue_group)).await?;
    Ok(tokio::spawn(async move {
        loop {
            let msg = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                m = sub.next() => m,
            };
            let Some(msg) = msg else { break };
            answer(&config, &buckets, &publisher, msg).await;
        }
    }))
}

/// One request: checked like a control message, answered from KV. An
/// unknown key, an expired one and another tenant's read the same.
async fn answer(config: &Config, buckets: &StateBuckets, publisher: &Publisher, msg: Incoming) {
    let Some(from) = requester(&config.subjects.turn_status, &msg.subject) else {
        return;
    };
    let Some(reply) = msg.reply.as_deref() else {
        debug!(subject = %msg.subject, "a turn state request without a reply subject");
        return;
    };
    let reply = match config.reply_rules().route(&from, Some(reply), None, "turn") {
        Ok(r) => r,
        Err((reason, _)) => {
            warn!(subject = %msg.subject, %reason, "not answering a turn state request there");
            return;
        }
    };
    let body = match parse_request(&msg.payload, &from) {
        Err(reason) => {
            serde_json::to_vec(&serde_json::json!({"error": reason, "code": "bad_request"}))
                .unwrap_or_default()
        }
        Ok(req) => {
            let key = state_key(&req.owner, &req.trace_id);
            let read = async {
                let bucket = buckets.get(&buckets.name_for(&req.owner)).await?;
                bucket.get(&key).await
            };
            match tokio::time::timeout(IO_TIMEOUT, read).await {
                Ok(Ok(Some(e))) => e.value.to_vec(),
                Ok(Ok(None)) => state_doc(&req.trace_id, TurnState::Unknown),
                Ok(Err(e)) => unavailable(e.to_string()),
                Err(_) => unavailable(format!("no answer within {IO_TIMEOUT:?}")),
            }
        }
    };
    if let Err(e) = publisher.publish_raw(&reply, body).await {
        warn!(error = %e, "answering a turn state request failed");
    }
}

fn unavailable(detail: String) -> Vec<u8> {
    // The detail (NATS's own words) stays in the log.
    warn!(%detail, "cannot read the turns bucket");
    let reason = "cannot read the turn states now; try again".to_string();
    serde_json::to_vec(
        &serde_json::json!({"error": reason, "code": "unavailable", "retryable": true}),
    )
    .unwrap_or_default()
}

/// The turn states as the daemon runs them: the writer, the request
/// responder, and what stops them.
pub struct Running {
    pub states: Arc<TurnStates>,
    writer: JoinHandle<()>,
    status: JoinHandle<()>,
    cancel: CancellationToken,
}

impl Running {
    /// With JetStream: the replies stream (`[jetstream] replies_stream`,
    /// when set), and unless `[cluster] enabled = "off"` the turn states,
    /// their request responder and the large finals' store. A failure is
    /// logged at error level and the daemon serves without them.
    pub async fn start(
        js: Option<&JetStream>,
        config: &Arc<Config>,
        nats: &crate::bus::Connection,
        publisher: &Publisher,
    ) -> Option<Running> {
        let js = js?;
        let j = &config.jetstream;
        if !j.replies_stream.is_empty() {
            let subjects = vec![format!("{}.>", config.subjects.reply_prefix)];
            match js
                .capture(&j.replies_stream, subjects, j.replies_max_age)
                .await
            {
                Ok(()) => {
                    info!(stream = %j.replies_stream, max_age = ?j.replies_max_age, "replies are kept in a stream")
                }
                Err(e) => {
                    tracing::error!(error = %e, "no replies stream ([jetstream] replies_stream)")
                }
            }
        }
        if config.cluster.enabled == crate::config::Switch::Off {
            return None;
        }
        match Self::start_states(js, config, nats, publisher).await {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::error!(error = %e, "no turn states: {} will not be answered and long finals are only cut", config.subjects.turn_status);
                None
            }
        }
    }

    async fn start_states(
        js: &JetStream,
        config: &Arc<Config>,
        nats: &crate::bus::Connection,
        publisher: &Publisher,
    ) -> Result<Running, crate::bus::BusError> {
        let cancel = CancellationToken::new();
        let (states, buckets, writer) = TurnStates::start(js, config, cancel.clone()).await?;
        let status = spawn_status(
            nats,
            config.clone(),
            buckets,
            publisher.clone(),
            cancel.clone(),
        )
        .await?;
        Ok(Running {
            states,
            writer,
            status,
            cancel,
        })
    }

    /// Stops answering and writes what waits (bounded), after the turns.
    pub async fn stop(self) {
        self.cancel.cancel();
        let _ = self.status.await;
        if tokio::time::timeout(IO_TIMEOUT, self.writer).await.is_err() {
            warn!("turn state writes still pending at shutdown; leaving them");
        }
        let dropped = self.states.dropped();
        if dropped > 0 {
            warn!(dropped, "turn state writes dropped during this run");
        }
    }
}
