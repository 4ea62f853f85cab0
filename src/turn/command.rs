//! A prompt that runs an OpenCode command (`"command"`): `POST
//! /session/{id}/command` answers only when the command's turn has ended,
//! so it runs on a task of its own while the turn follows the events like
//! any other. An error within [`GRACE`] (an unknown command, a session
//! that is gone) is the turn's; after that the events tell.

use std::time::Duration;

use tracing::warn;

use super::context::TurnContext;
use crate::opencode::client::PromptBody;
use crate::opencode::controls::CommandBody;
use crate::opencode::OpenCodeError;
use crate::protocol::controls::CommandRef;

/// How long a refusal of the command is waited for.
const GRACE: Duration = Duration::from_secs(2);

/// Sends the command as the turn's prompt (the user message `body`
/// names); `Ok` once OpenCode took it or did not refuse it within
/// [`GRACE`].
pub async fn send(
    ctx: &TurnContext,
    session_id: &str,
    body: &PromptBody,
    command: &CommandRef,
) -> Result<(), OpenCodeError> {
    let req = CommandBody {
        message_id: body.message_id.clone(),
        command: command.name.clone(),
        arguments: command.arguments.clone(),
        agent: body.agent.clone(),
        model: body
            .model
            .as_ref()
            .map(|m| format!("{}/{}", m.provider_id, m.model_id)),
    };
    let (client, sid) = (ctx.client.clone(), session_id.to_string());
    let timeout = ctx.config.turn.turn_timeout;
    let mut task = tokio::spawn(async move { client.command(&sid, &req, timeout).await });
    match tokio::time::timeout(GRACE, &mut task).await {
        Ok(Ok(sent)) => sent,
        Ok(Err(e)) => Err(OpenCodeError::Unavailable {
            what: "running a command".into(),
            detail: e.to_string(),
        }),
        Err(_) => {
            let sid = session_id.to_string();
            tokio::spawn(async move {
                if let Ok(Err(e)) = task.await {
                    warn!(session_id = %sid, error = %e, "the command's call to OpenCode failed");
                }
            });
            Ok(())
        }
    }
}
