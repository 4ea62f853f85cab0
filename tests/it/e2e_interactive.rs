//! Interactive turns against the real OpenCode: permission requests
//! answered over NATS (once, reject, never), the policy alone, a model
//! switch, an unknown model, and usage equal to what the fake LLM reported.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};

use crate::support::bridge::{assert_typed, assert_well_formed, request, terminal};
use crate::support::fake_llm::{self};
use crate::support::nats::{subscribe_ready, Reply};
use crate::support::rig::RealStack;
use opencode_nats_bridge::protocol::interactive::{Action, Rule};

const TURN: Duration = Duration::from_secs(60);

/// OpenCode asks before every bash call; the bridge's policy is `rules`.
async fn stack(rules: Vec<Rule>, ask_timeout: Duration) -> RealStack {
    RealStack::start(
        |oc| oc["permission"]["bash"] = json!("ask"),
        |cfg| {
            cfg.permissions.rules = rules;
            cfg.permissions.ask_timeout = ask_timeout;
        },
    )
    .await
}

fn ask_bash() -> Vec<Rule> {
    vec![Rule {
        tenant: None,
        permission: "bash".into(),
        pattern: "*".into(),
        action: Action::Ask,
    }]
}

/// Sends an interactive prompt; when the `permission` reply comes, answers
/// it with `answer` (if any) and returns every reply plus the answer's ack.
async fn interactive_turn(
    c: &async_nats::Client,
    text: &str,
    answer: Option<&str>,
) -> (Vec<Reply>, Option<Value>) {
    let inbox = c.new_inbox();
    let mut sub = subscribe_ready(c, inbox.clone()).await;
    let prompt = json!({"text": text, "interactive": true, "conversation": "ask.me"});
    c.publish_with_reply("opencode.prompt", inbox, prompt.to_string().into())
        .await
        .unwrap();
    let mut replies: Vec<Reply> = Vec::new();
    let mut ack = None;
    loop {
        let m = tokio::time::timeout(TURN, sub.next())
            .await
            .unwrap_or_else(|_| panic!("no terminal reply: {replies:#?}"))
            .unwrap();
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        let kind = v["kind"].as_str().unwrap_or("").to_string();
        replies.push((m.headers.clone(), v.clone()));
        if kind == "permission" {
            if let Some(a) = answer {
                let subject = v["reply_subject"].as_str().unwrap().to_string();
                let r = tokio::time::timeout(
                    Duration::from_secs(10),
                    c.request(subject, a.to_string().into()),
                )
                .await
                .expect("answer acknowledged")
                .unwrap();
                ack = Some(serde_json::from_slice(&r.payload).unwrap());
            }
        }
        if kind == "final" || kind == "error" {
            break;
        }
    }
    replies.extend(collect_after(&mut sub).await);
    (replies, ack)
}

async fn collect_after(sub: &mut async_nats::Subscriber) -> Vec<Reply> {
    let mut out = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
        out.push((
            m.headers.clone(),
            serde_json::from_slice(&m.payload).unwrap(),
        ));
    }
    out
}

fn kinds(r: &[Reply]) -> Vec<String> {
    r.iter()
        .map(|(_, v)| v["kind"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_answered_once_over_nats() {
    let s = stack(ask_bash(), Duration::from_secs(30)).await;
    let (r, ack) =
        interactive_turn(&s.client, "[tool:bash echo granted-once] go", Some("once")).await;
    assert_well_formed_with_extensions(&r);
    let p = r
        .iter()
        .find(|(_, v)| v["kind"] == "permission")
        .expect("a permission reply");
    assert_eq!(p.1["permission"], "bash");
    assert_eq!(p.1["patterns"], json!(["echo granted-once"]));
    assert!(p.1["request_id"].as_str().unwrap().starts_with("per"));
    assert_eq!(ack.unwrap()["applied"], "once");
    let res = r
        .iter()
        .find(|(_, v)| v["kind"] == "tool_result")
        .expect("tool_result");
    assert_eq!(res.1["success"], true);
    assert!(res.1["result"].as_str().unwrap().contains("granted-once"));
    let fin = terminal(&r);
    assert_eq!(fin["kind"], "final", "{r:#?}");
    assert!(
        fin["notes"].to_string().contains("answered `once`"),
        "{fin}"
    );
    s.bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_is_applied_as_once_and_reject_stops_the_tool() {
    let s = stack(ask_bash(), Duration::from_secs(30)).await;
    let (r, ack) = interactive_turn(
        &s.client,
        "[tool:bash echo granted-always] go",
        Some(r#"{"reply":"always"}"#),
    )
    .await;
    assert_well_formed_with_extensions(&r);
    let ack = ack.unwrap();
    assert_eq!(ack["applied"], "once", "{ack}");
    assert!(ack["note"].as_str().unwrap().contains("once"));
    assert_eq!(terminal(&r)["kind"], "final");
    // `always` was not granted server-wide: the next call is asked again,
    // and rejected this time.
    let started = std::time::Instant::now();
    let (r, _) =
        interactive_turn(&s.client, "[tool:bash echo not-allowed] go", Some("reject")).await;
    assert_well_formed_with_extensions(&r);
    // OpenCode stops its loop after a rejection (finish "tool-calls", idle):
    // that is the end, well before the 30 s idle deadline.
    let t = terminal(&r);
    assert_eq!(t["kind"], "final", "{r:#?}");
    assert_eq!(t["finish"], "tool-calls", "{t}");
    assert!(t["notes"].to_string().contains("answered `reject`"), "{t}");
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "{:?}",
        started.elapsed()
    );
    assert!(
        kinds(&r).contains(&"permission".to_string()),
        "asked again: {r:#?}"
    );
    let res = r
        .iter()
        .find(|(_, v)| v["kind"] == "tool_result")
        .expect("tool_result");
    assert_eq!(res.1["success"], false, "{res:?}");
    assert!(!res.1["result"].as_str().unwrap().contains("not-allowed\n"));
    assert_eq!(
        r.iter()
            .filter(|(_, v)| v["kind"] == "final" || v["kind"] == "error")
            .count(),
        1
    );
    s.bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_permission_times_out_and_the_turn_ends() {
    let s = stack(ask_bash(), Duration::from_secs(2)).await;
    let (r, _) = interactive_turn(&s.client, "[tool:bash echo never-answered] go", None).await;
    assert_well_formed_with_extensions(&r);
    assert!(kinds(&r).contains(&"permission".to_string()));
    let res = r
        .iter()
        .find(|(_, v)| v["kind"] == "tool_result")
        .expect("tool_result");
    assert_eq!(res.1["success"], false);
    let t = terminal(&r);
    assert_eq!(t["kind"], "final", "{r:#?}");
    assert!(
        t["notes"].to_string().contains("not answered within 2s"),
        "{t}"
    );
    s.bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_policy_allows_or_denies_without_asking() {
    // Not interactive and no rule: denied, and the turn still ends.
    let s = stack(vec![], Duration::from_secs(30)).await;
    let started = std::time::Instant::now();
    let r = request(
        &s.client,
        "opencode.prompt",
        "[tool:bash echo headless-denied] go",
        TURN,
    )
    .await;
    assert_well_formed(&r);
    assert!(!kinds(&r).contains(&"permission".to_string()));
    let t = terminal(&r);
    assert_eq!(t["kind"], "final", "{r:#?}");
    assert!(
        t["notes"].to_string().contains("no policy rule allows it"),
        "{t}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "{:?}",
        started.elapsed()
    );
    let res = r
        .iter()
        .find(|(_, v)| v["kind"] == "tool_result")
        .expect("tool_result");
    assert_eq!(res.1["success"], false);
    s.bridge.stop().await.unwrap();

    let allow = vec![Rule {
        tenant: None,
        permission: "bash".into(),
        pattern: "echo *".into(),
        action: Action::Allow,
    }];
    let s = stack(allow, Duration::from_secs(30)).await;
    let r = request(
        &s.client,
        "opencode.prompt",
        "[tool:bash echo policy-allowed] go",
        TURN,
    )
    .await;
    assert_well_formed(&r);
    let res = r
        .iter()
        .find(|(_, v)| v["kind"] == "tool_result")
        .expect("tool_result");
    assert_eq!(res.1["success"], true);
    assert!(res.1["result"].as_str().unwrap().contains("policy-allowed"));
    assert!(terminal(&r)["notes"]
        .to_string()
        .contains("allowed by policy"));
    s.bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_usage_and_cost() {
    let s = stack(vec![], Duration::from_secs(30)).await;
    let c = &s.client;
    // An unknown model is refused before anything reaches OpenCode.
    let r = request(
        c,
        "opencode.prompt",
        r#"{"text":"hi","model":"fake/nope","conversation":"models"}"#,
        TURN,
    )
    .await;
    assert_well_formed(&r);
    assert_eq!(terminal(&r)["code"], "bad_request", "{r:#?}");
    assert!(terminal(&r)["error"].as_str().unwrap().contains("nope"));
    let r = request(
        c,
        "opencode.prompt",
        r#"{"text":"hi","model":"nobody/m1","conversation":"models"}"#,
        TURN,
    )
    .await;
    assert_eq!(terminal(&r)["code"], "bad_request");

    let r1 = request(
        c,
        "opencode.prompt",
        r#"{"text":"first","conversation":"models"}"#,
        TURN,
    )
    .await;
    assert_eq!(terminal(&r1)["model"], "fake/m1");
    let r2 = request(
        c,
        "opencode.prompt",
        r#"{"text":"second","model":"fake/m2","conversation":"models"}"#,
        TURN,
    )
    .await;
    let fin = terminal(&r2);
    assert_eq!(fin["kind"], "final", "{r2:#?}");
    assert_eq!(fin["model"], "fake/m2");
    assert_eq!(fin["agent"], "build");
    // OpenCode's accounting of the fake LLM's usage chunk: input excludes
    // cached tokens, output excludes reasoning tokens.
    let u = &fin["usage"];
    assert_eq!(
        u["input"],
        fake_llm::USAGE_PROMPT_TOKENS - fake_llm::USAGE_CACHED_TOKENS
    );
    assert_eq!(
        u["output"],
        fake_llm::USAGE_COMPLETION_TOKENS - fake_llm::USAGE_REASONING_TOKENS
    );
    assert_eq!(u["reasoning"], fake_llm::USAGE_REASONING_TOKENS);
    assert_eq!(u["cache_read"], fake_llm::USAGE_CACHED_TOKENS);
    assert_eq!(fin["cost"], 0.0);
    // A tool turn has two LLM calls: usage is summed over both.
    s.bridge.stop().await.unwrap();
    let allow = vec![Rule {
        tenant: None,
        permission: "bash".into(),
        pattern: "*".into(),
        action: Action::Allow,
    }];
    let s = stack(allow, Duration::from_secs(30)).await;
    let r = request(
        &s.client,
        "opencode.prompt",
        "[tool:bash echo two-calls] go",
        TURN,
    )
    .await;
    let u = &terminal(&r)["usage"];
    assert_eq!(
        u["input"],
        2 * (fake_llm::USAGE_PROMPT_TOKENS - fake_llm::USAGE_CACHED_TOKENS),
        "{r:#?}"
    );
    assert_eq!(u["cache_read"], 2 * fake_llm::USAGE_CACHED_TOKENS);
    s.bridge.stop().await.unwrap();
}

/// `assert_well_formed` for turns that may carry the extension kinds.
pub(crate) fn assert_well_formed_with_extensions(replies: &[Reply]) {
    let core = replies;
    for (i, (_, v)) in core.iter().enumerate() {
        assert_typed(i, v);
        assert_eq!(v["seq"], i as u64, "seq gap at {i}: {replies:#?}");
    }
    let terminals: Vec<usize> = core
        .iter()
        .enumerate()
        .filter(|(_, (_, v))| v["kind"] == "final" || v["kind"] == "error")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        terminals,
        vec![core.len() - 1],
        "exactly one terminal, last: {replies:#?}"
    );
    let last = terminal(replies);
    if last["kind"] == "final" {
        let deltas: String = core
            .iter()
            .filter(|(_, v)| v["kind"] == "delta")
            .map(|(_, v)| v["content"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(deltas, last["content"].as_str().unwrap());
    }
}

/// Sends an interactive prompt; answers the `question` reply with `answer`.
async fn question_turn(c: &async_nats::Client, answer: &str) -> (Vec<Reply>, Option<Value>) {
    let inbox = c.new_inbox();
    let mut sub = subscribe_ready(c, inbox.clone()).await;
    let prompt = json!({"text": "[question] ask me", "interactive": true});
    c.publish_with_reply("opencode.prompt", inbox, prompt.to_string().into())
        .await
        .unwrap();
    let mut replies: Vec<Reply> = Vec::new();
    let mut ack = None;
    loop {
        let m = tokio::time::timeout(TURN, sub.next())
            .await
            .unwrap_or_else(|_| panic!("no terminal reply: {replies:#?}"))
            .unwrap();
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        replies.push((m.headers.clone(), v.clone()));
        if v["kind"] == "question" {
            let subject = v["reply_subject"].as_str().unwrap().to_string();
            let r = tokio::time::timeout(
                Duration::from_secs(10),
                c.request(subject, answer.to_string().into()),
            )
            .await
            .expect("answer acknowledged")
            .unwrap();
            ack = Some(serde_json::from_slice(&r.payload).unwrap());
        }
        if v["kind"] == "final" || v["kind"] == "error" {
            break;
        }
    }
    replies.extend(collect_after(&mut sub).await);
    (replies, ack)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn questions_answered_and_rejected_over_nats() {
    let s = stack(vec![], Duration::from_secs(30)).await;
    let (r, ack) = question_turn(&s.client, r#"{"answers": [["pear"]]}"#).await;
    assert_well_formed_with_extensions(&r);
    let q = r
        .iter()
        .find(|(_, v)| v["kind"] == "question")
        .expect("a question reply");
    assert_eq!(q.1["questions"][0]["question"], "Which fruit?");
    assert!(q.1["request_id"].as_str().unwrap().starts_with("que"));
    assert_eq!(ack.unwrap()["applied"], "answers");
    let res = r
        .iter()
        .find(|(_, v)| v["kind"] == "tool_result")
        .expect("tool_result");
    assert_eq!(res.1["tool"], "question");
    assert_eq!(res.1["success"], true, "{res:?}");
    assert!(
        res.1["result"].as_str().unwrap().contains("pear"),
        "{res:?}"
    );
    assert_eq!(terminal(&r)["kind"], "final", "{r:#?}");

    let (r, ack) = question_turn(&s.client, r#"{"reject": true}"#).await;
    assert_well_formed_with_extensions(&r);
    assert_eq!(ack.unwrap()["applied"], "reject");
    let res = r
        .iter()
        .find(|(_, v)| v["kind"] == "tool_result")
        .expect("tool_result");
    assert_eq!(res.1["success"], false, "{res:?}");
    s.bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subagent_tool_calls_and_usage_are_reported() {
    // OpenCode asks before bash, in the child session too: the bridge
    // follows the child, so the policy answers it (no hang).
    let allow = vec![Rule {
        tenant: None,
        permission: "bash".into(),
        pattern: "echo *".into(),
        action: Action::Allow,
    }];
    let s = stack(allow, Duration::from_secs(30)).await;
    let r = request(
        &s.client,
        "opencode.prompt",
        "[task:[tool:bash echo from-the-child] please:task] delegate",
        TURN,
    )
    .await;
    assert_well_formed(&r);
    let fin = terminal(&r);
    assert_eq!(fin["kind"], "final", "{r:#?}");
    let task = r
        .iter()
        .find(|(_, v)| v["kind"] == "tool_call" && v["tool"] == "task")
        .expect("the task call");
    let task_id = task.1["call_id"].clone();
    // The child's bash call, attributed to the task call.
    let child_call = r
        .iter()
        .find(|(_, v)| v["kind"] == "tool_call" && v["tool"] == "bash")
        .unwrap_or_else(|| panic!("the child's bash call: {r:#?}"));
    assert_eq!(child_call.1["parent_call_id"], task_id);
    let child_result = r
        .iter()
        .find(|(_, v)| v["kind"] == "tool_result" && v["tool"] == "bash")
        .expect("the child's bash result");
    assert!(child_result.1["result"]
        .as_str()
        .unwrap()
        .contains("from-the-child"));
    assert_eq!(child_result.1["parent_call_id"], task_id);
    // Usage: 2 LLM calls in the parent + 2 in the child.
    let per_call = fake_llm::USAGE_PROMPT_TOKENS - fake_llm::USAGE_CACHED_TOKENS;
    assert_eq!(fin["usage"]["input"], 4 * per_call, "{fin}");
    s.bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_rejects_the_pending_permission_at_opencode() {
    let s = stack(ask_bash(), Duration::from_secs(60)).await;
    let c = &s.client;
    let inbox = c.new_inbox();
    let mut sub = subscribe_ready(c, inbox.clone()).await;
    let prompt = json!({"text": "[tool:bash echo wait-for-me] go", "interactive": true, "trace_id": "abort-asking"});
    c.publish_with_reply("opencode.prompt", inbox, prompt.to_string().into())
        .await
        .unwrap();
    let mut replies: Vec<Reply> = Vec::new();
    // Wait until the caller is asked.
    loop {
        let m = tokio::time::timeout(TURN, sub.next())
            .await
            .expect("a reply")
            .unwrap();
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        replies.push((m.headers.clone(), v.clone()));
        if v["kind"] == "permission" {
            break;
        }
    }
    // OpenCode holds the request open.
    let pending = s.opencode.get_json("/permission").await;
    assert_eq!(pending.as_array().map(Vec::len), Some(1), "{pending}");
    let a = c
        .request("opencode.abort", r#"{"trace_id":"abort-asking"}"#.into())
        .await
        .unwrap();
    let a: Value = serde_json::from_slice(&a.payload).unwrap();
    assert_eq!(a["aborted"], true);
    replies.extend(crate::support::nats::collect_until_terminal(&mut sub, TURN).await);
    assert_well_formed_with_extensions(&replies);
    assert_eq!(terminal(&replies)["code"], "aborted", "{replies:#?}");
    // Nothing is left waiting at OpenCode.
    let mut left = Value::Null;
    for _ in 0..20 {
        left = s.opencode.get_json("/permission").await;
        if left.as_array().is_some_and(Vec::is_empty) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(left, json!([]), "a permission request was left pending");
    s.bridge.stop().await.unwrap();
}
