//! Issue 21's test of `[isolation] mode = "sandbox"`: the daemon binary,
//! the real OpenCode 1.18.34 per tenant, the fake LLM, two tenants with
//! bash, edit and write allowed. The hostile tenant's agent (its bash
//! called by the fake LLM) tries each attack: every one fails (the
//! `tool_result` shows the refusal, markers prove nothing was read or
//! written) while its own work succeeds, and the other tenant's concurrent
//! turn ends `final` with its exact text.
//!
//! Run as root, the daemon runs as `nobody` (support::tenant_user).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::process::Child;

use crate::support::bridge::{assert_well_formed, request, terminal};
use crate::support::daemon::{spawn_serving, BIN};
use crate::support::fake_llm::{self, FakeLlm};
use crate::support::nats::{client, collect_until_terminal, subscribe_ready, NatsServer, Reply};
use crate::support::real_opencode::{default_config, isolated_env, opencode_bin, IsolatedEnv};
use crate::support::tenant_user;

/// In the daemon's environment; no tenant may see it.
const DAEMON_SECRET: &str = "daemon-secret-5e7a";
/// In the daemon's config file; no tenant may read it.
const CONFIG_SECRET: &str = "config-secret-91c2";
/// In the victim tenant's workspace.
const ALICE_SECRET: &str = "alice-secret-0d44";

struct Daemon {
    child: Child,
    _env: IsolatedEnv,
    _log: tokio::sync::mpsc::UnboundedReceiver<String>,
    root: PathBuf,
    config: PathBuf,
}

fn port_of(url: &str) -> u16 {
    url.trim_end_matches("/v1")
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

async fn start_daemon(nats_url: &str, llm: &FakeLlm) -> Daemon {
    let env = isolated_env(&default_config(&llm.base_url()));
    let base = env.tmp.path().canonicalize().unwrap();
    let root = base.join("workspaces");
    let config = base.join("bridge.toml");
    let rules: String = ["alice", "mallory"]
        .iter()
        .flat_map(|t| {
            ["bash", "edit", "write", "external_directory"].map(move |p| {
                format!("  {{ tenant = \"{t}\", permission = \"{p}\", action = \"allow\" }},\n")
            })
        })
        .collect();
    let toml = format!(
        "# {CONFIG_SECRET}\n[isolation]\nmode = \"sandbox\"\npass_env = [\"OPENCODE_DISABLE_*\", \"OPENCODE_PURE\", \"SHELL\"]\nprovider_ports = [{}]\n[isolation.limits]\nmax_processes = 96\n[permissions]\nrules = [\n{rules}]\n",
        port_of(&llm.url())
    );
    std::fs::write(&config, toml).unwrap();
    // Open to everyone: only the sandbox may refuse.
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
    tenant_user::give(&base);
    let mut cmd = tenant_user::command(Path::new(BIN));
    cmd.arg("run")
        .arg("--config")
        .arg(&config)
        .env_clear()
        .envs(env.vars.iter().map(|(k, v)| (k.as_str(), v.as_os_str())))
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("OPENCODE_BRIDGE__NATS__URL", nats_url)
        .env("OPENCODE_BRIDGE__OPENCODE__BINARY", opencode_bin())
        .env("OPENCODE_BRIDGE__OPENCODE__DIRECTORY", &env.work_dir)
        .env("OPENCODE_BRIDGE__WORKSPACES__ROOT", &root)
        .env("OPENCODE_BRIDGE__TURN__IDLE_TIMEOUT", "60s")
        .env("OPENCODE_BRIDGE__SHUTDOWN__GRACE", "5s")
        .env("NATS_CREDS_SECRET", DAEMON_SECRET)
        .env("RUST_LOG", "info");
    let (child, log) = spawn_serving(cmd, Duration::from_secs(90)).await;
    Daemon {
        child,
        _env: env,
        _log: log,
        root,
        config,
    }
}

/// The `opencode serve` process working in `dir` (not its reaper), its
/// port and its password (read as the test, which may).
fn server_in(dir: &Path) -> (u32, u16, String) {
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if std::fs::read_link(entry.path().join("cwd")).ok().as_deref() != Some(dir) {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.first().is_some_and(|a| a.ends_with("sh")) || !args.iter().any(|a| a == "serve") {
            continue;
        }
        let port = args.iter().skip_while(|a| *a != "--port").nth(1).unwrap();
        let environ = std::fs::read(entry.path().join("environ")).unwrap();
        let password = environ
            .split(|b| *b == 0)
            .filter_map(|v| std::str::from_utf8(v).ok())
            .find_map(|v| v.strip_prefix("OPENCODE_SERVER_PASSWORD="))
            .unwrap()
            .to_string();
        return (pid, port.parse().unwrap(), password);
    }
    panic!("no opencode server works in {}", dir.display());
}

/// `command` as mallory's bash tool: its one `tool_result`, after a `final`
/// well before any deadline.
async fn bash(c: &async_nats::Client, command: &str) -> String {
    let started = Instant::now();
    let r = request(
        c,
        "opencode.prompt.mallory.attacks",
        &format!("[tool:bash {command}] go"),
        Duration::from_secs(90),
    )
    .await;
    assert_well_formed(&r);
    assert_eq!(terminal(&r)["kind"], "final", "`{command}`: {r:#?}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "`{command}`: {:?}",
        started.elapsed()
    );
    let results: Vec<&Value> = r
        .iter()
        .map(|(_, v)| v)
        .filter(|v| v["kind"] == "tool_result")
        .collect();
    assert_eq!(results.len(), 1, "`{command}`: {r:#?}");
    results[0]["result"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn refused(out: &str, leak: &str, refusal: &str, what: &str) {
    assert!(!out.contains(leak), "{what} leaked: {out}");
    assert!(out.contains(refusal), "{what} not refused: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_tenant_with_tools_reaches_nothing_of_the_other_or_the_host() {
    if tenant_user::sandbox_unavailable(Path::new(BIN)).is_some() {
        return;
    }
    let nats = NatsServer::start();
    let llm = FakeLlm::start().await;
    let mut d = start_daemon(&nats.url(), &llm).await;
    let daemon_pid = d.child.id().unwrap();
    let c = client(&nats.url()).await;

    // Alice's server runs, with a file and sessions of hers.
    let r = request(
        &c,
        "opencode.prompt.alice.a1",
        "hello",
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(terminal(&r)["kind"], "final", "{r:#?}");
    let alice = d.root.join("alice");
    std::fs::write(alice.join("secret.txt"), ALICE_SECRET).unwrap();
    tenant_user::give(&alice.join("secret.txt"));
    let (alice_pid, alice_port, alice_password) = server_in(&alice);

    // Alice's turn runs while mallory attacks.
    let inbox = c.new_inbox();
    let mut alice_sub = subscribe_ready(&c, inbox.clone()).await;
    c.publish_with_reply("opencode.prompt.alice.a1", inbox, "[slow] count".into())
        .await
        .unwrap();

    let out = bash(&c, &format!("cat {}/secret.txt", alice.display())).await;
    refused(&out, ALICE_SECRET, "Permission denied", "alice's workspace");
    let storage = alice.join(".opencode/data");
    let out = bash(&c, &format!("ls -R {}", storage.display())).await;
    refused(
        &out,
        "storage",
        "Permission denied",
        "alice's OpenCode storage",
    );
    let out = bash(&c, &format!("cat {}", d.config.display())).await;
    refused(
        &out,
        CONFIG_SECRET,
        "Permission denied",
        "the daemon's config",
    );
    let out = bash(&c, &format!("cat /proc/{daemon_pid}/environ")).await;
    refused(
        &out,
        DAEMON_SECRET,
        "Permission denied",
        "the daemon's environ",
    );
    let out = bash(&c, &format!("cat /proc/{alice_pid}/environ")).await;
    refused(
        &out,
        &alice_password,
        "Permission denied",
        "alice's server environ",
    );
    // A request to alice's server, with her password even.
    let request_alice = format!("python3 -c \"import http.client, base64; c = http.client.HTTPConnection('127.0.0.1', {alice_port}, timeout=5); c.request('GET', '/session', headers={{'Authorization': 'Basic ' + base64.b64encode(b'opencode:{alice_password}').decode()}}); print(c.getresponse().read())\"");
    let out = bash(&c, &request_alice).await;
    refused(&out, "ses_", "Permission denied", "alice's OpenCode port");
    let planted = alice.join("planted.txt");
    let out = bash(&c, &format!("echo PWNED > {}", planted.display())).await;
    refused(&out, "PWNED", "Permission denied", "a write outside");
    assert!(!planted.exists(), "mallory wrote into alice's root");
    let out = bash(&c, "echo PWNED > /tmp/mallory-was-here").await;
    refused(&out, "PWNED", "Permission denied", "a write to /tmp");
    assert!(!Path::new("/tmp/mallory-was-here").exists());
    let out = bash(&c, &format!("kill -9 {daemon_pid} && echo KILLED")).await;
    refused(
        &out,
        "KILLED",
        "Operation not permitted",
        "killing the daemon",
    );
    let bomb = "python3 -c \"exec('import os,time\\nn=0\\ntry:\\n for i in range(300):\\n  if os.fork()==0:\\n   time.sleep(1)\\n   os._exit(0)\\n  n+=1\\n print(\\\"FORKED\\\",n)\\nexcept OSError as e:\\n print(\\\"STOPPED\\\",n,e)')\"";
    let out = bash(&c, bomb).await;
    refused(
        &out,
        "FORKED",
        "Resource temporarily unavailable",
        "a fork bomb",
    );

    // Its own work.
    let own = "mkdir -p proj && cd proj && echo hi > a.txt && sed -i s/hi/ho/ a.txt && git init -q && python3 -c 'print(6*7)' && cat a.txt && head -c 5 /etc/passwd && echo && echo OWN-OK";
    let out = bash(&c, own).await;
    for want in ["42", "ho", "root:", "OWN-OK"] {
        assert!(out.contains(want), "own work lacks {want}: {out}");
    }
    let proj = d.root.join("mallory/proj");
    assert_eq!(std::fs::read_to_string(proj.join("a.txt")).unwrap(), "ho\n");
    assert!(proj.join(".git").is_dir());

    // Alice's turn, untouched; the daemon alive.
    let replies: Vec<Reply> = collect_until_terminal(&mut alice_sub, Duration::from_secs(90)).await;
    assert_well_formed(&replies);
    let t = terminal(&replies);
    assert_eq!(t["kind"], "final", "{replies:#?}");
    assert_eq!(t["content"], fake_llm::slow_reply(), "{t}");
    assert!(d.child.try_wait().unwrap().is_none(), "the daemon died");
}
