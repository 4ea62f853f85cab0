//! The start of a turn, up to OpenCode accepting its prompt: find or create
//! the session, follow its events before prompting (so none is missed),
//! wait for the shared event stream, check the model, then
//! `prompt_async` (recreating a vanished session once).

use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::context::{TurnContext, TurnError};
use super::sink::ReplySink;
use crate::opencode::client::{ModelBody, PromptBody, PromptPart, SessionInfo};
use crate::opencode::stream::StreamState;
use crate::opencode::{OpenCodeError, Subscription};
use crate::protocol::tenant::is_under;
use crate::protocol::{ErrorCode, ModelRef, Prompt};

/// A prompt OpenCode accepted: what the rest of the turn works with.
pub struct Accepted {
    pub session_id: String,
    /// The turn's events (and its subagents', once followed).
    pub sub: Subscription,
    /// The id of the user message OpenCode made for the prompt.
    pub message_id: String,
    /// The conversation's session had vanished and a new one was made.
    pub recreated: bool,
    /// The shared event stream's state, watched from before the prompt.
    pub stream: watch::Receiver<StreamState>,
    /// The stream connection the prompt was sent on.
    pub epoch: u64,
    /// The embedded server's exits so far (`StreamState::exits`).
    pub exits: u64,
    /// A redelivered job whose prompt an earlier delivery had sent: not
    /// prompted again, followed from where OpenCode is.
    pub resumed: bool,
}

/// Resolves the session and sends the prompt.
pub async fn begin(
    ctx: &TurnContext,
    prompt: &Prompt,
    sink: &mut ReplySink,
) -> Result<Accepted, TurnError> {
    // The model first: a prompt refused for it must not cost a session (nor
    // a slot of the conversation map).
    wait_restarted(ctx).await?;
    if let Some(m) = &prompt.model {
        check_model(ctx, m).await?;
    }
    if let Some(a) = &prompt.agent {
        check_agent(ctx, a).await?;
    }
    if let Some(found) = super::resume::accepted_before(ctx, prompt).await? {
        // The followed turn's replies name its session like any other's.
        sink.set_session(&found.session_id);
        return Ok(found);
    }
    let mut session_id = resolve_session(ctx, prompt).await?;
    let mut recreated = false;
    // Follow the session before prompting, so no event is missed.
    let mut sub = subscribe(ctx, &session_id)?;
    wait_connected(ctx).await?;
    let body = prompt_body(prompt);
    // Watch the stream from before the prompt: a reconnect while OpenCode
    // answers the POST must not go unnoticed.
    let stream = ctx.hub.state();
    let (epoch, exits) = (stream.borrow().epoch, stream.borrow().exits);
    loop {
        sink.set_session(&session_id);
        let sent = match &prompt.command {
            Some(c) => super::command::send(ctx, &session_id, &body, c).await,
            None => ctx.client.prompt_async(&session_id, &body).await,
        };
        match sent {
            Ok(()) => break,
            Err(OpenCodeError::NotFound { .. }) if prompt.session_id.is_none() && !recreated => {
                // The session is gone (deleted, data reset). OpenCode never
                // accepted the prompt, so sending it again is safe.
                warn!(%session_id, "OpenCode session is gone; creating a new one");
                if let Some(conv) = &prompt.conversation {
                    ctx.sessions.remove(conv).await;
                }
                drop(sub);
                session_id = resolve_session(ctx, prompt).await?;
                recreated = true;
                sub = subscribe(ctx, &session_id)?;
            }
            Err(OpenCodeError::NotFound { .. }) if prompt.session_id.is_some() => {
                return Err(TurnError::new(
                    ErrorCode::BadRequest,
                    format!("OpenCode has no session {session_id}"),
                ))
            }
            Err(e) => return Err(e.into()),
        }
    }
    debug!(%session_id, "prompt accepted by OpenCode");
    Ok(Accepted {
        session_id,
        sub,
        message_id: body.message_id,
        recreated,
        stream,
        epoch,
        exits,
        resumed: false,
    })
}

/// Waits (`opencode.connect_timeout`) for the shared event stream.
pub async fn wait_connected(ctx: &TurnContext) -> Result<(), TurnError> {
    if ctx
        .hub
        .wait_connected(ctx.config.opencode.connect_timeout)
        .await
    {
        return Ok(());
    }
    warn!(
        base_url = ctx.client.base_url(),
        "the event stream is not connected"
    );
    Err(TurnError::new(
        ErrorCode::OpencodeUnavailable,
        "OpenCode's event stream is not connected",
    ))
}

/// The embedded server behind the stream is being restarted: waits for it
/// (`[opencode] startup_timeout`) rather than failing the prompt.
async fn wait_restarted(ctx: &TurnContext) -> Result<(), TurnError> {
    if !ctx.hub.state().borrow().restarting {
        return Ok(());
    }
    info!("OpenCode is being restarted; the prompt waits for it");
    if ctx
        .hub
        .wait_connected(ctx.config.opencode.startup_timeout)
        .await
    {
        return Ok(());
    }
    Err(TurnError::new(
        ErrorCode::OpencodeUnavailable,
        "OpenCode exited and has not come back yet",
    ))
}

pub fn subscribe(ctx: &TurnContext, session_id: &str) -> Result<Subscription, TurnError> {
    ctx.hub
        .subscribe(session_id)
        .map_err(|e| TurnError::new(ErrorCode::SessionBusy, e.to_string()))
}

/// The session this prompt drives, created on first use of a conversation.
pub async fn resolve_session(ctx: &TurnContext, prompt: &Prompt) -> Result<String, TurnError> {
    if let Some(id) = &prompt.session_id {
        return named_session(ctx, prompt, id).await;
    }
    if let Some(conv) = &prompt.conversation {
        if let Some(id) = ctx.sessions.get(conv).await {
            return Ok(id);
        }
    }
    let title = session_title(ctx, prompt);
    let s = ctx.client.create_session(&title).await?;
    info!(session_id = %s.id, %title, "created OpenCode session");
    if let Some(conv) = &prompt.conversation {
        ctx.sessions.put(conv, &s.id).await;
    }
    Ok(s.id)
}

/// The title of the session a prompt without `session_id` drives: the
/// conversation's, or a one-off named by the trace id.
pub fn session_title(ctx: &TurnContext, prompt: &Prompt) -> String {
    match &prompt.conversation {
        Some(c) => format!("{}{c}", ctx.config.opencode.title_prefix),
        None => format!(
            "{}one-off {}",
            ctx.config.opencode.title_prefix, prompt.trace_id
        ),
    }
}

/// A session the prompt names by id. A tenant drives only sessions of its
/// own conversations (their titles name the conversation); another
/// tenant's session and an unknown one read the same.
async fn named_session(ctx: &TurnContext, prompt: &Prompt, id: &str) -> Result<String, TurnError> {
    let tenant = prompt.caller.tenant();
    let not_yours = || {
        TurnError::new(
            ErrorCode::Forbidden,
            format!(
                "session {id} is not one of {}'s conversations",
                prompt.caller
            ),
        )
    };
    match ctx.client.get_session(id).await {
        Ok(s) if !session_belongs(&s, tenant, &ctx.config.opencode.title_prefix) => {
            warn!(session_id = %id, caller = %prompt.caller, "a tenant named a session outside its namespace");
            Err(not_yours())
        }
        Ok(s) => Ok(s.id),
        Err(OpenCodeError::NotFound { .. }) if tenant.is_some() => Err(not_yours()),
        Err(OpenCodeError::NotFound { .. }) => Err(TurnError::new(
            ErrorCode::BadRequest,
            format!("OpenCode has no session {id}"),
        )),
        Err(e) => Err(e.into()),
    }
}

/// Whether `s` is a session the tenant may drive: a top-level session whose
/// title names one of the tenant's conversations. The operator may drive any.
fn session_belongs(s: &SessionInfo, tenant: Option<&str>, title_prefix: &str) -> bool {
    let Some(t) = tenant else { return true };
    s.parent_id.is_none()
        && s.title
            .strip_prefix(title_prefix)
            .is_some_and(|conv| is_under(conv, t))
}

fn prompt_body(prompt: &Prompt) -> PromptBody {
    // A job's user message carries the job's tag, so a later delivery
    // finds it (`super::resume`).
    let message_id = match &prompt.job {
        Some(job) => crate::opencode::ids::ascending_tagged("msg", &job.tag),
        None => crate::opencode::ids::ascending("msg"),
    };
    PromptBody {
        message_id,
        parts: PromptPart::of(&prompt.text, &prompt.attachments),
        model: prompt.model.as_ref().map(ModelBody::from),
        agent: prompt.agent.clone(),
        system: prompt.system.clone(),
        tools: prompt.tools.clone(),
    }
}

/// OpenCode accepts an unknown model with 204, fails later, and leaves the
/// session pinned to it: check it first.
async fn check_model(ctx: &TurnContext, m: &ModelRef) -> Result<(), TurnError> {
    let providers = ctx.client.providers().await?;
    match providers.get(&m.provider) {
        None => {
            // Which providers there are is the operator's to know: logged.
            let mut known: Vec<&String> = providers.keys().collect();
            known.sort();
            tracing::info!(model = %m, ?known, "a prompt named a provider OpenCode does not have");
            Err(TurnError::new(
                ErrorCode::BadRequest,
                format!(
                    "unknown model {m}: OpenCode has no provider {:?} (the operator can tell which models there are)",
                    m.provider
                ),
            ))
        }
        Some(models) if !models.contains(&m.model) => Err(TurnError::new(
            ErrorCode::BadRequest,
            format!(
                "unknown model {m}: provider {:?} has no model {:?}",
                m.provider, m.model
            ),
        )),
        Some(_) => Ok(()),
    }
}

/// OpenCode answers a prompt for an unknown agent with an `UnknownError`
/// and a stack trace, which reads as its fault and retryable: check it
/// first, and name the agents there are (the hidden ones, OpenCode's own,
/// are accepted but not listed).
async fn check_agent(ctx: &TurnContext, agent: &str) -> Result<(), TurnError> {
    let agents = ctx.client.agents().await?;
    if agents.iter().any(|a| a.name == agent) {
        return Ok(());
    }
    let mut known: Vec<&str> = agents
        .iter()
        .filter(|a| !a.hidden)
        .map(|a| a.name.as_str())
        .collect();
    known.sort_unstable();
    Err(TurnError::new(
        ErrorCode::BadRequest,
        format!("unknown agent {agent:?}: OpenCode has no such agent (it has {known:?})"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_drives_only_sessions_of_its_conversations() {
        let s = |title: &str, parent: Option<&str>| SessionInfo {
            id: "ses_1".into(),
            title: title.into(),
            parent_id: parent.map(str::to_string),
            directory: None,
        };
        assert!(session_belongs(
            &s("nats:slack.C1", None),
            Some("slack"),
            "nats:"
        ));
        assert!(session_belongs(
            &s("nats:slack", None),
            Some("slack"),
            "nats:"
        ));
        assert!(!session_belongs(
            &s("nats:slackers.C1", None),
            Some("slack"),
            "nats:"
        ));
        assert!(!session_belongs(
            &s("nats:discord.D1", None),
            Some("slack"),
            "nats:"
        ));
        assert!(!session_belongs(
            &s("slack.C1", None),
            Some("slack"),
            "nats:"
        ));
        assert!(!session_belongs(
            &s("nats:one-off t1", None),
            Some("slack"),
            "nats:"
        ));
        // A subagent's session is never a tenant's to drive.
        assert!(!session_belongs(
            &s("nats:slack.C1", Some("ses_0")),
            Some("slack"),
            "nats:"
        ));
        // The operator may drive any.
        assert!(session_belongs(&s("anything", None), None, "nats:"));
    }
}
