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
/// file (`[isolation]` ...; `{root}` stands for a fresh workspaces root),
/// and secrets of its own in its environment.
async fn start_daemon(nats_url: &str, llm_url: &str, toml: &str) -> Daemon {
    let env = isolated_env(&default_config(llm_url));
    let root = env.tmp.path().join("workspaces");
    let file = env.tmp.path().join("bridge.toml");
    let toml = toml.replace("{root}", &root.display().to_string());
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
        r#"[workspaces]
root = "{{root}}"

[isolation]
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

    // Discord names slack's session: its own server has no such session,
    // and the answer reads like one that does not exist.
    let slack_session = terminal(&recall)["session_id"]
        .as_str()
        .unwrap()
        .to_string();
    let payload = serde_json::json!({"text": "[recall] steal", "session_id": slack_session});
    let stolen = request(
        &c,
        "opencode.prompt.discord.D9",
        &payload.to_string(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(terminal(&stolen)["code"], "forbidden", "{stolen:#?}");
    assert!(!format!("{stolen:?}").contains("quince-iso"));
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
    let status = isolation_status(&c).await;
    assert_eq!(status["mode"], "process", "{status}");
    assert_eq!(status["tenant_servers"], 0, "{status}");
    assert_eq!(status["server_starts"], 1, "{status}");
    assert_eq!(status["server_stops"], 1, "{status}");
    let again = request(
        &c,
        "opencode.prompt.idle.I1",
        "again",
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(terminal(&again)["content"], fake_llm::text_reply("again"));
}

/// The `isolation` object of the daemon's status document.
async fn isolation_status(c: &async_nats::Client) -> serde_json::Value {
    let msg = tokio::time::timeout(
        Duration::from_secs(10),
        c.request("opencode.bridge.status", "".into()),
    )
    .await
    .expect("a status answer in time")
    .expect("a status answer");
    let v: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
    v["isolation"].clone()
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

/// Workspaces on the shared server (real OpenCode): a tenant's named
/// workspace is `<root>/<tenant>/<name>` (0700, filled from the template),
/// OpenCode's tools run there (the bash tool's `pwd`), the `final` names
/// it, the conversation keeps it, naming another is `bad_request`, and
/// path tricks never reach another tenant's directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspaces_put_each_conversation_in_its_directory() {
    use std::os::unix::fs::PermissionsExt;
    let nats = NatsServer::start();
    let llm = FakeLlm::start().await;
    let template = tempfile::tempdir().unwrap();
    std::fs::write(template.path().join("README.md"), "from the template").unwrap();
    let toml = format!(
        r#"[workspaces]
root = "{{root}}"
allow_named = true
template = "{}"

[permissions]
rules = [{{ tenant = "slack", permission = "bash", pattern = "pwd", action = "allow" }}]
"#,
        template.path().display()
    );
    let d = start_daemon(&nats.url(), &llm.base_url(), &toml).await;
    let c = client(&nats.url()).await;
    let subject = "opencode.prompt.slack.W1";
    let r = request(
        &c,
        subject,
        r#"{"text": "[tool:bash pwd]", "workspace": "repo"}"#,
        Duration::from_secs(90),
    )
    .await;
    assert_well_formed(&r);
    let dir = d.root.join("slack").join("repo");
    let t = terminal(&r);
    assert_eq!(t["kind"], "final", "{r:#?}");
    assert_eq!(t["workspace"], "repo");
    assert_eq!(
        t["content"],
        fake_llm::tool_followup_reply(&dir.display().to_string())
    );
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&d.root.join("slack")), 0o700);
    assert_eq!(
        std::fs::read_to_string(dir.join("README.md")).unwrap(),
        "from the template"
    );

    // The conversation keeps its workspace.
    let kept = request(&c, subject, "[tool:bash pwd]", Duration::from_secs(90)).await;
    assert_eq!(terminal(&kept)["workspace"], "repo", "{kept:#?}");
    let other = request(
        &c,
        subject,
        r#"{"text": "hi", "workspace": "other"}"#,
        Duration::from_secs(30),
    )
    .await;
    let t = terminal(&other);
    assert_eq!(t["code"], "bad_request", "{other:#?}");
    assert!(
        t["error"].as_str().unwrap().contains("keeps the workspace"),
        "{t}"
    );
    assert!(!d.root.join("slack/other").exists());

    // Path tricks: refused before anything is created.
    for trick in ["../discord", "..", "/tmp", "a/b", "."] {
        let payload = serde_json::json!({"text": "hi", "workspace": trick}).to_string();
        let r = request(
            &c,
            "opencode.prompt.slack.W2",
            &payload,
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(terminal(&r)["code"], "bad_request", "{trick}: {r:#?}");
    }
    assert!(
        !d.root.join("discord").exists(),
        "slack reached discord's directory"
    );
    let entries: Vec<_> = std::fs::read_dir(&d.root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("slack")]);
}

/// The figures of docs/BENCHMARKS.md, "Process isolation" (run by hand:
/// `cargo test --release --test it isolation::process_mode_figures -- --ignored --nocapture`):
/// cold start of a tenant's server (first prompt to first reply), RSS of an
/// idle server, and turns per second with 1, 10 and 50 tenants, process
/// mode beside shared. No assertion on speed; the turns that did not end
/// `final` with their text are counted and printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a test: minutes of real OpenCode servers"]
async fn process_mode_figures() {
    let nats = NatsServer::start();
    let llm = FakeLlm::start().await;
    let modes = std::env::var("FIGURES_MODES").unwrap_or("process,shared".into());
    for mode in modes.split(',') {
        let toml = match mode {
            "process" => process_mode(10, "10m"),
            _ => "[workspaces]\nroot = \"{root}\"\n".to_string(),
        };
        let d = start_daemon(&nats.url(), &llm.base_url(), &toml).await;
        let c = client(&nats.url()).await;
        // Cold start: the first prompt of a new tenant to its first reply.
        let inbox = c.new_inbox();
        let mut sub = subscribe_ready(&c, inbox.clone()).await;
        let t0 = Instant::now();
        c.publish_with_reply("opencode.prompt.cold.C", inbox, "hi".into())
            .await
            .unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(120), futures::StreamExt::next(&mut sub))
            .await
            .expect("a first reply");
        let cold = t0.elapsed();
        let _ = collect_until_terminal(&mut sub, Duration::from_secs(60)).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let rss: u64 = processes_in(&d.root.join("cold"))
            .iter()
            .map(|p| rss_kib(*p))
            .sum();
        eprintln!("{mode}: cold start (first prompt -> first reply) {cold:?}; idle tenant server RSS {} MiB", rss / 1024);
        for (tenants, per_tenant) in [(1usize, 20usize), (10, 4), (50, 2)] {
            let t0 = Instant::now();
            let work = (0..tenants).map(|i| {
                let c = c.clone();
                async move {
                    let mut failed = Vec::new();
                    for n in 0..per_tenant {
                        let text = format!("t{i} n{n}");
                        let subject = format!("opencode.prompt.b{tenants}x{i}.C");
                        let r = request(&c, &subject, &text, Duration::from_secs(600)).await;
                        if terminal(&r)["content"] != fake_llm::text_reply(&text) {
                            failed.push(terminal(&r).clone());
                        }
                    }
                    failed
                }
            });
            let failed: Vec<_> = futures::future::join_all(work).await.concat();
            let took = t0.elapsed();
            let turns = tenants * per_tenant;
            eprintln!(
                "{mode}: {tenants} tenants x {per_tenant} turns = {turns} turns in {took:?}: {:.2} turns/s; not final: {}",
                turns as f64 / took.as_secs_f64(),
                failed.len()
            );
            for f in failed {
                eprintln!("{mode}:   {} {}", f["code"], f["error"]);
            }
        }
        drop(d);
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// `VmRSS` of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}
