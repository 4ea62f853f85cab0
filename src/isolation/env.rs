//! A tenant's directories and the environment its server gets.
//!
//! `<root>/<tenant>` (mode 0700) is the tenant's workspace and its
//! server's directory; `<root>/<tenant>/.opencode/{config,data,state,cache,home}`
//! are the server's `XDG_*` directories and `HOME`, so its sessions,
//! logs and tool caches stay the tenant's. Of the daemon's environment
//! only what [`crate::protocol::workspace::passes`] allows goes on.

use std::ffi::OsString;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::IsolationConfig;
use crate::protocol::workspace;

/// Where one tenant's server lives.
pub struct Layout {
    /// `<root>/<tenant>`.
    pub workspace: PathBuf,
    /// `<root>/<tenant>/.opencode`.
    pub state: PathBuf,
}

/// The `XDG_*` variables and the directories under `.opencode` they name.
const XDG: [(&str, &str); 4] = [
    ("XDG_CONFIG_HOME", "config"),
    ("XDG_DATA_HOME", "data"),
    ("XDG_STATE_HOME", "state"),
    ("XDG_CACHE_HOME", "cache"),
];

impl Layout {
    /// Creates (mode 0700, if missing) the tenant's workspace, filled from
    /// `template` when it is new, and its server's directories.
    pub fn create(root: &Path, tenant: &str, template: Option<&Path>) -> std::io::Result<Layout> {
        let dir = workspace::directory(root, Some(tenant), None)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)?;
        create_workspace(&dir, template)?;
        let state = dir.join(".opencode");
        for sub in XDG.iter().map(|(_, d)| *d).chain(["home"]) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(state.join(sub))?;
        }
        Ok(Layout {
            workspace: dir,
            state,
        })
    }

    /// The server's whole environment: the daemon's variables that may
    /// pass, `HOME` and the `XDG_*` directories of the tenant, and
    /// `OPENCODE_CONFIG` naming the operator's OpenCode config (providers,
    /// models) when there is one. The server's password and config
    /// content are added by `opencode::embedded::server_command`.
    pub fn environment(&self, cfg: &IsolationConfig) -> Vec<(OsString, OsString)> {
        let mut vars: Vec<(OsString, OsString)> = std::env::vars_os()
            .filter(|(k, _)| {
                k.to_str()
                    .is_some_and(|k| workspace::passes(k, &cfg.pass_env) && !is_layout_var(k))
            })
            .collect();
        vars.push(("HOME".into(), self.state.join("home").into()));
        for (var, sub) in XDG {
            vars.push((var.into(), self.state.join(sub).into()));
        }
        if let Some(file) = cfg.opencode_config.clone().or_else(user_config) {
            vars.push(("OPENCODE_CONFIG".into(), file.into()));
        }
        vars
    }
}

/// Variables the layout sets itself (a `pass_env` entry cannot override
/// them).
fn is_layout_var(name: &str) -> bool {
    name == "HOME" || name == "OPENCODE_CONFIG" || XDG.iter().any(|(v, _)| *v == name)
}

/// The daemon user's OpenCode config file:
/// `$XDG_CONFIG_HOME/opencode/opencode.json[c]` (or `~/.config/...`).
fn user_config() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    ["opencode.json", "opencode.jsonc", "config.json"]
        .iter()
        .map(|f| base.join("opencode").join(f))
        .find(|p| p.is_file())
}

/// Creates `dir` (mode 0700) if it is missing, copying `template` into it
/// then. An existing one is left as it is (but made 0700).
pub fn create_workspace(dir: &Path, template: Option<&Path>) -> std::io::Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {
            if let Some(t) = template {
                copy_tree(t, dir)?;
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        }
        Err(e) => Err(e),
    }
}

/// Copies the files and directories under `from` into `to` (symbolic
/// links are copied as links, never followed).
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            std::fs::create_dir_all(&target)?;
            copy_tree(&entry.path(), &target)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path())?, &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}
