//! Kernel confinement of a tenant's OpenCode server in the `sandbox`
//! isolation mode (README "Security").
//!
//! The daemon never confines itself: it starts `opencode-nats-bridge
//! sandbox-exec <policy> -- opencode serve ...`, a fresh process that
//! applies the policy to itself ([`apply`]) and then `exec`s the server, so
//! the server and every tool it ever runs inherit it. [`policy`] *(pure)*
//! is the policy, its arguments and the kernel features it needs;
//! [`probe`] is the start-up check that the kernel enforces them.

pub mod apply;
pub mod policy;
pub mod probe;

use std::path::{Path, PathBuf};

pub use apply::{sandbox_exec, SandboxError, EXIT_SANDBOX};
pub use policy::{Limits, Network, Policy};

use crate::config::IsolationConfig;

/// The hidden subcommand of the daemon's binary that runs the helper.
pub const SUBCOMMAND: &str = "sandbox-exec";

/// System hierarchies a sandboxed server reads and executes from (those
/// that exist).
pub const SYSTEM_READ: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/proc", "/sys",
];

/// Devices a sandboxed server and its tools may open for reading and
/// writing (and send ioctls to: terminals).
pub const DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
    "/dev/tty",
    "/dev/ptmx",
    "/dev/pts",
];

/// What one tenant's sandboxed server runs with.
#[derive(Debug, Clone)]
pub struct Tenant<'a> {
    /// `<root>/<tenant>`: its workspaces and OpenCode directories, all it
    /// may write.
    pub root: &'a Path,
    /// Its private temporary directory (its `TMPDIR`; inside `root`).
    pub tmp: &'a Path,
    /// The OpenCode binary it runs.
    pub binary: &'a Path,
    /// The port its server listens on (the one port it may bind).
    pub port: u16,
    /// Files outside `root` the server must read (the operator's OpenCode
    /// config, when process mode points it there).
    pub extra_read: &'a [PathBuf],
}

/// The policy of one tenant's server under `[isolation]`.
pub fn tenant_policy(cfg: &IsolationConfig, tenant: &Tenant<'_>) -> Policy {
    let mut read: Vec<PathBuf> = SYSTEM_READ.iter().map(PathBuf::from).collect();
    // The binary's directory: a package's runtime files sit beside it.
    let binary = tenant
        .binary
        .canonicalize()
        .unwrap_or_else(|_| tenant.binary.to_path_buf());
    read.extend(binary.parent().map(Path::to_path_buf));
    read.extend(cfg.read.iter().cloned());
    read.extend(tenant.extra_read.iter().cloned());
    let mut hide = cfg.hide.clone();
    hide.extend(cfg.daemon_config.iter().cloned());
    Policy {
        read,
        hide,
        write: vec![tenant.root.to_path_buf()],
        devices: DEVICES.iter().map(PathBuf::from).collect(),
        tmp: Some(tenant.tmp.to_path_buf()),
        home: None,
        network: cfg.network.to_policy(),
        connect: cfg.provider_ports.clone(),
        bind: vec![tenant.port],
        limits: cfg.limits.to_policy(),
        user_namespace: true,
    }
}

/// How one tenant's server is started confined (`opencode::embedded`
/// asks it for the command prefix once its port is chosen).
#[derive(Debug, Clone)]
pub struct TenantSandbox {
    /// `[isolation]`.
    pub cfg: IsolationConfig,
    /// This binary, the helper.
    pub helper: PathBuf,
    /// `<root>/<tenant>`.
    pub root: PathBuf,
    /// Its `TMPDIR`, inside `root`.
    pub tmp: PathBuf,
    /// Files outside `root` its server reads (the operator's OpenCode
    /// config).
    pub extra_read: Vec<PathBuf>,
}

impl TenantSandbox {
    /// With `[isolation] mode = "sandbox"`, the sandbox of the tenant whose
    /// root is `root` (its server's state in `state`, its environment
    /// `vars`): creates its private `<state>/tmp`. `None` in other modes.
    pub fn for_tenant(
        cfg: &IsolationConfig,
        root: &Path,
        state: &Path,
        vars: &[(std::ffi::OsString, std::ffi::OsString)],
    ) -> std::io::Result<Option<TenantSandbox>> {
        use std::os::unix::fs::DirBuilderExt;
        if cfg.mode != crate::config::IsolationMode::Sandbox {
            return Ok(None);
        }
        let tmp = state.join("tmp");
        // The tenant may have replaced it with a symbolic link (the helper
        // refuses to grant one that leads out of its root): a fresh one.
        if std::fs::symlink_metadata(&tmp).is_ok_and(|m| m.file_type().is_symlink()) {
            std::fs::remove_file(&tmp)?;
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&tmp)?;
        // The operator's OpenCode config (providers, models), read-only.
        let extra_read = vars
            .iter()
            .filter(|(k, _)| k == "OPENCODE_CONFIG")
            .map(|(_, v)| PathBuf::from(v))
            .collect();
        Ok(Some(TenantSandbox {
            cfg: cfg.clone(),
            helper: std::env::current_exe()?,
            root: root.to_path_buf(),
            tmp,
            extra_read,
        }))
    }

    /// Whether the server may listen on `port`: never one of the provider
    /// ports, which every other tenant's tools may connect to.
    pub fn may_listen_on(&self, port: u16) -> bool {
        self.cfg.network == crate::config::NetworkMode::On
            || !self.cfg.provider_ports.contains(&port)
    }

    /// What goes before `<binary> serve ... --port <port>`.
    pub fn prefix(&self, binary: &Path, port: u16) -> Vec<std::ffi::OsString> {
        let tenant = Tenant {
            root: &self.root,
            tmp: &self.tmp,
            binary,
            port,
            extra_read: &self.extra_read,
        };
        prefix(&self.helper, &tenant_policy(&self.cfg, &tenant))
    }
}

/// What goes before a command to run it confined by `policy`: this
/// binary (`helper`), its hidden [`SUBCOMMAND`], the policy, `--`.
pub fn prefix(helper: &Path, policy: &Policy) -> Vec<std::ffi::OsString> {
    let mut out = vec![helper.as_os_str().to_owned(), SUBCOMMAND.into()];
    out.extend(policy.to_args());
    out.push("--".into());
    out
}

/// With `[isolation] mode = "sandbox"`: refuses unless this kernel enforces
/// the sandbox ([`probe::check`], with this binary as the helper), and logs
/// what it enforces.
pub fn check_at_start(cfg: &IsolationConfig) -> Result<(), String> {
    if cfg.mode != crate::config::IsolationMode::Sandbox {
        return Ok(());
    }
    let helper = std::env::current_exe()
        .map_err(|e| format!("[isolation] mode = \"sandbox\": cannot find this binary: {e}"))?;
    probe::check(cfg, &helper)?;
    tracing::info!(
        landlock_abi = probe::kernel_abi(),
        network = ?cfg.network,
        "sandbox mode: the kernel enforces Landlock filesystem, TCP and scope rules, user namespaces and limits"
    );
    Ok(())
}
