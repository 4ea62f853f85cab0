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

/// A fresh ascending id whose last 14 characters are `tag` (see
/// [`tag`]): ordered like every other id (OpenCode sorts a session's
/// messages by id), yet recognisable later by its tag alone.
pub fn ascending_tagged(prefix: &str, tag: &str) -> String {
    let mut random = random_base62();
    if tag.len() == random.len() && tag.bytes().all(|b| BASE62.contains(&b)) {
        random.copy_from_slice(tag.as_bytes());
    }
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    encode(prefix, next_value(now_ms), &random)
}

/// A 14-character base62 tag derived from `seed` alone (FNV-1a, stable
/// across builds and hosts): the same seed always gives the same tag.
pub fn tag(seed: &[u8]) -> String {
    let mut h: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    for b in seed {
        h ^= u128::from(*b);
        h = h.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
    }
    (0..14)
        .map(|_| {
            let c = BASE62[(h % 62) as usize] as char;
            h /= 62;
            c
        })
        .collect()
}

/// Whether `id` was made by [`ascending_tagged`] with `tag`.
pub fn has_tag(id: &str, prefix: &str, tag: &str) -> bool {
    id.len() == prefix.len() + 27
        && id.starts_with(prefix)
        && id[prefix.len()..].starts_with('_')
        && id.ends_with(tag)
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

    #[test]
    fn tagged_ids_ascend_and_keep_their_tag() {
        let t = tag(b"OPENCODE_JOBS/7/1700000000000000000");
        assert_eq!(t, tag(b"OPENCODE_JOBS/7/1700000000000000000"));
        assert_ne!(t, tag(b"OPENCODE_JOBS/8/1700000000000000000"));
        assert_eq!(t.len(), 14);
        let a = ascending_tagged("msg", &t);
        let b = ascending_tagged("msg", &t);
        assert!(b > a && a.len() == 4 + 26, "{a} {b}");
        assert!(has_tag(&a, "msg", &t) && has_tag(&b, "msg", &t));
        assert!(!has_tag(&ascending("msg"), "msg", &t));
        // A malformed tag is not used.
        assert!(!ascending_tagged("msg", "short").ends_with("short"));
    }
}
