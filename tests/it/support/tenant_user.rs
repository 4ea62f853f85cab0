//! Whom a sandboxed process runs as in the tests. As root, `nobody`
//! (`setpriv`): the kernel never bounds root's processes (`RLIMIT_NPROC`),
//! so the sandbox's process bound holds only for another user. Not root:
//! the tests' own user.

use std::path::Path;

/// `nobody`.
pub const NOBODY: u32 = 65534;

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// What goes before a command to run it as the tenant's user (`setpriv`
/// to `nobody` as root, nothing otherwise).
pub fn prefix() -> Vec<&'static str> {
    if is_root() {
        vec![
            "setpriv",
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "--",
        ]
    } else {
        Vec::new()
    }
}

/// `program` as the tenant's user.
pub fn command(program: &Path) -> tokio::process::Command {
    let prefix = prefix();
    let mut cmd = tokio::process::Command::new(prefix.first().map_or(program, Path::new));
    if !prefix.is_empty() {
        cmd.args(&prefix[1..]).arg(program);
    }
    cmd
}

/// Gives `path` and everything under it to the tenant's user (as root).
pub fn give(path: &Path) {
    if !is_root() {
        return;
    }
    std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY)).unwrap();
    if path.is_dir() && !path.is_symlink() {
        for e in std::fs::read_dir(path).unwrap().flatten() {
            give(&e.path());
        }
    }
}

/// Why this machine cannot run a sandbox (the daemon's own start-up check,
/// with the helper `helper`), or `None` when it can. Tests of the sandbox
/// print it and skip; `sandbox_mode` asserts the refusal instead.
pub fn sandbox_unavailable(helper: &Path) -> Option<String> {
    let mut cfg = opencode_nats_bridge::config::IsolationConfig {
        mode: opencode_nats_bridge::config::IsolationMode::Sandbox,
        ..Default::default()
    };
    // The process bound is the tests' to check (as `nobody`), not the probe's.
    cfg.limits.max_processes = 0;
    let reason = opencode_nats_bridge::sandbox::probe::check(&cfg, helper).err()?;
    eprintln!("SKIPPED: this machine cannot run the sandbox: {reason}");
    Some(reason)
}
