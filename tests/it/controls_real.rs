//! Conversation controls end to end on the real OpenCode (pinned) with
//! the fake LLM: a turn that edits a file in a git repository, `diff`,
//! `undo` and `redo` on disk and in `history`; another tenant refused.

use std::path::Path;
use std::time::Duration;

use opencode_nats_bridge::protocol::interactive::{Action, Rule};
use serde_json::json;

use crate::support::bridge::{assert_well_formed, request, terminal};
use crate::support::control::{control, ok, turns};
use crate::support::rig::RealStack;

const TURN: Duration = Duration::from_secs(90);

/// A git repository holding `notes.txt` ("old"), committed.
fn project() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("controls-project-")
        .tempdir()
        .expect("temp dir");
    std::fs::write(dir.path().join("notes.txt"), "old\n").unwrap();
    for args in [
        &["init", "-q"][..],
        &["add", "notes.txt"],
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.com",
            "commit",
            "-qm",
            "start",
        ],
    ] {
        let st = std::process::Command::new("git")
            .args(args)
            .current_dir(dir.path())
            .status()
            .expect("git runs");
        assert!(st.success(), "git {args:?}");
    }
    dir
}

/// OpenCode asks for every permission; tenant `t1` may edit.
async fn stack(project: &Path) -> RealStack {
    let dir = project.to_path_buf();
    RealStack::start(
        |oc| oc["permission"] = json!({"*": "ask"}),
        move |c| {
            c.opencode.directory = Some(dir);
            c.permissions.rules = vec![Rule {
                tenant: Some("t1".into()),
                permission: "edit".into(),
                pattern: "*".into(),
                action: Action::Allow,
            }];
        },
    )
    .await
}

async fn turn(s: &RealStack, text: &str) -> serde_json::Value {
    let started = std::time::Instant::now();
    let r = request(&s.client, "opencode.prompt.t1.c1", text, TURN).await;
    assert_well_formed(&r);
    let fin = terminal(&r).clone();
    assert_eq!(fin["kind"], "final", "{r:#?}");
    assert!(
        started.elapsed() < TURN / 2,
        "the turn took {:?}",
        started.elapsed()
    );
    fin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undo_restores_the_edited_file_and_redo_brings_it_back() {
    let project = project();
    let file = project.path().join("notes.txt");
    let s = stack(project.path()).await;
    let c = &s.client;
    let conv = json!({"conversation": "t1.c1"}).to_string();
    turn(&s, "hello first").await;
    let edit = format!("[tool:write {}|new content\n] write it", file.display());
    let fin = turn(&s, &edit).await;
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "new content\n",
        "{fin}"
    );
    let session = fin["session_id"].clone();

    let diff = ok(c, "opencode.control.t1.diff", &conv).await;
    let files = diff["files"].as_array().unwrap();
    let notes = files
        .iter()
        .find(|f| f["file"].as_str().is_some_and(|n| n.ends_with("notes.txt")))
        .unwrap_or_else(|| panic!("diff names notes.txt: {diff}"));
    assert!(
        notes["patch"].as_str().unwrap().contains("+new content"),
        "{diff}"
    );
    assert_eq!(diff["truncated"], false);
    assert_eq!(turns(c, "opencode.control.t1.history", "t1.c1").await, 2);

    // Another tenant: every op on the victim's conversation is refused.
    for op in [
        "new", "undo", "redo", "compact", "diff", "fork", "history", "info",
    ] {
        let v = control(c, &format!("opencode.control.t2.{op}"), &conv).await;
        assert_eq!(v["ok"], false, "{op}: {v}");
        assert_eq!(v["code"], "forbidden", "{op}: {v}");
    }
    let v = ok(c, "opencode.control.t2.list", "{}").await;
    assert_eq!(v["conversations"], json!([]), "t2 sees none of t1's: {v}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "new content\n");
    let info = ok(c, "opencode.control.t1.info", &conv).await;
    assert_eq!(info["session_id"], session, "{info}");
    assert_eq!(info["turns"], 2, "{info}");

    let undo = ok(c, "opencode.control.t1.undo", &conv).await;
    assert_eq!(undo["files_restored"], true, "{undo}");
    assert!(undo["files"].to_string().contains("notes.txt"), "{undo}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "old\n", "{undo}");
    assert_eq!(turns(c, "opencode.control.t1.history", "t1.c1").await, 1);

    let redo = ok(c, "opencode.control.t1.redo", &conv).await;
    assert_eq!(redo["files_restored"], true, "{redo}");
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "new content\n",
        "{redo}"
    );
    assert_eq!(turns(c, "opencode.control.t1.history", "t1.c1").await, 2);
    let v = control(c, "opencode.control.t1.redo", &conv).await;
    assert_eq!(v["code"], "bad_request", "nothing left to redo: {v}");
    s.bridge.stop().await.unwrap();
}
