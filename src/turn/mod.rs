//! One agent turn from prompt to `final`/`error`, the per-conversation
//! queue, and the conversation -> session map.

pub mod answered;
pub mod begin;
pub mod command;
pub mod context;
pub mod deadlines;
pub mod driver;
pub mod interactive;
pub mod job;
pub mod provider;
pub mod queue;
pub mod resume;
pub mod sessions;
pub mod shares;
pub mod sink;
pub mod states;

pub use context::{TurnContext, TurnError};
pub use driver::run_turn;
pub use queue::{Dispatcher, Job};
pub use sessions::{MemoryStore, SessionStore};
pub use sink::ReplySink;
