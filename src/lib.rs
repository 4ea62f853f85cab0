//! # opencode-nats-bridge
//!
//! A daemon between a NATS bus and OpenCode's headless server:
//!
//! ```text
//! NATS prompt -> turn driver -> OpenCode HTTP/SSE -> event mapper -> NATS replies
//! ```
//!
//! # Layout (in the order a prompt flows)
//!
//! - [`config`]: the TOML + environment configuration, validated.
//! - [`protocol`] *(pure)*: the NATS wire contract: prompt parsing, the reply
//!   vocabulary, subject validation (`docs/PROTOCOL.md`).
//! - [`bus`]: the async-nats adapter (subscribe, publish, drain).
//! - [`intake`]: an incoming message -> a queued turn, an abort, an answer;
//!   the tenant checks.
//! - [`cluster`]: conversation homes across daemons on NATS KV, leases,
//!   forwarding; *(pure)* the records and the decision.
//! - [`jobs`]: durable jobs from the JetStream work queue: pulled one at a
//!   time while a slot is free, settled (ack, nak, term) by how their turn
//!   ended.
//! - [`isolation`]: `[isolation] mode = "process"`: one `opencode serve`
//!   per tenant, started on demand, stopped when idle, supervised.
//! - [`turn`]: one turn from prompt to `final`/`error`; the per-conversation
//!   FIFO; the conversation -> session map.
//! - [`opencode`]: the HTTP client, the single event-stream reader and its
//!   per-session routes, the embedded `opencode serve`, the version check;
//!   *(pure)* the SSE decoder, the typed events and the version rules.
//! - [`mapper`] *(pure)*: OpenCode events -> replies, and the end of a turn
//!   read from the message list.
//! - `jsonscan` *(pure)*: the JSON string scan the event parser and the
//!   reply writer share.
//! - [`app`]: wiring and shutdown.
//! - [`sandbox`]: the `sandbox` isolation mode: the `sandbox-exec` helper
//!   that confines a tenant's server by the kernel, the start-up check;
//!   *(pure)* the policy.
//! - [`ops`]: operating it: metrics, status and heartbeat, the NATS micro
//!   service, systemd notifications, W3C trace context.

pub mod app;
pub mod bus;
pub mod cluster;
pub mod config;
pub mod controls;
pub mod intake;
pub mod isolation;
pub mod jobs;
mod jsonscan;
pub mod mapper;
pub mod metrics;
pub mod opencode;
pub mod ops;
pub mod protocol;
pub mod sandbox;
pub mod turn;
