//! `[isolation] mode = "process"` (one real `opencode serve` per tenant,
//! the fake LLM behind it) and the embedded server's crash ending turns at
//! once (issue 24 item 5), on the daemon binary so servers can be killed
//! for real and their environment read from `/proc`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::support::bridge::{assert_well_formed, request, terminal};
use crate::support::daemon::{spawn_serving, wait_for_line, BIN};
use crate::support::fake_llm::{self, FakeLlm};
use crate::support::nats::{client, collect_until_terminal, subscribe_ready, NatsServer, Reply};
use crate::support::real_opencode::{default_config, isolated_env, opencode_bin, IsolatedEnv};

/// A secret in the daemon's environment no tenant's server may see.
const DAEMON_SECRET: &str = "daemon-secret-4b1d";

struct Daemon {
    child: Child,
    env: IsolatedEnv,
    log: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// `[workspaces] root`.
    root: PathBuf,
}

/// The daemon binary on the embedded default, with `toml` as its config
/// file (`[isolation]` ...), and secrets of its own in its environment.
async fn start_daemon(nats_url: &str, llm_url: &str, toml: &str) -> Daemon {
    let env = isolated_env(&default_config(llm_url));
    let root = env.tmp.path().join("workspaces");
    let file = env.tmp.path().join("bridge.toml");
    std::fs::write(&file, toml).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("run")
        .arg("--config")
        .arg(file)
        .env_clear()
        .envs(env.vars.iter().map(|(k, v)| (k.as_str(), v.as_os_str())))
        .env("OPENCODE_BRIDGE__NATS__URL", nats_url)
        .env("OPENCODE_BRIDGE__OPENCODE__BINARY", opencode_bin())
        .env("OPENCODE_BRIDGE__OPENCODE__DIRECTORY", &env.work_dir)
        .env("OPENCODE_BRIDGE__SHUTDOWN__GRACE", "5s")
        .env("OPENCODE_BRIDGE__TURN__IDLE_TIMEOUT", "30s")
        .env("OPENCODE_BRIDGE__OPENCODE__STREAM_STALL_TIMEOUT", "15s")
        .env("OPENCODE_BRIDGE__WORKSPACES__ROOT", &root)
        .env("OPENCODE_SERVER_PASSWORD", DAEMON_SECRET)
        .env("NATS_CREDS_SECRET", DAEMON_SECRET)
        .env("RUST_LOG", "info");
    let (child, log) = spawn_serving(cmd, Duration::from_secs(90)).await;
    Daemon {
        child,
        env,
        log,
        root,
    }
}

/// Process mode, the hermetic switches passed on to the tenants' servers.
fn process_mode(max_servers: usize, idle_stop: &str) -> String {
    format!(
        r#"[isolation]
mode = "process"
max_servers = {max_servers}
idle_stop = "{idle_stop}"
pass_env = ["OPENCODE_DISABLE_*", "OPENCODE_PURE", "SHELL"]
"#
    )
}

/// Processes whose working directory is `dir` (a server and its reaper).
fn processes_in(dir: &Path) -> Vec<u32> {
    let Ok(dir) = dir.canonicalize() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if std::fs::read_link(entry.path().join("cwd")).ok().as_deref() == Some(&dir) {
            out.push(pid);
        }
    }
    out
}

fn kill_all(pids: &[u32]) {
    for pid in pids {
        let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
    }
}

/// Sends a `[slow]` prompt and waits for its first reply: the turn is in
/// flight. Returns the subscription to read the rest from, and that
/// first reply.
async fn slow_turn_in_flight(
    c: &async_nats::Client,
    subject: &str,
) -> (async_nats::Subscriber, Vec<Reply>) {
    let inbox = c.new_inbox();
    let mut sub = subscribe_ready(c, inbox.clone()).await;
    c.publish_with_reply(subject.to_string(), inbox, "[slow] count".into())
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(60), futures::StreamExt::next(&mut sub))
        .await
        .expect("a first reply of the slow turn")
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&first.payload).unwrap();
    assert!(
        !crate::support::nats::is_terminal(&v),
        "the slow turn ended before the kill: {v}"
    );
    (sub, vec![(first.headers.clone(), v)])
}

/// Issue 24 item 5: `kill -9` of the embedded server ends the turn in
/// flight at once with `opencode_unavailable` (retryable), 20 runs of 20,
/// and the next prompt waits for the restarted server and is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_crash_ends_the_turn_at_once_20_of_20() {
    let nats = NatsServer::start();
    let llm = FakeLlm::start().await;
    let mut d = start_daemon(&nats.url(), &llm.base_url(), "").await;
    let c = client(&nats.url()).await;
    let mut delays = Vec::new();
    for run in 0..20 {
        let (mut sub, mut replies) = slow_turn_in_flight(&c, "opencode.prompt.crash").await;
        let pids = processes_in(&d.env.work_dir);
        assert!(!pids.is_empty(), "run {run}: no embedded server found");
        let killed = Instant::now();
        kill_all(&pids);
        replies.extend(collect_until_terminal(&mut sub, Duration::from_secs(30)).await);
        let delay = killed.elapsed();
        assert_well_formed(&replies);
        let t = terminal(&replies);
        assert_eq!(t["kind"], "error", "run {run}: {replies:#?}");
        assert_eq!(t["code"], "opencode_unavailable", "run {run}: {t}");
        assert_eq!(t["retryable"], true);
        assert!(
            delay < Duration::from_secs(2),
            "run {run}: the terminal came {delay:?} after the kill"
        );
        delays.push(delay);
        // Sent at once: it waits for the restart instead of failing.
        let next = request(
            &c,
            "opencode.prompt.crash",
            "after",
            Duration::from_secs(90),
        )
        .await;
        assert_well_formed(&next);
        assert_eq!(terminal(&next)["kind"], "final", "run {run}: {next:#?}");
        assert_eq!(terminal(&next)["content"], fake_llm::text_reply("after"));
    }
    delays.sort();
    eprintln!(
        "kill -9 -> terminal over 20 runs: min {:?}, median {:?}, max {:?}",
        delays[0], delays[10], delays[19]
    );
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "the daemon kept running"
    );
}

/// Process mode: two tenants, each on its own server. `kill -9` of one
/// tenant's server ends that tenant's turn at once, the other tenant's
/// concurrent turn ends `final` with its exact text, the first tenant's
/// next prompt is served in the same session after the restart, and no
/// tenant server sees the daemon's secrets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_mode_a_crash_fails_only_its_tenant() {
    let nats = NatsServer::start();
    let llm = FakeLlm::start().await;
    let toml = process_mode(4, "10m");
    let mut d = start_daemon(&nats.url(), &llm.base_url(), &toml).await;
    let c = client(&nats.url()).await;
    let first = request(
        &c,
        "opencode.prompt.slack.C1",
        "Remember the word quince-iso",
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(terminal(&first)["kind"], "final", "{first:#?}");
    let (slack, discord) = (d.root.join("slack"), d.root.join("discord"));
    let slack_pids = processes_in(&slack);
    assert!(!slack_pids.is_empty(), "slack has a server of its own");
    assert!(
        processes_in(&discord).is_empty(),
        "discord's server starts only on its first prompt"
    );
    check_environment(&slack_pids, &slack);
    let warm = request(
        &c,
        "opencode.prompt.discord.D1",
        "hi",
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(terminal(&warm)["content"], fake_llm::text_reply("hi"));

    let (mut slack_turn, mut lost) = slow_turn_in_flight(&c, "opencode.prompt.slack.C1").await;
    let (mut discord_turn, mut other) = slow_turn_in_flight(&c, "opencode.prompt.discord.D1").await;
    let killed = Instant::now();
    kill_all(&slack_pids);
    lost.extend(collect_until_terminal(&mut slack_turn, Duration::from_secs(30)).await);
    let delay = killed.elapsed();
    assert_well_formed(&lost);
    assert_eq!(terminal(&lost)["code"], "opencode_unavailable", "{lost:#?}");
    assert!(
        delay < Duration::from_secs(2),
        "terminal {delay:?} after the kill"
    );
    eprintln!("process mode: kill -9 -> terminal in {delay:?}");
    other.extend(collect_until_terminal(&mut discord_turn, Duration::from_secs(60)).await);
    assert_well_formed(&other);
    assert_eq!(terminal(&other)["kind"], "final", "{other:#?}");
    assert_eq!(terminal(&other)["content"], fake_llm::slow_reply());
    check_environment(&processes_in(&discord), &discord);

    // The restarted server has the session: the conversation goes on.
    let recall = request(
        &c,
        "opencode.prompt.slack.C1",
        "[recall] what was the first thing?",
        Duration::from_secs(90),
    )
    .await;
    assert_well_formed(&recall);
    assert_eq!(terminal(&recall)["kind"], "final", "{recall:#?}");
    assert_eq!(
        terminal(&recall)["content"],
        fake_llm::recall_reply("Remember the word quince-iso")
    );
    let mut seen = Vec::new();
    assert!(wait_for_line(&mut d.log, &mut seen, "restarted", Duration::from_secs(1)).await);
}

/// What a tenant's server sees of the environment: its own `HOME` and
/// `XDG_*` under `<workspace>/.opencode`, and none of the daemon's
/// secrets (read from `/proc/<pid>/environ` of every process of it).
fn check_environment(pids: &[u32], workspace: &Path) {
    let mut checked = 0;
    for pid in pids {
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let vars: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        for v in &vars {
            assert!(!v.contains(DAEMON_SECRET), "pid {pid} sees {v}");
            assert!(!v.starts_with("OPENCODE_BRIDGE__"), "pid {pid} sees {v}");
            assert!(!v.starts_with("NATS_"), "pid {pid} sees {v}");
        }
        let home = format!("HOME={}", workspace.join(".opencode/home").display());
        assert!(vars.contains(&home), "pid {pid}: {vars:?}");
        let data = format!(
            "XDG_DATA_HOME={}",
            workspace.join(".opencode/data").display()
        );
        assert!(vars.contains(&data), "pid {pid}: {vars:?}");
        checked += 1;
    }
    assert!(checked > 0, "no process of the server could be read");
}

/// Process mode: a tenant's server with no turn for `idle_stop` is
/// stopped; its next prompt starts it again and is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_mode_an_idle_server_stops() {
    let nats = NatsServer::start();
    let llm = FakeLlm::start().await;
    let toml = process_mode(4, "2s");
    let d = start_daemon(&nats.url(), &llm.base_url(), &toml).await;
    let c = client(&nats.url()).await;
    let r = request(&c, "opencode.prompt.idle.I1", "hi", Duration::from_secs(90)).await;
    assert_eq!(terminal(&r)["content"], fake_llm::text_reply("hi"));
    let dir = d.root.join("idle");
    assert!(!processes_in(&dir).is_empty());
    let stopped = tokio::time::timeout(Duration::from_secs(30), async {
        while !processes_in(&dir).is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(stopped.is_ok(), "the idle server still runs");
    let again = request(
        &c,
        "opencode.prompt.idle.I1",
        "again",
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(terminal(&again)["content"], fake_llm::text_reply("again"));
}

/// Process mode: 6 tenants at once on `max_servers = 2`: every prompt is
/// answered `final` with its text, and never more than 2 servers run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_mode_max_servers_holds_with_3x_the_tenants() {
    let nats = NatsServer::start();
    let llm = FakeLlm::start().await;
    let toml = process_mode(2, "10m");
    let d = start_daemon(&nats.url(), &llm.base_url(), &toml).await;
    let c = client(&nats.url()).await;
    let root = d.root.clone();
    let watch = tokio::spawn(async move {
        let mut most = 0;
        loop {
            let servers = (0..6)
                .filter(|i| {
                    processes_in(&root.join(format!("t{i}")))
                        .iter()
                        .any(|p| is_opencode(*p))
                })
                .count();
            most = most.max(servers);
            tokio::time::sleep(Duration::from_millis(100)).await;
            if most > 2 {
                return most;
            }
        }
    });
    let turns = (0..6).map(|i| {
        let c = c.clone();
        async move {
            let text = format!("hello from t{i}");
            let subject = format!("opencode.prompt.t{i}.C");
            (
                text.clone(),
                request(&c, &subject, &text, Duration::from_secs(180)).await,
            )
        }
    });
    for (text, replies) in futures::future::join_all(turns).await {
        assert_well_formed(&replies);
        assert_eq!(terminal(&replies)["kind"], "final", "{replies:#?}");
        assert_eq!(terminal(&replies)["content"], fake_llm::text_reply(&text));
    }
    assert!(
        !watch.is_finished(),
        "more than 2 tenant servers ran at once"
    );
    watch.abort();
}

fn is_opencode(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains("serve") && !c.starts_with(b"sh"))
}
