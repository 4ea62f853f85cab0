//! A redelivered job is never prompted twice: the bridge tags the user
//! message of a job's turn (`opencode::ids::ascending_tagged`), so a later
//! delivery (on this daemon or another sharing the OpenCode server) looks
//! for that message before prompting, and if OpenCode has it, follows the
//! turn from where it is (its events, or the finished message list).

use tracing::info;

use super::begin::{resolve_session, session_title, subscribe, wait_connected, Accepted};
use super::context::{TurnContext, TurnError};
use crate::opencode::events::Role;
use crate::opencode::OpenCodeError;
use crate::protocol::Prompt;

/// At most this many sessions titled like the job's conversation are read.
const MAX_CANDIDATES: usize = 5;

/// The turn an earlier delivery of this job started, if OpenCode has its
/// prompt; `None` for a first delivery, or a prompt OpenCode never got.
pub async fn accepted_before(
    ctx: &TurnContext,
    prompt: &Prompt,
) -> Result<Option<Accepted>, TurnError> {
    let Some(job) = prompt.job.as_ref().filter(|j| j.redelivered) else {
        return Ok(None);
    };
    for session_id in candidates(ctx, prompt).await? {
        let messages = match ctx.client.messages(&session_id).await {
            Ok(m) => m,
            Err(OpenCodeError::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        let Some(user) = messages.iter().find(|m| {
            m.info.role == Role::User && crate::opencode::ids::has_tag(&m.info.id, "msg", &job.tag)
        }) else {
            continue;
        };
        info!(%session_id, message_id = %user.info.id, "a redelivered job: OpenCode already has its prompt; following that turn instead of prompting again");
        if let Some(conv) = &prompt.conversation {
            ctx.sessions.put(conv, &session_id).await;
        }
        let sub = subscribe(ctx, &session_id)?;
        wait_connected(ctx).await?;
        let stream = ctx.hub.state();
        let (epoch, exits) = (stream.borrow().epoch, stream.borrow().exits);
        return Ok(Some(Accepted {
            message_id: user.info.id.clone(),
            session_id,
            sub,
            recreated: false,
            stream,
            epoch,
            exits,
            resumed: true,
        }));
    }
    Ok(None)
}

/// The sessions an earlier delivery may have prompted: the one the prompt
/// names (checked as for any prompt); else the conversation's session in
/// the map, and the sessions titled like it (another daemon may have made
/// it after this one rebuilt its map).
async fn candidates(ctx: &TurnContext, prompt: &Prompt) -> Result<Vec<String>, TurnError> {
    if prompt.session_id.is_some() {
        return Ok(vec![resolve_session(ctx, prompt).await?]);
    }
    let mut out = Vec::new();
    if let Some(conv) = &prompt.conversation {
        if let Some(id) = ctx.sessions.get(conv).await {
            out.push(id);
        }
    }
    let title = session_title(ctx, prompt);
    let mut listed: Vec<String> = ctx
        .client
        .list_sessions()
        .await?
        .into_iter()
        .filter(|s| s.parent_id.is_none() && s.title == title && !out.contains(&s.id))
        .map(|s| s.id)
        .collect();
    listed.truncate(MAX_CANDIDATES);
    out.extend(listed);
    Ok(out)
}
