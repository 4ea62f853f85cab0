//! OpenCode's saved tool outputs, one folder for every session of every
//! tenant (issue 22). OpenCode 1.18 saves a tool output above 2,000 lines
//! or 50 KB whole under `<data>/opencode/tool-output/tool_*` (`<data>`:
//! `$XDG_DATA_HOME`, else `~/.local/share`), gives the model a cut preview
//! with the file's path, and appends to every agent's rules one that lets
//! `external_directory` reach that folder without asking, unless the
//! agent's rules already deny exactly that folder. In the shared isolation
//! mode that rule let one tenant's agent read another tenant's saved
//! output with `read`, `grep`, `glob` or `list`.
//!
//! The embedded server therefore runs with that folder denied
//! ([`deny_rules`]): OpenCode then leaves its allow rule out, and refuses
//! any tool that reaches into the folder. What agents lose: reading back
//! the whole of a cut output (theirs as well); they keep the preview
//! (the first 2,000 lines or 50 KB) and can run the command again with a
//! narrower output. An external OpenCode is the operator's to configure
//! the same way; the start-up audit says so ([`AUDIT_WARNING`]).

use serde_json::{json, Value};

/// The folder's glob as OpenCode writes it in its rules, for a process
/// whose environment is `var` (`XDG_DATA_HOME`, else `HOME`).
pub fn folder_glob(var: impl Fn(&str) -> Option<String>) -> Option<String> {
    let data = match var("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        Some(d) => d,
        None => format!("{}/.local/share", var("HOME").filter(|h| !h.is_empty())?),
    };
    Some(format!(
        "{}/opencode/tool-output/*",
        data.trim_end_matches('/')
    ))
}

/// The `permission` of the embedded server's config: ask for everything,
/// and deny the saved tool outputs (`glob`: [`folder_glob`]).
pub fn deny_rules(glob: Option<&str>) -> Value {
    match glob {
        Some(g) => json!({"*": "ask", "external_directory": {"*": "ask", g: "deny"}}),
        None => json!({"*": "ask"}),
    }
}

/// What the start-up audit says when OpenCode lets agents read the saved
/// tool outputs without asking.
pub const AUDIT_WARNING: &str = "OpenCode lets every agent read its saved tool outputs (external_directory on <data>/opencode/tool-output/*) without asking: with one OpenCode for all tenants, one tenant's agent can read another tenant's saved output. Deny that folder in OpenCode's config (\"permission\": {\"external_directory\": {\"<data>/opencode/tool-output/*\": \"deny\"}}), as the embedded server does";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_folder_follows_xdg_then_home() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            folder_glob(env(&[("XDG_DATA_HOME", "/x/data/"), ("HOME", "/home/u")])).as_deref(),
            Some("/x/data/opencode/tool-output/*")
        );
        assert_eq!(
            folder_glob(env(&[("XDG_DATA_HOME", ""), ("HOME", "/home/u")])).as_deref(),
            Some("/home/u/.local/share/opencode/tool-output/*")
        );
        assert_eq!(folder_glob(env(&[])), None);
        assert_eq!(
            deny_rules(Some("/d/opencode/tool-output/*")),
            json!({"*": "ask", "external_directory": {"*": "ask", "/d/opencode/tool-output/*": "deny"}})
        );
    }
}
