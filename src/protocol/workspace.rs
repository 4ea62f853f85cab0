//! [pure] Workspaces: which directory a prompt's agent works in, and which
//! of the daemon's environment a tenant's own OpenCode server may see.
//!
//! With `[workspaces] root` set, a tenant works in `<root>/<tenant>` and a
//! named workspace in `<root>/<tenant>/<name>`; the operator works in the
//! root. Both names are single path segments checked here, so no name can
//! climb out of its parent or reach into another tenant's directory.

use std::path::{Path, PathBuf};

/// The longest workspace (or tenant directory) name, in bytes.
pub const MAX_NAME_BYTES: usize = 64;

/// Checks that `name` is one harmless path segment: 1-64 bytes of ASCII
/// letters, digits, `-`, `_` and `.`, and not `.` or `..`. The reason
/// says what is wrong.
pub fn check_segment(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!("is {} bytes, above {MAX_NAME_BYTES}", name.len()));
    }
    if name == "." || name == ".." {
        return Err("names the directory itself or its parent".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "contains {c:?}: only letters, digits, '-', '_' and '.' are allowed"
        ));
    }
    Ok(())
}

/// Where a prompt works, under `root`: the root for the operator,
/// `<root>/<tenant>` for a tenant, `<root>/<tenant>/<name>` for a named
/// workspace (the operator's named workspaces are `<root>/<name>`).
pub fn directory(
    root: &Path,
    tenant: Option<&str>,
    workspace: Option<&str>,
) -> Result<PathBuf, String> {
    let mut dir = root.to_path_buf();
    if let Some(t) = tenant {
        check_segment(t).map_err(|e| format!("tenant {t:?} cannot name a directory: it {e}"))?;
        dir.push(t);
    }
    if let Some(w) = workspace {
        check_segment(w).map_err(|e| format!("`workspace` {w:?} {e}"))?;
        dir.push(w);
    }
    Ok(dir)
}

/// The workspace `directory` names, given the directory of its tenant (or
/// the operator's root): `None` for that directory itself, the name for
/// a direct child, `Err` for anything else (a session made elsewhere).
pub fn name_of(base: &Path, directory: &Path) -> Result<Option<String>, NotAWorkspace> {
    if directory == base {
        return Ok(None);
    }
    let rest = directory.strip_prefix(base).map_err(|_| NotAWorkspace)?;
    let mut parts = rest.components();
    match (parts.next(), parts.next()) {
        (Some(std::path::Component::Normal(n)), None) => n
            .to_str()
            .filter(|n| check_segment(n).is_ok())
            .map(|n| Some(n.to_string()))
            .ok_or(NotAWorkspace),
        _ => Err(NotAWorkspace),
    }
}

/// A directory that is no workspace of the tenant (or operator) asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotAWorkspace;

/// Whether the daemon's variable `name` may pass to a tenant's server:
/// the few a process needs to run (`PATH`, `LANG`, `LC_*`, `TZ`,
/// `TMPDIR`), and those `[isolation] pass_env` lists (a trailing `*`
/// matches a prefix). The server's own password and the bridge's settings
/// never pass, whatever the list says.
pub fn passes(name: &str, pass_env: &[String]) -> bool {
    const NEVER: [&str; 3] = [
        "OPENCODE_SERVER_PASSWORD",
        "OPENCODE_SERVER_USERNAME",
        "OPENCODE_BRIDGE__",
    ];
    if NEVER.iter().any(|n| name.starts_with(n)) {
        return false;
    }
    if matches!(name, "PATH" | "LANG" | "TZ" | "TMPDIR") || name.starts_with("LC_") {
        return true;
    }
    pass_env.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == p,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_tricks_are_refused() {
        for bad in [
            "", ".", "..", "a/b", "../b", "/etc", "a\\b", "a b", "a\0b", "é", "~",
        ] {
            assert!(check_segment(bad).is_err(), "{bad:?} passed");
        }
        assert!(check_segment(&"a".repeat(65)).is_err());
        for good in [
            "a",
            "repo-1",
            "my_repo.v2",
            "...",
            ".hidden",
            &"a".repeat(64),
        ] {
            assert!(check_segment(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn directories_stay_under_their_tenant() {
        let root = Path::new("/srv/ws");
        assert_eq!(directory(root, None, None).unwrap(), root);
        assert_eq!(
            directory(root, Some("slack"), None).unwrap(),
            Path::new("/srv/ws/slack")
        );
        assert_eq!(
            directory(root, Some("slack"), Some("repo")).unwrap(),
            Path::new("/srv/ws/slack/repo")
        );
        // Tenant A cannot name a workspace in tenant B's directory.
        for trick in ["../discord", "..", "../discord/repo", "/srv/ws/discord"] {
            let e = directory(root, Some("slack"), Some(trick)).unwrap_err();
            assert!(e.contains("`workspace`"), "{e}");
        }
        // A tenant whose subject token is no path segment gets no directory.
        assert!(directory(root, Some("a/b"), None).is_err());
    }

    #[test]
    fn a_sessions_directory_names_its_workspace() {
        let base = Path::new("/srv/ws/slack");
        assert_eq!(name_of(base, base), Ok(None));
        assert_eq!(
            name_of(base, Path::new("/srv/ws/slack/repo")),
            Ok(Some("repo".into()))
        );
        assert_eq!(
            name_of(base, Path::new("/srv/ws/discord")),
            Err(NotAWorkspace)
        );
        assert_eq!(
            name_of(base, Path::new("/srv/ws/slack/a/b")),
            Err(NotAWorkspace)
        );
    }

    #[test]
    fn only_listed_variables_pass_and_never_the_secrets() {
        let list = vec!["ANTHROPIC_API_KEY".to_string(), "OPENCODE_DISABLE_*".into()];
        assert!(passes("PATH", &list));
        assert!(passes("LC_ALL", &list));
        assert!(passes("ANTHROPIC_API_KEY", &list));
        assert!(passes("OPENCODE_DISABLE_LSP_DOWNLOAD", &list));
        assert!(!passes("ANTHROPIC_API_KEY_2", &list));
        assert!(!passes("NATS_CREDS", &list));
        assert!(!passes("HOME", &list));
        let all = vec!["*".to_string()];
        assert!(!passes("OPENCODE_SERVER_PASSWORD", &all));
        assert!(!passes("OPENCODE_BRIDGE__NATS__PASSWORD", &all));
    }
}
