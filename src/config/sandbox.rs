//! `[isolation]`'s keys for `mode = "sandbox"`: the network, the limits,
//! and the check that the provider ports keep NATS and the metrics port
//! out of a sandboxed tenant's reach.

use std::path::PathBuf;

use serde::Deserialize;

use super::isolation::IsolationMode;

/// `[isolation] hide` by default: secrets under `/etc`.
pub fn default_hide() -> Vec<PathBuf> {
    [
        "/etc/shadow",
        "/etc/gshadow",
        "/etc/shadow-",
        "/etc/gshadow-",
        "/etc/sudoers",
        "/etc/sudoers.d",
        "/etc/ssh",
        "/etc/ssl/private",
        "/etc/opencode-nats-bridge",
        "/etc/credstore",
        "/etc/credstore.encrypted",
    ]
    .into_iter()
    .map(PathBuf::from)
    .collect()
}

/// See [`super::IsolationConfig::network`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    #[default]
    Provider,
    On,
}

/// `[isolation.limits]`: `setrlimit` bounds on a sandboxed server and every
/// process it starts (each process has its own, except `max_processes`).
/// `0`: no bound.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxLimits {
    /// Processes and threads of one tenant's sandbox together
    /// (`RLIMIT_NPROC`, counted in the sandbox's own user namespace, so
    /// per tenant, not per host user). An idle OpenCode 1.18 runs 8
    /// threads, each tool command a few processes; a fork bomb stops here.
    pub max_processes: u64,
    /// Open file descriptors per process (`RLIMIT_NOFILE`).
    pub max_open_files: u64,
    /// The largest file a process may write, in bytes (`RLIMIT_FSIZE`; a
    /// write beyond it fails with `EFBIG` or ends the process by SIGXFSZ).
    pub max_file_bytes: u64,
    /// Address space per process, in bytes (`RLIMIT_AS`). Off by default:
    /// OpenCode's runtime (Bun) reserves tens of GB of address space it
    /// never uses, so this is no memory bound; bound memory with a cgroup
    /// (`MemoryMax=` in the systemd unit).
    pub max_address_space_bytes: u64,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        SandboxLimits {
            max_processes: 512,
            max_open_files: 4096,
            max_file_bytes: 1 << 30,
            max_address_space_bytes: 0,
        }
    }
}

impl SandboxLimits {
    /// As the sandbox helper takes them (`0` = none).
    pub fn to_policy(&self) -> crate::sandbox::Limits {
        let some = |v: u64| (v > 0).then_some(v);
        crate::sandbox::Limits {
            processes: some(self.max_processes),
            open_files: some(self.max_open_files),
            file_size: some(self.max_file_bytes),
            address_space: some(self.max_address_space_bytes),
        }
    }
}

impl NetworkMode {
    /// As the sandbox helper takes it.
    pub fn to_policy(self) -> crate::sandbox::Network {
        match self {
            NetworkMode::Provider => crate::sandbox::Network::Provider,
            NetworkMode::On => crate::sandbox::Network::On,
        }
    }
}

/// `[isolation]` against the rest of the config: the provider ports must
/// keep NATS and the metrics listener out of a sandboxed tenant's reach.
pub(super) fn validate(cfg: &super::Config) -> Result<(), super::ConfigError> {
    let iso = &cfg.isolation;
    if iso.mode != IsolationMode::Sandbox || iso.network != NetworkMode::Provider {
        return Ok(());
    }
    let invalid = |reason: String| super::ConfigError::Invalid {
        key: "isolation.provider_ports",
        reason,
    };
    if iso.provider_ports.contains(&0) {
        return Err(invalid("0 is not a port".into()));
    }
    for url in cfg.nats.urls() {
        if let Some(port) = url_port(&url) {
            if iso.provider_ports.contains(&port) {
                return Err(invalid(format!("{port} is NATS's port ({url}): a sandboxed tenant's tools could reach NATS on it; move NATS or the provider to another port")));
            }
        }
    }
    if let Some(listen) = cfg.metrics.listen {
        if iso.provider_ports.contains(&listen.port()) {
            return Err(invalid(format!(
                "{} is the metrics port ([metrics] listen): a sandboxed tenant's tools could reach it",
                listen.port()
            )));
        }
    }
    Ok(())
}

/// In `sandbox` mode the daemon's config file must lie outside
/// `[workspaces] root`: a tenant may read and write all of its own root.
pub(super) fn config_outside_workspaces(cfg: &super::Config) -> Result<(), super::ConfigError> {
    let (Some(file), Some(root)) = (&cfg.isolation.daemon_config, &cfg.workspaces.root) else {
        return Ok(());
    };
    let root = root.canonicalize().unwrap_or_else(|_| root.clone());
    if cfg.isolation.mode == IsolationMode::Sandbox && file.starts_with(&root) {
        return Err(super::ConfigError::Invalid {
            key: "workspaces.root",
            reason: format!(
                "the daemon's config file {} lies inside it, where a sandboxed tenant may read it; move one of them",
                file.display()
            ),
        });
    }
    Ok(())
}

/// The port of a NATS URL (`nats://h:4222`, `tls://h`, `h:4222`, `h`):
/// 4222 when it names none.
fn url_port(url: &str) -> Option<u16> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host_port = rest.split('/').next()?;
    let host_port = host_port.rsplit_once('@').map_or(host_port, |(_, h)| h);
    match host_port.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') && !port.contains(']') => port.parse().ok(),
        _ => Some(4222),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_ports_are_read_from_every_url_form() {
        assert_eq!(url_port("nats://127.0.0.1:4222"), Some(4222));
        assert_eq!(url_port("tls://a:b@nats.example:7422"), Some(7422));
        assert_eq!(url_port("nats.example"), Some(4222));
        assert_eq!(url_port("nats://[::1]:443"), Some(443));
        assert_eq!(url_port("nats://[::1]"), Some(4222));
    }
}
