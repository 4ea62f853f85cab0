//! OpenCode's side: the HTTP client, the shared event stream, and the
//! embedded `opencode serve` process.
//!
//! [pure] `sse` (bytes -> SSE events), `events` (SSE data -> typed
//! OpenCode events) and `version` (which OpenCode versions work). I/O:
//! `client` (reqwest), `retry` (which failed calls are sent again, and
//! since when OpenCode has not been reached), `stream` (the one reader task
//! and its per-session routes), `embedded` (spawning the server), `compat`
//! (reading and judging the server's version at start-up and after every
//! reconnect).

pub mod client;
pub mod compat;
pub mod controls;
pub mod embedded;
pub mod events;
pub mod ids;
pub mod retry;
pub mod sse;
pub mod stream;
pub mod tool_output;
pub mod version;

pub use client::{OpenCodeClient, OpenCodeError};
pub use stream::{EventHub, Subscription};
