//! [pure] Log lines that cannot be forged. Subjects, trace ids and headers
//! come from callers and reach the daemon's log; a control character there
//! could end a line and start a forged one (`\n`), recolour or erase the
//! terminal (`ESC[...`), hide text (NUL, `\r`), or reorder what a reader
//! sees (the bidirectional overrides, U+202E). [`escape_line`] writes each
//! such character as a visible escape (`\x1b`, `\u{202e}`); the daemon's
//! log writer passes every line through it (`ops/log.rs`).

use std::borrow::Cow;

/// Whether `c` reorders displayed text: the bidirectional embeddings,
/// overrides and isolates, and the invisible direction marks.
pub fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
    )
}

/// Whether `c` is written escaped in a log line: control characters (C0,
/// DEL, C1) but tab, and the bidirectional controls.
fn needs_escape(c: char) -> bool {
    (c.is_control() && c != '\t') || is_bidi_control(c)
}

/// How a log line is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LineStyle {
    /// Keep ESC for the formatter's own colours (on a terminal; the
    /// formatter escapes ESC inside values itself).
    pub keep_esc: bool,
    /// The line is JSON: escapes are JSON's `\u202e` (a reader that
    /// parses the line gets the character back; the file shows none).
    pub json: bool,
}

/// One formatted log line with every control character escaped, the
/// final `\n` kept.
pub fn escape_line(line: &str, style: LineStyle) -> Cow<'_, str> {
    let keep_esc = style.keep_esc;
    let (body, end) = match line.strip_suffix('\n') {
        Some(b) => (b, "\n"),
        None => (line, ""),
    };
    let escape = |c: char| needs_escape(c) && !(keep_esc && c == '\x1b');
    if !body.chars().any(escape) {
        return Cow::Borrowed(line);
    }
    let mut out = String::with_capacity(line.len() + 16);
    for c in body.chars() {
        if !escape(c) {
            out.push(c);
        } else if style.json {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else if (c as u32) < 0x80 {
            out.push_str(&format!("\\x{:02x}", c as u32));
        } else {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        }
    }
    out.push_str(end);
    Cow::Owned(out)
}

/// `s` escaped as in a log line, for text that goes elsewhere (a
/// terminal, a message).
pub fn escaped(s: &str) -> Cow<'_, str> {
    escape_line(s, LineStyle::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_and_bidi_are_escaped_and_the_line_end_kept() {
        let forged = "prompt refused subject=opencode.prompt.x\x1b[31mRED\x00\r\nFAKE line \u{202e}gnp.exe\n";
        assert_eq!(
            escape_line(forged, LineStyle::default()),
            "prompt refused subject=opencode.prompt.x\\x1b[31mRED\\x00\\x0d\\x0aFAKE line \\u{202e}gnp.exe\n"
        );
        assert_eq!(
            escape_line(
                "a\x1b[2mb\n",
                LineStyle {
                    keep_esc: true,
                    json: false
                }
            ),
            "a\x1b[2mb\n"
        );
        assert_eq!(escaped("\u{2066}x\u{7f}\u{85}"), "\\u{2066}x\\x7f\\u{85}");
    }

    #[test]
    fn clean_lines_are_not_copied() {
        let line = "INFO turn completed trace_id=t-1\tok é 日本\n";
        assert!(matches!(
            escape_line(line, LineStyle::default()),
            Cow::Borrowed(_)
        ));
        let json = LineStyle {
            keep_esc: false,
            json: true,
        };
        let out = escape_line("{\"subject\":\"a\u{202e}b\"}\n", json);
        assert_eq!(out, "{\"subject\":\"a\\u202eb\"}\n");
        let back: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(back["subject"], "a\u{202e}b");
    }
}
