//! [pure] The NATS wire contract: prompts in, replies out, subject rules.
//!
//! Nothing here does I/O; `bus/` moves these values over NATS. The contract is
//! written up for users in `docs/PROTOCOL.md`; the two must agree.

pub mod agent;
pub mod attachment;
pub mod caller;
pub mod control;
pub mod interactive;
pub mod job;
pub mod prompt;
pub mod reply;
pub mod subject;
pub mod tenant;
pub mod traceparent;
pub mod turn_state;
pub mod workspace;

pub use attachment::Attachment;
pub use prompt::{
    parse_prompt, ModelRef, Prompt, PromptHeaders, PromptLimits, QueueKey, Rejection, StreamMode,
};
pub use reply::{ErrorCode, Reply, ReplyBody, ReplyOwned, StatusEvent, Usage};
pub use subject::{reply_subject, subject_matches, validate_subject, SubjectError};
