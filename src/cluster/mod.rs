//! The cluster on NATS itself (docs/CLUSTER.md): each conversation has one
//! home daemon, recorded in a KV bucket and claimed atomically; each
//! daemon keeps a lease in a second bucket; a prompt for a conversation
//! at home elsewhere is forwarded there; a dead or stopped home is taken
//! over with compare-and-swap. The decisions are pure ([`home`]); this
//! module reads and writes the buckets.

pub mod home;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::bus::{self, Bucket, BusError, Forwarder, Incoming, JetStream};
use crate::config::Config;
use crate::turn::SessionStore;
use home::{decide, key, Decision, Home, Lease, Me};

/// Where a prompt of a conversation is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// Here; `moved_from` names the host the conversation came from when
    /// its session could not follow (another OpenCode).
    Here { moved_from: Option<String> },
    /// At its home, the live daemon `instance`.
    There { instance: String },
    /// Nowhere now (`session_busy`, retryable): a forwarded prompt whose
    /// conversation moved meanwhile, or a home that would not take it.
    Busy { reason: String },
}

/// This daemon in the cluster.
pub struct Cluster {
    me: Me,
    homes: Bucket,
    leases: Bucket,
    forwarder: Forwarder,
    ttl: Duration,
    /// Conversations this daemon is home to, with the KV revision it wrote.
    owned: Mutex<HashMap<String, u64>>,
    /// The last time the lease was written; the `owned` cache is trusted
    /// only while the lease is fresh.
    renewed: Mutex<Option<Instant>>,
    /// Since when homes could not be read (none: they could, last time).
    kv_down: Mutex<Option<Instant>>,
}

/// The bound on one decision's KV round trips.
const KV_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a decision keeps trying while the buckets cannot be read (a
/// JetStream leader election takes a few seconds), and the pause between
/// tries. Past it the prompt is not served (`session_busy`): serving it
/// here could give the conversation a second home (docs/CLUSTER.md).
const KV_RETRY_FOR: Duration = Duration::from_secs(8);
const KV_RETRY_PAUSE: Duration = Duration::from_millis(250);

impl Cluster {
    /// Opens (or creates) the buckets and writes the first lease.
    pub async fn start(
        js: &JetStream,
        nats: &bus::Connection,
        config: &Config,
        host: &str,
        opencode_id: String,
    ) -> Result<Arc<Cluster>, BusError> {
        let c = &config.cluster;
        let instance = c
            .instance_id
            .clone()
            .unwrap_or_else(|| home::instance_id(host, rand::random()));
        let me = Me {
            instance: instance.clone(),
            host: host.to_string(),
            opencode: opencode_id,
        };
        // The bridge's own buckets are not bounded: every bucket tenants
        // fill is ([shares]), so the rest of the store is their reserve.
        let homes = js
            .bucket(&c.conversations_bucket, Duration::ZERO, None)
            .await?;
        let leases = js.bucket(&c.instances_bucket, c.lease_ttl, None).await?;
        let forwarder = Forwarder::new(
            nats.clone(),
            &c.instance_prefix,
            &instance,
            c.forward_timeout,
        );
        let cluster = Arc::new(Cluster {
            me,
            homes,
            leases,
            forwarder,
            ttl: c.lease_ttl,
            owned: Mutex::new(HashMap::new()),
            renewed: Mutex::new(None),
            kv_down: Mutex::new(None),
        });
        cluster.refuse_a_twin().await?;
        cluster.renew().await?;
        info!(instance = %cluster.me.instance, opencode = %cluster.me.opencode, lease_ttl = ?c.lease_ttl, "joined the cluster");
        Ok(cluster)
    }

    pub fn instance(&self) -> &str {
        &self.me.instance
    }

    /// This daemon in `status`.
    pub fn status(&self) -> crate::ops::status::ClusterStatus {
        crate::ops::status::ClusterStatus {
            instance_id: self.me.instance.clone(),
            opencode_id: self.me.opencode.clone(),
        }
    }

    /// A live lease under this instance id from another host means two
    /// daemons were given one `[cluster] instance_id`: both would take the
    /// same forwarded prompts. (The same host is this daemon restarted.)
    async fn refuse_a_twin(&self) -> Result<(), BusError> {
        let Some(e) = self.leases.get(&self.me.instance).await? else {
            return Ok(());
        };
        match serde_json::from_slice::<Lease>(&e.value) {
            Ok(l) if l.host != self.me.host => Err(BusError::Refused {
                subject: self.leases.name().to_string(),
                detail: format!(
                    "instance id {:?} is in use by the live daemon on host {:?}: give each daemon its own [cluster] instance_id (or none)",
                    self.me.instance, l.host
                ),
            }),
            _ => Ok(()),
        }
    }

    /// Writes the lease. After a gap longer than the TTL (NATS was gone,
    /// the lease expired) the `owned` cache is dropped: another daemon may
    /// have taken a conversation over meanwhile.
    async fn renew(&self) -> Result<(), BusError> {
        let lease = Lease {
            host: self.me.host.clone(),
            opencode: self.me.opencode.clone(),
            started_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let value = serde_json::to_vec(&lease).expect("a lease serialises");
        self.leases.put(&self.me.instance, value.into()).await?;
        let mut renewed = lock(&self.renewed);
        if renewed.is_some_and(|t| t.elapsed() >= self.ttl) {
            warn!("the lease had expired (NATS unreachable for longer than lease_ttl); conversations are checked again in KV");
            lock(&self.owned).clear();
        }
        *renewed = Some(Instant::now());
        Ok(())
    }

    /// Renews the lease every third of its TTL until `cancel`.
    pub fn spawn_renewal(self: &Arc<Self>, cancel: CancellationToken) -> JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(me.ttl / 3);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tick.tick() => {}
                }
                if let Err(e) = me.renew().await {
                    warn!(error = %e, "cannot renew this daemon's lease");
                }
            }
        })
    }

    fn lease_fresh(&self) -> bool {
        lock(&self.renewed).is_some_and(|t| t.elapsed() < self.ttl)
    }

    /// Where a prompt of `conversation` is served. `forwarded`: it was
    /// forwarded here already, so it is never forwarded again.
    pub async fn place(
        &self,
        conversation: &str,
        forwarded: bool,
        sessions: &dyn SessionStore,
    ) -> Place {
        if self.lease_fresh() && lock(&self.owned).contains_key(conversation) {
            return Place::Here { moved_from: None };
        }
        // While the buckets are known to be unreadable, one try: prompts
        // are decided one at a time and must not each wait the full bound.
        let retry_for = if lock(&self.kv_down).is_some() {
            Duration::ZERO
        } else {
            KV_RETRY_FOR
        };
        let deadline = Instant::now() + retry_for;
        let why = loop {
            let decided =
                tokio::time::timeout(KV_TIMEOUT, self.decide(conversation, forwarded, sessions));
            let why = match decided.await {
                Ok(Ok(place)) => {
                    *lock(&self.kv_down) = None;
                    return place;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {KV_TIMEOUT:?}"),
            };
            if Instant::now() >= deadline {
                break why;
            }
            tokio::time::sleep(KV_RETRY_PAUSE).await;
        };
        lock(&self.kv_down).get_or_insert_with(Instant::now);
        error!(%conversation, error = %why, "cannot read the conversation's home; not serving it (another daemon may be its home): session_busy");
        Place::Busy {
            reason: "the cluster cannot read conversation homes now (JetStream has no leader for them: a nats-server restarting or cut off from the others); send again".into(),
        }
    }

    async fn decide(
        &self,
        conversation: &str,
        forwarded: bool,
        sessions: &dyn SessionStore,
    ) -> Result<Place, BusError> {
        let k = key(conversation);
        // A lost race (create or compare-and-swap) is read again.
        for _ in 0..4 {
            let entry = self.homes.get(&k).await?;
            let home: Option<(Home, u64)> = entry.and_then(|e| {
                serde_json::from_slice::<Home>(&e.value)
                    .ok()
                    .map(|h| (h, e.revision))
            });
            let alive = match &home {
                Some((h, _)) if h.instance != self.me.instance => {
                    self.leases.get(&h.instance).await?.is_some()
                }
                _ => true,
            };
            match decide(&self.me, home.as_ref().map(|(h, r)| (h, *r)), alive) {
                Decision::Serve => {
                    lock(&self.owned).insert(conversation.to_string(), home.map_or(0, |h| h.1));
                    return Ok(Place::Here { moved_from: None });
                }
                Decision::Claim => {
                    let value = encode(&self.me.home(None));
                    if let Some(rev) = self.homes.create(&k, value).await? {
                        debug!(%conversation, "claimed the conversation");
                        lock(&self.owned).insert(conversation.to_string(), rev);
                        return Ok(Place::Here { moved_from: None });
                    }
                }
                Decision::Forward { instance } if forwarded => {
                    return Ok(Place::Busy {
                        reason: format!("conversation {conversation} moved to another bridge ({instance}) meanwhile; send again"),
                    });
                }
                Decision::Forward { instance } => return Ok(Place::There { instance }),
                Decision::TakeOver {
                    revision,
                    session,
                    lost_host,
                } => {
                    let from = home.as_ref().map(|(h, _)| h.instance.clone());
                    let value = encode(&self.me.home(session.clone()));
                    let Some(rev) = self.homes.update(&k, value, revision).await? else {
                        continue;
                    };
                    warn!(%conversation, from = ?from, same_opencode = lost_host.is_none(), "took the conversation over from a dead or stopped daemon");
                    lock(&self.owned).insert(conversation.to_string(), rev);
                    match (&session, &lost_host) {
                        (Some(s), _) => sessions.put(conversation, s).await,
                        (None, Some(_)) => sessions.remove(conversation).await,
                        (None, None) => {}
                    }
                    return Ok(Place::Here {
                        moved_from: lost_host,
                    });
                }
            }
        }
        Ok(Place::Busy {
            reason: format!("conversation {conversation} is being claimed by several bridges at once; send again"),
        })
    }

    /// Waits (at most the lease TTL and a second) until `instance` has no
    /// lease any more or no longer holds `conversation` (released, or taken
    /// over): a home that stopped taking prompts (killed, hung, stopping)
    /// is taken over as soon as it may be.
    pub async fn wait_for_home(&self, instance: &str, conversation: &str) {
        let deadline = Instant::now() + self.ttl + Duration::from_secs(1);
        let step = (self.ttl / 15).max(Duration::from_millis(100));
        let k = key(conversation);
        while Instant::now() < deadline {
            let lease = self.leases.get(instance).await;
            let home = self.homes.get(&k).await;
            let holds = match home {
                Ok(Some(e)) => serde_json::from_slice::<Home>(&e.value)
                    .map(|h| h.instance == instance && !h.released)
                    .unwrap_or(false),
                Ok(None) => false,
                Err(_) => true,
            };
            if matches!(lease, Ok(None)) || !holds {
                return;
            }
            tokio::time::sleep(step).await;
        }
    }

    /// The daemon `conversation` is at home on now (none when unclaimed or
    /// released, or when the bucket cannot be read).
    pub async fn home_of(&self, conversation: &str) -> Option<String> {
        let e = self.homes.get(&key(conversation)).await.ok()??;
        serde_json::from_slice::<Home>(&e.value)
            .ok()
            .filter(|h| !h.released)
            .map(|h| h.instance)
    }

    /// Hands a pulled job to the daemon `instance`, which settles it.
    pub async fn forward_job(&self, instance: &str, job: &bus::JobMessage) -> Result<(), BusError> {
        self.forwarder.forward_job(instance, job).await
    }

    /// Hands `msg` to the daemon `instance`.
    pub async fn forward(&self, instance: &str, msg: &Incoming) -> Result<(), BusError> {
        self.forwarder.forward(instance, msg).await
    }

    /// Records the session a conversation at home here now uses, so a
    /// daemon on the same OpenCode that takes it over continues it.
    pub async fn record_session(&self, conversation: &str, session_id: &str) {
        self.write_session(conversation, Some(session_id)).await
    }

    /// Forgets the session of a conversation at home here (`new`): a
    /// daemon that takes it over starts a new one too.
    pub async fn forget_session(&self, conversation: &str) {
        self.write_session(conversation, None).await
    }

    async fn write_session(&self, conversation: &str, session_id: Option<&str>) {
        let Some(rev) = lock(&self.owned).get(conversation).copied() else {
            return;
        };
        let value = encode(&self.me.home(session_id.map(str::to_string)));
        let k = key(conversation);
        let update = self.homes.update(&k, value, rev);
        let Ok(updated) = tokio::time::timeout(KV_TIMEOUT, update).await else {
            warn!(%conversation, "recording the conversation's session took over 2s; skipped");
            return;
        };
        match updated {
            Ok(Some(new)) => {
                lock(&self.owned).insert(conversation.to_string(), new);
            }
            Ok(None) => {
                warn!(%conversation, "the conversation's home changed while this daemon served it");
                lock(&self.owned).remove(conversation);
            }
            Err(e) => warn!(%conversation, error = %e, "cannot record the conversation's session"),
        }
    }

    /// Hands back every conversation at home here except those `busy`
    /// says still have turns: the next prompt of each is served at once
    /// by another daemon.
    pub async fn release(&self, busy: impl Fn(&str) -> bool) -> usize {
        let owned: Vec<(String, u64)> = lock(&self.owned)
            .iter()
            .filter(|(c, _)| !busy(c))
            .map(|(c, r)| (c.clone(), *r))
            .collect();
        let mut n = 0;
        for (conversation, rev) in owned {
            let mut home = self.me.home(None);
            home.released = true;
            // Keep the session for a daemon on the same OpenCode.
            if let Ok(Some(e)) = self.homes.get(&key(&conversation)).await {
                if let Ok(h) = serde_json::from_slice::<Home>(&e.value) {
                    home.session_id = h.session_id;
                }
            }
            match self
                .homes
                .update(&key(&conversation), encode(&home), rev)
                .await
            {
                Ok(Some(_)) => n += 1,
                Ok(None) => debug!(%conversation, "not released: its home changed meanwhile"),
                Err(e) => warn!(%conversation, error = %e, "cannot release the conversation"),
            }
            lock(&self.owned).remove(&conversation);
        }
        n
    }

    /// Leaves the cluster: the lease goes, so nothing waits for it to
    /// expire.
    pub async fn leave(&self) {
        if let Err(e) = self.leases.delete(&self.me.instance).await {
            warn!(error = %e, "cannot delete this daemon's lease");
        }
    }
}

fn encode(home: &Home) -> Bytes {
    serde_json::to_vec(home).expect("a home serialises").into()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The conversation map with the cluster told of every new session.
pub struct ClusterSessions<S> {
    pub inner: S,
    pub cluster: Arc<Cluster>,
}

impl<S: SessionStore> SessionStore for ClusterSessions<S> {
    fn get<'a>(&'a self, conversation: &'a str) -> BoxFuture<'a, Option<String>> {
        self.inner.get(conversation)
    }

    fn put<'a>(&'a self, conversation: &'a str, session_id: &'a str) -> BoxFuture<'a, ()> {
        async move {
            self.inner.put(conversation, session_id).await;
            self.cluster.record_session(conversation, session_id).await;
        }
        .boxed()
    }

    fn remove<'a>(&'a self, conversation: &'a str) -> BoxFuture<'a, ()> {
        self.inner.remove(conversation)
    }

    fn known(&self) -> Option<usize> {
        self.inner.known()
    }
}
