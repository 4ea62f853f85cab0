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

/// The texts of the user messages the fake LLM was sent for the last chat
/// request.
fn last_request_user_texts(s: &RealStack) -> Vec<String> {
    let reqs = s.llm.chat_requests();
    let last = reqs.last().expect("a chat request");
    last["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "user")
        .map(crate::support::fake_llm::content_text)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_at_turn_3_of_5_sees_turns_1_to_3_only() {
    let project = project();
    let s = stack(project.path()).await;
    let c = &s.client;
    for i in 1..=5 {
        turn(&s, &format!("fact {i}: the number is {}", i * 11)).await;
    }
    let conv = json!({"conversation": "t1.c1"}).to_string();
    let h = ok(c, "opencode.control.t1.history", &conv).await;
    let third = h["turns"][2]["message_id"].clone();
    let q = json!({"conversation": "t1.c1", "to": "t1.side", "message": third}).to_string();
    let f = ok(c, "opencode.control.t1.fork", &q).await;
    assert_eq!(f["conversation"], "t1.side", "{f}");
    let r = request(
        &s.client,
        "opencode.prompt.t1.side",
        "what do you know?",
        TURN,
    )
    .await;
    let fin = terminal(&r);
    assert_eq!(fin["kind"], "final", "{r:#?}");
    assert_eq!(fin["session_id"], f["session_id"], "the fork's session");
    let seen = last_request_user_texts(&s).join("\n");
    for i in 1..=3 {
        assert!(
            seen.contains(&format!("fact {i}:")),
            "turn {i} in the fork: {seen}"
        );
    }
    for i in 4..=5 {
        assert!(
            !seen.contains(&format!("fact {i}:")),
            "turn {i} not in the fork: {seen}"
        );
    }
    assert_eq!(
        turns(c, "opencode.control.t1.history", "t1.c1").await,
        5,
        "the original is unchanged"
    );
    assert_eq!(turns(c, "opencode.control.t1.history", "t1.side").await, 4);
    s.bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compact_answers_fewer_tokens_and_the_summary_keeps_turn_1() {
    let project = project();
    let s = stack(project.path()).await;
    let c = &s.client;
    turn(&s, "remember: the password is kumquat-42").await;
    for i in 2..=6 {
        turn(&s, &format!("turn {i} of small talk")).await;
    }
    let conv = json!({"conversation": "t1.c1"}).to_string();
    let v = ok(c, "opencode.control.t1.compact", &conv).await;
    let before = v["tokens_before"].as_u64().expect("tokens before");
    let after = v["tokens_after"].as_u64().expect("tokens after");
    assert!(after < before, "{v}");
    assert_eq!(v["model"], "fake/m1", "{v}");
    let fin = turn(&s, "what is the password?").await;
    // The next turn sees the summary (which has turn 1), not the turns.
    let users = last_request_user_texts(&s);
    assert!(!users.iter().any(|u| u.contains("small talk")), "{users:?}");
    let last = s.llm.chat_requests().last().unwrap()["messages"].to_string();
    assert!(
        last.contains("kumquat-42"),
        "turn 1's fact in the summary: {last}"
    );
    let info = ok(c, "opencode.control.t1.info", &conv).await;
    assert_eq!(
        info["session_id"], fin["session_id"],
        "the same session, compacted"
    );
    s.bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undo_outside_a_git_repository_says_no_file_was_restored() {
    let plain = tempfile::Builder::new()
        .prefix("controls-plain-")
        .tempdir()
        .unwrap();
    let file = plain.path().join("notes.txt");
    std::fs::write(&file, "old\n").unwrap();
    let s = stack(plain.path()).await;
    let c = &s.client;
    let conv = json!({"conversation": "t1.c1"}).to_string();
    let edit = format!("[tool:write {}|new content\n] write it", file.display());
    turn(&s, &edit).await;
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "new content\n");
    let undo = ok(c, "opencode.control.t1.undo", &conv).await;
    // OpenCode snapshots files only in a git repository: the answer says
    // nothing was restored, and indeed the file keeps the turn's content.
    assert_eq!(undo["files_restored"], false, "{undo}");
    assert_eq!(undo["files"], json!([]), "{undo}");
    assert!(
        undo["note"]
            .as_str()
            .unwrap()
            .contains("not a git repository"),
        "{undo}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "new content\n");
    assert_eq!(turns(c, "opencode.control.t1.history", "t1.c1").await, 0);
    s.bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_command_streams_and_ends_final_another_is_forbidden() {
    let project = project();
    let dir = project.path().join(".opencode/command");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("hello.md"),
        "---\ndescription: Greet someone\n---\nSay hello to $ARGUMENTS\n",
    )
    .unwrap();
    let path = project.path().to_path_buf();
    let s = RealStack::start(
        |_| {},
        move |c| {
            c.opencode.directory = Some(path);
            c.prompt.commands = vec!["hello".into()];
        },
    )
    .await;
    let c = &s.client;
    let listed = ok(c, "opencode.control.t1.commands", "").await;
    assert_eq!(
        listed["commands"],
        json!([{"name": "hello", "description": "Greet someone"}]),
        "{listed}"
    );
    let started = std::time::Instant::now();
    let p = json!({"command": {"name": "hello", "arguments": "world"}}).to_string();
    let r = request(c, "opencode.prompt.t1.cmd", &p, TURN).await;
    assert_well_formed(&r);
    let fin = terminal(&r);
    assert_eq!(fin["kind"], "final", "{r:#?}");
    assert!(
        fin["content"]
            .as_str()
            .unwrap()
            .contains("Say hello to world"),
        "{fin}"
    );
    assert!(
        r.iter().filter(|(_, v)| v["kind"] == "delta").count() > 1,
        "streamed"
    );
    assert!(started.elapsed() < TURN / 2, "{:?}", started.elapsed());
    let h = ok(
        c,
        "opencode.control.t1.history",
        r#"{"conversation":"t1.cmd"}"#,
    )
    .await;
    assert_eq!(h["turns"].as_array().unwrap().len(), 1, "{h}");

    let p = json!({"command": {"name": "init"}}).to_string();
    let r = request(c, "opencode.prompt.t1.cmd", &p, TURN).await;
    let end = terminal(&r);
    assert_eq!(
        (end["kind"].as_str(), end["code"].as_str()),
        (Some("error"), Some("forbidden")),
        "{end}"
    );
    assert!(end["error"].as_str().unwrap().contains("init"), "{end}");
    s.bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steer_ends_the_running_turn_superseded_and_reject_queues_nothing() {
    use crate::support::nats::{collect_until_terminal, subscribe_ready};
    let project = project();
    let s = stack(project.path()).await;
    let c = &s.client;
    let inbox = c.new_inbox();
    let mut slow = subscribe_ready(c, inbox.clone()).await;
    let p = json!({"text": "[slow] take your time", "trace_id": "slow-1"}).to_string();
    c.publish_with_reply("opencode.prompt.t1.c1", inbox, p.into())
        .await
        .unwrap();
    // Wait until the slow answer streams.
    let first = tokio::time::timeout(TURN, futures::StreamExt::next(&mut slow))
        .await
        .expect("the slow turn streams")
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&first.payload).unwrap();
    assert_eq!(v["kind"], "delta", "{v}");

    let p = json!({"text": "not now", "when_busy": "reject"}).to_string();
    let r = request(c, "opencode.prompt.t1.c1", &p, TURN).await;
    let end = terminal(&r);
    assert_eq!(
        (end["kind"].as_str(), end["code"].as_str()),
        (Some("error"), Some("session_busy")),
        "{end}"
    );

    let started = std::time::Instant::now();
    let p = json!({"text": "do this instead", "when_busy": "steer"}).to_string();
    let steered = tokio::spawn({
        let c = c.clone();
        async move { request(&c, "opencode.prompt.t1.c1", &p, TURN).await }
    });
    let old = collect_until_terminal(&mut slow, TURN).await;
    let took = started.elapsed();
    eprintln!("the steered turn ended after {took:?}");
    let end = terminal(&old);
    assert_eq!(
        (end["kind"].as_str(), end["code"].as_str()),
        (Some("error"), Some("aborted")),
        "{end}"
    );
    assert_eq!(end["reason"], "superseded", "{end}");
    // A second under no load; a margin for the shared test machine.
    assert!(took < Duration::from_secs(2), "superseded after {took:?}");
    let new = steered.await.unwrap();
    let fin = terminal(&new);
    assert_eq!(fin["kind"], "final", "{new:#?}");
    assert_eq!(
        fin["content"],
        crate::support::fake_llm::text_reply("do this instead")
    );
    let users = turns(c, "opencode.control.t1.history", "t1.c1").await;
    assert_eq!(
        users, 2,
        "the slow turn and the steering one; the rejected never reached OpenCode"
    );
    let sent: Vec<String> = s
        .llm
        .chat_requests()
        .iter()
        .map(|b| b["messages"].to_string())
        .collect();
    assert!(
        sent.iter().all(|m| !m.contains("not now")),
        "the rejected prompt reached the model"
    );
    s.bridge.stop().await.unwrap();
}
