//! The `sandbox-exec` helper: a fresh process between the daemon and
//! `opencode serve` confines itself by a [`Policy`] and then `exec`s the
//! command, which (with every child it ever starts) inherits the
//! confinement. In order: a user namespace of its own, the resource limits,
//! the Landlock ruleset (filesystem, TCP, scoping), `exec`. Any step that
//! fails ends the helper with [`EXIT_SANDBOX`] before the command runs:
//! never a command with less confinement than asked.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, NetPort, PathBeneath, PathFd,
    Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

use super::policy::{Network, Policy};

/// The helper's exit status when the sandbox cannot be set up (the command
/// never ran).
pub const EXIT_SANDBOX: u8 = 125;

/// The Landlock ABI whose rights the ruleset handles: filesystem through
/// device ioctls (5), TCP (4), scoping (6).
const ABI_USED: ABI = ABI::V6;

/// Why the sandbox could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Policy(#[from] super::policy::PolicyError),
    #[error("sandbox-exec: cannot create a user namespace: {0}")]
    UserNamespace(#[source] std::io::Error),
    #[error("sandbox-exec: cannot set {what}: {source}")]
    Limit {
        what: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("sandbox-exec: cannot open {}: {source}", path.display())]
    Path {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sandbox-exec: Landlock: {0}")]
    Landlock(#[from] landlock::RulesetError),
    #[error("sandbox-exec: the kernel enforces the Landlock ruleset only partly ({0:?}); refusing to run with less")]
    Partial(RulesetStatus),
    #[error("sandbox-exec: cannot run {}: {source}", command.to_string_lossy())]
    Exec {
        command: OsString,
        #[source]
        source: std::io::Error,
    },
}

/// `opencode-nats-bridge sandbox-exec <policy> -- <command>`: confines this
/// process, then becomes the command. Returns only on failure.
pub fn sandbox_exec(args: &[OsString]) -> SandboxError {
    match Policy::parse_args(args) {
        Ok((policy, command)) => match confine(&policy) {
            Ok(()) => exec(&policy, &command),
            Err(e) => e,
        },
        Err(e) => e.into(),
    }
}

/// Applies every part of `policy` to this process (single-threaded: called
/// before any runtime starts).
pub fn confine(policy: &Policy) -> Result<(), SandboxError> {
    if policy.user_namespace {
        enter_user_namespace()?;
    }
    // After the namespace: a limit set before it would also become the
    // bound on the parent's count of this user's processes.
    set_limits(policy)?;
    restrict(policy)
}

fn exec(policy: &Policy, command: &[OsString]) -> SandboxError {
    let mut cmd = std::process::Command::new(&command[0]);
    cmd.args(&command[1..]);
    if let Some(tmp) = &policy.tmp {
        cmd.env("TMPDIR", tmp);
    }
    if let Some(home) = &policy.home {
        cmd.env("HOME", home);
    }
    SandboxError::Exec {
        command: command[0].clone(),
        source: cmd.exec(),
    }
}

/// A user namespace with this user mapped to itself: no capability outside
/// it (even for root), and `RLIMIT_NPROC` counted per namespace.
fn enter_user_namespace() -> Result<(), SandboxError> {
    let uid = nix::unistd::getuid();
    let gid = nix::unistd::getgid();
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER)
        .map_err(|e| SandboxError::UserNamespace(e.into()))?;
    let write =
        |file: &str, text: String| std::fs::write(file, text).map_err(SandboxError::UserNamespace);
    write("/proc/self/setgroups", "deny".into())?;
    write("/proc/self/uid_map", format!("{uid} {uid} 1"))?;
    write("/proc/self/gid_map", format!("{gid} {gid} 1"))
}

fn set_limits(policy: &Policy) -> Result<(), SandboxError> {
    use nix::sys::resource::{setrlimit, Resource};
    let l = &policy.limits;
    for (what, resource, value) in [
        ("RLIMIT_NPROC", Resource::RLIMIT_NPROC, l.processes),
        ("RLIMIT_NOFILE", Resource::RLIMIT_NOFILE, l.open_files),
        ("RLIMIT_FSIZE", Resource::RLIMIT_FSIZE, l.file_size),
        ("RLIMIT_AS", Resource::RLIMIT_AS, l.address_space),
    ] {
        if let Some(v) = value {
            setrlimit(resource, v, v).map_err(|source| SandboxError::Limit { what, source })?;
        }
    }
    // No core dumps: a dump of the server would hold its password.
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(|source| SandboxError::Limit {
        what: "RLIMIT_CORE",
        source,
    })
}

/// The Landlock ruleset: every right of [`ABI_USED`] handled (so denied
/// unless a rule grants it), as a hard requirement (an older kernel is an
/// error, never a silent best effort), then the grants of `policy`.
fn restrict(policy: &Policy) -> Result<(), SandboxError> {
    let read = AccessFs::from_read(ABI_USED);
    let all = AccessFs::from_all(ABI_USED);
    let device = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate | AccessFs::IoctlDev;
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(all)?
        .scope(Scope::from_all(ABI_USED))?;
    if policy.network == Network::Provider {
        ruleset = ruleset.handle_access(AccessNet::from_all(ABI_USED))?;
    }
    let mut created = ruleset.create()?;
    for path in readable(&policy.read, &policy.hide)? {
        created = created.add_rule(beneath(&path, read)?)?;
    }
    for path in policy.write.iter().chain(policy.tmp.iter()) {
        let path = inside_write(path, &policy.write)?;
        created = created.add_rule(beneath(&path, all)?)?;
    }
    for path in &policy.devices {
        created = created.add_rule(beneath(path, device | AccessFs::ReadDir)?)?;
    }
    if policy.network == Network::Provider {
        for port in &policy.connect {
            created = created.add_rule(NetPort::new(*port, AccessNet::ConnectTcp))?;
        }
        for port in &policy.bind {
            created = created.add_rule(NetPort::new(*port, AccessNet::BindTcp))?;
        }
    }
    let status = created.restrict_self()?;
    if status.ruleset != RulesetStatus::FullyEnforced {
        return Err(SandboxError::Partial(status.ruleset));
    }
    Ok(())
}

/// `path` as the kernel resolves it, refused unless it lies inside one of
/// the `write` roots as they resolve. The tenant may write its root, so it
/// may have replaced a directory there (its `TMPDIR`) with a symbolic link
/// to another tenant's root: granting what the link points at would hand
/// that root over.
fn inside_write(path: &Path, write: &[PathBuf]) -> Result<PathBuf, SandboxError> {
    let resolved = |p: &Path| {
        p.canonicalize().map_err(|source| SandboxError::Path {
            path: p.to_path_buf(),
            source,
        })
    };
    let real = resolved(path)?;
    for root in write {
        if real.starts_with(resolved(root)?) {
            return Ok(real);
        }
    }
    Err(SandboxError::Path {
        path: path.to_path_buf(),
        source: std::io::Error::other(format!(
            "it resolves to {}, outside the writable roots (a symbolic link?): refused",
            real.display()
        )),
    })
}

/// A grant of `access` on `path` and beneath it; on a file, the rights
/// that apply to files.
fn beneath(path: &Path, access: BitFlags<AccessFs>) -> Result<PathBeneath<PathFd>, SandboxError> {
    let fd = PathFd::new(path).map_err(|e| SandboxError::Path {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    let access = if path.is_dir() {
        access
    } else {
        access & AccessFs::from_file(ABI_USED)
    };
    Ok(PathBeneath::new(fd, access))
}

/// The hierarchies to grant read on: `read`, each with the `hide` paths
/// under it carved out (the parent replaced by its other entries, down to
/// the hidden one). Paths that do not exist are left out (a grant fewer is
/// only stricter); symbolic links are followed, as the kernel does.
pub fn readable(read: &[PathBuf], hide: &[PathBuf]) -> Result<Vec<PathBuf>, SandboxError> {
    let hide: Vec<PathBuf> = hide.iter().filter_map(|h| h.canonicalize().ok()).collect();
    let mut out = Vec::new();
    for root in read {
        let Ok(root) = root.canonicalize() else {
            continue;
        };
        carve(&root, &hide, &mut out)?;
    }
    Ok(out)
}

fn carve(dir: &Path, hide: &[PathBuf], out: &mut Vec<PathBuf>) -> Result<(), SandboxError> {
    if hide.iter().any(|h| h == dir) {
        return Ok(());
    }
    if !hide.iter().any(|h| h.starts_with(dir)) {
        out.push(dir.to_path_buf());
        return Ok(());
    }
    let entries = std::fs::read_dir(dir).map_err(|source| SandboxError::Path {
        path: dir.to_path_buf(),
        source,
    })?;
    for entry in entries.flatten() {
        // Canonical, so a link to a hidden path is not a way around it.
        let Ok(path) = entry.path().canonicalize() else {
            continue;
        };
        if path.starts_with(dir) && path != dir {
            carve(&path, hide, out)?;
        } else if !hide
            .iter()
            .any(|h| h.starts_with(&path) || path.starts_with(h))
        {
            // A link out of `dir` (or back to it): granted only when
            // nothing hidden is at or under where it leads.
            out.push(path);
        }
    }
    Ok(())
}
