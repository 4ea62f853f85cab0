//! The client commands of the real binary (`prompt`, `status`) against an
//! in-process bridge on a real nats-server: the real OpenCode driving the
//! fake LLM where the claim is the answer, the fake OpenCode for errors,
//! hangs and aborts.

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use opencode_nats_bridge::config::Config;
use serde_json::Value;
use tokio::io::AsyncReadExt;

use crate::support::bridge::{test_config, Bridge};
use crate::support::fake_llm::{self, FakeLlm};
use crate::support::fake_opencode::{echo_reply, FakeOpenCode};
use crate::support::nats::NatsServer;
use crate::support::ops::{cli, command, finish, run};
use crate::support::real_opencode::RealOpenCode;

/// Bound on one CLI run against the real OpenCode.
const REAL: Duration = Duration::from_secs(90);
/// Bound on one CLI run against the fake.
const FAKE: Duration = Duration::from_secs(30);

struct FakeRig {
    nats: NatsServer,
    fake: FakeOpenCode,
    bridge: Bridge,
}

async fn fake_rig(tweak: impl FnOnce(&mut Config)) -> FakeRig {
    let nats = NatsServer::start();
    let fake = FakeOpenCode::start().await;
    let mut cfg = test_config(&nats.url(), &fake.url(), None);
    tweak(&mut cfg);
    cfg.validate().unwrap();
    let bridge = Bridge::start(cfg).await;
    FakeRig { nats, fake, bridge }
}

fn json_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_prints_the_real_opencode_answer_and_exits_0() {
    let nats = NatsServer::start();
    let llm = FakeLlm::start().await;
    let opencode = RealOpenCode::start(&llm.base_url()).await;
    let mut cfg = test_config(&nats.url(), opencode.base_url(), Some(opencode.password()));
    cfg.opencode.directory = Some(opencode.directory().to_path_buf());
    let bridge = Bridge::start(cfg).await;
    let url = nats.url();

    // Text as arguments; stdout is exactly the final answer.
    let first = "Remember the word cli-kumquat";
    let out = cli(
        &[
            "prompt",
            "--server",
            &url,
            "--conversation",
            "cli.real",
            first,
        ],
        REAL,
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert_eq!(out.stdout, fake_llm::text_reply(first), "{out:#?}");

    // Text from stdin, --json: one reply per line, ending with the final;
    // the same conversation continues (the answer recalls the first turn).
    let mut cmd = command(&[
        "prompt",
        "--server",
        &url,
        "--conversation",
        "cli.real",
        "--json",
    ]);
    cmd.env("NO_COLOR", "1");
    let out = run(cmd, Some("[recall] what did I say first?"), REAL).await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    let lines = json_lines(&out.stdout);
    assert!(lines.len() >= 2, "{lines:#?}");
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["seq"], i as u64, "{lines:#?}");
        assert_eq!(l["conversation"], "cli.real");
    }
    let last = lines.last().unwrap();
    assert_eq!(last["kind"], "final", "{lines:#?}");
    assert_eq!(last["content"], fake_llm::recall_reply(first));
    let deltas: String = lines
        .iter()
        .filter(|l| l["kind"] == "delta")
        .map(|l| l["content"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, fake_llm::recall_reply(first));
    assert!(out.stderr.is_empty(), "{}", out.stderr);

    // A tool turn: the answer on stdout, the tool activity on stderr.
    let out = cli(
        &[
            "prompt",
            "--server",
            &url,
            "[tool:bash echo cli-tool-ran] run it",
        ],
        REAL,
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(out.stderr.contains("→ bash"), "{}", out.stderr);
    assert!(
        out.stderr.contains("← bash ok: cli-tool-ran"),
        "{}",
        out.stderr
    );
    assert_eq!(
        out.stdout,
        fake_llm::tool_followup_reply("cli-tool-ran"),
        "{out:#?}"
    );
    bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_exits_2_on_an_error_turn_and_3_on_a_timeout() {
    let r = fake_rig(|_| {}).await;
    let url = r.nats.url();
    let out = cli(&["prompt", "--server", &url, "[error401] hello"], FAKE).await;
    assert_eq!(out.code, Some(2), "{out:#?}");
    assert_eq!(out.stdout, "");
    assert!(
        out.stderr.contains("error (provider_error): "),
        "{}",
        out.stderr
    );

    // The same with --json: the error reply is the last line.
    let out = cli(
        &["prompt", "--json", "--server", &url, "[error401] hi"],
        FAKE,
    )
    .await;
    assert_eq!(out.code, Some(2), "{out:#?}");
    let lines = json_lines(&out.stdout);
    assert_eq!(lines.last().unwrap()["code"], "provider_error");

    // A turn that never ends: the CLI gives up after --timeout.
    let started = std::time::Instant::now();
    let out = cli(
        &[
            "prompt",
            "--server",
            &url,
            "--timeout",
            "1500ms",
            "[hang] forever",
        ],
        FAKE,
    )
    .await;
    assert_eq!(out.code, Some(3), "{out:#?}");
    assert_eq!(
        out.stdout, "Starting... ",
        "what streamed before the timeout"
    );
    assert!(out
        .stderr
        .contains("no final or error reply within 1s 500ms"));
    assert!(started.elapsed() < Duration::from_secs(15));
    r.bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_aborts_the_turn_and_waits_for_its_end() {
    let r = fake_rig(|_| {}).await;
    let url = r.nats.url();
    let mut child = command(&["prompt", "--server", &url, "[slow] count"])
        .spawn()
        .unwrap();
    // Wait for the first delta on stdout, then Ctrl-C.
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 5];
    tokio::time::timeout(FAKE, stdout.read_exact(&mut first))
        .await
        .expect("a first delta")
        .unwrap();
    assert_eq!(&first, b"slow-");
    kill(Pid::from_raw(child.id().unwrap() as i32), Signal::SIGINT).unwrap();
    let mut rest = String::new();
    let read_rest = async {
        let _ = stdout.read_to_string(&mut rest).await;
    };
    let (out, ()) = tokio::join!(finish(child, FAKE), read_rest);
    assert_eq!(out.code, Some(130), "{out:#?}");
    assert!(out.stderr.contains("aborting the turn"), "{}", out.stderr);
    assert!(out.stderr.contains("error (aborted): "), "{}", out.stderr);
    // The bridge really aborted the OpenCode session.
    assert!(
        r.fake
            .requests()
            .iter()
            .any(|q| q.method == "POST" && q.path.ends_with("/abort")),
        "no abort call reached OpenCode"
    );
    r.bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_reads_stdin_and_finds_nats_like_the_daemon() {
    // The subjects come from the config file, the URL from the environment.
    let r = fake_rig(|c| c.subjects.prompt = "team.ask".into()).await;
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("cli.toml");
    std::fs::write(&conf, "[subjects]\nprompt = \"team.ask\"\n").unwrap();
    let mut cmd = command(&["prompt", "--config", conf.to_str().unwrap()]);
    cmd.env("OPENCODE_BRIDGE__NATS__URL", r.nats.url());
    let out = run(cmd, Some("hello from stdin"), FAKE).await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert_eq!(out.stdout, echo_reply("hello from stdin"));

    // Nothing to say is a usage error; a bad config is 78.
    let out = run(
        command(&["prompt", "--server", &r.nats.url()]),
        Some("  \n"),
        FAKE,
    )
    .await;
    assert_eq!(out.code, Some(64), "{out:#?}");
    std::fs::write(&conf, "[subjects]\nprompt = \"a.*\"\n").unwrap();
    let out = cli(&["prompt", "--config", conf.to_str().unwrap(), "x"], FAKE).await;
    assert_eq!(out.code, Some(78), "{out:#?}");
    r.bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_without_a_bridge_or_without_nats_exits_1_at_once() {
    let nats = NatsServer::start();
    let started = std::time::Instant::now();
    let out = cli(&["prompt", "--server", &nats.url(), "anyone?"], FAKE).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(
        out.stderr
            .contains("no bridge is listening on opencode.prompt"),
        "{}",
        out.stderr
    );
    let url = nats.url();
    drop(nats);
    let out = cli(&["prompt", "--server", &url, "anyone?"], FAKE).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(
        out.stderr.contains("cannot connect to NATS"),
        "{}",
        out.stderr
    );
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_every_running_bridge() {
    let nats = NatsServer::start();
    let fake = FakeOpenCode::start().await;
    let mut bridges = Vec::new();
    for host in ["alpha", "beta"] {
        let mut cfg = test_config(&nats.url(), &fake.url(), None);
        cfg.service.host = Some(host.into());
        bridges.push(Bridge::start(cfg).await);
    }
    let url = nats.url();
    let out = cli(&["status", "--server", &url], FAKE).await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", out.stdout);
    assert!(lines[0].starts_with("HOST"), "{}", out.stdout);
    assert!(lines[1].starts_with("alpha "), "{}", out.stdout);
    assert!(lines[2].starts_with("beta "), "{}", out.stdout);
    assert!(
        lines[1].contains(&format!("{} (up)", fake.url())),
        "{}",
        out.stdout
    );

    let out = cli(&["status", "--json", "--server", &url], FAKE).await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    let all = json_lines(&out.stdout);
    assert_eq!(all.len(), 2);
    for s in &all {
        assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(s["healthy"], true, "{s}");
        assert_eq!(s["nats_connected"], true);
        assert_eq!(s["opencode_connected"], true);
        assert_eq!(s["opencode_url"], fake.url());
        assert_eq!(s["turns_in_flight"], 0);
        assert!(s["uptime_s"].is_u64());
        assert!(!s["instance"].as_str().unwrap().is_empty());
    }

    for b in bridges {
        b.stop().await.unwrap();
    }
    let out = cli(&["status", "--server", &url, "--timeout", "500ms"], FAKE).await;
    assert_eq!(out.code, Some(3), "{out:#?}");
    assert!(out.stderr.contains("no bridge answered"), "{}", out.stderr);
    // NATS said at once that nobody listens: the message does not claim
    // it waited the whole timeout.
    assert!(
        out.stderr.contains("NATS says nothing subscribes"),
        "{}",
        out.stderr
    );
}
