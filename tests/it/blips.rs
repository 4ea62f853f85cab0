//! A dropped connection is not an outage: the bridge talks to OpenCode
//! through a TCP proxy ([`Proxy`]) that severs every open connection (the
//! event stream, pooled HTTP connections, a request in flight) at chosen or
//! random moments, and every turn still ends `final` with its exact text,
//! prompted once.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;

use opencode_nats_bridge::config::Config;

use crate::support::bridge::{assert_well_formed, request, terminal, test_config, Bridge};
use crate::support::fake_llm::{self, FakeLlm};
use crate::support::fake_opencode::{
    hang_turn, FakeOpenCode, FakeOptions, Step, TurnBuilder, TurnInput,
};
use crate::support::nats::{client, collect_until_terminal, subscribe_ready, NatsServer, Reply};
use crate::support::proxy::Proxy;
use crate::support::real_opencode::{default_config, RealOpenCode};

/// Bound on collecting one turn's replies: well before the turn's own
/// deadlines (`test_config`: idle 30 s, turn 60 s), so a turn that ended on
/// a deadline cannot pass.
const COLLECT: Duration = Duration::from_secs(25);

/// NATS, the fake OpenCode behind the proxy, the bridge pointed at the proxy.
struct FakeBehindProxy {
    _nats: NatsServer,
    fake: FakeOpenCode,
    proxy: Option<Proxy>,
    bridge: Bridge,
    client: async_nats::Client,
}

async fn fake_behind_proxy(
    script: impl Fn(&TurnInput) -> crate::support::fake_opencode::TurnScript + Send + Sync + 'static,
    tweak: impl FnOnce(&mut Config),
) -> FakeBehindProxy {
    let nats = NatsServer::start();
    let fake = FakeOpenCode::start_with(FakeOptions::default()).await;
    fake.set_script(script);
    let proxy = Proxy::start(&fake.url()).await;
    let mut cfg = test_config(&nats.url(), &proxy.url(), None);
    tweak(&mut cfg);
    cfg.validate().expect("tweaked config is valid");
    let bridge = Bridge::start(cfg).await;
    let client = client(&nats.url()).await;
    FakeBehindProxy {
        _nats: nats,
        fake,
        proxy: Some(proxy),
        bridge,
        client,
    }
}

/// The words the fake streams for a prompt (one delta each).
fn answer_words(prompt: &str) -> Vec<String> {
    (1..=24)
        .map(|i| format!("{}-w{i} ", prompt.replace(' ', "_")))
        .collect()
}

/// A text turn that streams [`answer_words`] over about half a second.
fn slow_text_turn(input: &TurnInput) -> crate::support::fake_opencode::TurnScript {
    let words = answer_words(&input.text);
    let mut t = TurnBuilder::new(input);
    t.begin();
    let a = t.assistant();
    let p = t.part_start(&a, "text");
    for w in &words {
        t.delta(&a, &p, w);
        t.sleep_ms(20);
    }
    t.part_end(&a, &p, &words.concat());
    t.finish(&a, "stop");
    t.end();
    t.build()
}

/// Every `prompt_async` the fake got, by the user message id it carried:
/// each id must be there once (no turn prompted twice).
fn prompts_by_message_id(fake: &FakeOpenCode) -> HashMap<String, usize> {
    let mut by_id = HashMap::new();
    for p in fake.prompts() {
        let body: Value = serde_json::from_slice(&p.body).unwrap_or(Value::Null);
        let id = body["messageID"].as_str().unwrap_or("").to_string();
        *by_id.entry(id).or_insert(0) += 1;
    }
    by_id
}

fn assert_final(r: &[Reply], expected: &str) {
    assert_well_formed(r);
    let fin = terminal(r);
    assert_eq!(fin["kind"], "final", "{r:#?}");
    assert_eq!(fin["content"], expected, "{fin}");
}

/// Many turns, some one-off (a new session each), some in conversations,
/// three at a time, while the proxy cuts every connection every 50-400 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turns_survive_connections_cut_at_random_moments() {
    let s = fake_behind_proxy(slow_text_turn, |_| {}).await;
    let proxy = s.proxy.as_ref().unwrap();
    let cutter = proxy.sever_randomly(Duration::from_millis(50), Duration::from_millis(400));
    let lanes = (0..3).map(|lane| {
        let c = s.client.clone();
        async move {
            let mut out = Vec::new();
            for i in 0..5 {
                let text = format!("lane {lane} turn {i}");
                let subject = match lane {
                    0 => "opencode.prompt".to_string(),
                    _ => format!("opencode.prompt.blip.{lane}"),
                };
                let r = request(&c, &subject, &text, COLLECT).await;
                out.push((text, r));
            }
            out
        }
    });
    let results: Vec<_> = futures::future::join_all(lanes)
        .await
        .into_iter()
        .flatten()
        .collect();
    drop(cutter);
    assert_eq!(results.len(), 15);
    for (text, r) in &results {
        assert_final(r, &answer_words(text).concat());
    }
    let prompts = prompts_by_message_id(&s.fake);
    assert_eq!(prompts.len(), 15, "{prompts:?}");
    assert!(
        prompts.values().all(|n| *n == 1),
        "a prompt sent twice: {prompts:?}"
    );
    // The cuts reached the turns: the event stream was cut and reopened.
    assert!(proxy.severed() > 0);
    assert!(
        s.fake.streams_opened() >= 3,
        "{} streams",
        s.fake.streams_opened()
    );
    s.bridge.stop().await.unwrap();
}

/// The connection carrying `prompt_async` is cut after OpenCode took the
/// prompt and before its `204` came back: the bridge sees a send error,
/// finds its user message in the session, and does not prompt again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_cut_before_its_answer_is_not_sent_twice() {
    let s = fake_behind_proxy(
        |input| {
            let mut t = TurnBuilder::new(input);
            t.begin();
            // OpenCode has the prompt; its 204 waits until the cut.
            t.sleep_ms(300);
            t.push(Step::Respond);
            let a = t.assistant();
            t.text(&a, &["Taken ", "once."]);
            t.finish(&a, "stop");
            t.end();
            t.build()
        },
        |_| {},
    )
    .await;
    let c = s.client.clone();
    let turn =
        tokio::spawn(async move { request(&c, "opencode.prompt", "cut my prompt", COLLECT).await });
    s.fake
        .wait_until("a prompt", Duration::from_secs(10), |f| {
            !f.prompts().is_empty()
        })
        .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(s.proxy.as_ref().unwrap().sever_all() > 0);
    let r = turn.await.unwrap();
    assert_final(&r, "Taken once.");
    assert_eq!(s.fake.prompts().len(), 1, "the prompt was sent again");
    s.bridge.stop().await.unwrap();
}

/// OpenCode really gone: the proxy stops (connects are refused) in the
/// middle of a turn. The turn waits `unavailable_after`, then ends
/// `opencode_unavailable`, retryable, well before its own deadlines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opencode_gone_longer_than_unavailable_after_fails_the_turn() {
    let mut s = fake_behind_proxy(
        |input| hang_turn(input, Duration::from_millis(200), Duration::from_secs(60)),
        |c| c.opencode.unavailable_after = Duration::from_secs(1),
    )
    .await;
    let c = s.client.clone();
    let turn =
        tokio::spawn(async move { request(&c, "opencode.prompt", "hang on", COLLECT).await });
    s.fake
        .wait_until("a prompt", Duration::from_secs(10), |f| {
            !f.prompts().is_empty()
        })
        .await;
    drop(s.proxy.take());
    let r = turn.await.unwrap();
    assert_well_formed(&r);
    let e = terminal(&r);
    assert_eq!(e["kind"], "error", "{r:#?}");
    assert_eq!(e["code"], "opencode_unavailable", "{e}");
    assert_eq!(e["retryable"], true, "{e}");
    assert!(e["error"].as_str().unwrap().contains("went away"), "{e}");
    s.bridge.stop().await.unwrap();
}

/// The real OpenCode streaming 2,000 deltas through the proxy, which
/// severs every connection twice during the turn: `final`, exact text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_opencode_turn_survives_two_cuts() {
    let nats = NatsServer::start();
    let llm = FakeLlm::start().await;
    let opencode = RealOpenCode::start_with_config(default_config(&llm.base_url())).await;
    let proxy = Proxy::start(opencode.base_url()).await;
    let mut cfg = test_config(&nats.url(), &proxy.url(), Some(opencode.password()));
    cfg.opencode.directory = Some(opencode.directory().to_path_buf());
    let bridge = Bridge::start(cfg).await;
    let c = client(&nats.url()).await;

    let inbox = c.new_inbox();
    let mut sub = subscribe_ready(&c, inbox.clone()).await;
    c.publish_with_reply("opencode.prompt", inbox, "[many] go".into())
        .await
        .unwrap();
    // The first cut at the first delta; the second once the text passed
    // `m500`, with 1,500 chunks (1.5 s of the fake LLM's pauses) to come.
    let mut replies: Vec<Reply> = Vec::new();
    let mut text = String::new();
    let started = tokio::time::Instant::now();
    let mut first_cut = None;
    while first_cut.is_none() || !text.contains(" m500 ") {
        let m = tokio::time::timeout(COLLECT, sub.next())
            .await
            .expect("a reply")
            .expect("the subscription is open");
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        let kind = v["kind"].as_str().unwrap_or("").to_string();
        if kind == "delta" {
            text.push_str(v["content"].as_str().unwrap_or(""));
        }
        replies.push((m.headers.clone(), v));
        assert!(
            kind != "final" && kind != "error",
            "the turn ended ({kind}) before the second cut: {} replies, {} bytes of text, first cut at {first_cut:?}, now {:?}",
            replies.len(),
            text.len(),
            started.elapsed()
        );
        if first_cut.is_none() && kind == "delta" {
            assert!(proxy.sever_all() > 0);
            first_cut = Some((started.elapsed(), text.len()));
        }
    }
    assert!(proxy.sever_all() > 0);
    replies.extend(collect_until_terminal(&mut sub, COLLECT).await);
    assert_final(&replies, &fake_llm::many_reply());
    assert_eq!(proxy.cuts(), 2);
    bridge.stop().await.unwrap();
}
