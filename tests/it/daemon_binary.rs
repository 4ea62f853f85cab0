//! The real binary: `check-config` exit codes, and `run` on the embedded
//! default (the daemon starts `opencode serve` itself), stopped by SIGTERM.

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::support::bridge::{assert_well_formed, request, terminal};
use crate::support::daemon::{spawn_serving, BIN};
use crate::support::fake_llm::{self, FakeLlm};
use crate::support::nats::{client, NatsServer};
use crate::support::real_opencode::{default_config, isolated_env, opencode_bin, IsolatedEnv};

#[test]
fn check_config_accepts_the_example_and_names_what_is_wrong() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let ok = std::process::Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&example)
        .env_remove("OPENCODE_BRIDGE__NATS__URL")
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[turn]\nidle_timout = \"5s\"\n").unwrap();
    let out = std::process::Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("idle_timout"));

    // The environment layer is checked too.
    let out = std::process::Command::new(BIN)
        .args(["check-config"])
        .env("OPENCODE_BRIDGE__TURN__IDLE_TIMEOUT", "soon")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    // `run` refuses a bad config with the same status, before connecting.
    let out = std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
}

struct Daemon {
    child: Child,
    env: IsolatedEnv,
    log: tokio::sync::mpsc::UnboundedReceiver<String>,
}

/// Starts the binary on the embedded default: no OpenCode URL, the
/// daemon spawns `opencode serve` (hermetic env, fake LLM) itself.
async fn start_daemon(nats_url: &str, llm_url: &str, grace: &str) -> Daemon {
    start_daemon_with(nats_url, llm_url, grace, None).await
}

/// As [`start_daemon`], with a config file of `toml` (in the temp dir).
async fn start_daemon_with(
    nats_url: &str,
    llm_url: &str,
    grace: &str,
    toml: Option<&str>,
) -> Daemon {
    let env = isolated_env(&default_config(llm_url));
    let mut cmd = Command::new(BIN);
    cmd.arg("run");
    if let Some(toml) = toml {
        let file = env.tmp.path().join("bridge.toml");
        std::fs::write(&file, toml).unwrap();
        cmd.arg("--config").arg(file);
    }
    cmd.env_clear()
        .envs(env.vars.iter().map(|(k, v)| (k.as_str(), v.as_os_str())))
        .env("OPENCODE_BRIDGE__NATS__URL", nats_url)
        .env("OPENCODE_BRIDGE__OPENCODE__BINARY", opencode_bin())
        .env("OPENCODE_BRIDGE__OPENCODE__DIRECTORY", &env.work_dir)
        .env("OPENCODE_BRIDGE__SHUTDOWN__GRACE", grace)
        .env("OPENCODE_BRIDGE__TURN__IDLE_TIMEOUT", "20s")
        .env("OPENCODE_BRIDGE__OPENCODE__STREAM_STALL_TIMEOUT", "15s")
        .env("RUST_LOG", "info");
    let (child, log) = spawn_serving(cmd, Duration::from_secs(60)).await;
    Daemon { child, env, log }
}

/// Processes whose working directory is `dir` (the embedded OpenCode).
fn processes_in(dir: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if std::fs::read_link(entry.path().join("cwd")).ok().as_deref() == Some(dir) {
            out.push(pid);
        }
    }
    out
}

async fn sigterm_and_wait(d: &mut Daemon) -> std::process::ExitStatus {
    kill(Pid::from_raw(d.child.id().unwrap() as i32), Signal::SIGTERM).unwrap();
    tokio::time::timeout(Duration::from_secs(60), d.child.wait())
        .await
        .expect("the daemon exits after SIGTERM")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_default_serves_then_drains_on_sigterm() {
    let nats = NatsServer::start();
    let llm = FakeLlm::start().await;
    let mut d = start_daemon(&nats.url(), &llm.base_url(), "30s").await;
    let work_dir = d.env.work_dir.canonicalize().unwrap();
    assert!(
        !processes_in(&work_dir).is_empty(),
        "the embedded opencode runs in the work dir"
    );
    let c = client(&nats.url()).await;

    let r = request(
        &c,
        "opencode.prompt",
        "hello embedded",
        Duration::from_secs(60),
    )
    .await;
    assert_well_formed(&r);
    assert_eq!(
        terminal(&r)["content"],
        fake_llm::text_reply("hello embedded")
    );

    // A slow turn in flight when SIGTERM arrives finishes within the grace.
    let inbox = c.new_inbox();
    let mut sub = crate::support::nats::subscribe_ready(&c, inbox.clone()).await;
    c.publish_with_reply("opencode.prompt", inbox, "[slow] count".into())
        .await
        .unwrap();
    // Wait for its first delta, then SIGTERM.
    let first = tokio::time::timeout(Duration::from_secs(30), futures::StreamExt::next(&mut sub))
        .await
        .expect("a first reply")
        .unwrap();
    let mut replies = vec![(
        first.headers.clone(),
        serde_json::from_slice(&first.payload).unwrap(),
    )];
    let status = sigterm_and_wait(&mut d).await;
    replies.extend(
        crate::support::nats::collect_until_terminal(&mut sub, Duration::from_secs(30)).await,
    );
    assert!(status.success(), "exit status {status}");
    assert_well_formed(&replies);
    assert_eq!(terminal(&replies)["kind"], "final", "{replies:#?}");
    assert_eq!(terminal(&replies)["content"], fake_llm::slow_reply());
    // The embedded OpenCode was stopped with the daemon.
    let mut left = processes_in(&work_dir);
    for _ in 0..50 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = processes_in(&work_dir);
    }
    assert!(left.is_empty(), "opencode processes left behind: {left:?}");
    let mut log = Vec::new();
    while let Ok(l) = d.log.try_recv() {
        log.push(l);
    }
    let log = log.join("\n");
    if std::env::var_os("SHOW_DAEMON_LOG").is_some() {
        eprintln!("{log}");
    }
    assert!(log.contains("draining prompt subscriptions"), "{log}");
    // Secrets are never logged.
    assert!(!log.to_lowercase().contains("password="), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turns_past_the_grace_end_with_shutting_down() {
    let nats = NatsServer::start();
    let llm = FakeLlm::start().await;
    let mut d = start_daemon(&nats.url(), &llm.base_url(), "500ms").await;
    let c = client(&nats.url()).await;
    let inbox = c.new_inbox();
    let mut sub = crate::support::nats::subscribe_ready(&c, inbox.clone()).await;
    c.publish_with_reply("opencode.prompt.grace", inbox, "[slow] count".into())
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(30), futures::StreamExt::next(&mut sub))
        .await
        .expect("a first reply")
        .unwrap();
    let mut replies = vec![(
        first.headers.clone(),
        serde_json::from_slice(&first.payload).unwrap(),
    )];
    let status = sigterm_and_wait(&mut d).await;
    replies.extend(
        crate::support::nats::collect_until_terminal(&mut sub, Duration::from_secs(30)).await,
    );
    assert!(status.success(), "exit status {status}");
    assert_well_formed(&replies);
    let t = terminal(&replies);
    assert_eq!(t["kind"], "error", "{replies:#?}");
    assert_eq!(t["code"], "shutting_down");
    assert_eq!(t["retryable"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_opencode_crash_is_survived() {
    let nats = NatsServer::start();
    let llm = FakeLlm::start().await;
    let mut d = start_daemon(&nats.url(), &llm.base_url(), "5s").await;
    let work_dir = d.env.work_dir.canonicalize().unwrap();
    let c = client(&nats.url()).await;
    let r = request(
        &c,
        "opencode.prompt.crash",
        "Remember the word quince-crash",
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(terminal(&r)["kind"], "final", "{r:#?}");

    // Kill OpenCode in the middle of a slow turn.
    let inbox = c.new_inbox();
    let mut sub = crate::support::nats::subscribe_ready(&c, inbox.clone()).await;
    c.publish_with_reply("opencode.prompt.crash", inbox, "[slow] count".into())
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(30), futures::StreamExt::next(&mut sub))
        .await
        .expect("a first reply")
        .unwrap();
    let mut replies = vec![(
        first.headers.clone(),
        serde_json::from_slice(&first.payload).unwrap(),
    )];
    let pids = processes_in(&work_dir);
    assert!(!pids.is_empty());
    for pid in pids {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    replies.extend(
        crate::support::nats::collect_until_terminal(&mut sub, Duration::from_secs(30)).await,
    );
    assert_well_formed(&replies);
    let t = terminal(&replies);
    assert_eq!(t["kind"], "error", "{replies:#?}");
    assert_eq!(t["code"], "opencode_unavailable");
    assert_eq!(t["retryable"], true);

    // The daemon restarts OpenCode; the conversation goes on where it was.
    let mut last = Vec::new();
    for _ in 0..30 {
        last = request(
            &c,
            "opencode.prompt.crash",
            "[recall] what was the first thing?",
            Duration::from_secs(60),
        )
        .await;
        if terminal(&last)["kind"] == "final" {
            break;
        }
        assert_eq!(terminal(&last)["code"], "opencode_unavailable", "{last:#?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_well_formed(&last);
    assert_eq!(terminal(&last)["kind"], "final", "{last:#?}");
    assert_eq!(
        terminal(&last)["content"],
        fake_llm::recall_reply("Remember the word quince-crash")
    );
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "the daemon kept running"
    );
    let status = sigterm_and_wait(&mut d).await;
    assert!(status.success());
}

/// The embedded OpenCode runs with `"permission": {"*": "ask"}` whatever
/// its config says (this one allows bash), so the bridge's built-in policy
/// decides: a bash call is denied, the turn ends at once with the denial in
/// `notes`, and the command never ran. `tools: {"bash": true}` is refused
/// before OpenCode sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_builtin_policy_denies_bash_on_a_stock_embedded_opencode() {
    let nats = NatsServer::start();
    let llm = FakeLlm::start().await;
    let mut d = start_daemon(&nats.url(), &llm.base_url(), "5s").await;
    let c = client(&nats.url()).await;
    let pwned = d.env.work_dir.join("pwned");
    let started = std::time::Instant::now();
    let r = request(
        &c,
        "opencode.prompt.chat.C1",
        &format!("[tool:bash touch {}] please", pwned.display()),
        Duration::from_secs(60),
    )
    .await;
    assert_well_formed(&r);
    let t = terminal(&r);
    assert_eq!(t["kind"], "final", "{r:#?}");
    let notes = t["notes"].to_string();
    assert!(
        notes.contains("permission `bash`") && notes.contains("rejected"),
        "{t}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "ended on the rejection, not a deadline: {:?}",
        started.elapsed()
    );
    assert!(!pwned.exists(), "the denied command ran");

    let r = request(
        &c,
        "opencode.prompt.chat.C1",
        r#"{"text": "hi", "tools": {"bash": true}}"#,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(terminal(&r)["code"], "forbidden", "{r:#?}");
    let status = sigterm_and_wait(&mut d).await;
    assert!(status.success());
}

/// A rule scoped to the `ops` tenant lets its prompts run bash; a
/// `kill -9` of the daemon then leaves no `opencode` process and no tool
/// process behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ops_rule_runs_bash_and_kill_9_of_the_daemon_leaves_nothing_behind() {
    let nats = NatsServer::start();
    let llm = FakeLlm::start().await;
    let rules =
        "[[permissions.rules]]\ntenant = \"ops\"\npermission = \"bash\"\naction = \"allow\"\n";
    let mut d = start_daemon_with(&nats.url(), &llm.base_url(), "5s", Some(rules)).await;
    let work_dir = d.env.work_dir.canonicalize().unwrap();
    let c = client(&nats.url()).await;
    let r = request(
        &c,
        "opencode.prompt.ops.shell",
        "[tool:bash echo ran-$((40+2))] go",
        Duration::from_secs(60),
    )
    .await;
    assert_well_formed(&r);
    assert_eq!(terminal(&r)["kind"], "final", "{r:#?}");
    let results: Vec<_> = r
        .iter()
        .filter(|(_, v)| v["kind"] == "tool_result")
        .collect();
    assert_eq!(results.len(), 1, "{r:#?}");
    assert!(
        results[0].1["result"].as_str().unwrap().contains("ran-42"),
        "{r:#?}"
    );
    // The same command from another tenant is denied.
    let r = request(
        &c,
        "opencode.prompt.public.x",
        "[tool:bash echo ran-$((40+2))] go",
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(terminal(&r)["kind"], "final", "{r:#?}");
    assert!(
        terminal(&r)["notes"].to_string().contains("rejected"),
        "{r:#?}"
    );

    // A long tool command, then the daemon dies without stopping.
    let inbox = c.new_inbox();
    let mut sub = crate::support::nats::subscribe_ready(&c, inbox.clone()).await;
    c.publish_with_reply(
        "opencode.prompt.ops.shell",
        inbox,
        "[tool:bash sleep 300] wait".into(),
    )
    .await
    .unwrap();
    let call = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(m) = futures::StreamExt::next(&mut sub).await {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            if v["kind"] == "tool_call" {
                return v;
            }
        }
        panic!("replies ended")
    })
    .await
    .expect("the tool call");
    assert_eq!(call["tool"], "bash");
    // The tool process is up (its working directory is the project).
    let sleeping = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let n = processes_in(&work_dir).len();
            if n >= 3 {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("opencode, its reaper and the tool process");
    assert!(sleeping >= 3);
    kill(Pid::from_raw(d.child.id().unwrap() as i32), Signal::SIGKILL).unwrap();
    let _ = d.child.wait().await;
    let left = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let left = processes_in(&work_dir);
            if left.is_empty() {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        left.is_ok(),
        "processes outlived the daemon: {:?}",
        processes_in(&work_dir)
    );
}
