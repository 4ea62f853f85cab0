//! [pure] What an `error` reply may say: what failed, and nothing of the
//! machinery behind it. Errors that come from OpenCode or a model provider
//! carry stack traces, URLs, hosts and ports, and the host's paths; a
//! tenant learns nothing useful from them and an attacker learns the
//! layout. [`public_error`] keeps the sentence and replaces those with
//! placeholders; the daemon's log keeps the original.

/// The longest error text a reply carries (bytes); the log keeps the rest.
pub const MAX_ERROR_BYTES: usize = 2048;

/// `message` with stack traces cut off and URLs, `host:port` and absolute
/// paths replaced by `<url>`, `<host>` and `<path>`, at most
/// [`MAX_ERROR_BYTES`] long.
pub fn public_error(message: &str) -> String {
    let mut kept = Vec::new();
    for line in message.lines() {
        if is_stack_line(line) {
            break;
        }
        kept.push(line.trim_end());
    }
    let joined = kept.join("\n");
    let mut out: String = joined
        .split_inclusive(char::is_whitespace)
        .map(redact_word)
        .collect();
    let trimmed = out.trim_end().len();
    out.truncate(trimmed);
    if out.len() > MAX_ERROR_BYTES {
        let cut = super::reply::floor_char_boundary(&out, MAX_ERROR_BYTES);
        out.truncate(cut);
        out.push_str(" [...]");
    }
    out
}

/// Whether `line` starts a stack trace (JavaScript, Rust, Python, Go).
fn is_stack_line(line: &str) -> bool {
    let t = line.trim_start();
    (t.len() < line.len() && t.starts_with("at "))
        || t.starts_with("stack backtrace:")
        || t.starts_with("Traceback (most recent call last)")
        || t.starts_with("goroutine ")
}

/// One whitespace-ended word, its secret-looking core replaced.
fn redact_word(word: &str) -> String {
    let body = word.trim_end_matches(char::is_whitespace);
    let space = &word[body.len()..];
    // Punctuation around the core stays: `(http://x:1/y).` -> `(<url>).`
    let core_start = body
        .find(|c: char| !"\"'`([{<".contains(c))
        .unwrap_or(body.len());
    let core_end = body
        .rfind(|c: char| !"\"'`)]}>.,;:!?".contains(c))
        .map_or(core_start, |i| {
            i + body[i..].chars().next().map_or(1, char::len_utf8)
        })
        .max(core_start);
    let (pre, core, post) = (
        &body[..core_start],
        &body[core_start..core_end],
        &body[core_end..],
    );
    let replaced = if let Some(i) = core.find("://") {
        let scheme = &core[..i];
        if !scheme.is_empty()
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+.-".contains(&b))
        {
            format!("{}<url>", key_prefix(scheme))
        } else {
            core.to_string()
        }
    } else if let Some(i) = path_start(core) {
        format!("{}<path>", &core[..i])
    } else if let Some(i) = host_port_start(core) {
        format!("{}<host>", &core[..i])
    } else {
        core.to_string()
    };
    format!("{pre}{replaced}{post}{space}")
}

/// What precedes a URL inside one word (`url=http://...` keeps `url=`).
fn key_prefix(scheme: &str) -> &str {
    match scheme.rfind(['=', ':', '(']) {
        Some(i) => &scheme[..=i],
        None => "",
    }
}

/// Where an absolute path starts in a word: at its start, or after `=`
/// or `:` (`path=/var/x`, `ENOENT:/x`); `~/` too. A lone `/` or a
/// `type/subtype` is not a path.
fn path_start(core: &str) -> Option<usize> {
    let starts = std::iter::once(0).chain(
        core.char_indices()
            .filter(|(_, c)| *c == '=' || *c == ':')
            .map(|(i, _)| i + 1),
    );
    for i in starts {
        let rest = &core[i..];
        let after = rest.strip_prefix("~/").or_else(|| rest.strip_prefix('/'));
        if after.is_some_and(|a| {
            a.chars()
                .next()
                .is_some_and(|c| c.is_alphanumeric() || "._-~".contains(c))
        }) {
            return Some(i);
        }
    }
    None
}

/// Where a `host:port` starts in a word (`127.0.0.1:8080`,
/// `api.example.com:443`, `localhost:4096`, `[::1]:80`): the host has a
/// dot or is `localhost` or bracketed, the port is 1 to 5 digits.
fn host_port_start(core: &str) -> Option<usize> {
    let (host, port) = core.rsplit_once(':')?;
    let port = port.split('/').next().unwrap_or_default();
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let start = host
        .rfind(|c: char| !(c.is_ascii_alphanumeric() || ".-[]:".contains(c)))
        .map_or(0, |i| i + 1);
    let h = &host[start..];
    let hosty = h.eq_ignore_ascii_case("localhost")
        || (h.starts_with('[') && h.ends_with(']'))
        || (h.contains('.')
            && h.chars().any(|c| c.is_ascii_alphanumeric())
            && !h.starts_with('.')
            && !h.ends_with('.'));
    hosty.then_some(start)
}

/// `text` with the host's path to OpenCode's data directory cut from
/// every saved tool output it names: `/home/u/.local/share/opencode/
/// tool-output/tool_1` becomes `tool-output/tool_1` (truncation hints in
/// tool results, permission notes). Borrowed when there is none.
pub fn strip_data_dirs(text: &str) -> std::borrow::Cow<'_, str> {
    const MARK: &str = "/opencode/tool-output";
    if !text.contains(MARK) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(MARK) {
        // The path starts after the last space, quote or bracket before it.
        let start = rest[..i]
            .rfind(|c: char| c.is_whitespace() || "\"'`([{<=:,".contains(c))
            .map_or(0, |j| j + 1);
        out.push_str(&rest[..start]);
        out.push_str("tool-output");
        rest = &rest[i + MARK.len()..];
    }
    out.push_str(rest);
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sentence_stays_the_machinery_goes() {
        let cases = [
            (
                "TypeError: undefined is not an object\n    at decode (/$bunfs/root/src/image.ts:12:5)\n    at async run",
                "TypeError: undefined is not an object",
            ),
            (
                "APIError: Cannot connect to API: connect ECONNREFUSED 127.0.0.1:39217",
                "APIError: Cannot connect to API: connect ECONNREFUSED <host>",
            ),
            (
                "request to https://api.example.com/v1/chat/completions failed (http://10.0.0.2:8080).",
                "request to <url> failed (<url>).",
            ),
            (
                "upstream api.example.com:443 refused",
                "upstream <host> refused",
            ),
            (
                "ENOENT: no such file, open '/home/opencode/.local/share/opencode/tool-output/tool_1'",
                "ENOENT: no such file, open '<path>'",
            ),
            (
                "see path=/var/lib/x and ~/secret.txt",
                "see path=<path> and <path>",
            ),
            ("panicked\nstack backtrace:\n 0: main", "panicked"),
        ];
        for (raw, want) in cases {
            assert_eq!(public_error(raw), want, "{raw:?}");
        }
    }

    #[test]
    fn what_the_bridge_says_passes_unchanged() {
        for s in [
            "`attachments[0]` (\"bomb.png\") is declared image/png but its content is not an image",
            "conversation slack.C1 belongs to another tenant",
            "the deadline of 30s passed: no event for 30s ([turn] idle_timeout)",
            "OpenCode answered HTTP 500 (sending the prompt)",
            "reply_to must be under opencode.reply.discord.",
            "at 12:30 the turn ended; ratio 3/4",
        ] {
            assert_eq!(public_error(s), s);
        }
    }

    #[test]
    fn saved_tool_outputs_are_named_without_the_host_path() {
        let hint = "...\nThe tool call succeeded but the output was truncated. Full output saved to: /home/op/.local/share/opencode/tool-output/tool_9f\nUse the Task tool";
        assert_eq!(
            strip_data_dirs(hint),
            "...\nThe tool call succeeded but the output was truncated. Full output saved to: tool-output/tool_9f\nUse the Task tool"
        );
        assert_eq!(
            strip_data_dirs("permission `external_directory` (/x/d/opencode/tool-output/*) denied"),
            "permission `external_directory` (tool-output/*) denied"
        );
        assert!(matches!(
            strip_data_dirs("no paths"),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn long_errors_are_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_ERROR_BYTES);
        let out = public_error(&long);
        assert!(out.len() <= MAX_ERROR_BYTES + 6, "{}", out.len());
        assert!(out.ends_with(" [...]"));
    }
}
