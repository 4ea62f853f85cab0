//! `deploy/nats-server.conf`, as shipped, on a real nats-server (its port
//! comes from the command line): the daemon runs as user `bridge`; the chat
//! user `slack` prompts and reads its streamed replies (request style and
//! `reply_to`), and cannot read `discord`'s or prompt in its namespace; the
//! `ops` user lists the daemons and prompts through the CLI.

use std::path::Path;
use std::time::Duration;

use async_nats::{Client, ConnectOptions, Event};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::support::bridge::{assert_well_formed, terminal, test_config, Bridge};
use crate::support::fake_opencode::{echo_reply, FakeOpenCode};
use crate::support::nats::{collect_until_terminal, NatsServer, Reply};
use crate::support::ops::{cli, gather};

const TURN: Duration = Duration::from_secs(10);

pub(crate) fn conf() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nats-server.conf"))
        .expect("read deploy/nats-server.conf")
}

/// The password of `user` as the example file defines it.
pub(crate) fn password(user: &str) -> String {
    let var = format!("{}_PASSWORD:", user.to_uppercase());
    let line = conf()
        .lines()
        .find(|l| l.starts_with(&var))
        .unwrap_or_else(|| panic!("{var} in deploy/nats-server.conf"))
        .to_string();
    line.split('"').nth(1).unwrap().to_string()
}

/// A client as `user` with its own inbox prefix; server errors (permission
/// violations) arrive on the receiver.
pub(crate) async fn user(url: &str, user: &str) -> (Client, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let c = ConnectOptions::new()
        .user_and_password(user.into(), password(user))
        .custom_inbox_prefix(format!("_INBOX.{user}"))
        .event_callback(move |e| {
            let tx = tx.clone();
            async move {
                if let Event::ServerError(e) = e {
                    let _ = tx.send(e.to_string());
                }
            }
        })
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect as {user}: {e}"));
    (c, rx)
}

/// Request style without a round-trip barrier (these users may not publish
/// to their own inbox): the inbox is subscribed on the same connection
/// before the prompt goes out, so the server has it when replies come.
pub(crate) async fn request(
    c: &Client,
    subject: &str,
    text: &str,
    timeout: Duration,
) -> Vec<Reply> {
    let inbox = c.new_inbox();
    let mut sub = c.subscribe(inbox.clone()).await.unwrap();
    c.publish_with_reply(subject.to_string(), inbox, text.to_string().into())
        .await
        .unwrap();
    c.flush().await.unwrap();
    collect_until_terminal(&mut sub, timeout).await
}

/// Waits for a server error that contains `needle`.
pub(crate) async fn violation(
    errors: &mut mpsc::UnboundedReceiver<String>,
    needle: &str,
) -> String {
    let wait = async {
        while let Some(e) = errors.recv().await {
            if e.contains(needle) {
                return e;
            }
        }
        panic!("error channel closed")
    };
    tokio::time::timeout(Duration::from_secs(5), wait)
        .await
        .unwrap_or_else(|_| panic!("no permissions violation mentioning {needle:?} within 5s"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_permissions_hold() {
    let nats = NatsServer::start_with_config(&conf());
    let url = nats.url();
    let fake = FakeOpenCode::start().await;
    let mut cfg = test_config(&url, &fake.url(), None);
    cfg.nats.user = Some("bridge".into());
    cfg.nats.password = Some(password("bridge"));
    cfg.nats.inbox_prefix = "_INBOX.bridge".into();
    cfg.service.host = Some("perm-host".into());
    cfg.service.heartbeat_interval = Duration::from_millis(300);
    let bridge = Bridge::start(cfg).await;

    let (slack, mut slack_errors) = user(&url, "slack").await;
    let (discord, _discord_errors) = user(&url, "discord").await;

    // Request style: a whole streamed turn comes back to slack's inbox.
    let r = request(
        &slack,
        "opencode.prompt.slack.C042",
        "hello from slack",
        TURN,
    )
    .await;
    assert_well_formed(&r);
    assert_eq!(terminal(&r)["content"], echo_reply("hello from slack"));
    assert_eq!(terminal(&r)["conversation"], "slack.C042");
    assert!(r.len() > 3, "several replies streamed: {r:#?}");

    // reply_to under its own prefix (subscribed on the connection that
    // prompts, so before the prompt reaches the bridge).
    let mut mine = slack.subscribe("opencode.reply.slack.>").await.unwrap();
    let prompt = json!({"text": "to my subject", "reply_to": "opencode.reply.slack.C042"});
    slack
        .publish("opencode.prompt.slack.C042", prompt.to_string().into())
        .await
        .unwrap();
    let r = collect_until_terminal(&mut mine, TURN).await;
    assert_eq!(terminal(&r)["content"], echo_reply("to my subject"));

    // slack cannot read discord's replies: not its reply_to subjects, not
    // its inboxes.
    let mut spy = slack.subscribe("opencode.reply.discord.>").await.unwrap();
    let e = violation(&mut slack_errors, "opencode.reply.discord.>").await;
    assert!(e.to_lowercase().contains("permissions violation"), "{e}");
    let mut spy_inbox = slack.subscribe("_INBOX.discord.>").await.unwrap();
    violation(&mut slack_errors, "_INBOX.discord.>").await;
    // ... while discord gets its own, both ways.
    let mut theirs = discord.subscribe("opencode.reply.discord.>").await.unwrap();
    let prompt = json!({"text": "discord only", "reply_to": "opencode.reply.discord.D7"});
    discord
        .publish("opencode.prompt.discord.D7", prompt.to_string().into())
        .await
        .unwrap();
    let r = collect_until_terminal(&mut theirs, TURN).await;
    assert_eq!(terminal(&r)["content"], echo_reply("discord only"));
    let r = request(
        &discord,
        "opencode.prompt.discord.D7",
        "discord again",
        TURN,
    )
    .await;
    assert_eq!(terminal(&r)["content"], echo_reply("discord again"));
    for s in [&mut spy, &mut spy_inbox] {
        let leaked = tokio::time::timeout(Duration::from_millis(300), s.next()).await;
        assert!(
            !matches!(leaked, Ok(Some(_))),
            "slack read discord's reply: {leaked:?}"
        );
    }

    // slack cannot prompt in discord's namespace (nor on the bare subject).
    slack
        .publish("opencode.prompt.discord.D7", "sneaky".into())
        .await
        .unwrap();
    violation(&mut slack_errors, "opencode.prompt.discord.D7").await;

    // ops: the status endpoint, $SRV and heartbeats work under these rules.
    let (ops, _ops_errors) = user(&url, "ops").await;
    let mut beats = ops.subscribe("opencode.bridge.heartbeat.>").await.unwrap();
    let beat = tokio::time::timeout(Duration::from_secs(5), beats.next())
        .await
        .expect("a heartbeat")
        .unwrap();
    assert_eq!(beat.subject.as_str(), "opencode.bridge.heartbeat.perm-host");
    let pongs = gather(
        &ops,
        "$SRV.PING.opencode-bridge",
        Duration::from_millis(700),
    )
    .await;
    assert_eq!(pongs.len(), 1, "{pongs:#?}");
    let status = gather(&ops, "opencode.bridge.status", Duration::from_millis(700)).await;
    assert_eq!(status.len(), 1, "{status:#?}");
    assert_eq!(status[0]["host"], "perm-host");

    // The CLI as ops, NATS found through a config file like the daemon's.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ops.toml");
    std::fs::write(
        &file,
        format!(
            "[nats]\nurl = \"{url}\"\nuser = \"ops\"\npassword = \"{}\"\ninbox_prefix = \"_INBOX.ops\"\n",
            password("ops")
        ),
    )
    .unwrap();
    let conf_arg = file.to_str().unwrap();
    let out = cli(&["prompt", "--config", conf_arg, "hello as ops"], TURN).await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert_eq!(out.stdout, echo_reply("hello as ops"));
    let out = cli(&["status", "--json", "--config", conf_arg], TURN).await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    let s: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(s["host"], "perm-host");

    // The CLI as slack: its conversations ride in the subject, so the
    // namespace rule lets them through; a prompt outside it is refused at
    // once, not left to time out.
    let file = dir.path().join("slack.toml");
    std::fs::write(
        &file,
        format!(
            "[nats]\nurl = \"{url}\"\nuser = \"slack\"\npassword = \"{}\"\ninbox_prefix = \"_INBOX.slack\"\n",
            password("slack")
        ),
    )
    .unwrap();
    let slack_conf = file.to_str().unwrap();
    let out = cli(
        &[
            "prompt",
            "--config",
            slack_conf,
            "--conversation",
            "slack.C9",
            "from the slack CLI",
        ],
        TURN,
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert_eq!(out.stdout, echo_reply("from the slack CLI"));
    let out = cli(
        &[
            "prompt",
            "--config",
            slack_conf,
            "--conversation",
            "discord.D7",
            "x",
        ],
        TURN,
    )
    .await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(
        out.stderr
            .contains("refused the prompt on opencode.prompt.discord.D7"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.to_lowercase().contains("permissions violation"),
        "{}",
        out.stderr
    );

    bridge.stop().await.unwrap();
}
