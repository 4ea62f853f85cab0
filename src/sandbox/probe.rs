//! The start-up check of the `sandbox` mode: does this kernel enforce what
//! the mode promises? First the Landlock features, each asked of the kernel
//! as a hard requirement; then a trial run of the helper (user namespace,
//! limits, ruleset) on `/bin/sh -c 'exit 0'`. Either failing is a refusal
//! that names what is missing, never a silent fallback.

use std::path::Path;

use landlock::{
    Access, AccessFs, AccessNet, CompatLevel, Compatible, Ruleset, RulesetAttr, Scope, ABI,
};

use super::policy::{missing, Network, Policy};
use crate::config::IsolationConfig;

/// The highest Landlock ABI (up to the 6 this crate uses) whose rights the
/// kernel enforces in full: 0 without Landlock.
pub fn kernel_abi() -> u8 {
    [ABI::V6, ABI::V5, ABI::V4, ABI::V3, ABI::V2, ABI::V1]
        .into_iter()
        .find(|abi| enforces(*abi))
        .map_or(0, |abi| abi as u8)
}

/// Whether a ruleset handling every right of `abi` can be created (not
/// applied) as a hard requirement.
fn enforces(abi: ABI) -> bool {
    let strict = Ruleset::default().set_compatibility(CompatLevel::HardRequirement);
    let mut ruleset = match strict.handle_access(AccessFs::from_all(abi)) {
        Ok(r) => r,
        Err(_) => return false,
    };
    if abi as u8 >= 4 {
        ruleset = match ruleset.handle_access(AccessNet::from_all(abi)) {
            Ok(r) => r,
            Err(_) => return false,
        };
    }
    if abi as u8 >= 6 {
        ruleset = match ruleset.scope(Scope::from_all(abi)) {
            Ok(r) => r,
            Err(_) => return false,
        };
    }
    ruleset.create().is_ok()
}

/// Refuses (with what is missing) unless this kernel enforces the
/// `sandbox` mode of `cfg`, tried with the helper `helper` (this binary).
pub fn check(cfg: &IsolationConfig, helper: &Path) -> Result<(), String> {
    if let Some(refusal) = root_refusal(nix::unistd::geteuid().is_root(), cfg) {
        return Err(refusal);
    }
    let network = cfg.network.to_policy();
    let abi = kernel_abi();
    let lacks = missing(abi, &network);
    if !lacks.is_empty() {
        let names: Vec<&str> = lacks.iter().map(|f| f.what).collect();
        return Err(format!(
            "[isolation] mode = \"sandbox\" needs what this kernel (Landlock ABI {abi}) does not enforce: {}",
            names.join("; ")
        ));
    }
    trial(cfg, helper, network)
}

/// The kernel never applies `RLIMIT_NPROC` to root (uid 0), not even in a
/// user namespace of its own: a daemon running as root cannot bound a
/// tenant's processes, so it refuses unless the operator set
/// `max_processes = 0` (no bound) knowingly.
pub fn root_refusal(root: bool, cfg: &IsolationConfig) -> Option<String> {
    (root && cfg.limits.max_processes > 0).then(|| {
        "[isolation] mode = \"sandbox\": the daemon runs as root, and the kernel never bounds root's processes (RLIMIT_NPROC), so [isolation.limits] max_processes cannot hold; run the daemon as an unprivileged user (deploy/ does) or set max_processes = 0 to run without a process bound".to_string()
    })
}

/// The helper, confining a shell that exits 0 at once.
fn trial(cfg: &IsolationConfig, helper: &Path, network: Network) -> Result<(), String> {
    let policy = Policy {
        read: super::SYSTEM_READ.iter().map(Into::into).collect(),
        network,
        connect: cfg.provider_ports.clone(),
        limits: cfg.limits.to_policy(),
        user_namespace: true,
        ..Policy::default()
    };
    let out = std::process::Command::new(helper)
        .arg(super::SUBCOMMAND)
        .args(policy.to_args())
        .args(["--", "/bin/sh", "-c", "exit 0"])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run the sandbox helper {}: {e}", helper.display()))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "[isolation] mode = \"sandbox\": a trial of the sandbox failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_refused_a_process_bound_it_cannot_have() {
        let mut cfg = IsolationConfig::default();
        let refusal = root_refusal(true, &cfg).unwrap();
        assert!(refusal.contains("RLIMIT_NPROC"), "{refusal}");
        assert!(root_refusal(false, &cfg).is_none());
        cfg.limits.max_processes = 0;
        assert!(root_refusal(true, &cfg).is_none());
    }
}
