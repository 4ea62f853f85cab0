//! The async-nats adapter, by role: [`connect`] (options, backoff, events),
//! [`incoming`] (a message off the bus), [`subscribe`] (prompt and control
//! subscriptions, one subscribe loop, drain), [`publish`] (replies with
//! their headers), [`service`] (the NATS micro service: `$SRV.*`, `status`),
//! [`agent`] (the Synadia Agent Protocol registration and heartbeat),
//! [`jetstream`] (JetStream found or not, KV buckets with compare-and-swap),
//! [`forward`] (a prompt handed to its conversation's home daemon),
//! [`objects`] (object store buckets, the replies stream), [`replicas`]
//! (the copies of what it creates), [`jobs`] (the
//! durable jobs stream and its shared consumer) and [`caller`] (the client
//! side of the contract, for the CLI).
//! Architecture invariant: this is the only module that imports
//! `async_nats`; the rest of the daemon sees [`Incoming`], [`Publisher`],
//! [`Service`] and [`Caller`].

pub mod agent;
pub mod caller;
pub mod connect;
pub mod forward;
pub mod incoming;
pub mod jetstream;
pub mod jobs;
pub mod objects;
pub mod publish;
pub mod replicas;
pub mod service;
pub mod subscribe;

pub use agent::{AgentOptions, AgentPrompts, AgentService};
/// A NATS connection, for the wiring that hands it from [`connect`] to the
/// subscriptions and the publisher.
pub use async_nats::Client as Connection;
pub use caller::{Caller, Received, ReplyStream};
pub use connect::{connect, connect_observed};
pub use forward::{Forwarded, Forwarder, InstanceSubscription};
pub use incoming::Incoming;
pub use jetstream::{Bucket, Entry, JetStream};
pub use jobs::{JobMessage, JobQueue, JobSettings};
pub use objects::Objects;
pub use publish::{Publisher, TurnHeaders};
pub use service::{Service, ServiceOptions, StatusFn};
pub use subscribe::{barrier, ControlSubscription, PromptSubscription};

/// The error of an async-nats call, kept whole (`source()`).
pub type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong on the NATS side.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("NATS server URL {url:?} is invalid: {source}")]
    Url { url: String, source: Source },
    #[error("cannot read NATS credentials file {path}: {source}")]
    Credentials {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot connect to NATS at {urls}: {source} (is a nats-server running there? `[nats] url` / OPENCODE_BRIDGE__NATS__URL says where)")]
    Connect { urls: String, source: Source },
    #[error("cannot subscribe to {subject}: {source}")]
    Subscribe { subject: String, source: Source },
    #[error("cannot publish to {subject}: {source}")]
    Publish { subject: String, source: Source },
    #[error("cannot start the NATS micro service {name}: {source}")]
    Service { name: String, source: Source },
    #[error("JetStream: cannot {what}: {source}")]
    JetStream { what: String, source: Source },
    #[error("the NATS server refused a request on {subject}: {detail}")]
    Refused { subject: String, detail: String },
}
