//! Ids, timestamps and placeholders as OpenCode makes them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::*;

/// Replaces `{sid}`, `{user}` and `{asst}` in every string of `v`.
pub fn substitute(v: Value, input: &TurnInput) -> Value {
    match v {
        Value::String(s) if s.contains('{') => Value::String(
            s.replace("{sid}", &input.session_id)
                .replace("{user}", &input.user_id)
                .replace("{asst}", &input.asst_id),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(|x| substitute(x, input)).collect()),
        Value::Object(o) => Value::Object(
            o.into_iter()
                .map(|(k, x)| (k, substitute(x, input)))
                .collect(),
        ),
        other => other,
    }
}

/// Unix time in ms.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// The last id value handed out or seen (client-chosen `messageID`s
/// included), so the fake's ids always sort after them.
pub(super) static LAST_ID: AtomicU64 = AtomicU64::new(0);

/// An ascending OpenCode id: `prefix_` + 12 hex digits of
/// `unix_ms * 0x1000 + counter` + 14 base62 characters, strictly above every
/// id made or [`observe_id`]d before.
pub fn next_id(prefix: &str) -> String {
    let candidate = now_ms().wrapping_mul(0x1000) & 0xffff_ffff_ffff;
    let mut last = LAST_ID.load(Ordering::SeqCst);
    let value = loop {
        let v = candidate.max(last + 1) & 0xffff_ffff_ffff;
        match LAST_ID.compare_exchange(last, v, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => break v,
            Err(l) => last = l,
        }
    };
    format!("{prefix}_{value:012x}{}", base62_tail())
}

/// Raises the id floor to `id` (an id chosen by a client), so later
/// [`next_id`]s sort after it.
pub fn observe_id(id: &str) {
    let hex = id.split_once('_').map(|(_, rest)| rest).unwrap_or("");
    if let Some(v) = hex.get(..12).and_then(|h| u64::from_str_radix(h, 16).ok()) {
        LAST_ID.fetch_max(v, Ordering::SeqCst);
    }
}

pub(super) fn base62_tail() -> String {
    const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    (0..14)
        .map(|_| BASE62[rand::random_range(0..BASE62.len())] as char)
        .collect()
}

/// A descending id, as OpenCode makes session ids (newer sort first).
pub fn descending_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst) & 0xfff;
    let value = (now_ms().wrapping_mul(0x1000).wrapping_add(n)) & 0xffff_ffff_ffff;
    format!(
        "{prefix}_{:012x}{}",
        !value & 0xffff_ffff_ffff,
        base62_tail()
    )
}

/// An `APIError` as OpenCode reports a provider's HTTP error.
pub fn api_error(status: u16, message: &str, retryable: bool) -> Value {
    let body = json!({"error": {"message": message, "type": "fake_error"}}).to_string();
    json!({"name": "APIError", "data": {
        "message": message, "statusCode": status, "isRetryable": retryable,
        "responseHeaders": {"content-type": "application/json"},
        "responseBody": body,
        "metadata": {"url": "http://127.0.0.1:1/v1/chat/completions"}
    }})
}
