//! `[cluster]` and `[jetstream]`: scaling out on NATS itself
//! (docs/CLUSTER.md). Both need a nats-server with JetStream; without it
//! the daemon logs once that it runs single-host and serves as before.

use std::time::Duration;

use serde::Deserialize;

/// Whether a JetStream feature is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Switch {
    /// On when the server has JetStream (and the daemon may use it).
    #[default]
    Auto,
    /// On; a server without JetStream stops the start (exit 78) after
    /// 30 s of asking (a JetStream cluster electing its leader is silent).
    On,
    Off,
}

/// `[cluster]`: one home per conversation across daemons, leases, and
/// every turn's state in a KV bucket.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// `auto` (default): on when the nats-server has JetStream; `on`:
    /// required; `off`: single-host, the in-memory map only.
    pub enabled: Switch,
    /// This daemon's id in the cluster (one subject token). Unset: the
    /// host name and a random suffix, new at every start.
    pub instance_id: Option<String>,
    /// Names the OpenCode server this daemon drives; daemons that share one
    /// OpenCode must agree on it (they continue each other's sessions).
    /// Unset: `[opencode] base_url` for an external server, else
    /// `embedded@<host>:<directory>`.
    pub opencode_id: Option<String>,
    /// KV bucket: conversation -> its owner daemon and session.
    pub conversations_bucket: String,
    /// KV bucket: one lease per live daemon (its TTL is `lease_ttl`).
    pub instances_bucket: String,
    /// KV bucket: every turn's state and terminal reply, for
    /// `opencode.turn.status` (its TTL is `turn_ttl`).
    pub turns_bucket: String,
    /// A daemon whose lease is not renewed for this long is dead and its
    /// conversations are taken over. Renewed every third of it.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// How long a turn's state stays fetchable after its last change.
    #[serde(with = "humantime_serde")]
    pub turn_ttl: Duration,
    /// Where a daemon takes prompts forwarded to it:
    /// `<instance_prefix>.<instance_id>.prompt`.
    pub instance_prefix: String,
    /// How long a forwarding daemon waits for the owner to take the prompt.
    #[serde(with = "humantime_serde")]
    pub forward_timeout: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            enabled: Switch::Auto,
            instance_id: None,
            opencode_id: None,
            conversations_bucket: "opencode_bridge_conversations".into(),
            instances_bucket: "opencode_bridge_instances".into(),
            turns_bucket: "opencode_bridge_turns".into(),
            lease_ttl: Duration::from_secs(15),
            turn_ttl: Duration::from_secs(3600),
            instance_prefix: "opencode.bridge.instance".into(),
            forward_timeout: Duration::from_secs(2),
        }
    }
}

/// `[jetstream]`: durable jobs, and optionally a stream of every reply.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JetStreamConfig {
    /// Take jobs from `jobs_stream` (`auto`: when the server has JetStream).
    pub jobs: Switch,
    /// The work-queue stream of jobs, created when missing.
    pub jobs_stream: String,
    /// Its subjects: `<jobs_subject>` and `<jobs_subject>.>` (tenants as
    /// for prompts: `opencode.job.<tenant>[.<conversation>]`).
    pub jobs_subject: String,
    /// The durable pull consumer every daemon shares.
    pub jobs_consumer: String,
    /// The jobs stream's size (bytes) when the daemon creates it: a full
    /// stream refuses new jobs (the publisher's JetStream ack fails)
    /// rather than drop stored ones, and one tenant cannot fill the
    /// JetStream store the cluster's buckets live in.
    pub jobs_max_bytes: u64,
    /// A job not acknowledged (nor marked in progress) for this long is
    /// delivered again; a running job is marked in progress every third.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Deliveries of one job before it gets `error` `undeliverable`.
    pub max_deliver: i64,
    /// A job that found OpenCode unavailable comes back after this.
    #[serde(with = "humantime_serde")]
    pub retry_delay: Duration,
    /// A stream capturing `<reply_prefix>.>` so a client can replay a
    /// whole turn by subject. Empty: none.
    pub replies_stream: String,
    /// How long `replies_stream` keeps replies.
    #[serde(with = "humantime_serde")]
    pub replies_max_age: Duration,
    /// Copies of every bucket and stream the daemon creates (conversations,
    /// instances, turns, finals, jobs, replies): 1 on a single nats-server,
    /// 3 on a three-node cluster (docs/CLUSTER.md). A cluster with fewer
    /// JetStream servers cannot place them: the start fails and says so.
    /// Existing ones keep their count (a different one is logged).
    pub replicas: usize,
}

impl Default for JetStreamConfig {
    fn default() -> Self {
        JetStreamConfig {
            jobs: Switch::Auto,
            jobs_stream: "OPENCODE_JOBS".into(),
            jobs_subject: "opencode.job".into(),
            jobs_consumer: "opencode_bridge".into(),
            jobs_max_bytes: 256 * 1024 * 1024,
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            retry_delay: Duration::from_secs(5),
            replies_stream: String::new(),
            replies_max_age: Duration::from_secs(3600),
            replicas: 1,
        }
    }
}
