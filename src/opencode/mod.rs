//! OpenCode's side: the HTTP client, the shared event stream, and the
//! embedded `opencode serve` process.
//!
//! [pure] `sse` (bytes -> SSE events) and `events` (SSE data -> typed
//! OpenCode events). I/O: `client` (reqwest), `stream` (the one reader task
//! and its per-session routes), `embedded` (spawning the server).

pub mod client;
pub mod embedded;
pub mod events;
pub mod ids;
pub mod sse;
pub mod stream;

pub use client::{OpenCodeClient, OpenCodeError};
pub use stream::{EventHub, Subscription};
