//! Tenants and trust (docs/PROTOCOL.md, "Tenants and trust"), tried as a
//! hostile chat user would: a real nats-server running
//! `deploy/nats-server.conf` as shipped, the daemon as user `bridge` in
//! strict mode, `slack` the victim and `discord` the attacker. Each attack
//! gets a typed refusal, and spies on the victim's subjects, the victim's
//! turns and the fake OpenCode's request log show nothing reached the
//! victim.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::{Client, HeaderMap};
use futures::StreamExt;
use opencode_nats_bridge::protocol::interactive::{Action, Rule};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::e2e_interactive::assert_well_formed_with_extensions;
use crate::ops_nats_permissions::{conf, password, request, user, violation};
use crate::support::bridge::{assert_well_formed, terminal, test_config, Bridge};
use crate::support::fake_opencode::{
    default_script, ev, FakeOpenCode, Step, TurnBuilder, TurnInput,
};
use crate::support::nats::{collect_until_terminal, NatsServer, Reply};

const TURN: Duration = Duration::from_secs(20);

/// `[perm]`: a bash call that waits for its permission to be answered,
/// then does what OpenCode 1.18 does after a rejection without a message:
/// the tool errs, the message ends with `finish: "tool-calls"`, the session
/// goes idle, and no second answer comes.
fn script(input: &TurnInput) -> crate::support::fake_opencode::TurnScript {
    if !input.text.contains("[perm]") {
        return default_script(input);
    }
    let id = format!("per_trust{}", input.nth);
    let mut t = TurnBuilder::new(input);
    let sid = t.sid.clone();
    t.begin();
    let a = t.assistant();
    let args = json!({"command": "touch /tmp/pwned", "description": "x"});
    let p = t.tool_start(&a, "call_trust", "bash", &args);
    t.emit(ev::permission_asked(
        &sid,
        &id,
        "bash",
        &["touch /tmp/pwned"],
        &a,
        "call_trust",
    ));
    t.push(Step::WaitForRequest {
        method: "POST".into(),
        path: format!("/permission/{id}/reply"),
        timeout: Duration::from_secs(30),
    });
    t.emit(ev::permission_replied(&sid, &id, "reject"));
    t.tool_end(
        &a,
        &p,
        "call_trust",
        "bash",
        &args,
        Err("The user rejected permission to use this specific tool call."),
    );
    t.finish(&a, "tool-calls");
    t.end();
    t.build()
}

struct Rig {
    _nats: NatsServer,
    fake: FakeOpenCode,
    bridge: Option<Bridge>,
    slack: Client,
    discord: Client,
    discord_errors: mpsc::UnboundedReceiver<String>,
    /// Everything published on the victim's reply space and inboxes.
    spied: Arc<Mutex<Vec<(String, Value)>>>,
}

impl Rig {
    async fn start() -> Rig {
        let nats = NatsServer::start_with_config(&conf());
        let url = nats.url();
        let fake = FakeOpenCode::start().await;
        fake.set_script(script);
        let mut cfg = test_config(&url, &fake.url(), None);
        cfg.nats.user = Some("bridge".into());
        cfg.nats.password = Some(password("bridge"));
        cfg.nats.inbox_prefix = "_INBOX.bridge".into();
        cfg.tenancy.strict = true;
        cfg.cluster.instance_id = Some("bridge-1".into());
        cfg.permissions.rules = vec![Rule {
            tenant: None,
            permission: "bash".into(),
            pattern: "*".into(),
            action: Action::Ask,
        }];
        let bridge = Bridge::start(cfg).await;
        let (slack, _) = user(&url, "slack").await;
        let (discord, discord_errors) = user(&url, "discord").await;
        // The victim's own connection watches its whole space.
        let spied = Arc::new(Mutex::new(Vec::new()));
        for subject in ["opencode.reply.slack.>", "_INBOX.slack.>"] {
            let mut sub = slack.subscribe(subject).await.unwrap();
            let spied = spied.clone();
            tokio::spawn(async move {
                while let Some(m) = sub.next().await {
                    let v = serde_json::from_slice(&m.payload).unwrap_or(Value::Null);
                    spied.lock().unwrap().push((m.subject.to_string(), v));
                }
            });
        }
        slack.flush().await.unwrap();
        Rig {
            _nats: nats,
            fake,
            bridge: Some(bridge),
            slack,
            discord,
            discord_errors,
            spied,
        }
    }

    /// The attacker's request-style prompt; its replies.
    async fn attack(&self, subject: &str, payload: Value) -> Vec<Reply> {
        let r = request(&self.discord, subject, &payload.to_string(), TURN).await;
        assert_well_formed(&r);
        r
    }

    /// No message in the victim's space carries one of `traces`, and the
    /// fake OpenCode never saw a prompt with `marker`.
    fn assert_untouched(&self, traces: &HashSet<String>, marker: &str) {
        for (subject, body) in self.spied.lock().unwrap().iter() {
            let t = body["trace_id"].as_str().unwrap_or_default();
            assert!(
                !traces.contains(t),
                "an attacker's reply reached the victim on {subject}: {body}"
            );
            assert!(
                !body.to_string().contains(marker),
                "the attack reached the victim on {subject}: {body}"
            );
        }
        for p in self.fake.prompts() {
            assert!(
                !p.json().to_string().contains(marker),
                "an attacker's prompt reached OpenCode: {}",
                p.json()
            );
        }
    }

    async fn stop(mut self) {
        if let Some(b) = self.bridge.take() {
            b.stop().await.unwrap();
        }
    }
}

fn refused(r: &[Reply], code: &str) -> String {
    let t = terminal(r);
    assert_eq!(t["kind"], "error", "{r:#?}");
    assert_eq!(t["code"], code, "{r:#?}");
    assert_eq!(r.len(), 1, "a refusal is one reply: {r:#?}");
    t["error"].as_str().unwrap().to_string()
}

/// Collects what arrives on `sub` until a terminal reply (or `wait`).
async fn one_terminal(sub: &mut async_nats::Subscriber) -> Value {
    let r = collect_until_terminal(sub, TURN).await;
    assert_well_formed(&r);
    terminal(&r).clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_prompt_reaches_only_its_own_conversations_and_reply_space() {
    let mut rig = Rig::start().await;
    // The victim's conversation and session.
    let r = request(
        &rig.slack,
        "opencode.prompt.slack.C1",
        "hello from slack",
        TURN,
    )
    .await;
    assert_well_formed(&r);
    assert_eq!(terminal(&r)["kind"], "final", "{r:#?}");
    let victim_session = terminal(&r)["session_id"].as_str().unwrap().to_string();
    let victim_messages = rig.fake.messages(&victim_session).len();

    let mut traces = HashSet::new();
    let marker = "ATTACK-7f3";
    let subject = "opencode.prompt.discord.D1";

    // 1. Another tenant's conversation, by payload and by header.
    let r = rig
        .attack(
            subject,
            json!({"text": marker, "conversation": "slack.C1", "trace_id": "atk-1"}),
        )
        .await;
    assert!(refused(&r, "forbidden").contains("slack.C1"));
    traces.insert("atk-1".to_string());
    let mut h = HeaderMap::new();
    h.insert("Conversation", "slack.C1");
    h.insert("Trace-Id", "atk-1h");
    let inbox = rig.discord.new_inbox();
    let mut sub = rig.discord.subscribe(inbox.clone()).await.unwrap();
    rig.discord
        .publish_with_reply_and_headers(subject, inbox, h, marker.into())
        .await
        .unwrap();
    let r = collect_until_terminal(&mut sub, TURN).await;
    refused(&r, "forbidden");
    traces.insert("atk-1h".to_string());

    // 2. Another tenant's session, unknown sessions alike.
    let r = rig
        .attack(
            subject,
            json!({"text": marker, "session_id": victim_session, "trace_id": "atk-2"}),
        )
        .await;
    let theirs = refused(&r, "forbidden");
    let r = rig
        .attack(
            subject,
            json!({"text": marker, "session_id": "ses_doesnotexist1", "trace_id": "atk-2u"}),
        )
        .await;
    let unknown = refused(&r, "forbidden");
    assert_eq!(
        theirs.replace(&victim_session, "<id>"),
        unknown.replace("ses_doesnotexist1", "<id>"),
        "another tenant's session and an unknown one read the same"
    );
    traces.extend(["atk-2".to_string(), "atk-2u".to_string()]);

    // 3. reply_to into the victim's reply space: refused in the attacker's own.
    let mut own = rig
        .discord
        .subscribe("opencode.reply.discord.>")
        .await
        .unwrap();
    rig.discord.flush().await.unwrap();
    rig.discord
        .publish(
            subject,
            json!({"text": marker, "reply_to": "opencode.reply.slack.C1", "trace_id": "atk-3"})
                .to_string()
                .into(),
        )
        .await
        .unwrap();
    let t = one_terminal(&mut own).await;
    assert_eq!(
        (t["code"].as_str(), t["trace_id"].as_str()),
        (Some("forbidden"), Some("atk-3")),
        "{t}"
    );
    traces.insert("atk-3".to_string());

    // 4. A dotted trace id that would land in the victim's reply space.
    let r = rig
        .attack(subject, json!({"text": marker, "trace_id": "slack.C1.x"}))
        .await;
    assert!(refused(&r, "bad_request").contains("trace_id"));
    assert_ne!(terminal(&r)["trace_id"], "slack.C1.x");

    // 5. The victim's inbox as the NATS reply subject (strict mode).
    rig.discord
        .publish_with_reply(
            subject,
            "_INBOX.slack.stolen",
            json!({"text": marker, "trace_id": "atk-5"})
                .to_string()
                .into(),
        )
        .await
        .unwrap();
    let t = one_terminal(&mut own).await;
    assert_eq!(
        (t["code"].as_str(), t["trace_id"].as_str()),
        (Some("forbidden"), Some("atk-5")),
        "{t}"
    );
    assert!(
        t["error"].as_str().unwrap().contains("_INBOX.discord"),
        "{t}"
    );
    traces.insert("atk-5".to_string());

    // 6. Tools switched on by a prompt field.
    for tools in [json!({"bash": true}), json!({"*": true})] {
        let r = rig
            .attack(subject, json!({"text": marker, "tools": tools}))
            .await;
        assert!(refused(&r, "forbidden").contains("tools"));
    }
    // Switching a tool off is fine, and the attacker's own conversation works.
    let r = rig
        .attack(subject, json!({"text": "mine", "tools": {"bash": false}}))
        .await;
    assert_eq!(terminal(&r)["kind"], "final", "{r:#?}");
    assert_eq!(terminal(&r)["conversation"], "discord.D1");

    // 7. Publishing in the victim's namespace is stopped by NATS itself.
    rig.discord
        .publish("opencode.prompt.slack.C1", marker.into())
        .await
        .unwrap();
    violation(&mut rig.discord_errors, "opencode.prompt.slack.C1").await;
    // So is forging a prompt forwarded by another daemon, which would name
    // the victim's subject in a header (only daemons publish there).
    let forged = "opencode.bridge.instance.bridge-1.prompt";
    let mut h = async_nats::HeaderMap::new();
    h.insert("Bridge-Subject", "opencode.prompt.slack.C1");
    h.insert("Bridge-Forwarded-By", "bridge-2");
    rig.discord
        .publish_with_headers(forged, h, marker.into())
        .await
        .unwrap();
    violation(&mut rig.discord_errors, forged).await;

    // Let anything stray arrive, then check the victim saw nothing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    rig.assert_untouched(&traces, marker);
    assert_eq!(
        rig.fake.messages(&victim_session).len(),
        victim_messages,
        "the victim's session got no new message"
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cannot_abort_or_redirect_onto_another_tenants_turn() {
    let mut rig = Rig::start().await;
    // The victim's slow turn (20 deltas, 100 ms apart).
    let mut mine = rig.slack.subscribe("opencode.reply.slack.>").await.unwrap();
    rig.slack.flush().await.unwrap();
    rig.slack
        .publish(
            "opencode.prompt.slack.C2",
            json!({"text": "[slow] count", "trace_id": "victim-slow"})
                .to_string()
                .into(),
        )
        .await
        .unwrap();
    let first = tokio::time::timeout(TURN, mine.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.subject.as_str(), "opencode.reply.slack.victim-slow");
    let started = Instant::now();

    // Aborts on the attacker's own subject: by trace id, by conversation;
    // each answered exactly like a turn that does not exist.
    let ask = |payload: Value| {
        let c = rig.discord.clone();
        async move {
            let m = c
                .request("opencode.abort.discord", payload.to_string().into())
                .await
                .expect("an abort answer");
            serde_json::from_slice::<Value>(&m.payload).unwrap()
        }
    };
    let by_trace = ask(json!({"trace_id": "victim-slow", "drop_queued": true})).await;
    let by_conv = ask(json!({"conversation": "slack.C2", "drop_queued": true})).await;
    let unknown = ask(json!({"trace_id": "no-such-turn"})).await;
    for a in [&by_trace, &by_conv] {
        assert_eq!(a["aborted"], false, "{a}");
        assert_eq!(a["dropped"], 0, "{a}");
        assert_eq!(a["reason"], unknown["reason"], "{a} vs {unknown}");
    }
    // The operator's abort subject is closed to it by NATS.
    rig.discord
        .publish(
            "opencode.abort",
            json!({"trace_id": "victim-slow"}).to_string().into(),
        )
        .await
        .unwrap();
    violation(&mut rig.discord_errors, "opencode.abort").await;

    // A prompt whose reply subject is the abort subject (or another of the
    // daemon's own): refused in the attacker's space, never published there.
    let mut own = rig
        .discord
        .subscribe("opencode.reply.discord.>")
        .await
        .unwrap();
    rig.discord.flush().await.unwrap();
    for (i, target) in [
        "opencode.abort",
        "opencode.abort.slack",
        "opencode.prompt.slack.C2",
    ]
    .iter()
    .enumerate()
    {
        let trace = format!("victim-slow-{i}");
        rig.discord
            .publish_with_reply(
                "opencode.prompt.discord.D2",
                target.to_string(),
                json!({"text": "x", "trace_id": trace, "conversation": "discord.D2"})
                    .to_string()
                    .into(),
            )
            .await
            .unwrap();
        let t = one_terminal(&mut own).await;
        assert_eq!(t["code"], "forbidden", "{t}");
        assert!(t["error"].as_str().unwrap().contains("own subjects"), "{t}");
    }

    // A second live turn with the victim's trace id: refused, so an abort
    // or a reply subject always names one turn.
    let r = rig
        .attack(
            "opencode.prompt.discord.D3",
            json!({"text": "x", "trace_id": "victim-slow"}),
        )
        .await;
    refused(&r, "bad_request");

    // The victim's turn ran to its end, whole.
    let mut replies = vec![(
        first.headers.clone(),
        serde_json::from_slice(&first.payload).unwrap(),
    )];
    replies.extend(collect_until_terminal(&mut mine, TURN).await);
    assert_well_formed(&replies);
    let t = terminal(&replies);
    assert_eq!(
        t["kind"], "final",
        "the victim's turn was not aborted: {replies:#?}"
    );
    assert!(t["content"].as_str().unwrap().contains("slow-20"), "{t}");
    assert!(
        started.elapsed() < TURN,
        "the victim's turn ended well before any deadline"
    );
    assert!(
        rig.fake
            .requests_to("POST", "/session/")
            .iter()
            .all(|r| !r.path.ends_with("/abort")),
        "no abort reached OpenCode"
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_asking_tenant_answers_its_permission_and_a_rejection_ends_the_turn_at_once() {
    let mut rig = Rig::start().await;
    let mut mine = rig.slack.subscribe("opencode.reply.slack.>").await.unwrap();
    rig.slack.flush().await.unwrap();
    rig.slack
        .publish(
            "opencode.prompt.slack.C3",
            json!({"text": "[perm] clean up", "interactive": true, "trace_id": "victim-perm"})
                .to_string()
                .into(),
        )
        .await
        .unwrap();
    // Wait for the permission request.
    let mut replies: Vec<Reply> = Vec::new();
    let asked = loop {
        let m = tokio::time::timeout(TURN, mine.next())
            .await
            .unwrap()
            .unwrap();
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        replies.push((m.headers.clone(), v.clone()));
        if v["kind"] == "permission" {
            break v;
        }
    };
    let id = asked["request_id"].as_str().unwrap().to_string();
    let reply_subject = asked["reply_subject"].as_str().unwrap().to_string();
    assert_eq!(
        reply_subject,
        format!("opencode.permission.reply.slack.{id}")
    );

    // The attacker answers on its own subject: refused, nothing applied.
    let m = rig
        .discord
        .request(
            format!("opencode.permission.reply.discord.{id}"),
            "once".into(),
        )
        .await
        .expect("an acknowledgement");
    let ack: Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(ack["ok"], false, "{ack}");
    // ... and cannot publish on the victim's answer subject at all.
    rig.discord
        .publish(reply_subject.clone(), "once".into())
        .await
        .unwrap();
    violation(&mut rig.discord_errors, &reply_subject).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        rig.fake
            .requests_to("POST", &format!("/permission/{id}/reply"))
            .is_empty(),
        "the attacker's answer reached OpenCode"
    );

    // The victim rejects: OpenCode stops the loop (finish "tool-calls",
    // idle) and the turn ends with `final` at once, the decision in notes.
    let answered = Instant::now();
    let m = rig
        .slack
        .request(reply_subject, "reject".into())
        .await
        .expect("an acknowledgement");
    let ack: Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(ack["ok"], true, "{ack}");
    replies.extend(collect_until_terminal(&mut mine, TURN).await);
    assert_well_formed_with_extensions(&replies);
    let t = terminal(&replies);
    assert_eq!(t["kind"], "final", "{replies:#?}");
    assert_eq!(t["finish"], "tool-calls", "{t}");
    let notes = t["notes"].to_string();
    assert!(
        notes.contains("permission `bash`") && notes.contains("reject"),
        "{t}"
    );
    assert!(
        answered.elapsed() < Duration::from_secs(15),
        "the rejected turn ended promptly, not at a deadline ({:?})",
        answered.elapsed()
    );
    let applied = rig
        .fake
        .requests_to("POST", &format!("/permission/{id}/reply"));
    assert_eq!(applied.len(), 1);
    assert_eq!(applied[0].json()["reply"], "reject");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permission_the_policy_denies_ends_a_headless_turn_at_once() {
    let rig = Rig::start().await;
    let started = Instant::now();
    let r = request(
        &rig.slack,
        "opencode.prompt.slack.C4",
        &json!({"text": "[perm] clean up"}).to_string(),
        TURN,
    )
    .await;
    assert_well_formed(&r);
    let t = terminal(&r);
    assert_eq!(t["kind"], "final", "{r:#?}");
    assert!(t["notes"].to_string().contains("not interactive"), "{t}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    rig.stop().await;
}

/// A one-off prompt (no conversation, no session) leaves no session behind
/// (`[opencode] one_off_sessions = "delete"`, the default); `keep` keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_off_sessions_are_deleted_after_the_terminal_reply() {
    for keep in [false, true] {
        let nats = NatsServer::start();
        let fake = FakeOpenCode::start().await;
        let mut cfg = test_config(&nats.url(), &fake.url(), None);
        if keep {
            cfg.opencode.one_off_sessions = opencode_nats_bridge::config::OneOffSessions::Keep;
        }
        let bridge = Bridge::start(cfg).await;
        let c = crate::support::nats::client(&nats.url()).await;
        let r = crate::support::bridge::request(&c, "opencode.prompt", "just once", TURN).await;
        assert_well_formed(&r);
        assert_eq!(terminal(&r)["kind"], "final", "{r:#?}");
        let sid = terminal(&r)["session_id"].as_str().unwrap().to_string();
        // A conversation's session stays.
        let r =
            crate::support::bridge::request(&c, "opencode.prompt.team.c1", "keep me", TURN).await;
        let conv_sid = terminal(&r)["session_id"].as_str().unwrap().to_string();
        bridge.stop().await.unwrap();
        let deleted: Vec<String> = fake
            .requests_to("DELETE", "/session/")
            .iter()
            .map(|r| r.path.clone())
            .collect();
        let ids: Vec<String> = fake.sessions().iter().map(|s| s.id.clone()).collect();
        assert!(ids.contains(&conv_sid), "{ids:?}");
        if keep {
            assert!(deleted.is_empty(), "{deleted:?}");
            assert!(ids.contains(&sid), "{ids:?}");
        } else {
            assert_eq!(deleted, vec![format!("/session/{sid}")]);
            assert!(!ids.contains(&sid), "{ids:?}");
        }
    }
}

/// With `[opencode] require_ask`, a server whose own rules would run a tool
/// without asking (the real OpenCode 1.18 with bash allowed in its config)
/// is refused at start-up: a configuration error (exit 78), naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_ask_refuses_an_opencode_that_would_not_ask() {
    use crate::support::fake_llm::FakeLlm;
    use crate::support::real_opencode::{default_config, RealOpenCode};
    let nats = NatsServer::start();
    let llm = FakeLlm::start().await;
    // default_config allows bash, edit and read in OpenCode itself.
    let opencode = RealOpenCode::start_with_config(default_config(&llm.base_url())).await;
    let mut cfg = test_config(&nats.url(), opencode.base_url(), Some(opencode.password()));
    cfg.opencode.directory = Some(opencode.directory().to_path_buf());
    cfg.opencode.require_ask = true;
    let run = opencode_nats_bridge::app::run(cfg, std::future::pending(), None);
    let err = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("refused at start-up, not served")
        .expect_err("refused");
    assert!(err.is_config(), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("`bash`") && msg.contains("`edit`"), "{msg}");

    // Asking for everything in OpenCode's own config passes the check.
    let mut asking = default_config(&llm.base_url());
    asking["permission"] = json!({"*": "ask"});
    let opencode = RealOpenCode::start_with_config(asking).await;
    let mut cfg = test_config(&nats.url(), opencode.base_url(), Some(opencode.password()));
    cfg.opencode.directory = Some(opencode.directory().to_path_buf());
    cfg.opencode.require_ask = true;
    let bridge = Bridge::start(cfg).await;
    bridge.stop().await.unwrap();
}

/// One tenant cannot take every slot: beyond `[tenancy]
/// max_turns_per_tenant` its prompts get `overloaded` at once, while
/// another tenant's prompt is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_gets_overloaded_beyond_its_share_and_others_are_still_served() {
    let nats = NatsServer::start();
    let fake = FakeOpenCode::start().await;
    fake.set_script(script);
    let mut cfg = test_config(&nats.url(), &fake.url(), None);
    cfg.tenancy.max_turns_per_tenant = 2;
    let bridge = Bridge::start(cfg).await;
    let c = crate::support::nats::client(&nats.url()).await;
    // Two slow turns of `greedy` (20 deltas, 100 ms apart), on conversations
    // of their own.
    let mut subs = Vec::new();
    for i in 0..2 {
        let inbox = c.new_inbox();
        let mut sub = crate::support::nats::subscribe_ready(&c, inbox.clone()).await;
        c.publish_with_reply(
            format!("opencode.prompt.greedy.c{i}"),
            inbox,
            "[slow] count".into(),
        )
        .await
        .unwrap();
        // The first reply: the turn is running.
        tokio::time::timeout(TURN, sub.next())
            .await
            .unwrap()
            .unwrap();
        subs.push(sub);
    }
    let r =
        crate::support::bridge::request(&c, "opencode.prompt.greedy.c9", "one more", TURN).await;
    assert_well_formed(&r);
    let t = terminal(&r);
    assert_eq!(
        (t["kind"].as_str(), t["code"].as_str()),
        (Some("error"), Some("overloaded")),
        "{r:#?}"
    );
    assert_eq!(t["retryable"], true);
    // Another tenant is served meanwhile.
    let r = crate::support::bridge::request(&c, "opencode.prompt.polite.c1", "hello", TURN).await;
    assert_eq!(terminal(&r)["kind"], "final", "{r:#?}");
    // The greedy turns end whole; then greedy may prompt again.
    for mut sub in subs {
        let rest = collect_until_terminal(&mut sub, TURN).await;
        assert_eq!(terminal(&rest)["kind"], "final", "{rest:#?}");
    }
    let r = crate::support::bridge::request(&c, "opencode.prompt.greedy.c9", "again", TURN).await;
    assert_eq!(terminal(&r)["kind"], "final", "{r:#?}");
    bridge.stop().await.unwrap();
}
