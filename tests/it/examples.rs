//! The clients in `examples/` run against the real stack (nats-server, the
//! bridge, the real OpenCode asking before bash, the fake LLM): each one
//! streams the answer and answers the permission request itself.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use tokio::process::Command;

use crate::support::fake_llm::{self};
use crate::support::rig::RealStack;
use opencode_nats_bridge::protocol::interactive::{Action, Rule};

const RUN: Duration = Duration::from_secs(120);

/// OpenCode asks before every bash call; the bridge asks the caller.
async fn stack() -> RealStack {
    RealStack::start(
        |oc| oc["permission"]["bash"] = json!("ask"),
        |cfg| {
            cfg.permissions.rules = vec![Rule {
                tenant: None,
                permission: "bash".into(),
                pattern: "*".into(),
                action: Action::Ask,
            }]
        },
    )
    .await
}

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn output(mut cmd: Command) -> Output {
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(RUN, cmd.output())
        .await
        .expect("the example finishes")
        .expect("the example starts");
    Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Where nats-py is (`.tools/python`), or `None` (said) when pip is
/// unavailable and so it could not be installed.
fn python_tools() -> Option<PathBuf> {
    let tools = root().join(".tools/python");
    if !tools.join("nats").is_dir() {
        let pip = std::process::Command::new("python3")
            .args(["-m", "pip", "--version"])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            !pip,
            "pip is available but nats-py is not in {}: run .ci/install-deps",
            tools.display()
        );
        eprintln!(
            "SKIPPED: pip is unavailable, so nats-py could not be installed for examples/python"
        );
        return None;
    }
    Some(tools)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_example_exits_1_when_no_bridge_listens() {
    let Some(tools) = python_tools() else {
        return;
    };
    let nats = crate::support::nats::NatsServer::start();
    let mut cmd = Command::new("python3");
    cmd.arg(root().join("examples/python/stream_and_answer.py"))
        .arg("anyone there?")
        .args(["--server", &nats.url(), "--timeout", "60"])
        .env("PYTHONPATH", &tools);
    let started = std::time::Instant::now();
    let out = output(cmd).await;
    assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        out.stderr.trim(),
        "no bridge is listening on opencode.prompt (is the daemon running, on this NATS server?)"
    );
    assert_eq!(out.stdout, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_example_streams_and_answers_a_permission() {
    let Some(tools) = python_tools() else {
        return;
    };
    let s = stack().await;
    let marker = format!("py-example-{}", std::process::id());
    let mut cmd = Command::new("python3");
    cmd.arg(root().join("examples/python/stream_and_answer.py"))
        .arg(format!("[tool:bash echo {marker}] run it"))
        .args(["--server", &s.nats.url(), "--permissions", "once"])
        .env("PYTHONPATH", &tools);
    let out = output(cmd).await;
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert_eq!(
        out.stdout.trim(),
        fake_llm::tool_followup_reply(&marker),
        "stderr: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains("permission bash") && out.stderr.contains("\"ok\":true"),
        "{}",
        out.stderr
    );
    s.bridge.stop().await.unwrap();
}

/// The example binary: built by `cargo test` (examples are built with the
/// tests), else built here.
async fn rust_example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let target = exe.parent().unwrap().parent().unwrap();
    let bin = target.join("examples/rust_client");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = output({
            let mut c = Command::new(cargo);
            c.args(["build", "--example", "rust_client", "--manifest-path"])
                .arg(root().join("Cargo.toml"));
            c
        })
        .await;
        assert_eq!(out.code, Some(0), "cargo build --example: {}", out.stderr);
    }
    bin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_example_streams_and_answers_a_permission() {
    let bin = rust_example().await;
    let s = stack().await;
    let marker = format!("rs-example-{}", std::process::id());
    let mut cmd = Command::new(bin);
    cmd.arg(format!("[tool:bash echo {marker}] run it"))
        .env("OPENCODE_BRIDGE__NATS__URL", s.nats.url());
    let out = output(cmd).await;
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert_eq!(
        out.stdout.trim(),
        fake_llm::tool_followup_reply(&marker),
        "stderr: {}",
        out.stderr
    );
    assert!(out.stderr.contains("permission bash"), "{}", out.stderr);
    s.bridge.stop().await.unwrap();
}
