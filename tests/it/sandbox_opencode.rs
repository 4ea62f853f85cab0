//! The real OpenCode 1.18.34 confined by `sandbox-exec` with a tenant's
//! policy, driven through the bridge over NATS, its bash tool called by the
//! fake LLM: every tool OpenCode runs inherits the confinement. Each attack
//! a hostile tenant's agent tries fails (the `tool_result` shows the
//! refusal, markers prove nothing was read or written), its own work
//! succeeds.
//!
//! Run as root, OpenCode runs as `nobody` (setpriv): the kernel exempts root
//! from `RLIMIT_NPROC`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use opencode_nats_bridge::config::IsolationConfig;
use opencode_nats_bridge::protocol::interactive::{Action, Rule};
use opencode_nats_bridge::sandbox::{self, Tenant};
use serde_json::{json, Value};
use tokio::process::Child;

use crate::support::bridge::{assert_well_formed, request, terminal, test_config, Bridge};
use crate::support::daemon::BIN;
use crate::support::fake_llm::FakeLlm;
use crate::support::nats::{client, NatsServer, Reply};
use crate::support::ops::free_port;
use crate::support::real_opencode::{default_config, isolated_env, opencode_bin, IsolatedEnv};
use crate::support::tenant_user;

/// `[isolation.limits] max_processes` of the sandboxed server.
const MAX_PROCESSES: u64 = 96;

/// The hostile tenant's sandboxed `opencode serve`, its root, and what
/// lies outside it: another tenant's file, a victim process.
struct Sandboxed {
    child: Child,
    base_url: String,
    password: String,
    env: IsolatedEnv,
    outside: tempfile::TempDir,
}

impl Drop for Sandboxed {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

async fn start_sandboxed(llm: &FakeLlm, nats_port: u16) -> Sandboxed {
    let mut config = default_config(&llm.base_url());
    // Every tool use asks the bridge, as the daemon's own servers do.
    config["permission"] = json!({"*": "ask"});
    let env = isolated_env(&config);
    let root = env.tmp.path().canonicalize().unwrap();
    let tmp = root.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(outside.path().join("alice")).unwrap();
    std::fs::write(outside.path().join("alice/secret.txt"), "ALICE-SECRET\n").unwrap();
    for d in [outside.path(), &outside.path().join("alice")] {
        // Open to everyone: only the sandbox may refuse.
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    tenant_user::give(&root);
    let port = free_port();
    let llm_port: u16 = llm.url().rsplit(':').next().unwrap().parse().unwrap();
    let mut iso = IsolationConfig {
        provider_ports: vec![llm_port],
        ..IsolationConfig::default()
    };
    iso.limits.max_processes = MAX_PROCESSES;
    assert_ne!(llm_port, nats_port);
    let binary = opencode_bin().canonicalize().unwrap();
    let tenant = Tenant {
        root: &root,
        tmp: &tmp,
        binary: &binary,
        port,
        extra_read: &[],
    };
    let policy = sandbox::tenant_policy(&iso, &tenant);
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let mut cmd = tenant_user::command(Path::new(BIN));
    cmd.arg(sandbox::SUBCOMMAND)
        .args(policy.to_args())
        .arg("--")
        .arg(&binary)
        .args(["serve", "--hostname", "127.0.0.1", "--port"])
        .arg(port.to_string())
        .current_dir(&env.work_dir)
        .env_clear()
        .envs(env.vars.iter().map(|(k, v)| (k.as_str(), v.as_os_str())))
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("OPENCODE_SERVER_PASSWORD", &password)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    let child = cmd.spawn().unwrap();
    let mut s = Sandboxed {
        child,
        base_url: format!("http://127.0.0.1:{port}"),
        password,
        env,
        outside,
    };
    wait_healthy(&mut s).await;
    s
}

async fn wait_healthy(s: &mut Sandboxed) {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = s.child.try_wait() {
            panic!("the sandboxed opencode exited: {status}");
        }
        let health = http
            .get(format!("{}/global/health", s.base_url))
            .basic_auth("opencode", Some(&s.password))
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        if health.is_ok_and(|r| r.status() == 200) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the sandboxed opencode is not healthy"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs `command` as the hostile tenant's bash tool; the turn's replies
/// and its tool result.
async fn bash(c: &async_nats::Client, command: &str) -> (Vec<Reply>, String) {
    let started = Instant::now();
    let r = request(
        c,
        "opencode.prompt.mallory.c1",
        &format!("[tool:bash {command}] go"),
        Duration::from_secs(90),
    )
    .await;
    assert_well_formed(&r);
    assert_eq!(terminal(&r)["kind"], "final", "`{command}`: {r:#?}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "`{command}` ended by a deadline: {:?}",
        started.elapsed()
    );
    let results: Vec<&Value> = r
        .iter()
        .map(|(_, v)| v)
        .filter(|v| v["kind"] == "tool_result")
        .collect();
    assert_eq!(results.len(), 1, "`{command}`: {r:#?}");
    let result = results[0]["result"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    (r, result)
}

fn refused(result: &str, leak: &str, refusal: &str, what: &str) {
    assert!(!result.contains(leak), "{what} leaked: {result}");
    assert!(result.contains(refusal), "{what}: {result}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_opencode_and_its_tools_stay_in_the_sandbox() {
    if tenant_user::sandbox_unavailable(Path::new(BIN)).is_some() {
        return;
    }
    let nats = NatsServer::start();
    let nats_port: u16 = nats.url().rsplit(':').next().unwrap().parse().unwrap();
    let llm = FakeLlm::start().await;
    let s = start_sandboxed(&llm, nats_port).await;
    let mut cfg = test_config(&nats.url(), &s.base_url, Some(&s.password));
    // Tools on for the tenant: the sandbox, not the policy, must hold.
    cfg.permissions.rules = ["bash", "external_directory"]
        .into_iter()
        .map(|permission| Rule {
            tenant: Some("mallory".into()),
            permission: permission.into(),
            pattern: "*".into(),
            action: Action::Allow,
        })
        .collect();
    cfg.turn.turn_timeout = Duration::from_secs(90);
    let bridge = Bridge::start(cfg).await;
    let c = client(&nats.url()).await;
    let outside = s.outside.path().canonicalize().unwrap();

    // Another tenant's workspace.
    let secret = outside.join("alice/secret.txt");
    let (_, out) = bash(&c, &format!("cat {}", secret.display())).await;
    refused(&out, "ALICE-SECRET", "Permission denied", "another root");

    // A process outside: its environment, a signal.
    let mut victim = tenant_user::command(Path::new("/bin/sleep"));
    victim
        .arg("300")
        .env("VICTIM_SECRET", "ENV-SECRET")
        .kill_on_drop(true);
    let mut victim = victim.spawn().unwrap();
    let pid = victim.id().unwrap();
    let (_, out) = bash(&c, &format!("cat /proc/{pid}/environ")).await;
    refused(&out, "ENV-SECRET", "Permission denied", "environ");
    let (_, out) = bash(&c, &format!("kill -9 {pid} && echo KILLED")).await;
    refused(&out, "KILLED", "Operation not permitted", "kill");
    assert!(
        victim.try_wait().unwrap().is_none(),
        "the victim was killed"
    );

    // Writes outside its root.
    let planted = outside.join("alice/planted.txt");
    let (_, out) = bash(&c, &format!("echo PWNED > {}", planted.display())).await;
    refused(&out, "PWNED", "Permission denied", "write outside");
    assert!(!planted.exists());

    // NATS's port (TCP to anything but the provider's port).
    let connect = format!("python3 -c \"import socket; socket.create_connection(('127.0.0.1', {nats_port}), timeout=5); print('CONNECTED')\"");
    let (_, out) = bash(&c, &connect).await;
    refused(&out, "CONNECTED", "PermissionError", "NATS port");

    // A fork bomb.
    let bomb = "python3 -c \"exec('import os,time\\nn=0\\ntry:\\n for i in range(300):\\n  if os.fork()==0:\\n   time.sleep(1)\\n   os._exit(0)\\n  n+=1\\n print(\\\"FORKED\\\",n)\\nexcept OSError as e:\\n print(\\\"STOPPED\\\",n,e)')\"";
    let (_, out) = bash(&c, bomb).await;
    refused(&out, "FORKED", "STOPPED", "fork bomb");
    assert!(out.contains("Resource temporarily unavailable"), "{out}");

    // Its own work.
    let own = "mkdir -p proj && cd proj && echo hi > a.txt && sed -i s/hi/ho/ a.txt && git init -q && python3 -c 'print(6*7)' && cat a.txt && head -c 5 /etc/passwd && echo && echo OWN-OK";
    let (_, out) = bash(&c, own).await;
    for want in ["42", "ho", "root:", "OWN-OK"] {
        assert!(out.contains(want), "own work lacks {want}: {out}");
    }
    let proj = s.env.work_dir.join("proj");
    assert_eq!(std::fs::read_to_string(proj.join("a.txt")).unwrap(), "ho\n");
    assert!(proj.join(".git").is_dir());
    bridge.stop().await.unwrap();
}
