//! The ops that read or change one conversation: `info`, `diff`, `new`,
//! `undo`, `redo`, `compact`, `fork`.

use std::time::Duration;

use serde_json::{json, Value};
use tracing::{info, warn};

use super::{busy, opencode, Controls, Outcome};
use crate::config::OnNew;
use crate::opencode::controls::FileDiff;
use crate::opencode::events::{MessageWithParts, Role};
use crate::protocol::control::{AbortRequest, AbortTarget};
use crate::protocol::controls::{cut_patches, ControlOp, ControlRequest};
use crate::protocol::tenant::Caller;
use crate::protocol::ErrorCode;

/// What the answer says when OpenCode recorded no file changes.
const NO_FILES: &str = "OpenCode recorded no file changes for this: the turn changed no file, or the workspace is not a git repository (OpenCode snapshots files only there), so no file was restored";

/// One conversation: its session, model and agent (of its last answer),
/// tokens and cost so far, turns, whether a turn runs and how many wait.
pub(super) async fn info(c: &Controls, conversation: &str) -> Outcome {
    let busy = c.dispatcher.is_active(conversation);
    let queued = c.dispatcher.queued(conversation);
    let Some(session) = c.session_of(conversation).await else {
        return Ok(
            json!({"conversation": conversation, "session_id": null, "busy": busy, "queued": queued, "turns": 0}),
        );
    };
    let client = &c.ctx().client;
    let detail = client.session_detail(&session).await.map_err(opencode)?;
    let messages = visible(client.messages(&session).await.map_err(opencode)?, &detail);
    let (mut usage, mut cost) = ([0.0f64; 5], 0.0);
    for m in messages.iter().filter(|m| m.info.role == Role::Assistant) {
        if let Some(t) = &m.info.tokens {
            for (sum, v) in
                usage
                    .iter_mut()
                    .zip([t.input, t.output, t.reasoning, t.cache.read, t.cache.write])
            {
                *sum += v;
            }
        }
        cost += m.info.cost.unwrap_or(0.0);
    }
    let last = messages
        .iter()
        .rev()
        .find(|m| m.info.role == Role::Assistant);
    let turns = messages
        .iter()
        .filter(|m| m.info.role == Role::User)
        .count();
    let u = usage.map(|v| v as u64);
    Ok(json!({
        "conversation": conversation, "session_id": session,
        "model": last.and_then(model_of), "agent": last.and_then(|m| m.info.agent.clone().or(m.info.mode.clone())),
        "usage": {"input": u[0], "output": u[1], "reasoning": u[2], "cache_read": u[3], "cache_write": u[4]},
        "cost": cost, "turns": turns, "busy": busy, "queued": queued,
        "reverted": detail.revert.is_some(),
    }))
}

/// The files the conversation changed, with their unified diffs, cut to
/// `[controls] max_diff_bytes` (and the payload limit): `truncated`, and
/// with JetStream the whole diff in the caller's object store bucket, as
/// for a cut final (`diff_object`). One entry per file and turn
/// (`message_id`), oldest first; `message` limits it to that turn. Turns
/// `undo` hid are left out.
pub(super) async fn diff(
    c: &Controls,
    caller: &Caller,
    conversation: &str,
    req: &ControlRequest,
) -> Outcome {
    let Some(session) = c.session_of(conversation).await else {
        return Ok(
            json!({"conversation": conversation, "session_id": null, "files": [], "truncated": false}),
        );
    };
    let client = &c.ctx().client;
    let detail = client.session_detail(&session).await.map_err(opencode)?;
    let hidden = detail.revert.as_ref().map(|r| r.message_id.clone());
    let diffs: Vec<(String, FileDiff)> = client
        .turn_diffs(&session)
        .await
        .map_err(opencode)?
        .into_iter()
        .filter(|(id, _)| hidden.as_deref().is_none_or(|h| id.as_str() < h))
        .filter(|(id, _)| req.message.as_deref().is_none_or(|m| m == id))
        .flat_map(|(id, files)| files.into_iter().map(move |f| (id.clone(), f)))
        .collect();
    let mut patches: Vec<String> = diffs.iter().map(|(_, d)| d.patch.clone()).collect();
    let room = c
        .publisher
        .max_payload()
        .saturating_sub(4096 + 300 * diffs.len());
    let whole = patches.concat();
    let truncated = cut_patches(&mut patches, c.config.controls.max_diff_bytes.min(room));
    let object = match (&c.ctx().states, truncated) {
        (Some(states), true) => {
            let id = format!("diff-{}", uuid::Uuid::new_v4().simple());
            match states.record(caller, &id).store_final(&whole).await {
                Ok(o) => json!(o),
                Err(e) => {
                    warn!(%conversation, error = %e, "the whole diff could not be stored");
                    Value::Null
                }
            }
        }
        _ => Value::Null,
    };
    let files: Vec<Value> = diffs
        .iter()
        .zip(patches)
        .map(|((id, d), patch)| {
            json!({"file": d.file, "message_id": id, "status": d.status, "additions": d.additions as u64,
                   "deletions": d.deletions as u64, "patch": patch})
        })
        .collect();
    Ok(
        json!({"conversation": conversation, "session_id": session, "files": files,
              "truncated": truncated, "diff_object": object}),
    )
}

/// The conversation's next prompt starts a new session; the old one is
/// kept (renamed out of the conversation) or deleted (`[controls]
/// on_new`). With `abort`, a running turn is aborted and the queued ones
/// dropped first.
pub(super) async fn new(c: &Controls, caller: &Caller, conversation: &str, abort: bool) -> Outcome {
    let mut aborted = false;
    if abort && c.dispatcher.is_active(conversation) {
        let req = AbortRequest {
            target: AbortTarget::Conversation(conversation.to_string()),
            drop_queued: true,
        };
        aborted = c.dispatcher.abort(&req, caller).aborted;
        let bound = c.config.turn.abort_timeout + Duration::from_secs(5);
        let waited = tokio::time::timeout(bound, async {
            while c.dispatcher.is_active(conversation) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        if waited.await.is_err() {
            warn!(%conversation, "the aborted turn did not end in time for `new`");
        }
    }
    let Some(_hold) = c.dispatcher.hold(conversation) else {
        return Err(busy(conversation, ControlOp::New));
    };
    let old = c.session_of(conversation).await;
    c.ctx().sessions.remove(conversation).await;
    if let Some(cl) = &c.cluster {
        cl.forget_session(conversation).await;
    }
    let client = &c.ctx().client;
    let on_new = c.config.controls.on_new;
    if let Some(s) = &old {
        // A kept session leaves the conversation's title, so a restart
        // (which rebuilds the map from titles) does not bring it back.
        let done = match on_new {
            OnNew::Keep => {
                let title = format!("kept:{}{conversation}", c.config.opencode.title_prefix);
                client.set_title(s, &title).await
            }
            OnNew::Delete => client.delete_session(s).await,
        };
        if let Err(e) = done {
            warn!(%conversation, session_id = %s, error = %e, "the old session could not be renamed or deleted");
        }
    }
    info!(%conversation, old_session = ?old, ?on_new, aborted, "conversation starts a new session");
    Ok(
        json!({"conversation": conversation, "old_session": old, "old_session_kept": old.is_some() && on_new == OnNew::Keep, "aborted": aborted}),
    )
}

/// Hides the conversation's last visible turn and restores the files it
/// changed (OpenCode's revert); a second `undo` goes one turn further back.
pub(super) async fn undo(c: &Controls, conversation: &str) -> Outcome {
    let session = c.session_or_refuse(conversation).await?;
    let client = &c.ctx().client;
    let detail = client.session_detail(&session).await.map_err(opencode)?;
    let messages = visible(client.messages(&session).await.map_err(opencode)?, &detail);
    let Some(last) = messages.iter().rev().find(|m| m.info.role == Role::User) else {
        return Err((
            ErrorCode::BadRequest,
            format!("conversation {conversation} has no turn to undo"),
        ));
    };
    let after = client
        .revert(&session, &last.info.id)
        .await
        .map_err(opencode)?;
    let files = files_of(after.revert.as_ref().and_then(|r| r.diff.as_deref()));
    Ok(files_answer(
        conversation,
        &session,
        json!({"undone": last.info.id}),
        files,
    ))
}

/// Brings back what `undo` hid (every undone turn), and their files.
pub(super) async fn redo(c: &Controls, conversation: &str) -> Outcome {
    let session = c.session_or_refuse(conversation).await?;
    let client = &c.ctx().client;
    let detail = client.session_detail(&session).await.map_err(opencode)?;
    let Some(revert) = detail.revert else {
        return Err((
            ErrorCode::BadRequest,
            format!("conversation {conversation} has nothing undone to redo"),
        ));
    };
    let files = files_of(revert.diff.as_deref());
    client.unrevert(&session).await.map_err(opencode)?;
    Ok(files_answer(
        conversation,
        &session,
        json!({"redone": revert.message_id}),
        files,
    ))
}

/// Summarizes the session with the model of its last answer; the context
/// in tokens before (the last answer's) and after (the summary's).
pub(super) async fn compact(c: &Controls, conversation: &str) -> Outcome {
    let session = c.session_or_refuse(conversation).await?;
    let client = &c.ctx().client;
    let before_msgs = client.messages(&session).await.map_err(opencode)?;
    let Some(last) = before_msgs
        .iter()
        .rev()
        .find(|m| m.info.role == Role::Assistant)
    else {
        return Err((
            ErrorCode::BadRequest,
            format!("conversation {conversation} has no answer to compact"),
        ));
    };
    let (Some(provider), Some(model)) = (last.info.provider_id.clone(), last.info.model_id.clone())
    else {
        return Err((
            ErrorCode::OpencodeError,
            "the last answer names no model".into(),
        ));
    };
    let before = context_tokens(last);
    client
        .summarize(&session, &provider, &model, c.config.turn.turn_timeout)
        .await
        .map_err(opencode)?;
    let after_msgs = client.messages(&session).await.map_err(opencode)?;
    let summary = after_msgs
        .iter()
        .rev()
        .find(|m| m.info.role == Role::Assistant && m.info.id.as_str() > last.info.id.as_str());
    let after = summary
        .and_then(|m| m.info.tokens)
        .map(|t| (t.output + t.reasoning) as u64);
    Ok(
        json!({"conversation": conversation, "session_id": session, "model": format!("{provider}/{model}"),
              "tokens_before": before, "tokens_after": after}),
    )
}

/// A new conversation (`to`, else `<conversation>.fork-<id>`) whose
/// session continues from the last visible turn, or from the turn of the
/// user message `message` (that turn included).
pub(super) async fn fork(
    c: &Controls,
    caller: &Caller,
    conversation: &str,
    req: &ControlRequest,
) -> Outcome {
    let session = c.session_or_refuse(conversation).await?;
    let to = req.to.clone().unwrap_or_else(|| {
        format!(
            "{conversation}.fork-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        )
    });
    if c.session_of(&to).await.is_some() {
        return Err((
            ErrorCode::BadRequest,
            format!("conversation {to} exists already; fork to a new key"),
        ));
    }
    let client = &c.ctx().client;
    let detail = client.session_detail(&session).await.map_err(opencode)?;
    let hidden = detail.revert.as_ref().map(|r| r.message_id.clone());
    let messages = visible(client.messages(&session).await.map_err(opencode)?, &detail);
    let users: Vec<&str> = messages
        .iter()
        .filter(|m| m.info.role == Role::User)
        .map(|m| m.info.id.as_str())
        .collect();
    let cut = match &req.message {
        None => hidden,
        Some(m) => {
            let Some(i) = users.iter().position(|u| u == m) else {
                return Err((ErrorCode::BadRequest, format!("message {m} is not a turn of conversation {conversation} (`history` gives each turn's message_id)")));
            };
            users.get(i + 1).map(|s| s.to_string()).or(hidden)
        }
    };
    let forked = client
        .fork(&session, cut.as_deref())
        .await
        .map_err(opencode)?;
    let title = format!("{}{to}", c.config.opencode.title_prefix);
    client
        .set_title(&forked.id, &title)
        .await
        .map_err(opencode)?;
    let sessions = c.ctx().sessions.as_ref();
    if let Some(cl) = &c.cluster {
        // Home here, so the new session is recorded with the home.
        cl.place(&to, false, sessions).await;
    }
    sessions.put(&to, &forked.id).await;
    info!(%conversation, %to, session_id = %forked.id, ?caller, "conversation forked");
    Ok(
        json!({"conversation": to, "session_id": forked.id, "from": conversation, "at": req.message}),
    )
}

/// The OpenCode commands prompts may run (`[prompt] commands`) that
/// OpenCode knows, with their descriptions.
pub(super) async fn commands(c: &Controls) -> Outcome {
    let allowed = &c.config.prompt.commands;
    if allowed.is_empty() {
        return Ok(json!({"commands": []}));
    }
    let known = c.ctx().client.commands().await.map_err(opencode)?;
    let list: Vec<Value> = known
        .into_iter()
        .filter(|k| allowed.contains(&k.name))
        .map(|k| json!({"name": k.name, "description": k.description}))
        .collect();
    Ok(json!({"commands": list}))
}

/// The messages `undo` has not hidden.
fn visible(
    messages: Vec<MessageWithParts>,
    detail: &crate::opencode::controls::SessionDetail,
) -> Vec<MessageWithParts> {
    let hidden = detail.revert.as_ref().map(|r| r.message_id.as_str());
    messages
        .into_iter()
        .filter(|m| hidden.is_none_or(|h| m.info.id.as_str() < h))
        .collect()
}

fn model_of(m: &MessageWithParts) -> Option<String> {
    Some(format!(
        "{}/{}",
        m.info.provider_id.as_ref()?,
        m.info.model_id.as_ref()?
    ))
}

/// The context an answer was given, in tokens (what it read and wrote).
fn context_tokens(m: &MessageWithParts) -> Option<u64> {
    let t = m.info.tokens?;
    Some((t.input + t.output + t.reasoning + t.cache.read + t.cache.write) as u64)
}

/// The files a unified diff names (`+++ b/<file>`, or `--- a/<file>` for a
/// deleted one), in order, once each.
pub fn files_of(diff: Option<&str>) -> Vec<String> {
    let mut files: Vec<String> = Vec::new();
    for line in diff.unwrap_or_default().lines() {
        let name = line
            .strip_prefix("+++ b/")
            .or_else(|| line.strip_prefix("--- a/"))
            .or_else(|| line.strip_prefix("+++ "))
            .filter(|n| *n != "/dev/null");
        if let Some(n) = name {
            let n = n.trim().to_string();
            if !files.contains(&n) {
                files.push(n);
            }
        }
    }
    files
}

fn files_answer(conversation: &str, session: &str, mut v: Value, files: Vec<String>) -> Value {
    v["conversation"] = json!(conversation);
    v["session_id"] = json!(session);
    v["files_restored"] = json!(!files.is_empty());
    if files.is_empty() {
        v["note"] = json!(NO_FILES);
    }
    v["files"] = json!(files);
    v
}

#[cfg(test)]
mod tests {
    use super::files_of;

    #[test]
    fn files_are_read_from_a_unified_diff() {
        let d = "Index: a.txt\n===\n--- a/a.txt\n+++ b/a.txt\n@@ -1 +1 @@\n-x\n+y\n--- a/gone.txt\n+++ /dev/null\n";
        assert_eq!(files_of(Some(d)), vec!["a.txt", "gone.txt"]);
        assert!(files_of(None).is_empty());
    }
}
