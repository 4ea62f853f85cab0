//! What a sandboxed process may do, and how the daemon hands it to the
//! `sandbox-exec` helper: typed [`Policy`] <-> command-line arguments, and
//! which kernel features a policy needs ([`missing`]). Pure: no I/O.

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;

/// Where a sandboxed process may open TCP connections.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Network {
    /// TCP `connect` only to these ports (any host: Landlock rules are per
    /// port), TCP `bind` only to these. UDP is not restricted.
    #[default]
    Provider,
    /// TCP unrestricted.
    On,
}

/// Resource bounds (`setrlimit`, soft = hard), each unset = inherited.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Limits {
    /// `RLIMIT_NPROC`: processes and threads.
    pub processes: Option<u64>,
    /// `RLIMIT_NOFILE`: open file descriptors per process.
    pub open_files: Option<u64>,
    /// `RLIMIT_FSIZE`: the largest file a process may write, in bytes.
    pub file_size: Option<u64>,
    /// `RLIMIT_AS`: address space per process, in bytes.
    pub address_space: Option<u64>,
}

/// The whole confinement of one sandboxed process and everything it starts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Policy {
    /// Hierarchies it may read and execute from.
    pub read: Vec<PathBuf>,
    /// Paths under `read` it may not read (each carved out of its parent:
    /// the parent's other entries stay readable).
    pub hide: Vec<PathBuf>,
    /// Hierarchies it may read, write, create in, remove from and execute
    /// from.
    pub write: Vec<PathBuf>,
    /// Device files (or directories of them) it may read, write and send
    /// ioctls to (`/dev/null`, `/dev/tty`, ...).
    pub devices: Vec<PathBuf>,
    /// Its `TMPDIR` (also writable).
    pub tmp: Option<PathBuf>,
    /// Its `HOME`.
    pub home: Option<PathBuf>,
    /// TCP.
    pub network: Network,
    /// TCP ports it may connect to (with [`Network::Provider`]).
    pub connect: Vec<u16>,
    /// TCP ports it may bind (with [`Network::Provider`]).
    pub bind: Vec<u16>,
    /// Resource bounds.
    pub limits: Limits,
    /// Run in a user namespace of its own: no capability over anything
    /// outside it, and `RLIMIT_NPROC` counts this sandbox's processes only.
    pub user_namespace: bool,
}

/// Arguments the helper does not understand.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("sandbox-exec: unknown argument `{0}`")]
    Unknown(String),
    #[error("sandbox-exec: `{0}` needs a value")]
    NoValue(&'static str),
    #[error("sandbox-exec: `{flag}` {value:?}: {reason}")]
    BadValue {
        flag: &'static str,
        value: String,
        reason: String,
    },
    #[error("sandbox-exec: no command after `--`")]
    NoCommand,
    #[error("sandbox-exec: {0} must be an absolute path")]
    Relative(PathBuf),
}

impl Policy {
    /// The helper's arguments for this policy, before `--` and the command.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut out: Vec<OsString> = Vec::new();
        let mut paths = |flag: &str, list: &[PathBuf]| {
            for p in list {
                out.push(flag.into());
                out.push(p.into());
            }
        };
        paths("--read", &self.read);
        paths("--hide", &self.hide);
        paths("--write", &self.write);
        paths("--device", &self.devices);
        paths("--tmp", self.tmp.as_slice());
        paths("--home", self.home.as_slice());
        out.push("--network".into());
        out.push(match self.network {
            Network::Provider => "provider".into(),
            Network::On => "on".into(),
        });
        for (flag, ports) in [("--connect", &self.connect), ("--bind", &self.bind)] {
            for p in ports {
                out.push(flag.into());
                out.push(p.to_string().into());
            }
        }
        let l = &self.limits;
        for (flag, v) in [
            ("--max-processes", l.processes),
            ("--max-open-files", l.open_files),
            ("--max-file-size", l.file_size),
            ("--max-address-space", l.address_space),
        ] {
            if let Some(v) = v {
                out.push(flag.into());
                out.push(v.to_string().into());
            }
        }
        if self.user_namespace {
            out.push("--user-namespace".into());
        }
        out
    }

    /// Reads the helper's arguments (what [`to_args`](Self::to_args)
    /// wrote, then `--` and the command).
    pub fn parse_args(args: &[OsString]) -> Result<(Policy, Vec<OsString>), PolicyError> {
        let mut p = Policy::default();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let flag = arg.to_string_lossy();
            if flag == "--" {
                let command: Vec<OsString> = it.cloned().collect();
                if command.is_empty() {
                    return Err(PolicyError::NoCommand);
                }
                return Ok((p, command));
            }
            if flag == "--user-namespace" {
                p.user_namespace = true;
                continue;
            }
            let flag = known_flag(&flag).ok_or_else(|| PolicyError::Unknown(flag.into()))?;
            let value = it.next().ok_or(PolicyError::NoValue(flag))?;
            p.set(flag, value)?;
        }
        Err(PolicyError::NoCommand)
    }

    fn set(&mut self, flag: &'static str, value: &OsStr) -> Result<(), PolicyError> {
        let path = || {
            let p = PathBuf::from(value);
            if p.is_absolute() {
                Ok(p)
            } else {
                Err(PolicyError::Relative(p))
            }
        };
        let bad = |reason: String| PolicyError::BadValue {
            flag,
            value: value.to_string_lossy().into(),
            reason,
        };
        let number = || {
            value
                .to_string_lossy()
                .parse::<u64>()
                .map_err(|e| bad(e.to_string()))
        };
        let port = || {
            value
                .to_string_lossy()
                .parse::<u16>()
                .map_err(|e| bad(e.to_string()))
        };
        match flag {
            "--read" => self.read.push(path()?),
            "--hide" => self.hide.push(path()?),
            "--write" => self.write.push(path()?),
            "--device" => self.devices.push(path()?),
            "--tmp" => self.tmp = Some(path()?),
            "--home" => self.home = Some(path()?),
            "--network" => {
                self.network = match value.to_str() {
                    Some("provider") => Network::Provider,
                    Some("on") => Network::On,
                    _ => return Err(bad("expected `provider` or `on`".into())),
                }
            }
            "--connect" => self.connect.push(port()?),
            "--bind" => self.bind.push(port()?),
            "--max-processes" => self.limits.processes = Some(number()?),
            "--max-open-files" => self.limits.open_files = Some(number()?),
            "--max-file-size" => self.limits.file_size = Some(number()?),
            "--max-address-space" => self.limits.address_space = Some(number()?),
            _ => return Err(PolicyError::Unknown(flag.into())),
        }
        Ok(())
    }
}

/// The flags that take a value, as `'static` names.
fn known_flag(flag: &str) -> Option<&'static str> {
    [
        "--read",
        "--hide",
        "--write",
        "--device",
        "--tmp",
        "--home",
        "--network",
        "--connect",
        "--bind",
        "--max-processes",
        "--max-open-files",
        "--max-file-size",
        "--max-address-space",
    ]
    .into_iter()
    .find(|f| *f == flag)
}

/// A kernel feature the sandbox relies on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    /// The Landlock ABI version that brought it.
    pub abi: u8,
    /// What it is, for the refusal message.
    pub what: &'static str,
}

/// Every Landlock feature the `sandbox` mode uses, oldest first.
pub const FEATURES: &[Feature] = &[
    Feature {
        abi: 1,
        what: "Landlock filesystem rules (ABI 1, Linux 5.13)",
    },
    Feature {
        abi: 2,
        what: "Landlock control of renames and links across directories (ABI 2, Linux 5.19)",
    },
    Feature {
        abi: 3,
        what: "Landlock control of truncation (ABI 3, Linux 6.2)",
    },
    Feature {
        abi: 4,
        what: "Landlock TCP bind/connect rules, for [isolation] network = \"provider\" (ABI 4, Linux 6.7)",
    },
    Feature {
        abi: 5,
        what: "Landlock control of device ioctls (ABI 5, Linux 6.10)",
    },
    Feature {
        abi: 6,
        what: "Landlock scoping of signals and abstract Unix sockets (ABI 6, Linux 6.12)",
    },
];

/// What a kernel with Landlock ABI `abi` (0: none) lacks for `network`;
/// empty when it enforces everything the mode promises.
pub fn missing(abi: u8, network: &Network) -> Vec<Feature> {
    FEATURES
        .iter()
        .filter(|f| f.abi > abi)
        .filter(|f| !(f.abi == 4 && *network == Network::On))
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn args_round_trip() {
        let p = Policy {
            read: vec!["/usr".into(), "/etc".into()],
            hide: vec!["/etc/shadow".into()],
            write: vec!["/srv/ws/alice".into()],
            devices: vec!["/dev/null".into()],
            tmp: Some("/srv/ws/alice/.opencode/tmp".into()),
            home: Some("/srv/ws/alice".into()),
            network: Network::Provider,
            connect: vec![443, 11434],
            bind: vec![40001],
            limits: Limits {
                processes: Some(256),
                open_files: Some(4096),
                file_size: Some(1 << 30),
                address_space: None,
            },
            user_namespace: true,
        };
        let mut args = p.to_args();
        args.extend(os(&["--", "opencode", "serve"]));
        let (back, cmd) = Policy::parse_args(&args).unwrap();
        assert_eq!(back, p);
        assert_eq!(cmd, os(&["opencode", "serve"]));
    }

    #[test]
    fn bad_arguments_are_named() {
        assert_eq!(
            Policy::parse_args(&os(&["--read", "usr", "--", "true"])),
            Err(PolicyError::Relative("usr".into()))
        );
        assert_eq!(
            Policy::parse_args(&os(&["--frobnicate", "--", "true"])),
            Err(PolicyError::Unknown("--frobnicate".into()))
        );
        assert_eq!(
            Policy::parse_args(&os(&["--read", "/usr"])),
            Err(PolicyError::NoCommand)
        );
        assert_eq!(
            Policy::parse_args(&os(&["--read", "/usr", "--"])),
            Err(PolicyError::NoCommand)
        );
        assert_eq!(
            Policy::parse_args(&os(&["--connect"])),
            Err(PolicyError::NoValue("--connect"))
        );
        let err = Policy::parse_args(&os(&["--connect", "70000", "--", "true"])).unwrap_err();
        assert!(
            matches!(
                err,
                PolicyError::BadValue {
                    flag: "--connect",
                    ..
                }
            ),
            "{err}"
        );
        let err = Policy::parse_args(&os(&["--network", "off", "--", "true"])).unwrap_err();
        assert!(err.to_string().contains("`provider` or `on`"), "{err}");
    }

    #[test]
    fn a_kernel_without_scoping_is_refused_by_name() {
        let lacks = missing(5, &Network::Provider);
        assert_eq!(lacks.len(), 1);
        assert!(lacks[0].what.contains("signals"), "{lacks:?}");
        assert!(missing(6, &Network::Provider).is_empty());
        assert!(missing(7, &Network::On).is_empty());
    }

    #[test]
    fn tcp_rules_are_needed_only_for_the_provider_network() {
        let provider: Vec<u8> = missing(3, &Network::Provider)
            .iter()
            .map(|f| f.abi)
            .collect();
        assert_eq!(provider, vec![4, 5, 6]);
        let on: Vec<u8> = missing(3, &Network::On).iter().map(|f| f.abi).collect();
        assert_eq!(on, vec![5, 6]);
        assert_eq!(missing(0, &Network::On).len(), FEATURES.len() - 1);
    }
}
