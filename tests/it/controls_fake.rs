//! Conversation controls on the fake OpenCode: paging at scale (120 turns,
//! 300 conversations), `new` (old session kept or deleted), a busy
//! conversation, another tenant, and the home of a conversation in a
//! two-daemon cluster.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use opencode_nats_bridge::config::OnNew;
use serde_json::{json, Value};

use crate::support::bridge::{request, terminal, test_config, Bridge};
use crate::support::control::{control, ok};
use crate::support::fake_opencode::{default_script, echo_reply, FakeOpenCode};
use crate::support::nats::{client, subscribe_ready, NatsServer};
use crate::support::rig::Rig;

async fn rig(tweak: impl FnOnce(&mut opencode_nats_bridge::config::Config)) -> Rig {
    Rig::start(default_script, tweak).await
}

/// One turn; its final.
async fn turn(r: &Rig, subject: &str, text: &str) -> Value {
    let replies = r.ask(subject, text).await;
    let fin = terminal(&replies).clone();
    assert_eq!(fin["kind"], "final", "{replies:?}");
    fin
}

fn user_texts(page: &Value) -> Vec<String> {
    page["turns"]
        .as_array()
        .expect("turns")
        .iter()
        .map(|t| t["replies"][0]["text"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_over_120_turns_and_list_over_300_conversations() {
    let r = rig(|_| {}).await;
    let c = &r.client;
    for i in 1..=120 {
        turn(&r, "opencode.prompt.t1.long", &format!("turn {i}")).await;
    }
    // Newest page first, each page oldest-first; `next` pages back.
    let mut seen: Vec<String> = Vec::new();
    let mut before: Option<Value> = None;
    let mut pages = 0;
    loop {
        let mut q = json!({"conversation": "t1.long", "limit": 50});
        if let Some(b) = &before {
            q["before"] = b.clone();
        }
        let page = ok(c, "opencode.control.t1.history", &q.to_string()).await;
        let texts = user_texts(&page);
        let t = &page["turns"][0]["replies"];
        assert_eq!(t[1]["kind"], "final", "{t}");
        assert_eq!(t[1]["content"], echo_reply(&texts[0]).as_str());
        seen.splice(0..0, texts);
        pages += 1;
        if page["next"].is_null() {
            break;
        }
        before = Some(page["next"].clone());
        assert!(pages < 5, "history does not end");
    }
    let want: Vec<String> = (1..=120).map(|i| format!("turn {i}")).collect();
    assert_eq!((pages, seen), (3, want));
    // A limit above `[controls] max_history_turns` is capped.
    let big = ok(
        c,
        "opencode.control.t1.history",
        r#"{"conversation":"t1.long","limit":1000}"#,
    )
    .await;
    assert_eq!(big["turns"].as_array().unwrap().len(), 50);

    // 300 conversations of t1 (and a few of t2) in OpenCode.
    for i in 0..300 {
        r.fake.add_session(&format!("nats:t1.c{i:03}"));
    }
    for i in 0..5 {
        r.fake.add_session(&format!("nats:t2.c{i}"));
    }
    let mut keys: Vec<String> = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut q = json!({});
        if let Some(a) = &after {
            q["after"] = json!(a);
        }
        let page = ok(c, "opencode.control.t1.list", &q.to_string()).await;
        let convs = page["conversations"].as_array().unwrap();
        assert!(convs.len() <= 100, "{}", convs.len());
        for e in convs {
            assert_eq!(e["busy"], false, "{e}");
            assert!(e["session_id"].as_str().unwrap().starts_with("ses"), "{e}");
            keys.push(e["conversation"].as_str().unwrap().to_string());
        }
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
        assert!(keys.len() <= 301, "list does not end");
    }
    let mut want: Vec<String> = (0..300).map(|i| format!("t1.c{i:03}")).collect();
    want.push("t1.long".into());
    want.sort();
    assert_eq!(keys, want, "every conversation of t1 once, in order");
    let t2 = ok(c, "opencode.control.t2.list", "{}").await;
    assert_eq!(t2["conversations"].as_array().unwrap().len(), 5, "{t2}");
    r.stop().await;
}

async fn new_then_prompt(on_new: OnNew) {
    let r = rig(|c| c.controls.on_new = on_new).await;
    let c = &r.client;
    let first = turn(&r, "opencode.prompt.t1.n", "before").await;
    let old = first["session_id"].as_str().unwrap().to_string();
    let v = ok(c, "opencode.control.t1.new", r#"{"conversation":"t1.n"}"#).await;
    assert_eq!(v["old_session"], old.as_str(), "{v}");
    let second = turn(&r, "opencode.prompt.t1.n", "after").await;
    let new = second["session_id"].as_str().unwrap();
    assert_ne!(new, old, "a new session");
    let info = ok(c, "opencode.control.t1.info", r#"{"conversation":"t1.n"}"#).await;
    assert_eq!(
        (info["session_id"].as_str(), &info["turns"]),
        (Some(new), &json!(1))
    );
    let sessions = r.fake.sessions();
    let kept = sessions.iter().find(|s| s.id == old);
    match on_new {
        OnNew::Keep => {
            let kept = kept.expect("the old session is kept");
            assert_eq!(
                kept.title, "kept:nats:t1.n",
                "out of the conversation's title"
            );
            assert_eq!(kept.messages.len(), first_len(&r, &old), "untouched");
        }
        OnNew::Delete => assert!(kept.is_none(), "the old session is deleted"),
    }
    r.stop().await;
}

fn first_len(r: &Rig, id: &str) -> usize {
    r.fake.messages(id).len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_then_a_prompt_starts_a_new_session_keeping_the_old() {
    new_then_prompt(OnNew::Keep).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_then_a_prompt_starts_a_new_session_deleting_the_old() {
    new_then_prompt(OnNew::Delete).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_conversation_refuses_changes_and_new_with_abort_ends_the_turn() {
    let r = rig(|_| {}).await;
    let c = &r.client;
    turn(&r, "opencode.prompt.t1.b", "first").await;
    let inbox = c.new_inbox();
    let mut sub = subscribe_ready(c, inbox.clone()).await;
    let hang = json!({"text": "[hang]", "trace_id": "busy-1"}).to_string();
    c.publish_with_reply("opencode.prompt.t1.b", inbox, hang.into())
        .await
        .unwrap();
    r.fake
        .wait_until("the hanging turn", Duration::from_secs(10), |f| {
            f.prompts().len() == 2
        })
        .await;
    let conv = r#"{"conversation":"t1.b"}"#;
    for op in ["undo", "redo", "compact", "fork", "new"] {
        let v = control(c, &format!("opencode.control.t1.{op}"), conv).await;
        assert_eq!(v["code"], "session_busy", "{op}: {v}");
        assert_eq!(v["retryable"], true, "{op}: {v}");
    }
    let info = ok(c, "opencode.control.t1.info", conv).await;
    assert_eq!(info["busy"], true, "{info}");
    let started = Instant::now();
    let v = ok(
        c,
        "opencode.control.t1.new",
        r#"{"conversation":"t1.b","abort":true}"#,
    )
    .await;
    assert_eq!(v["aborted"], true, "{v}");
    let replies =
        crate::support::nats::collect_until_terminal(&mut sub, Duration::from_secs(10)).await;
    let end = terminal(&replies);
    assert_eq!(
        (end["kind"].as_str(), end["code"].as_str()),
        (Some("error"), Some("aborted")),
        "{end}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    let fin = turn(&r, "opencode.prompt.t1.b", "fresh").await;
    assert_ne!(fin["session_id"], v["old_session"], "{fin} {v}");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenant_reaches_nothing_of_the_victim() {
    let r = rig(|_| {}).await;
    let c = &r.client;
    let fin = turn(&r, "opencode.prompt.victim.c1", "secret plans").await;
    let sid = fin["session_id"].as_str().unwrap().to_string();
    let calls = |f: &FakeOpenCode| {
        f.requests()
            .iter()
            .filter(|q| q.path != "/event" && q.path != "/global/health")
            .count()
    };
    let before = calls(&r.fake);
    let victim = r#"{"conversation":"victim.c1"}"#;
    for op in [
        "new", "undo", "redo", "compact", "diff", "fork", "history", "info",
    ] {
        for payload in [
            victim.to_string(),
            json!({"conversation": "victim.c1", "abort": true}).to_string(),
            json!({"conversation": "mallory.x", "to": "victim.c2"}).to_string(),
        ] {
            let v = control(c, &format!("opencode.control.mallory.{op}"), &payload).await;
            assert_eq!(v["code"], "forbidden", "{op} {payload}: {v}");
        }
    }
    // An op token that names another tenant's subject is nobody's op.
    let v = control(c, "opencode.control.mallory.victim", victim).await;
    assert_eq!(v["code"], "bad_request", "{v}");
    let listed = ok(c, "opencode.control.mallory.list", "{}").await;
    assert_eq!(listed["conversations"], json!([]), "{listed}");
    assert_eq!(
        calls(&r.fake),
        before + 1,
        "only mallory's list reached OpenCode"
    );
    let mine = ok(c, "opencode.control.victim.info", victim).await;
    assert_eq!(
        (mine["session_id"].as_str(), &mine["turns"]),
        (Some(sid.as_str()), &json!(1))
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_a_control_acts_at_the_conversations_home_and_is_answered_once() {
    let nats = NatsServer::start();
    let (fa, fb) = (FakeOpenCode::start().await, FakeOpenCode::start().await);
    let cfg = |f: &FakeOpenCode, host: &str| {
        let mut c = test_config(&nats.url(), &f.url(), None);
        c.service.host = Some(host.to_string());
        c
    };
    let a = Bridge::start(cfg(&fa, "host-a")).await;
    let b = Bridge::start(cfg(&fb, "host-b")).await;
    let c = client(&nats.url()).await;
    let r = request(
        &c,
        "opencode.prompt.t1.home",
        "hello home",
        Duration::from_secs(20),
    )
    .await;
    let fin = terminal(&r);
    assert_eq!(fin["kind"], "final", "{r:?}");
    let sid = fin["session_id"].as_str().unwrap().to_string();
    let (home, other) = if fa.prompts().is_empty() {
        (&fb, &fa)
    } else {
        (&fa, &fb)
    };
    // The queue group spreads these over both daemons (all ten on the
    // home has a chance of 1 in 1024); each is answered once, at home.
    let mut sessions = HashSet::new();
    for _ in 0..10 {
        let v = ok(
            &c,
            "opencode.control.t1.history",
            r#"{"conversation":"t1.home"}"#,
        )
        .await;
        assert_eq!(v["turns"].as_array().unwrap().len(), 1, "{v}");
        sessions.insert(v["session_id"].as_str().unwrap().to_string());
    }
    assert_eq!(sessions, HashSet::from([sid.clone()]));
    let path = format!("/session/{sid}/message");
    assert!(home.requests().iter().filter(|q| q.path == path).count() >= 10);
    let elsewhere: Vec<String> = other
        .requests()
        .iter()
        .filter(|q| q.path.starts_with("/session/ses"))
        .map(|q| format!("{} {}", q.method, q.path))
        .collect();
    assert!(
        elsewhere.is_empty(),
        "nothing at the other OpenCode: {elsewhere:?}"
    );
    // A change goes home too: `new` there (the home record forgets the
    // session, so a daemon taking over would not bring it back), then the
    // next prompt there.
    let kv = async_nats::jetstream::new(c.clone())
        .get_key_value("opencode_bridge_conversations")
        .await
        .unwrap();
    let key = opencode_nats_bridge::cluster::home::key("t1.home");
    let session_of_home = || async {
        let v = kv.get(key.clone()).await.unwrap().expect("a home record");
        serde_json::from_slice::<Value>(&v).unwrap()["session_id"].clone()
    };
    assert_eq!(session_of_home().await, sid.as_str());
    ok(
        &c,
        "opencode.control.t1.new",
        r#"{"conversation":"t1.home"}"#,
    )
    .await;
    assert_eq!(session_of_home().await, Value::Null);
    let r = request(
        &c,
        "opencode.prompt.t1.home",
        "again",
        Duration::from_secs(20),
    )
    .await;
    assert_ne!(terminal(&r)["session_id"].as_str(), Some(sid.as_str()));
    assert!(other.prompts().is_empty());
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// Starts a `[hang]` turn in `t1.s` (request style); its reply inbox.
async fn hanging(r: &Rig, trace: &str) -> async_nats::Subscriber {
    let c = &r.client;
    let inbox = c.new_inbox();
    let sub = subscribe_ready(c, inbox.clone()).await;
    let n = r.fake.prompts().len();
    let hang = json!({"text": "[hang]", "trace_id": trace}).to_string();
    c.publish_with_reply("opencode.prompt.t1.s", inbox, hang.into())
        .await
        .unwrap();
    r.fake
        .wait_until("the hanging turn", Duration::from_secs(10), |f| {
            f.prompts().len() == n + 1
        })
        .await;
    sub
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steer_supersedes_the_running_turn_and_reject_queues_nothing() {
    let r = rig(|_| {}).await;
    let c = &r.client;
    // reject: `session_busy` at once, and nothing waits behind the turn.
    let mut first = hanging(&r, "hang-1").await;
    let p = json!({"text": "not now", "when_busy": "reject"}).to_string();
    let replies = request(c, "opencode.prompt.t1.s", &p, Duration::from_secs(5)).await;
    let end = terminal(&replies);
    assert_eq!(
        (end["kind"].as_str(), end["code"].as_str()),
        (Some("error"), Some("session_busy")),
        "{end}"
    );
    let info = ok(c, "opencode.control.t1.info", r#"{"conversation":"t1.s"}"#).await;
    assert_eq!(
        (&info["busy"], &info["queued"]),
        (&json!(true), &json!(0)),
        "{info}"
    );

    // steer: the running turn ends `aborted` (superseded), the new one runs.
    let started = Instant::now();
    let p = json!({"text": "do this instead", "when_busy": "steer"}).to_string();
    let steered = tokio::spawn({
        let c = c.clone();
        async move { request(&c, "opencode.prompt.t1.s", &p, Duration::from_secs(10)).await }
    });
    let old =
        crate::support::nats::collect_until_terminal(&mut first, Duration::from_secs(10)).await;
    let end = terminal(&old);
    assert_eq!(
        (end["kind"].as_str(), end["code"].as_str()),
        (Some("error"), Some("aborted")),
        "{end}"
    );
    assert_eq!(end["reason"], "superseded", "{end}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "superseded after {:?}",
        started.elapsed()
    );
    let new = steered.await.unwrap();
    let fin = terminal(&new);
    assert_eq!(fin["kind"], "final", "{new:?}");
    assert_eq!(fin["content"], echo_reply("do this instead").as_str());
    // Both prompts that ran reached OpenCode; the rejected one never did.
    let texts: Vec<String> = r
        .fake
        .prompts()
        .iter()
        .map(|q| String::from_utf8_lossy(&q.body).to_string())
        .collect();
    assert!(texts.iter().all(|t| !t.contains("not now")), "{texts:?}");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sends_each_control_and_exits_by_its_answer() {
    use crate::support::ops::cli;
    let r = rig(|_| {}).await;
    let fin = turn(&r, "opencode.prompt.t1.cli", "hello cli").await;
    let url = r.nats.url();
    let limit = Duration::from_secs(30);
    let base = [
        "--server",
        url.as_str(),
        "--tenant",
        "t1",
        "--conversation",
        "t1.cli",
    ];
    let info = cli(&[&["info"][..], &base[..]].concat(), limit).await;
    assert_eq!(info.code, Some(0), "{info:?}");
    let v: Value = serde_json::from_str(&info.stdout).expect("pretty JSON");
    assert_eq!(v["session_id"], fin["session_id"], "{v}");
    let h = cli(
        &[&["history", "--json", "--limit", "1"][..], &base[..]].concat(),
        limit,
    )
    .await;
    assert_eq!(h.code, Some(0), "{h:?}");
    let v: Value = serde_json::from_str(h.stdout.trim()).expect("one JSON line");
    assert_eq!(v["turns"][0]["replies"][0]["text"], "hello cli", "{v}");
    // Another tenant: refused, exit 2, the reason on stderr.
    let other = [
        "--server",
        url.as_str(),
        "--tenant",
        "t2",
        "--conversation",
        "t1.cli",
    ];
    let undo = cli(&[&["undo"][..], &other[..]].concat(), limit).await;
    assert_eq!(undo.code, Some(2), "{undo:?}");
    assert!(undo.stderr.contains("forbidden"), "{undo:?}");
    let list = cli(
        &["list", "--server", url.as_str(), "--tenant", "t1", "--json"],
        limit,
    )
    .await;
    assert_eq!(list.code, Some(0), "{list:?}");
    assert!(list.stdout.contains("\"t1.cli\""), "{list:?}");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_nats_permissions_let_a_chat_user_control_only_its_own() {
    use crate::ops_nats_permissions::{conf, password, user, violation};
    let nats = NatsServer::start_with_config(&conf());
    let url = nats.url();
    let fake = FakeOpenCode::start().await;
    let mut cfg = test_config(&url, &fake.url(), None);
    cfg.nats.user = Some("bridge".into());
    cfg.nats.password = Some(password("bridge"));
    cfg.nats.inbox_prefix = "_INBOX.bridge".into();
    let bridge = Bridge::start(cfg).await;
    let (slack, mut errors) = user(&url, "slack").await;
    let inbox = slack.new_inbox();
    let mut sub = slack.subscribe(inbox.clone()).await.unwrap();
    let p = r#"{"conversation":"slack.C1"}"#;
    slack
        .publish_with_reply("opencode.control.slack.info", inbox, p.into())
        .await
        .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut sub))
        .await
        .expect("an answer")
        .unwrap();
    let v: Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    slack
        .publish(
            "opencode.control.discord.info",
            r#"{"conversation":"discord.D1"}"#.into(),
        )
        .await
        .unwrap();
    violation(&mut errors, "opencode.control.discord.info").await;
    slack
        .publish("opencode.control.undo", p.into())
        .await
        .unwrap();
    violation(&mut errors, "opencode.control.undo").await;
    bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diff_past_the_limit_is_cut_and_whole_in_the_object_store() {
    use crate::support::fake_opencode::{ev, text_turn, Step};
    // Each turn changed one file by a 30 KB patch (OpenCode records it in
    // the user message's summary).
    let patch = |i: usize| {
        format!(
            "--- f{i}.txt\n+++ f{i}.txt\n@@ -1 +1 @@\n{}\n",
            "+x".repeat(15_000)
        )
    };
    let r = Rig::start(
        move |input: &crate::support::fake_opencode::TurnInput| {
            let mut summary = ev::user_summary(&input.session_id, &input.user_id, 1, &input.model());
            summary["properties"]["info"]["summary"]["diffs"] = json!([{"file": format!("f{}.txt", input.nth_in_session),
                "patch": patch(input.nth_in_session), "additions": 1, "deletions": 1, "status": "modified"}]);
            text_turn(input, &["done"])
                .insert_before(|s| crate::support::fake_opencode::emits(s, "session.idle"), Step::Emit(summary))
        },
        |c| c.controls.max_diff_bytes = 40_000,
    )
    .await;
    let c = &r.client;
    turn(&r, "opencode.prompt.t1.d", "one").await;
    turn(&r, "opencode.prompt.t1.d", "two").await;
    let v = ok(c, "opencode.control.t1.diff", r#"{"conversation":"t1.d"}"#).await;
    let files = v["files"].as_array().unwrap();
    assert_eq!(files.len(), 2, "{}", v["files"][0]["file"]);
    let kept: usize = files
        .iter()
        .map(|f| f["patch"].as_str().unwrap().len())
        .sum();
    assert!(kept <= 40_000, "{kept}");
    assert_eq!(v["truncated"], true);
    let o = &v["diff_object"];
    assert!(
        o["bucket"].as_str().unwrap().ends_with("-t1"),
        "the tenant's own bucket: {o}"
    );
    let caller = opencode_nats_bridge::bus::Caller::connect(
        &test_config(&r.nats.url(), "http://x", None).nats,
    )
    .await
    .unwrap();
    let whole = caller
        .fetch_object(o["bucket"].as_str().unwrap(), o["name"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8(whole).unwrap(),
        format!("{}{}", patch(0), patch(1))
    );
    // One turn's diff alone.
    let first = files[0]["message_id"].as_str().unwrap();
    let q = json!({"conversation": "t1.d", "message": first}).to_string();
    let one = ok(c, "opencode.control.t1.diff", &q).await;
    assert_eq!(
        one["files"].as_array().unwrap().len(),
        1,
        "{}",
        one["files"][0]["file"]
    );
    assert_eq!(one["files"][0]["file"], "f0.txt");
    r.stop().await;
}

/// With workspaces (and so in the process and sandbox modes) the controls
/// would act on the shared OpenCode, not on the conversation's workspace or
/// its tenant's server: every op is refused, typed, and none reaches
/// OpenCode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_workspaces_every_control_is_refused_and_reaches_nothing() {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().to_path_buf();
    let r = rig(move |c| c.workspaces.root = Some(path)).await;
    let calls = |f: &FakeOpenCode| {
        f.requests()
            .iter()
            .filter(|q| q.path != "/event" && q.path != "/global/health")
            .count()
    };
    let before = calls(&r.fake);
    let own = r#"{"conversation":"slack.c1"}"#;
    for op in [
        "new", "undo", "redo", "compact", "diff", "fork", "history", "info", "list", "commands",
    ] {
        let v = control(&r.client, &format!("opencode.control.slack.{op}"), own).await;
        assert_eq!(v["code"], "bad_request", "{op}: {v}");
        assert!(
            v["error"]
                .as_str()
                .unwrap_or_default()
                .contains("[workspaces] root"),
            "{op}: {v}"
        );
    }
    assert_eq!(calls(&r.fake), before, "a refused control reached OpenCode");
    r.stop().await;
}
