//! `[workspaces]` and `[isolation]`: where each tenant's agent works, and
//! whether tenants share one OpenCode server or each gets its own
//! (README "Security", docs/PROTOCOL.md "Workspaces").

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::sandbox::{NetworkMode, SandboxLimits};
use super::{Config, ConfigError};

/// `[workspaces]`: a directory per tenant (and per named workspace).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct WorkspacesConfig {
    /// Unset (the default): every prompt works in `[opencode] directory`,
    /// as before. Set (an absolute path): a tenant's prompts work in
    /// `<root>/<tenant>` (created on demand, mode 0700); operator prompts
    /// work in the root itself. `[isolation] mode = "process"` needs it.
    pub root: Option<PathBuf>,
    /// Whether a prompt may name `"workspace": "<name>"`, resolved to
    /// `<root>/<tenant>/<name>` (created on demand). Off: such a prompt is
    /// answered `bad_request`.
    pub allow_named: bool,
    /// A directory copied into every workspace when it is created (a
    /// checkout, a project skeleton). Unset: new workspaces start empty.
    pub template: Option<PathBuf>,
}

/// How tenants share OpenCode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum IsolationMode {
    /// One OpenCode server for every tenant (the default).
    #[default]
    Shared,
    /// One embedded `opencode serve` per tenant, with its own storage,
    /// password, environment and supervision.
    Process,
    /// `Process`, with each tenant's server and every tool it runs
    /// confined by the kernel (`crate::sandbox`, README "Security").
    Sandbox,
}

impl IsolationMode {
    /// Whether each tenant gets a server of its own (`process`, `sandbox`).
    pub fn per_tenant(self) -> bool {
        self != IsolationMode::Shared
    }
}

/// `[isolation]`: one OpenCode per tenant, or one for all.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IsolationConfig {
    /// `shared` (default): one OpenCode for everyone. `process`: a tenant's
    /// prompts run on an `opencode serve` of its own, started on its first
    /// prompt in `<root>/<tenant>`, with its storage under
    /// `<root>/<tenant>/.opencode/` (operator prompts keep the shared one).
    /// `sandbox`: `process`, with each tenant's server and every tool it
    /// runs confined by the kernel to its own `<root>/<tenant>` (README
    /// "Security"); the daemon refuses to start (exit 78) where the kernel
    /// cannot enforce it.
    pub mode: IsolationMode,
    /// `process`: a tenant's server with no turn for this long is stopped
    /// (its next prompt starts it again, sessions kept).
    #[serde(with = "humantime_serde")]
    pub idle_stop: Duration,
    /// `process`: at most this many tenant servers run at once. A tenant
    /// beyond it waits (`server_wait`) for an idle server to be stopped,
    /// then is answered `overloaded`.
    pub max_servers: usize,
    /// `process`: how long a turn waits for its tenant's server (a free
    /// place under `max_servers`, then the start or restart) before it
    /// fails (`overloaded` or `opencode_unavailable`).
    #[serde(with = "humantime_serde")]
    pub server_wait: Duration,
    /// `process`: the daemon's environment variables a tenant's server
    /// (and every tool it runs) sees, by name; a trailing `*` matches a
    /// prefix (`"OPENCODE_DISABLE_*"`). Nothing else passes but `PATH`,
    /// `LANG`, `LC_*`, `TZ` and `TMPDIR`: put the provider keys the
    /// servers need here (`"ANTHROPIC_API_KEY"`). Never the NATS
    /// credentials or `OPENCODE_SERVER_PASSWORD`.
    pub pass_env: Vec<String>,
    /// `process`: the OpenCode config file (providers, models) every
    /// tenant's server reads, as `OPENCODE_CONFIG`. Unset: the daemon
    /// user's own, `$XDG_CONFIG_HOME/opencode/opencode.json[c]` (or under
    /// `~/.config`), when it exists. `OPENCODE_CONFIG_CONTENT` is passed as
    /// for the shared server, with `permission` set to ask.
    pub opencode_config: Option<PathBuf>,
    /// `sandbox` mode: TCP from a tenant's server and its tools.
    /// `provider`: connect only to `provider_ports` (on any host: the
    /// kernel's rules are per port), bind only the server's own listening
    /// port; `on`: unrestricted. UDP is never restricted.
    pub network: NetworkMode,
    /// `sandbox` mode with `network = "provider"`: the TCP ports the model
    /// provider listens on (443 for an HTTPS API; 11434 for a local
    /// Ollama). Must not be NATS's port or the metrics port: a tenant's
    /// tools could reach whatever listens on an allowed port, on any host.
    pub provider_ports: Vec<u16>,
    /// `sandbox` mode: more hierarchies a tenant's server may read and
    /// execute from, beside the system's (`/usr`, `/bin`, `/lib*`, `/etc`,
    /// `/proc`, `/sys`), the OpenCode binary's directory and its own root
    /// (e.g. a toolchain under `/opt`).
    pub read: Vec<PathBuf>,
    /// `sandbox` mode: paths under the readable ones that stay unreadable
    /// (secrets in `/etc`). The daemon's config file is always added.
    pub hide: Vec<PathBuf>,
    /// `[isolation.limits]`: resource bounds per sandboxed server.
    pub limits: SandboxLimits,
    /// The daemon's own config file (not a key: set when it is loaded),
    /// hidden from sandboxed tenants as `hide` is.
    #[serde(skip)]
    pub daemon_config: Option<PathBuf>,
}

impl Default for IsolationConfig {
    fn default() -> Self {
        IsolationConfig {
            mode: IsolationMode::Shared,
            idle_stop: Duration::from_secs(600),
            max_servers: 16,
            server_wait: Duration::from_secs(120),
            pass_env: Vec::new(),
            opencode_config: None,
            network: NetworkMode::Provider,
            provider_ports: vec![443],
            read: Vec::new(),
            hide: super::sandbox::default_hide(),
            limits: SandboxLimits::default(),
            daemon_config: None,
        }
    }
}

impl Config {
    /// `[workspaces]` and `[isolation]` hold together.
    pub(super) fn validate_isolation(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_string(),
            })
        };
        let w = &self.workspaces;
        if w.root.as_ref().is_some_and(|r| !r.is_absolute()) {
            return invalid("workspaces.root", "must be an absolute path");
        }
        if w.template.is_some() && w.root.is_none() {
            return invalid("workspaces.template", "needs [workspaces] root");
        }
        if w.allow_named && w.root.is_none() {
            return invalid("workspaces.allow_named", "needs [workspaces] root");
        }
        let i = &self.isolation;
        if i.mode.per_tenant() {
            if w.root.is_none() {
                return invalid(
                    "isolation.mode",
                    "\"process\" and \"sandbox\" need [workspaces] root (each tenant's server works and keeps its storage under <root>/<tenant>)",
                );
            }
            if i.max_servers == 0 {
                return invalid("isolation.max_servers", "must be at least 1");
            }
            if i.idle_stop.is_zero() {
                return invalid("isolation.idle_stop", "must be more than 0");
            }
        }
        for p in &i.pass_env {
            let name = p.strip_suffix('*').unwrap_or(p);
            if name.is_empty() || name.contains(['=', '*', '\0']) {
                return invalid(
                    "isolation.pass_env",
                    "each entry is a variable name, or a prefix ending in `*`",
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid_key(c: &Config) -> Option<&'static str> {
        match c.validate_isolation() {
            Err(ConfigError::Invalid { key, .. }) => Some(key),
            _ => None,
        }
    }

    #[test]
    fn process_mode_needs_a_root_and_sane_bounds() {
        let mut c = Config::default();
        assert_eq!(invalid_key(&c), None, "the defaults are today's behaviour");
        c.isolation.mode = IsolationMode::Process;
        assert_eq!(invalid_key(&c), Some("isolation.mode"));
        c.workspaces.root = Some("relative/dir".into());
        assert_eq!(invalid_key(&c), Some("workspaces.root"));
        c.workspaces.root = Some("/srv/ws".into());
        assert_eq!(invalid_key(&c), None);
        c.isolation.max_servers = 0;
        assert_eq!(invalid_key(&c), Some("isolation.max_servers"));
        c.isolation.max_servers = 2;
        c.isolation.pass_env = vec!["*".into()];
        assert_eq!(invalid_key(&c), Some("isolation.pass_env"));
        c.isolation.pass_env = vec!["A=B".into()];
        assert_eq!(invalid_key(&c), Some("isolation.pass_env"));
        c.isolation.pass_env = vec!["OPENCODE_DISABLE_*".into(), "ANTHROPIC_API_KEY".into()];
        assert_eq!(invalid_key(&c), None);
    }

    #[test]
    fn named_workspaces_and_templates_need_a_root() {
        let mut c = Config::default();
        c.workspaces.allow_named = true;
        assert_eq!(invalid_key(&c), Some("workspaces.allow_named"));
        c.workspaces.allow_named = false;
        c.workspaces.template = Some("/srv/template".into());
        assert_eq!(invalid_key(&c), Some("workspaces.template"));
    }
}
