//! The `sandbox-exec` helper on plain shell commands, with the policy the
//! daemon gives a tenant's server (`sandbox::tenant_policy`): each attack a
//! hostile tenant's tools could try fails, and is shown to succeed
//! unconfined (so the refusal is the sandbox's, not the file modes'), while
//! the tenant's own work succeeds.
//!
//! Run as root, the commands run as `nobody` (setpriv): the kernel exempts
//! root from `RLIMIT_NPROC`, and the daemon refuses to promise a process
//! bound as root (`sandbox::probe::root_refusal`).

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use opencode_nats_bridge::config::IsolationConfig;
use opencode_nats_bridge::sandbox::{self, Tenant};

use crate::support::daemon::BIN;
use crate::support::tenant_user;

/// A workspaces root with two tenants, a daemon config beside them, and a
/// victim process outside the sandbox.
struct Lab {
    _dir: tempfile::TempDir,
    base: PathBuf,
    alice: PathBuf,
    bob: PathBuf,
    config: PathBuf,
    cfg: IsolationConfig,
}

impl Lab {
    /// `None` (said why) where the sandbox cannot run.
    fn new() -> Option<Lab> {
        if tenant_user::sandbox_unavailable(Path::new(BIN)).is_some() {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        let alice = base.join("ws/alice");
        let bob = base.join("ws/bob");
        let etc = base.join("etc");
        for d in [&alice, &bob, &etc, &alice.join(".tmp")] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(bob.join("notes.txt"), "BOB-SECRET\n").unwrap();
        let config = etc.join("bridge.toml");
        std::fs::write(&config, "[nats]\npassword = \"NATS-SECRET\"\n").unwrap();
        std::fs::write(etc.join("motd"), "hello\n").unwrap();
        // Readable by everyone: only the sandbox may refuse.
        for d in [&base, &base.join("ws"), &bob, &etc] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        tenant_user::give(&alice);
        let mut cfg = IsolationConfig::default();
        cfg.read.push(etc.clone());
        cfg.daemon_config = Some(config.clone());
        cfg.limits.max_processes = 32;
        Some(Lab {
            _dir: dir,
            base,
            alice,
            bob,
            config,
            cfg,
        })
    }

    /// A command as the tenant's user (nobody when the tests run as root).
    fn command(&self, program: &str) -> Command {
        let prefix = tenant_user::prefix();
        let mut cmd = Command::new(prefix.first().copied().unwrap_or(program));
        if !prefix.is_empty() {
            cmd.args(&prefix[1..]).arg(program);
        }
        cmd.env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .current_dir(&self.alice)
            .stdin(Stdio::null());
        cmd
    }

    /// `sh -c script` confined as alice's server would be (`bind` its
    /// port), or not.
    fn sh(&self, confined: bool, script: &str) -> Output {
        let mut cmd = if confined {
            let tenant = Tenant {
                root: &self.alice,
                tmp: &self.alice.join(".tmp"),
                binary: Path::new("/bin/sh"),
                port: 1,
                extra_read: &[],
            };
            let policy = sandbox::tenant_policy(&self.cfg, &tenant);
            let mut c = self.command(BIN);
            c.arg(sandbox::SUBCOMMAND).args(policy.to_args()).arg("--");
            c.args(["/bin/sh", "-c", script]);
            c
        } else {
            let mut c = self.command("/bin/sh");
            c.args(["-c", script]);
            c
        };
        cmd.output().unwrap()
    }

    /// A process of the same user outside the sandbox, with a secret in
    /// its environment.
    fn victim(&self) -> Victim {
        let mut cmd = self.command("sleep");
        cmd.arg("120").env("VICTIM_SECRET", "ENV-SECRET");
        let child = cmd.spawn().unwrap();
        // Until `setpriv` (as root) has become `sleep` as the tenant's user,
        // its /proc entries are root's: wait for the exec.
        let cmdline = format!("/proc/{}/cmdline", child.id());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !std::fs::read(&cmdline).is_ok_and(|c| c.starts_with(b"sleep")) {
            assert!(std::time::Instant::now() < deadline, "the victim never ran");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Victim(child)
    }
}

struct Victim(Child);

impl Drop for Victim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The attack succeeds unconfined (printing `leak`) and fails confined
/// with `refusal`, printing nothing of `leak`.
fn refused(lab: &Lab, script: &str, leak: &str, refusal: &str) {
    let open = lab.sh(false, script);
    assert!(
        String::from_utf8_lossy(&open.stdout).contains(leak),
        "unconfined, `{script}` should work:\n{}",
        text(&open)
    );
    let out = lab.sh(true, script);
    let all = text(&out);
    assert!(!all.contains(leak), "confined, `{script}` leaked:\n{all}");
    assert!(all.contains(refusal), "confined, `{script}`:\n{all}");
}

#[test]
fn another_tenants_root_and_the_daemon_config_are_unreadable() {
    let Some(lab) = Lab::new() else { return };
    let bob = lab.bob.join("notes.txt");
    refused(
        &lab,
        &format!("cat {}", bob.display()),
        "BOB-SECRET",
        "Permission denied",
    );
    refused(
        &lab,
        &format!("ls {}", lab.bob.display()),
        "notes.txt",
        "Permission denied",
    );
    refused(
        &lab,
        &format!("cat {}", lab.config.display()),
        "NATS-SECRET",
        "Permission denied",
    );
    // The rest of the directory the config sits in stays readable.
    let motd = lab.sh(true, &format!("cat {}/etc/motd", lab.base.display()));
    assert!(out_has(&motd, "hello"), "{}", text(&motd));
}

#[test]
fn another_process_environment_is_unreadable_and_it_cannot_be_signalled() {
    let Some(lab) = Lab::new() else { return };
    let mut victim = lab.victim();
    let pid = victim.0.id();
    let environ = format!("tr '\\0' '\\n' < /proc/{pid}/environ");
    refused(&lab, &environ, "ENV-SECRET", "Permission denied");
    let out = lab.sh(true, &format!("kill -TERM {pid} && echo KILLED"));
    assert!(!out_has(&out, "KILLED"), "{}", text(&out));
    assert!(
        text(&out).contains("Operation not permitted"),
        "{}",
        text(&out)
    );
    assert!(
        victim.0.try_wait().unwrap().is_none(),
        "the victim was killed"
    );
    // Unconfined, the same user may (shown last: it ends the victim).
    let open = lab.sh(false, &format!("kill -0 {pid} && echo ALIVE"));
    assert!(out_has(&open, "ALIVE"), "{}", text(&open));
}

#[test]
fn writes_outside_the_root_fail_and_leave_nothing() {
    let Some(lab) = Lab::new() else { return };
    for target in [lab.base.join("outside.txt"), lab.bob.join("planted.txt")] {
        if tenant_user::is_root() {
            // Writable by nobody, so that only the sandbox refuses.
            let dir = target.parent().unwrap();
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let out = lab.sh(true, &format!("echo PWNED > {}", target.display()));
        assert!(text(&out).contains("Permission denied"), "{}", text(&out));
        assert!(!target.exists(), "{} was written", target.display());
        let open = lab.sh(false, &format!("echo PWNED > {}", target.display()));
        assert!(open.status.success(), "{}", text(&open));
        assert!(target.exists());
    }
    let out = lab.sh(true, "echo PWNED > /tmp/opencode-nats-bridge-sandbox-test");
    assert!(text(&out).contains("Permission denied"), "{}", text(&out));
}

#[test]
fn tcp_reaches_the_provider_port_and_nothing_else() {
    let Some(mut lab) = Lab::new() else { return };
    let provider = TcpListener::bind("127.0.0.1:0").unwrap();
    let forbidden = TcpListener::bind("127.0.0.1:0").unwrap();
    forbidden.set_nonblocking(true).unwrap();
    lab.cfg.provider_ports = vec![provider.local_addr().unwrap().port()];
    let connect = |port: u16| {
        format!("python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=5); print('CONNECTED')\"")
    };
    let port = forbidden.local_addr().unwrap().port();
    let out = lab.sh(true, &connect(port));
    assert!(!out_has(&out, "CONNECTED"), "{}", text(&out));
    assert!(text(&out).contains("PermissionError"), "{}", text(&out));
    assert!(
        forbidden.accept().is_err(),
        "the forbidden port saw a connection"
    );
    let out = lab.sh(true, &connect(provider.local_addr().unwrap().port()));
    assert!(out_has(&out, "CONNECTED"), "{}", text(&out));
    let open = lab.sh(false, &connect(port));
    assert!(out_has(&open, "CONNECTED"), "{}", text(&open));
}

#[test]
fn abstract_unix_sockets_outside_are_unreachable() {
    use std::os::linux::net::SocketAddrExt;
    let Some(lab) = Lab::new() else { return };
    let name = format!("ocnb-sandbox-test-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
    let listener = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
    listener.set_nonblocking(true).unwrap();
    let connect = format!("python3 -c \"import socket; s = socket.socket(socket.AF_UNIX); s.connect('\\0{name}'); print('CONNECTED')\"");
    let out = lab.sh(true, &connect);
    assert!(!out_has(&out, "CONNECTED"), "{}", text(&out));
    assert!(text(&out).contains("PermissionError"), "{}", text(&out));
    assert!(listener.accept().is_err(), "the socket saw a connection");
    let open = lab.sh(false, &connect);
    assert!(out_has(&open, "CONNECTED"), "{}", text(&open));
}

#[test]
fn a_fork_bomb_stops_at_max_processes() {
    let Some(lab) = Lab::new() else { return };
    let bomb = "python3 -c \"
import os, time
n = 0
try:
    for i in range(200):
        if os.fork() == 0:
            time.sleep(2)
            os._exit(0)
        n += 1
    print('FORKED', n)
except OSError as e:
    print('STOPPED', n, e)
\"";
    let out = lab.sh(true, bomb);
    let all = text(&out);
    assert!(all.contains("STOPPED"), "{all}");
    assert!(all.contains("Resource temporarily unavailable"), "{all}");
    let forked: u32 = all
        .split("STOPPED ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(forked < 32, "{all}");
    let open = lab.sh(false, bomb);
    assert!(out_has(&open, "FORKED 200"), "{}", text(&open));
}

#[test]
fn its_own_work_succeeds() {
    let Some(lab) = Lab::new() else { return };
    let script = "set -e
echo one > notes.md
sed -i 's/one/two/' notes.md
grep -q two notes.md
mkdir -p src && echo 'print(6*7)' > src/main.py
python3 src/main.py
python3 -c 'import sys; print(sys.version_info[0])'
git init -q repo && git -C repo status --short && echo GIT-OK
t=$(mktemp) && echo tmp > \"$t\" && cat \"$t\"
ls /usr/bin/env >/dev/null && head -c 4 /etc/passwd && echo
echo DONE";
    let out = lab.sh(true, script);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    for want in ["42", "3", "GIT-OK", "tmp", "DONE"] {
        assert!(out_has(&out, want), "missing {want}:\n{all}");
    }
    assert_eq!(
        std::fs::read_to_string(lab.alice.join("notes.md")).unwrap(),
        "two\n"
    );
    assert!(lab.alice.join("repo/.git").is_dir());
}

#[test]
fn a_policy_it_cannot_read_runs_nothing() {
    let Some(lab) = Lab::new() else { return };
    let marker = lab.alice.join("ran");
    let out = Command::new(BIN)
        .args([sandbox::SUBCOMMAND, "--read", "usr", "--", "/bin/sh", "-c"])
        .arg(format!("touch {}", marker.display()))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(i32::from(sandbox::EXIT_SANDBOX)),
        "{}",
        text(&out)
    );
    assert!(
        text(&out).contains("must be an absolute path"),
        "{}",
        text(&out)
    );
    assert!(!marker.exists());
}

/// The tenant may write its root, so it may replace its `TMPDIR` there by a
/// symbolic link to another tenant's root: the helper then refuses to run
/// (granting the link's target would hand that root over), and nothing
/// reaches the other root.
#[test]
fn a_tmp_dir_replaced_by_a_link_to_another_root_is_refused() {
    let Some(lab) = Lab::new() else { return };
    let tmp = lab.alice.join(".tmp");
    std::fs::remove_dir(&tmp).unwrap();
    std::os::unix::fs::symlink(&lab.bob, &tmp).unwrap();
    let marker = lab.bob.join("planted");
    let out = lab.sh(true, &format!("echo x > {}", tmp.join("planted").display()));
    assert_eq!(
        out.status.code(),
        Some(i32::from(sandbox::EXIT_SANDBOX)),
        "{}",
        text(&out)
    );
    assert!(
        text(&out).contains("outside the writable roots"),
        "{}",
        text(&out)
    );
    assert!(
        !marker.exists(),
        "the link let the tenant write another root"
    );
}

fn out_has(out: &Output, want: &str) -> bool {
    String::from_utf8_lossy(&out.stdout).contains(want)
}
