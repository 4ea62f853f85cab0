//! [pure] OpenCode-style ascending ids (`msg_` + 12 hex digits of
//! `unix_ms * 0x1000 + counter` + 14 base62 characters). The bridge names
//! each turn's user message itself (`messageID` of `prompt_async`), so it
//! knows exactly which assistant messages answer it (their `parentID`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The last value encoded, so ids stay strictly ascending within a process
/// even within one millisecond.
static LAST: AtomicU64 = AtomicU64::new(0);

/// A fresh ascending id with `prefix` (`msg`, `prt`...).
pub fn ascending(prefix: &str) -> String {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    encode(prefix, next_value(now_ms), &random_base62())
}

fn next_value(now_ms: u64) -> u64 {
    let candidate = (now_ms.wrapping_mul(0x1000)) & 0xffff_ffff_ffff;
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let v = candidate.max(last + 1) & 0xffff_ffff_ffff;
        match LAST.compare_exchange_weak(last, v, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return v,
            Err(l) => last = l,
        }
    }
}

fn random_base62() -> [u8; 14] {
    let mut out = [0u8; 14];
    for b in out.iter_mut() {
        *b = BASE62[rand::random_range(0..62)];
    }
    out
}

fn encode(prefix: &str, value: u64, random: &[u8; 14]) -> String {
    let mut s = String::with_capacity(prefix.len() + 27);
    s.push_str(prefix);
    s.push('_');
    s.push_str(&format!("{value:012x}"));
    s.push_str(std::str::from_utf8(random).unwrap_or("00000000000000"));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_and_order() {
        let a = ascending("msg");
        let b = ascending("msg");
        assert!(a.starts_with("msg_") && a.len() == 4 + 26, "{a}");
        assert!(a[4..16].bytes().all(|c| c.is_ascii_hexdigit()));
        assert!(b > a, "{b} <= {a}");
        // Same scheme as OpenCode: a recorded id from 1.18.34 sorts below.
        assert!(a.as_str() > "msg_20133286a001j7fYE8dSf1bVNg");
        assert_eq!(
            encode("msg", 0x1, b"AAAAAAAAAAAAAA"),
            "msg_000000000001AAAAAAAAAAAAAA"
        );
    }
}
