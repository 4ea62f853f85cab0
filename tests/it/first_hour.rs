//! What a new user meets in the first hour: start-up that obeys signals,
//! waiting for NATS with one line per backoff step, and a clear exit when
//! NATS is absent and retrying is off.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::support::daemon::{log_lines, wait_for_line, BIN};

/// A loopback port where nothing listens (bound, then released).
fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

struct Started {
    child: Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
}

fn spawn(envs: &[(&str, &str)], dir: &Path) -> Started {
    let mut cmd = Command::new(BIN);
    cmd.arg("run")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", dir)
        .env("RUST_LOG", "info")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn the daemon");
    let lines = log_lines(&mut child);
    Started {
        child,
        lines,
        seen: Vec::new(),
    }
}

impl Started {
    /// Reads the log until a line contains `needle` (bounded).
    async fn wait_for(&mut self, needle: &str) {
        let found = wait_for_line(
            &mut self.lines,
            &mut self.seen,
            needle,
            Duration::from_secs(60),
        )
        .await;
        assert!(
            found,
            "no log line with {needle:?}; log:\n{}",
            self.seen.join("\n")
        );
    }

    async fn signal_and_wait(&mut self, sig: Signal) -> std::process::ExitStatus {
        kill(Pid::from_raw(self.child.id().unwrap() as i32), sig).unwrap();
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("the daemon ignored {sig}; log:\n{}", self.seen.join("\n")))
            .unwrap();
        // Every line up to the end of stderr (the reader may lag the exit).
        while let Ok(Some(l)) =
            tokio::time::timeout(Duration::from_secs(10), self.lines.recv()).await
        {
            self.seen.push(l);
        }
        status
    }

    fn log(&self) -> String {
        self.seen.join("\n")
    }
}

#[tokio::test]
async fn a_signal_while_waiting_for_nats_stops_the_daemon() {
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("nats://127.0.0.1:{}", dead_port());
        let mut d = spawn(&[("OPENCODE_BRIDGE__NATS__URL", &url)], dir.path());
        // One line with the URL, then one per backoff step.
        d.wait_for("connecting to NATS; retrying until it answers")
            .await;
        assert!(d.log().contains(&url), "{}", d.log());
        d.wait_for("NATS not reachable; retrying").await;
        d.wait_for("NATS not reachable; retrying").await;
        let status = d.signal_and_wait(sig).await;
        let log = d.log();
        assert_eq!(status.code(), Some(0), "{sig}: {status}; log:\n{log}");
        assert!(log.contains("stopped during start-up"), "{log}");
        // The retry lines name the URL; async-nats' own per-attempt
        // "IO error" lines are not at info.
        assert!(
            log.lines()
                .filter(|l| l.contains("NATS not reachable"))
                .all(|l| l.contains(&url)),
            "{log}"
        );
        assert!(!log.contains("IO error"), "{log}");
        assert!(!log.contains("event: "), "{log}");
        // stderr is a pipe here: plain text, no ANSI colour.
        assert!(!log.contains('\x1b'), "{log:?}");
    }
}

#[tokio::test]
async fn a_mistyped_nats_host_shows_the_dns_error_in_each_retry_line() {
    let dir = tempfile::tempdir().unwrap();
    let url = "nats://nats.invalid:4222";
    let mut d = spawn(&[("OPENCODE_BRIDGE__NATS__URL", url)], dir.path());
    for _ in 0..3 {
        d.wait_for("NATS not reachable; retrying").await;
    }
    let status = d.signal_and_wait(Signal::SIGTERM).await;
    let log = d.log();
    assert_eq!(status.code(), Some(0), "{log}");
    let retries: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("NATS not reachable"))
        .collect();
    assert!(retries.len() >= 3, "{log}");
    for l in retries {
        assert!(
            l.contains("cannot resolve nats.invalid: failed to lookup address information"),
            "{l}"
        );
        assert!(l.contains(url), "{l}");
    }
    // A port where nothing listens: the address and what to check.
    let dead = format!("nats://127.0.0.1:{}", dead_port());
    let mut d = spawn(&[("OPENCODE_BRIDGE__NATS__URL", &dead)], dir.path());
    let line = {
        d.wait_for("NATS not reachable; retrying").await;
        d.log()
    };
    assert!(
        line.contains(&format!(
            "error={}:{} (127.0.0.1): the connection failed (is a nats-server listening there?)",
            "127.0.0.1",
            dead.rsplit(':').next().unwrap()
        )),
        "{line}"
    );
    assert_eq!(d.signal_and_wait(Signal::SIGTERM).await.code(), Some(0));
}

#[tokio::test]
async fn without_retry_an_absent_nats_exits_1_naming_the_url() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("nats://127.0.0.1:{}", dead_port());
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new(BIN)
            .arg("run")
            .env_clear()
            .env("HOME", dir.path())
            .env("OPENCODE_BRIDGE__NATS__URL", &url)
            .env("OPENCODE_BRIDGE__NATS__RETRY_ON_INITIAL_CONNECT", "false")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("the daemon exits by itself")
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&url), "{err}");
}

/// Processes whose working directory is `dir`.
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

#[tokio::test]
async fn a_signal_while_opencode_starts_stops_it_too() {
    let nats = crate::support::nats::NatsServer::start();
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().canonicalize().unwrap().join("work");
        std::fs::create_dir(&work).unwrap();
        // An `opencode` that never becomes healthy.
        let fake = work.join("never-healthy-opencode");
        std::fs::write(&fake, "#!/bin/sh\nexec sleep 600\n").unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let mut d = spawn(
            &[
                ("OPENCODE_BRIDGE__NATS__URL", &nats.url()),
                ("OPENCODE_BRIDGE__OPENCODE__BINARY", fake.to_str().unwrap()),
                (
                    "OPENCODE_BRIDGE__OPENCODE__DIRECTORY",
                    work.to_str().unwrap(),
                ),
            ],
            dir.path(),
        );
        d.wait_for("started embedded `opencode serve`").await;
        assert!(!processes_in(&work).is_empty(), "the fake opencode runs");
        let status = d.signal_and_wait(sig).await;
        let log = d.log();
        assert_eq!(status.code(), Some(0), "{sig}: {status}; log:\n{log}");
        assert!(
            log.contains("stopped during start-up, while OpenCode was starting"),
            "{log}"
        );
        let mut left = processes_in(&work);
        for _ in 0..50 {
            if left.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            left = processes_in(&work);
        }
        assert!(left.is_empty(), "opencode left behind: {left:?}");
    }
}

mod provider_trouble {
    //! The real OpenCode, a fake LLM that fails: the caller hears of the
    //! provider's retries and gets a `provider_error` that says what failed
    //! and what to do, after `[turn] provider_retry_limit` retries instead
    //! of OpenCode's ~70 s.

    use std::time::Duration;

    use serde_json::json;

    use crate::support::bridge::{assert_well_formed, request, terminal, test_config, Bridge};
    use crate::support::fake_llm::{self, FakeLlm, Scenario};
    use crate::support::nats::{client, NatsServer};
    use crate::support::real_opencode::RealOpenCode;

    const TURN: Duration = Duration::from_secs(120);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn provider_retries_are_told_and_cut_at_the_limit() {
        let nats = NatsServer::start();
        let llm = FakeLlm::start().await;
        let opencode = RealOpenCode::start(&llm.base_url()).await;
        let mut cfg = test_config(&nats.url(), opencode.base_url(), Some(opencode.password()));
        cfg.opencode.directory = Some(opencode.directory().to_path_buf());
        assert_eq!(cfg.turn.provider_retry_limit, 3, "the default");
        let bridge = Bridge::start(cfg).await;
        let c = client(&nats.url()).await;
        let llm_host = llm
            .base_url()
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap()
            .to_string();

        // With "progress": a `status` reply per retry, then the error.
        let prompt =
            json!({"text": "[error500] hello", "conversation": "fh.retry", "progress": true});
        let r = request(&c, "opencode.prompt", &prompt.to_string(), TURN).await;
        assert_well_formed(&r);
        let statuses: Vec<_> = r.iter().filter(|(_, v)| v["kind"] == "status").collect();
        let attempts: Vec<u64> = statuses
            .iter()
            .map(|(_, v)| v["attempt"].as_u64().unwrap())
            .collect();
        assert_eq!(attempts, vec![1, 2, 3], "{r:#?}");
        for (_, s) in &statuses {
            assert_eq!(s["event"], "provider_retry", "{s}");
            assert_eq!(s["retry_limit"], 3, "{s}");
            assert!(!s["reason"].as_str().unwrap().is_empty(), "{s}");
        }
        let t = terminal(&r);
        assert_eq!(t["kind"], "error", "{r:#?}");
        assert_eq!(t["code"], "provider_error", "{t}");
        assert_eq!(t["retryable"], true, "{t}");
        let msg = t["error"].as_str().unwrap();
        eprintln!("provider_error after the retry limit: {msg}");
        eprintln!("a status reply: {}", statuses[0].1);
        // The provider's host stays in the log (issue 22).
        assert!(!msg.contains(&llm_host), "the provider's host in {msg:?}");
        for needle in [
            "failed 3 times in a row",
            "provider_retry_limit = 3",
            "model fake/m1",
            "can help",
            "What to do:",
        ] {
            assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
        }
        // OpenCode was stopped: no fourth call to the provider.
        let calls = llm
            .recorded()
            .iter()
            .filter(|x| x.scenario == Scenario::Error500)
            .count();
        assert_eq!(calls, 3, "provider calls");

        // The conversation goes on afterwards.
        let r = request(&c, "opencode.prompt.fh.retry", "after the failure", TURN).await;
        assert_well_formed(&r);
        assert_eq!(terminal(&r)["kind"], "final", "{r:#?}");
        assert_eq!(
            terminal(&r)["content"],
            fake_llm::text_reply("after the failure")
        );

        // Without "progress": no status replies, the same error.
        let r = request(&c, "opencode.prompt", "[error500] quietly", TURN).await;
        assert_well_formed(&r);
        assert!(r.iter().all(|(_, v)| v["kind"] != "status"), "{r:#?}");
        assert_eq!(terminal(&r)["code"], "provider_error", "{r:#?}");

        // A refused key: not retryable, and says how to give OpenCode one.
        let r = request(&c, "opencode.prompt", "[error401] key?", TURN).await;
        assert_well_formed(&r);
        let t = terminal(&r);
        assert_eq!(t["code"], "provider_error", "{t}");
        assert_eq!(t["retryable"], false, "{t}");
        let msg = t["error"].as_str().unwrap();
        eprintln!("provider_error on a refused key: {msg}");
        for needle in [
            fake_llm::ERROR_401_MESSAGE,
            "model fake/m1",
            "will not help",
            "opencode auth login",
        ] {
            assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
        }
        bridge.stop().await.unwrap();
    }
}

#[test]
fn check_config_says_what_it_read_and_where_a_mistake_is() {
    let run = |args: &[&str], envs: &[(&str, &str)]| {
        let mut c = std::process::Command::new(BIN);
        c.arg("check-config").args(args).env_clear();
        for (k, v) in envs {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let out = run(&[], &[]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "config OK; read: built-in defaults only (no --config file, no OPENCODE_BRIDGE__* environment variables)\n"
    );
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let out = run(
        &["--config", example.to_str().unwrap()],
        &[("OPENCODE_BRIDGE__TURN__IDLE_TIMEOUT", "10m")],
    );
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "config OK; read: built-in defaults, config file {}, environment OPENCODE_BRIDGE__TURN__IDLE_TIMEOUT\n",
            example.display()
        )
    );
    let out = run(&["--config", "/nonexistent.toml"], &[]);
    assert_eq!(out.status.code(), Some(78));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "config file /nonexistent.toml does not exist\n"
    );
    let out = run(&[], &[("OPENCODE_BRIDGE__TURN__IDLE_TIMEOUT", "600")]);
    assert_eq!(out.status.code(), Some(78));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "environment variable OPENCODE_BRIDGE__TURN__IDLE_TIMEOUT=\"600\" ([turn] idle_timeout): not a duration; write a duration such as \"10m\", \"90s\" or \"1h 30m\"\n"
    );
}

mod unknown_agent {
    //! The real OpenCode, asked for an agent it does not have: a
    //! `bad_request` naming the agents it has (OpenCode itself answers with
    //! an `UnknownError` and a stack trace), and nothing reaches the model.

    use std::time::Duration;

    use serde_json::json;

    use crate::support::bridge::{assert_well_formed, request, terminal, test_config, Bridge};
    use crate::support::fake_llm::{self, FakeLlm};
    use crate::support::nats::{client, NatsServer};
    use crate::support::real_opencode::RealOpenCode;

    const TURN: Duration = Duration::from_secs(120);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unknown_agent_is_a_bad_request_listing_the_agents() {
        let nats = NatsServer::start();
        let llm = FakeLlm::start().await;
        let opencode = RealOpenCode::start(&llm.base_url()).await;
        let mut cfg = test_config(&nats.url(), opencode.base_url(), Some(opencode.password()));
        cfg.opencode.directory = Some(opencode.directory().to_path_buf());
        let bridge = Bridge::start(cfg).await;
        let c = client(&nats.url()).await;

        let started = std::time::Instant::now();
        let prompt = json!({"text": "hello", "agent": "nosuch", "conversation": "fh.agent"});
        let r = request(&c, "opencode.prompt", &prompt.to_string(), TURN).await;
        assert_well_formed(&r);
        let t = terminal(&r);
        assert_eq!(t["kind"], "error", "{r:#?}");
        assert_eq!(t["code"], "bad_request", "{t}");
        assert_eq!(t["retryable"], false, "{t}");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{:?}",
            started.elapsed()
        );
        let msg = t["error"].as_str().unwrap();
        eprintln!("unknown agent: {msg}");
        assert!(
            msg.starts_with("unknown agent \"nosuch\": OpenCode has no such agent (it has ["),
            "{msg}"
        );
        for agent in ["\"build\"", "\"plan\""] {
            assert!(msg.contains(agent), "{agent} not in {msg}");
        }
        // OpenCode's hidden agents are not offered.
        assert!(!msg.contains("\"title\""), "{msg}");
        assert!(llm.recorded().is_empty(), "the model was called");

        // A known agent answers.
        let prompt = json!({"text": "with plan", "agent": "plan", "conversation": "fh.agent"});
        let r = request(&c, "opencode.prompt", &prompt.to_string(), TURN).await;
        assert_well_formed(&r);
        assert_eq!(terminal(&r)["kind"], "final", "{r:#?}");
        // (the plan agent's reminder follows the user's text)
        let content = terminal(&r)["content"].as_str().unwrap().to_string();
        assert!(
            content.starts_with(&fake_llm::text_reply("with plan"))
                && content.contains("Plan mode"),
            "{content}"
        );
        bridge.stop().await.unwrap();
    }
}

#[test]
fn every_subcommand_describes_every_flag() {
    let help = |args: &[&str]| {
        let out = std::process::Command::new(BIN).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for cmd in ["run", "check-config", "prompt", "status", "turn"] {
        let text = help(&[cmd, "--help"]);
        let lines: Vec<&str> = text.lines().collect();
        let mut flags = 0;
        for (i, l) in lines.iter().enumerate() {
            let t = l.trim_start();
            if l.starts_with("  -") && (t.starts_with("--") || t.starts_with('-')) {
                flags += 1;
                let next = lines.get(i + 1).copied().unwrap_or("");
                assert!(
                    next.starts_with("          ") && !next.trim().is_empty(),
                    "`{cmd} --help`: {t:?} has no description:\n{text}"
                );
            }
        }
        assert!(flags >= 2, "`{cmd} --help` lists no flags:\n{text}");
        // More than one line about what the command does.
        let about: Vec<&str> = text.split("Usage:").next().unwrap().lines().collect();
        assert!(
            about.iter().filter(|l| !l.trim().is_empty()).count() >= 2,
            "`{cmd} --help` says one line:\n{text}"
        );
    }
}
