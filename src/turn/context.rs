//! What every turn shares, and why a turn fails.

use std::sync::Arc;

use tracing::warn;

use super::interactive::AnswerRegistry;
use super::sessions::SessionStore;
use super::sink::ReplySink;
use crate::bus::Publisher;
use crate::config::Config;
use crate::opencode::{EventHub, OpenCodeClient, OpenCodeError};
use crate::protocol::{ErrorCode, Prompt};

/// What every turn shares.
pub struct TurnContext {
    pub client: OpenCodeClient,
    pub hub: Arc<EventHub>,
    pub publisher: Publisher,
    pub sessions: Arc<dyn SessionStore>,
    pub config: Arc<Config>,
    /// Answers to permission / question replies, by request id.
    pub answers: Arc<AnswerRegistry>,
    /// Turn states and large finals, with JetStream (`turn::states`).
    pub states: Option<Arc<super::states::TurnStates>>,
    /// With `[workspaces] root`: each turn drives its workspace (and, in
    /// `[isolation] mode = "process"`, its tenant's own server) instead
    /// of `client` and `hub` as they are.
    pub isolation: Option<Arc<crate::isolation::Isolation>>,
}

impl TurnContext {
    pub fn new(
        client: OpenCodeClient,
        hub: Arc<EventHub>,
        publisher: Publisher,
        sessions: Arc<dyn SessionStore>,
        config: Arc<Config>,
    ) -> Self {
        TurnContext {
            client,
            hub,
            publisher,
            sessions,
            config,
            answers: Arc::new(AnswerRegistry::default()),
            states: None,
            isolation: None,
        }
    }

    /// Runs turns in workspaces and tenants' servers (`crate::isolation`).
    pub fn with_isolation(mut self, isolation: Option<Arc<crate::isolation::Isolation>>) -> Self {
        self.isolation = isolation;
        self
    }

    /// The context a turn of `prompt` runs in: this one, or, with
    /// workspaces, one driving the prompt's workspace on its server (held
    /// by the returned value while the turn runs).
    pub async fn for_prompt(
        self: &Arc<Self>,
        prompt: &Prompt,
    ) -> Result<(Arc<TurnContext>, Option<crate::isolation::Placed>), TurnError> {
        let Some(isolation) = &self.isolation else {
            if prompt.workspace.is_some() {
                return Err(TurnError::new(
                    ErrorCode::BadRequest,
                    "this bridge has no workspaces ([workspaces] root is not set)",
                ));
            }
            return Ok((self.clone(), None));
        };
        let placed = isolation
            .place(prompt, &self.client, &self.hub, self.sessions.as_ref())
            .await?;
        let ctx = TurnContext {
            client: placed.client.clone(),
            hub: placed.hub.clone(),
            publisher: self.publisher.clone(),
            sessions: self.sessions.clone(),
            config: self.config.clone(),
            answers: self.answers.clone(),
            states: self.states.clone(),
            isolation: None,
        };
        Ok((Arc::new(ctx), Some(placed)))
    }

    /// Keeps every accepted turn's state (and large finals) with `states`.
    pub fn with_states(mut self, running: &Option<super::states::Running>) -> Self {
        self.states = running.as_ref().map(|r| r.states.clone());
        self
    }

    /// A sink for one prompt's replies.
    pub fn sink(&self, prompt: &Prompt, subject: String) -> ReplySink {
        ReplySink::new(
            self.publisher.clone(),
            subject,
            prompt.trace_id.clone(),
            prompt.conversation.clone(),
            self.config.limits.max_reply_bytes,
        )
    }
}

/// Why a turn failed: the `error` reply's fields.
#[derive(Debug, Clone)]
pub struct TurnError {
    pub code: ErrorCode,
    pub message: String,
    pub retryable: bool,
}

impl TurnError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        TurnError {
            code,
            message: message.into(),
            retryable: code.retryable(),
        }
    }
}

impl From<OpenCodeError> for TurnError {
    /// The reply says what failed; the detail (URL, body) is logged only.
    fn from(e: OpenCodeError) -> Self {
        warn!(error = %e, "OpenCode call failed");
        TurnError {
            code: e.code(),
            retryable: e.retryable(),
            message: e.public(),
        }
    }
}
