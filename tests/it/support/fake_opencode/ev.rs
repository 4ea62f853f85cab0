//! Single OpenCode events, shaped as OpenCode 1.18.34 sends them (the
//! envelope `id` is added when emitted).
use super::*;

fn envelope(kind: &str, props: Value) -> Value {
    json!({"type": kind, "properties": props})
}

pub fn tokens() -> Value {
    json!({"total": TOKENS_INPUT + TOKENS_OUTPUT + TOKENS_REASONING + TOKENS_CACHE_READ,
           "input": TOKENS_INPUT, "output": TOKENS_OUTPUT, "reasoning": TOKENS_REASONING,
           "cache": {"write": 0, "read": TOKENS_CACHE_READ}})
}

pub fn zero_tokens() -> Value {
    json!({"input": 0, "output": 0, "reasoning": 0, "cache": {"read": 0, "write": 0}})
}

pub fn heartbeat() -> Value {
    envelope("server.heartbeat", json!({}))
}

pub fn user_message(sid: &str, user: &str, created: u64, model: &(String, String)) -> Value {
    envelope(
        "message.updated",
        json!({"sessionID": sid, "info": {
            "id": user, "role": "user", "sessionID": sid, "time": {"created": created},
            "agent": "build", "model": {"providerID": model.0, "modelID": model.1}}}),
    )
}

/// The user message again, with its summary (OpenCode re-sends it
/// mid-turn).
pub fn user_summary(sid: &str, user: &str, created: u64, model: &(String, String)) -> Value {
    let mut v = user_message(sid, user, created, model);
    v["properties"]["info"]["summary"] = json!({"diffs": []});
    v
}

pub fn part(sid: &str, part: Value) -> Value {
    envelope(
        "message.part.updated",
        json!({"sessionID": sid, "part": part, "time": now_ms()}),
    )
}

pub fn user_text(sid: &str, user: &str, part_id: &str, text: &str) -> Value {
    part(
        sid,
        json!({"type": "text", "text": text, "messageID": user, "sessionID": sid, "id": part_id}),
    )
}

pub fn status(sid: &str, kind: &str) -> Value {
    envelope(
        "session.status",
        json!({"sessionID": sid, "status": {"type": kind}}),
    )
}

pub fn retry(sid: &str, attempt: u64, message: &str) -> Value {
    envelope(
        "session.status",
        json!({"sessionID": sid, "status": {"type": "retry", "attempt": attempt, "message": message, "next": now_ms() + 1000}}),
    )
}

pub fn session_idle(sid: &str) -> Value {
    envelope("session.idle", json!({"sessionID": sid}))
}

/// `session.status {idle}` then `session.idle`.
pub fn idle(sid: &str) -> Vec<Value> {
    vec![status(sid, "idle"), session_idle(sid)]
}

pub fn session_error(sid: &str, error: Value) -> Value {
    envelope("session.error", json!({"sessionID": sid, "error": error}))
}

/// An assistant message's info: `completed` and `finish` when given.
#[allow(clippy::too_many_arguments)]
pub fn assistant_info(
    sid: &str,
    asst: &str,
    parent: &str,
    model: &(String, String),
    created: u64,
    completed: Option<u64>,
    finish: Option<&str>,
    cost: f64,
) -> Value {
    let mut info = json!({
        "id": asst, "parentID": parent, "role": "assistant", "mode": "build", "agent": "build",
        "path": {"cwd": "/tmp/fake-opencode", "root": "/"},
        "cost": if completed.is_some() { cost } else { 0.0 },
        "tokens": if completed.is_some() { tokens() } else { zero_tokens() },
        "modelID": model.1, "providerID": model.0,
        "time": {"created": created}, "sessionID": sid});
    if let Some(c) = completed {
        info["time"]["completed"] = json!(c);
    }
    if let Some(f) = finish {
        info["finish"] = json!(f);
    }
    info
}

pub fn message_updated(sid: &str, info: Value) -> Value {
    envelope("message.updated", json!({"sessionID": sid, "info": info}))
}

pub fn delta(sid: &str, asst: &str, part_id: &str, delta: &str) -> Value {
    envelope(
        "message.part.delta",
        json!({"sessionID": sid, "messageID": asst, "partID": part_id, "field": "text", "delta": delta}),
    )
}

pub fn step_start(sid: &str, asst: &str) -> Value {
    part(
        sid,
        json!({"id": next_id("prt"), "messageID": asst, "sessionID": sid, "type": "step-start"}),
    )
}

pub fn step_finish(sid: &str, asst: &str, reason: &str, cost: f64) -> Value {
    part(
        sid,
        json!({"id": next_id("prt"), "reason": reason, "messageID": asst, "sessionID": sid,
               "type": "step-finish", "tokens": tokens(), "cost": cost}),
    )
}

/// A `text` or `reasoning` part; `end` set when it is finished.
pub fn text_part(
    sid: &str,
    asst: &str,
    part_id: &str,
    kind: &str,
    text: &str,
    start: u64,
    end: Option<u64>,
) -> Value {
    let mut time = json!({"start": start});
    if let Some(e) = end {
        time["end"] = json!(e);
    }
    part(
        sid,
        json!({"id": part_id, "messageID": asst, "sessionID": sid, "type": kind, "text": text, "time": time}),
    )
}

/// A `tool` part in state `status` (`pending`, `running`, `completed`,
/// `error`); `outcome` is the output (completed) or the error.
#[allow(clippy::too_many_arguments)]
pub fn tool_part(
    sid: &str,
    asst: &str,
    part_id: &str,
    call_id: &str,
    tool: &str,
    status: &str,
    input: &Value,
    outcome: Option<&str>,
    start: u64,
) -> Value {
    let state = match status {
        "pending" => json!({"status": "pending", "input": {}, "raw": ""}),
        "running" => json!({"status": "running", "input": input, "time": {"start": start}}),
        "completed" => {
            let out = outcome.unwrap_or("");
            json!({"status": "completed", "input": input, "output": out,
                   "metadata": {"output": out, "exit": 0, "truncated": false},
                   "title": tool, "time": {"start": start, "end": now_ms()}})
        }
        _ => {
            json!({"status": "error", "input": input, "error": outcome.unwrap_or("tool failed"),
                    "time": {"start": start, "end": now_ms()}})
        }
    };
    part(
        sid,
        json!({"type": "tool", "tool": tool, "callID": call_id, "state": state,
               "id": part_id, "sessionID": sid, "messageID": asst}),
    )
}

#[allow(clippy::too_many_arguments)]
pub fn permission_asked(
    sid: &str,
    id: &str,
    permission: &str,
    patterns: &[&str],
    asst: &str,
    call_id: &str,
) -> Value {
    envelope(
        "permission.asked",
        json!({"id": id, "sessionID": sid, "permission": permission, "patterns": patterns,
               "metadata": {"command": patterns.first().copied().unwrap_or("")},
               "always": patterns, "tool": {"messageID": asst, "callID": call_id}}),
    )
}

pub fn permission_replied(sid: &str, id: &str, reply: &str) -> Value {
    envelope(
        "permission.replied",
        json!({"sessionID": sid, "requestID": id, "reply": reply}),
    )
}

/// Events that belong to no turn (OpenCode sends plenty).
pub fn noise(sid: &str) -> Vec<Value> {
    vec![
        envelope("plugin.added", json!({"id": "core/config-reference"})),
        envelope("session.diff", json!({"sessionID": sid, "diff": []})),
        envelope(
            "session.updated",
            json!({"sessionID": sid, "info": {"id": sid, "title": "x", "version": VERSION}}),
        ),
    ]
}
