//! `history` (a conversation's turns in the reply vocabulary, paged) and
//! `list` (the caller's conversations, paged).

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::{opencode, Controls, Outcome};
use crate::opencode::events::{MessageWithParts, PartKind, Role, ToolStatus};
use crate::protocol::controls::ControlRequest;
use crate::protocol::tenant::Caller;
use crate::protocol::validate_subject;

/// Room left in a payload for the answer's other fields.
const ENVELOPE: usize = 1024;

/// The conversation's turns, newest last: `limit` of them (capped by
/// `[controls] max_history_turns`) before `before`, each its user text
/// then its `tool_call` / `tool_result` / `final`; `next` pages back.
/// Turns an `undo` hid are not shown. The answer fits one NATS message:
/// older turns of the page are left for `next` when it would not.
pub(super) async fn history(c: &Controls, conversation: &str, req: &ControlRequest) -> Outcome {
    let Some(session) = c.session_of(conversation).await else {
        return Ok(
            json!({"conversation": conversation, "session_id": null, "turns": [], "next": null}),
        );
    };
    let client = &c.ctx().client;
    let detail = client.session_detail(&session).await.map_err(opencode)?;
    let messages = client.messages(&session).await.map_err(opencode)?;
    let hidden = detail.revert.as_ref().map(|r| r.message_id.as_str());
    let visible: Vec<MessageWithParts> = messages
        .into_iter()
        .filter(|m| hidden.is_none_or(|h| m.info.id.as_str() < h))
        .collect();
    let max_text = c.config.limits.max_tool_result_bytes;
    let mut turns = turns(&visible, max_text);
    if let Some(b) = &req.before {
        turns.retain(|t| t["message_id"].as_str().is_some_and(|id| id < b.as_str()));
    }
    let limit = req
        .limit
        .unwrap_or(c.config.controls.max_history_turns)
        .min(c.config.controls.max_history_turns);
    let mut page = turns.split_off(turns.len().saturating_sub(limit));
    let budget = c.publisher.max_payload().saturating_sub(ENVELOPE);
    while page.len() > 1 && Value::Array(page.clone()).to_string().len() > budget {
        turns.push(page.remove(0));
    }
    let next = (!turns.is_empty()).then(|| page.first().map(|t| t["message_id"].clone()));
    Ok(
        json!({"conversation": conversation, "session_id": session, "turns": page, "next": next.flatten()}),
    )
}

/// [pure] Messages -> turns: each user message opens one, with its text;
/// the assistant messages after it add their tool calls and results and,
/// at the end, one `final` with the turn's answer text. Texts are cut at
/// `max_text` bytes (`truncated: true`).
pub fn turns(messages: &[MessageWithParts], max_text: usize) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    let mut answer = String::new();
    let mut last: Option<&MessageWithParts> = None;
    let close = |out: &mut Vec<Value>, answer: &mut String, last: Option<&MessageWithParts>| {
        let (Some(turn), Some(m)) = (out.last_mut(), last) else {
            return;
        };
        let model = match (&m.info.provider_id, &m.info.model_id) {
            (Some(p), Some(id)) => Value::String(format!("{p}/{id}")),
            _ => Value::Null,
        };
        let (content, cut) = cut(std::mem::take(answer), max_text);
        let mut f =
            json!({"kind": "final", "content": content, "model": model, "finish": m.info.finish});
        if cut {
            f["truncated"] = Value::Bool(true);
        }
        turn["replies"].as_array_mut().expect("an array").push(f);
    };
    for m in messages {
        match m.info.role {
            Role::User => {
                close(&mut out, &mut answer, last.take());
                let text: String = texts(m).collect::<Vec<_>>().join("\n");
                let (text, cut) = cut(text, max_text);
                let mut user = json!({"kind": "user", "text": text});
                if cut {
                    user["truncated"] = Value::Bool(true);
                }
                out.push(json!({"message_id": m.info.id, "replies": [user]}));
            }
            Role::Assistant if !out.is_empty() => {
                let turn = out.last_mut().expect("not empty");
                let replies = turn["replies"].as_array_mut().expect("an array");
                tools(m, max_text, replies);
                answer.extend(texts(m));
                last = Some(m);
            }
            _ => {}
        }
    }
    close(&mut out, &mut answer, last);
    out
}

/// The text parts of a message that are not synthetic.
fn texts(m: &MessageWithParts) -> impl Iterator<Item = &str> {
    m.parts
        .iter()
        .filter(|p| p.kind == PartKind::Text && p.synthetic != Some(true))
        .filter_map(|p| p.text.as_deref())
}

/// A message's finished tool calls, as `tool_call` and `tool_result`.
fn tools(m: &MessageWithParts, max_text: usize, replies: &mut Vec<Value>) {
    for p in m.parts.iter().filter(|p| p.kind == PartKind::Tool) {
        let (Some(state), Some(call_id)) = (&p.state, &p.call_id) else {
            continue;
        };
        let tool = p.tool.clone().unwrap_or_default();
        replies.push(
            json!({"kind": "tool_call", "call_id": call_id, "tool": tool, "args": state.input}),
        );
        let (success, result) = match state.status {
            ToolStatus::Completed => (true, state.output.clone().unwrap_or_default()),
            ToolStatus::Error => (false, state.error.clone().unwrap_or_default()),
            _ => continue,
        };
        // As the live `tool_result` says it: no host data paths.
        let result = crate::protocol::redact::strip_data_dirs(&result).into_owned();
        let (result, cut) = cut(result, max_text);
        let mut r = json!({"kind": "tool_result", "call_id": call_id, "tool": tool, "success": success, "result": result});
        if cut {
            r["truncated"] = Value::Bool(true);
        }
        replies.push(r);
    }
}

/// `s` cut to at most `max` bytes on a char boundary; whether it was cut.
fn cut(mut s: String, max: usize) -> (String, bool) {
    if s.len() <= max {
        return (s, false);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    (s, true)
}

/// The caller's conversations (from OpenCode's session titles), by key:
/// `limit` (capped by `[controls] max_list`) after `after`; `next` pages
/// on. Each with its session, last activity, whether a turn runs or waits
/// on this daemon, and its home daemon in a cluster.
pub(super) async fn list(c: &Controls, caller: &Caller, req: &ControlRequest) -> Outcome {
    let details = c.ctx().client.session_details().await.map_err(opencode)?;
    let prefix = &c.config.opencode.title_prefix;
    let mut newest: BTreeMap<String, (String, f64)> = BTreeMap::new();
    for s in details.into_iter().filter(|s| s.parent_id.is_none()) {
        let Some(conv) = s.title.strip_prefix(prefix.as_str()) else {
            continue;
        };
        if validate_subject(conv).is_err() || !caller.owns_conversation(conv) {
            continue;
        }
        let updated = s.time.updated.or(s.time.created).unwrap_or(0.0);
        let e = newest
            .entry(conv.to_string())
            .or_insert((s.id.clone(), updated));
        if updated > e.1 {
            *e = (s.id, updated);
        }
    }
    let limit = req
        .limit
        .unwrap_or(c.config.controls.max_list)
        .min(c.config.controls.max_list);
    let after = req.after.clone().unwrap_or_default();
    let mut rest = newest
        .into_iter()
        .filter(|(k, _)| k.as_str() > after.as_str());
    let page: Vec<_> = rest.by_ref().take(limit).collect();
    let more = rest.next().is_some();
    let mut entries = Vec::with_capacity(page.len());
    for (conv, (mapped, updated)) in &page {
        let session = c.session_of(conv).await.unwrap_or_else(|| mapped.clone());
        let home = match &c.cluster {
            Some(cl) => cl
                .home_of(conv)
                .await
                .map(Value::String)
                .unwrap_or(Value::Null),
            None => Value::Null,
        };
        entries.push(json!({
            "conversation": conv, "session_id": session, "last_activity": *updated as u64,
            "busy": c.dispatcher.is_active(conv), "home": home,
        }));
    }
    let next = more.then(|| page.last().map(|(k, _)| k.clone())).flatten();
    Ok(json!({"conversations": entries, "next": next}))
}
