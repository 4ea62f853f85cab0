//! One check for every `error` reply the integration tests read (issue 22):
//! an error says what failed and nothing else. No stack trace, no URL, no
//! `host:port`, no absolute path of the host. The reply-reading helpers
//! (`nats::collect_until_terminal`, `bridge::drain_for`) pass every reply
//! through [`assert_no_leak`], so every test's error replies are checked.

use serde_json::Value;

/// Panics when `body` is an `error` reply (the bridge's or the agent
/// protocol's) whose text carries a stack trace, a URL, a `host:port` or
/// an absolute path.
pub fn assert_no_leak(body: &Value) {
    let text = match (body["kind"].as_str(), body["type"].as_str()) {
        (Some("error"), _) => body["error"].as_str(),
        (_, Some("error")) => body["data"].as_str(),
        _ => None,
    };
    if let Some(text) = text {
        if let Some(why) = leak(text) {
            panic!("an error reply leaks {why}: {body}");
        }
    }
}

/// What `text` leaks, if anything.
pub fn leak(text: &str) -> Option<&'static str> {
    let stack = text.lines().any(|l| {
        let t = l.trim_start();
        t.len() < l.len() && t.starts_with("at ")
    }) || [
        "stack backtrace",
        "Traceback (",
        "at async ",
        ".ts:",
        ".js:",
        "$bunfs",
    ]
    .iter()
    .any(|n| text.contains(n));
    if stack {
        return Some("a stack trace");
    }
    if text.contains("://") {
        return Some("a URL");
    }
    for word in text.split(|c: char| c.is_whitespace() || "\"'`(),;[]".contains(c)) {
        let w = word.trim_end_matches(['.', ':']);
        if is_host_port(w) {
            return Some("a host:port");
        }
        let path = w.strip_prefix('/').or_else(|| w.strip_prefix("~/"));
        if path.is_some_and(|p| p.chars().next().is_some_and(char::is_alphanumeric)) {
            return Some("a host path");
        }
    }
    None
}

/// `127.0.0.1:4222`, `localhost:8080`, `api.example.com:443`.
fn is_host_port(w: &str) -> bool {
    let Some((host, port)) = w.rsplit_once(':') else {
        return false;
    };
    let port_ok = !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
    let host_ok = host == "localhost"
        || (host.contains('.')
            && host.split('.').all(|p| !p.is_empty())
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b)));
    port_ok && host_ok
}

#[test]
fn the_leak_check_catches_each_kind() {
    for (text, why) in [
        ("boom\n    at decode (x)", "a stack trace"),
        ("failed: http://127.0.0.1:9/x", "a URL"),
        ("ECONNREFUSED 127.0.0.1:39217", "a host:port"),
        (
            "open '/home/u/.local/share/opencode/tool-output/tool_1'",
            "a host path",
        ),
        ("see ~/secrets", "a host path"),
    ] {
        assert_eq!(leak(text), Some(why), "{text}");
    }
    for ok in [
        "`attachments[0]` (\"a.png\") is declared image/png but its content is not an image",
        "conversation slack.C1 belongs to another tenant; at 12:30 3/4",
        "OpenCode answered HTTP 500 (sending the prompt)",
    ] {
        assert_eq!(leak(ok), None, "{ok}");
    }
}
