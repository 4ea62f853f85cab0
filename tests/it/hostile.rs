//! Hostile tenants, round 2 (issue 22), tried as the attacker `discord`
//! against `deploy/nats-server.conf` as shipped, the daemon as user
//! `bridge` in strict mode, `slack` the tenant that must not notice: image
//! bombs and floods of attachments are refused before OpenCode sees them;
//! a caller-chosen subject cannot forge the daemon's log; filling its own
//! shares (attachments in flight, turn states, large finals, jobs) hurts
//! only the attacker; job ids do not cross tenants; each tenant reads its
//! own large finals only; and, with the real OpenCode, another tenant's
//! saved tool output is out of reach.

use std::time::{Duration, Instant};

use async_nats::Client;
use base64::Engine as _;
use serde_json::{json, Value};

use crate::ops_nats_permissions::{conf, password, request, user};
use crate::support::bridge::{assert_well_formed, terminal, test_config, Bridge};
use crate::support::fake_opencode::FakeOpenCode;
use crate::support::nats::{NatsServer, Reply};

const TURN: Duration = Duration::from_secs(30);

/// The shipped NATS config, the daemon as `bridge` (strict), and a tenant
/// client each for the attacker and the bystander.
pub(crate) struct Shipped {
    pub nats: NatsServer,
    pub fake: FakeOpenCode,
    pub bridge: Bridge,
    pub slack: Client,
    pub discord: Client,
}

impl Shipped {
    pub async fn start(tweak: impl FnOnce(&mut opencode_nats_bridge::config::Config)) -> Shipped {
        let nats = NatsServer::start_with_config(&conf());
        let fake = FakeOpenCode::start().await;
        let mut cfg = test_config(&nats.url(), &fake.url(), None);
        cfg.nats.user = Some("bridge".into());
        cfg.nats.password = Some(password("bridge"));
        cfg.nats.inbox_prefix = "_INBOX.bridge".into();
        cfg.tenancy.strict = true;
        cfg.cluster.instance_id = Some("bridge-1".into());
        tweak(&mut cfg);
        let bridge = Bridge::start(cfg).await;
        let (slack, _) = user(&nats.url(), "slack").await;
        let (discord, _) = user(&nats.url(), "discord").await;
        Shipped {
            nats,
            fake,
            bridge,
            slack,
            discord,
        }
    }
}

/// A bad_request refusal, alone, not retryable; its text.
fn bad_request(r: &[Reply]) -> String {
    assert_well_formed(r);
    assert_eq!(r.len(), 1, "a refusal is one reply: {r:#?}");
    let t = terminal(r);
    assert_eq!(
        (t["kind"].as_str(), t["code"].as_str()),
        (Some("error"), Some("bad_request")),
        "{t}"
    );
    assert_eq!(t["retryable"], false, "{t}");
    t["error"].as_str().unwrap().to_string()
}

/// A real greyscale PNG of `side` x `side` pixels at 1 bit per pixel, all
/// black: signature, IHDR, one IDAT of zlib (fixed-Huffman deflate: one
/// literal 0 then matches of 258 at distance 1), IEND; CRCs and the
/// Adler-32 computed. 16000x16000 is about 200 KB and decodes to 256 MB.
pub(crate) fn png_bomb(side: u32) -> Vec<u8> {
    let row = 1 + side.div_ceil(8) as u64; // filter byte + packed pixels
    let raw = row * u64::from(side); // all zero bytes
    let mut bits = BitWriter::default();
    bits.put(1, 1); // BFINAL
    bits.put(1, 2); // BTYPE = fixed Huffman
    bits.code(0b0011_0000, 8); // literal 0
    let mut left = raw - 1;
    while left >= 258 {
        bits.code(0b1100_0101, 8); // length 258 (symbol 285)
        bits.code(0, 5); // distance 1
        left -= 258;
    }
    for _ in 0..left {
        bits.code(0b0011_0000, 8);
    }
    bits.code(0, 7); // end of block
    let mut zlib = vec![0x78, 0x01];
    zlib.extend(bits.finish());
    let b = (raw % 65521) as u32; // Adler-32 of zeros: a = 1, b = n
    zlib.extend(((b << 16) | 1).to_be_bytes());

    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend(side.to_be_bytes());
    ihdr.extend(side.to_be_bytes());
    ihdr.extend([1, 0, 0, 0, 0]); // 1 bit, greyscale, deflate, filter 0, no interlace
    for (kind, data) in [(&b"IHDR"[..], ihdr), (b"IDAT", zlib), (b"IEND", Vec::new())] {
        png.extend((data.len() as u32).to_be_bytes());
        let mut chunk = kind.to_vec();
        chunk.extend(&data);
        png.extend(&chunk);
        png.extend(crc32(&chunk).to_be_bytes());
    }
    png
}

#[derive(Default)]
struct BitWriter {
    out: Vec<u8>,
    acc: u32,
    n: u32,
}

impl BitWriter {
    /// `len` bits of `v`, least significant first (deflate's header bits).
    fn put(&mut self, v: u32, len: u32) {
        self.acc |= v << self.n;
        self.n += len;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }

    /// A Huffman code, most significant bit first.
    fn code(&mut self, code: u32, len: u32) {
        let rev = (0..len).fold(0, |r, i| r | ((code >> i) & 1) << (len - 1 - i));
        self.put(rev, len);
    }

    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn the_png_bomb_is_a_png() {
    assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    let png = png_bomb(16000);
    assert!(png.len() < 300_000, "{} bytes", png.len());
    assert_eq!(&png[12..16], b"IHDR");
    assert_eq!(&png[16..24], [0, 0, 0x3e, 0x80, 0, 0, 0x3e, 0x80]);
    assert!(png.ends_with(&[0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xae, 0x42, 0x60, 0x82]));
}

/// The attacker's prompt with `attachments`, sent request style.
async fn attack(s: &Shipped, trace: &str, attachments: Value) -> (Vec<Reply>, Duration) {
    let prompt = json!({"text": "look", "trace_id": trace, "attachments": attachments});
    let t0 = Instant::now();
    let r = request(
        &s.discord,
        "opencode.prompt.discord.D1",
        &prompt.to_string(),
        TURN,
    )
    .await;
    (r, t0.elapsed())
}

/// An image bomb (a 16000x16000 PNG of ~200 KB), 5,000 tiny attachments
/// and a text file named `.png` are refused with `bad_request` naming the
/// attachment and the limit, while the bystander's probe prompt, sent at
/// the same time, ends with its `final`; none of the attacks reaches
/// OpenCode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_bombs_and_attachment_floods_are_refused_before_opencode() {
    let s = Shipped::start(|_| {}).await;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let bomb = png_bomb(16000);
    let bomb_bytes = bomb.len();
    let flood: Vec<Value> = (0..5000)
        .map(|i| json!({"filename": format!("f{i}.txt"), "content": "eA=="}))
        .collect();
    let probe = async {
        let t0 = Instant::now();
        let r = request(&s.slack, "opencode.prompt.slack.C1", "probe", TURN).await;
        (r, t0.elapsed())
    };
    let attacks = async {
        let bomb = attack(
            &s,
            "atk-bomb",
            json!([{"filename": "bomb.png", "content": b64(&bomb)}]),
        )
        .await;
        let flood = attack(&s, "atk-flood", json!(flood)).await;
        let fake = attack(
            &s,
            "atk-fake",
            json!([{"filename": "x.png", "content": b64(b"console.log('not a png')")}]),
        )
        .await;
        (bomb, flood, fake)
    };
    let ((probe, probe_took), (bomb, flood, fake)) = tokio::join!(probe, attacks);

    let e = bad_request(&bomb.0);
    assert!(
        e.contains("\"bomb.png\"")
            && e.contains("16000x16000 = 256000000 pixels")
            && e.contains("40000000 pixels (max_image_pixels)"),
        "{e}"
    );
    let e = bad_request(&flood.0);
    assert!(
        e.contains("5000 attachments, above the limit of 16 (max_attachments)"),
        "{e}"
    );
    let e = bad_request(&fake.0);
    assert!(
        e.contains("(\"x.png\") is declared image/png but its content is not an image"),
        "{e}"
    );
    assert_well_formed(&probe);
    assert_eq!(terminal(&probe)["kind"], "final", "{probe:#?}");
    eprintln!(
        "bomb refused in {:?} ({} bytes), 5,000 attachments in {:?}, the probe's final in {probe_took:?}",
        bomb.1,
        bomb_bytes,
        flood.1
    );
    for (what, took) in [("bomb", bomb.1), ("flood", flood.1), ("probe", probe_took)] {
        assert!(took < TURN / 3, "{what} took {took:?}");
    }
    for p in s.fake.prompts() {
        let body = p.json().to_string();
        assert!(
            !body.contains("bomb.png") && !body.contains("f4999.txt") && !body.contains("x.png"),
            "an attack reached OpenCode: {body:.200}"
        );
    }
    let _ = &s.nats;
    s.bridge.stop().await.unwrap();
}

/// A subject token with an escape sequence, NUL and a right-to-left
/// override reaches the daemon's log escaped: no raw control character in
/// any line, the escapes visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_with_escape_codes_is_logged_escaped() {
    use crate::support::daemon::{spawn_serving, wait_for_line};
    let nats = NatsServer::start_with_config(&conf());
    let fake = FakeOpenCode::start().await;
    let mut cmd = crate::support::ops::command(&["run"]);
    cmd.env("OPENCODE_BRIDGE__NATS__URL", nats.url())
        .env("OPENCODE_BRIDGE__NATS__USER", "bridge")
        .env("OPENCODE_BRIDGE__NATS__PASSWORD", password("bridge"))
        .env("OPENCODE_BRIDGE__NATS__INBOX_PREFIX", "_INBOX.bridge")
        .env("OPENCODE_BRIDGE__TENANCY__STRICT", "true")
        .env("OPENCODE_BRIDGE__OPENCODE__BASE_URL", fake.url())
        .env("OPENCODE_BRIDGE__SHUTDOWN__GRACE", "2s")
        .env("RUST_LOG", "info");
    let (_child, mut log) = spawn_serving(cmd, Duration::from_secs(30)).await;
    let (c, _) = user(&nats.url(), "discord").await;
    let evil = "opencode.prompt.discord.x\u{1b}[31mRED\u{0}\u{202e}gnp";
    c.publish(evil, "hi".into()).await.unwrap();
    c.flush().await.unwrap();
    let mut seen = Vec::new();
    let found = wait_for_line(&mut log, &mut seen, "RED", Duration::from_secs(10)).await;
    assert!(found, "the subject was not logged: {seen:#?}");
    let line = seen.last().unwrap();
    assert!(
        line.contains("discord.x\\x1b[31mRED\\x00\\u{202e}gnp"),
        "not escaped: {line:?}"
    );
    for l in &seen {
        assert!(
            !l.chars()
                .any(|c| (c.is_control() && c != '\t') || c == '\u{202e}'),
            "a raw control character in the log: {l:?}"
        );
    }
}

/// `[big]`: 600 KB of text in 6 deltas (a final cut to fit a reply and
/// stored whole); anything else as the default script says.
fn big_or_default(
    input: &crate::support::fake_opencode::TurnInput,
) -> crate::support::fake_opencode::TurnScript {
    if !input.text.contains("[big]") {
        return crate::support::fake_opencode::default_script(input);
    }
    let deltas: Vec<String> = (0..6)
        .map(|i| format!("{i}{}", "y".repeat(100_000)))
        .collect();
    let refs: Vec<&str> = deltas.iter().map(String::as_str).collect();
    crate::support::fake_opencode::text_turn(input, &refs)
}

/// A tenant's prompt on `subject` sent to a fresh inbox; its replies.
async fn prompt_json(c: &Client, subject: &str, body: Value) -> Vec<Reply> {
    let r = request(c, subject, &body.to_string(), TURN).await;
    assert_well_formed(&r);
    r
}

/// A `[big]` prompt's final (cut: the deltas carry more than its content).
async fn big_final(c: &Client, subject: &str, trace: &str) -> Value {
    let body = json!({"text": "[big]", "trace_id": trace});
    let r = request(c, subject, &body.to_string(), TURN).await;
    let fin = terminal(&r).clone();
    assert_eq!(fin["kind"], "final", "{:.300}", fin.to_string());
    assert_eq!(fin["content_truncated"], true);
    assert_eq!(r.iter().filter(|(_, v)| v["kind"] == "final").count(), 1);
    fin
}

/// One turn state request as `c`; the answer.
async fn turn_state(c: &Client, tenant: &str, trace: &str) -> Value {
    let m = tokio::time::timeout(
        Duration::from_secs(10),
        c.request(
            format!("opencode.turn.status.{tenant}"),
            json!({"trace_id": trace}).to_string().into(),
        ),
    )
    .await
    .expect("a turn state answer within 10s")
    .expect("a turn state answer");
    serde_json::from_slice(&m.payload).unwrap()
}

/// The attacker fills its own share of the large-finals store and of the
/// turn states: its next large final goes out cut without
/// `content_object`, with a note that says its share is full and what to
/// do; the bystander's large final is still stored whole, its turn state
/// still reads `done`, and the daemon's lease is still renewed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_that_fills_its_shares_of_jetstream_hurts_only_itself() {
    let s = Shipped::start(|c| {
        c.shares.finals_bytes = 1024 * 1024;
        c.shares.turn_states_bytes = 1024 * 1024;
        c.cluster.lease_ttl = Duration::from_secs(3);
    })
    .await;
    s.fake.set_script(big_or_default);
    let mut full_note = None;
    for i in 0..4 {
        let trace = format!("atk-big-{i}");
        let fin = big_final(&s.discord, "opencode.prompt.discord.D1", &trace).await;
        if fin.get("content_object").is_none() {
            full_note = fin["notes"]
                .as_array()
                .and_then(|n| n.iter().find_map(|n| n.as_str().map(str::to_string)));
            break;
        }
    }
    let note = full_note.expect("the attacker's share of the finals store never filled");
    assert!(
        note.contains("share of the large-finals store is full ([shares] finals_bytes)")
            && note.contains("turn_ttl"),
        "{note}"
    );
    // Its turn states share fills too: a later final says its state is
    // not kept, and what to do.
    let mut states_note = None;
    for i in 0..6 {
        let fin = big_final(
            &s.discord,
            "opencode.prompt.discord.D1",
            &format!("atk-more-{i}"),
        )
        .await;
        let notes = fin["notes"].as_array().cloned().unwrap_or_default();
        if let Some(n) = notes
            .iter()
            .filter_map(Value::as_str)
            .find(|n| n.contains("turn_states_bytes"))
        {
            states_note = Some(n.to_string());
            break;
        }
    }
    let n = states_note.expect("the attacker's share of the turn states never filled");
    assert!(
        n.contains("share of the turn states is full") && n.contains("turn_ttl"),
        "{n}"
    );

    // The bystander: its large final stored whole, its state readable.
    let fin = big_final(&s.slack, "opencode.prompt.slack.C1", "slack-big").await;
    assert_eq!(
        fin["content_object"]["bucket"],
        "opencode_bridge_finals-slack",
        "{:.300}",
        fin.to_string()
    );
    // Written after the reply went out: asked until it is there.
    let deadline = Instant::now() + Duration::from_secs(10);
    let state = loop {
        let state = turn_state(&s.slack, "slack", "slack-big").await;
        if state["state"] == "done" || Instant::now() > deadline {
            break state;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(state["state"], "done", "{:.300}", state.to_string());
    // The attacker's own states: its bucket is full, its later turns
    // are not all recorded (read as what was written last, or unknown).
    let last = turn_state(&s.discord, "discord", "atk-big-0").await;
    eprintln!("the attacker's first turn state: {:.100}", last.to_string());

    // The daemon still holds its lease: renewed after the flood.
    let (bridge, _) = user(&s.nats.url(), "bridge").await;
    let kv = async_nats::jetstream::new(bridge)
        .get_key_value("opencode_bridge_instances")
        .await
        .unwrap();
    let before = kv
        .entry("bridge-1")
        .await
        .unwrap()
        .expect("a lease")
        .revision;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = kv
        .entry("bridge-1")
        .await
        .unwrap()
        .expect("a lease")
        .revision;
    assert!(
        after > before,
        "the lease was not renewed ({before} -> {after})"
    );
    // Each tenant's turn states are a bucket of their own, bounded.
    let js = async_nats::jetstream::new(user(&s.nats.url(), "bridge").await.0);
    for tenant in ["slack", "discord"] {
        let mut kv = js
            .get_stream(format!("KV_opencode_bridge_turns-{tenant}"))
            .await
            .unwrap();
        let info = kv.info().await.unwrap();
        assert_eq!(info.config.max_bytes, 1024 * 1024, "{tenant}");
        assert!(
            info.state.bytes <= 1024 * 1024,
            "{tenant}: {}",
            info.state.bytes
        );
    }
    s.bridge.stop().await.unwrap();
}

/// Attachment bytes in flight: beyond its share, the attacker's prompt
/// with attachments gets `overloaded` (retryable) while its slow turn
/// holds the share; the bystander's attachments are served; once the
/// attacker's turn has ended its share is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attachment_bytes_in_flight_are_shared_per_tenant() {
    let s = Shipped::start(|c| c.shares.attachment_bytes_in_flight = 1000).await;
    let file = || json!([{"filename": "a.txt", "content": base64::engine::general_purpose::STANDARD.encode([b'x'; 800])}]);
    let inbox = s.discord.new_inbox();
    let mut slow = s.discord.subscribe(inbox.clone()).await.unwrap();
    s.discord
        .publish_with_reply(
            "opencode.prompt.discord.D1",
            inbox,
            json!({"text": "[slow] hold", "attachments": file()})
                .to_string()
                .into(),
        )
        .await
        .unwrap();
    // Its first reply: the turn is running and holds 800 bytes.
    futures::StreamExt::next(&mut slow).await.unwrap();
    let r = prompt_json(
        &s.discord,
        "opencode.prompt.discord.D2",
        json!({"text": "more", "attachments": file()}),
    )
    .await;
    let t = terminal(&r);
    assert_eq!(
        (t["code"].as_str(), t["retryable"].as_bool()),
        (Some("overloaded"), Some(true)),
        "{t}"
    );
    assert!(
        t["error"]
            .as_str()
            .unwrap()
            .contains("share of 1000 bytes ([shares] attachment_bytes_in_flight)"),
        "{t}"
    );
    let r = prompt_json(
        &s.slack,
        "opencode.prompt.slack.C1",
        json!({"text": "mine", "attachments": file()}),
    )
    .await;
    assert_eq!(terminal(&r)["kind"], "final", "{r:#?}");
    let rest = crate::support::nats::collect_until_terminal(&mut slow, TURN).await;
    assert_eq!(terminal(&rest)["kind"], "final", "{rest:#?}");
    let r = prompt_json(
        &s.discord,
        "opencode.prompt.discord.D2",
        json!({"text": "again", "attachments": file()}),
    )
    .await;
    assert_eq!(terminal(&r)["kind"], "final", "{r:#?}");
    s.bridge.stop().await.unwrap();
}

/// The object `name` of `bucket`, read as `c` (`None`: refused or absent).
async fn read_object(c: &Client, bucket: &str, name: &str) -> Option<Vec<u8>> {
    let js = async_nats::jetstream::new(c.clone());
    let read = async {
        let store = js.get_object_store(bucket).await.ok()?;
        let mut o = store.get(name).await.ok()?;
        let mut got = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut o, &mut got)
            .await
            .ok()?;
        Some(got)
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .ok()
        .flatten()
}

/// With the shipped NATS config a tenant fetches its own large final
/// (`final.content_object`) whole, and cannot read another tenant's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_fetches_its_own_large_finals_and_no_one_elses() {
    let s = Shipped::start(|_| {}).await;
    s.fake.set_script(big_or_default);
    let whole: String = (0..6)
        .map(|i| format!("{i}{}", "y".repeat(100_000)))
        .collect();
    let mine = big_final(&s.slack, "opencode.prompt.slack.C1", "slack-own").await;
    let theirs = big_final(&s.discord, "opencode.prompt.discord.D1", "discord-own").await;
    let object = |fin: &Value| {
        let o = &fin["content_object"];
        (
            o["bucket"].as_str().unwrap().to_string(),
            o["name"].as_str().unwrap().to_string(),
        )
    };
    let (bucket, name) = object(&mine);
    assert_eq!(bucket, "opencode_bridge_finals-slack");
    let got = read_object(&s.slack, &bucket, &name)
        .await
        .expect("slack reads its own final");
    assert!(got == whole.as_bytes(), "{} bytes", got.len());
    let (bucket, name) = object(&theirs);
    assert!(
        read_object(&s.slack, &bucket, &name).await.is_none(),
        "slack read discord's final"
    );
    let got = read_object(&s.discord, &bucket, &name)
        .await
        .expect("discord reads its own");
    assert!(got == whole.as_bytes());
    s.bridge.stop().await.unwrap();
}

/// The real OpenCode 1.18.34, embedded (the daemon binary starts it, one
/// server for every tenant), the shipped NATS config: `slack` (allowed
/// bash by a rule) prints a secret at the end of 3,000 lines, which
/// OpenCode saves whole under `<data>/opencode/tool-output/`; `discord`'s
/// agent then tries `read`, `grep`, `glob` and `list` on that folder and
/// gets nothing of it (OpenCode 1.18.34 has no `list` tool: `read` of the
/// folder lists it), and nothing of it reaches discord's model or replies. Slack's own hint names the saved file without the host path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_saved_tool_output_is_out_of_reach() {
    use crate::support::daemon::spawn_serving;
    use crate::support::fake_llm::FakeLlm;
    use crate::support::real_opencode::{default_config, isolated_env, opencode_bin};
    let nats = NatsServer::start_with_config(&conf());
    let llm = FakeLlm::start().await;
    let env = isolated_env(&default_config(&llm.base_url()));
    let toml = r#"
[tenancy]
strict = true
[permissions]
rules = [{ tenant = "slack", permission = "bash", action = "allow" }]
"#;
    let file = env.tmp.path().join("bridge.toml");
    std::fs::write(&file, toml).unwrap();
    let mut cmd = tokio::process::Command::new(crate::support::daemon::BIN);
    cmd.arg("run").arg("--config").arg(&file);
    cmd.env_clear()
        .envs(env.vars.iter().map(|(k, v)| (k.as_str(), v.as_os_str())))
        .env("OPENCODE_BRIDGE__NATS__URL", nats.url())
        .env("OPENCODE_BRIDGE__NATS__USER", "bridge")
        .env("OPENCODE_BRIDGE__NATS__PASSWORD", password("bridge"))
        .env("OPENCODE_BRIDGE__NATS__INBOX_PREFIX", "_INBOX.bridge")
        .env("OPENCODE_BRIDGE__OPENCODE__BINARY", opencode_bin())
        .env("OPENCODE_BRIDGE__OPENCODE__DIRECTORY", &env.work_dir)
        .env("OPENCODE_BRIDGE__SHUTDOWN__GRACE", "5s")
        .env("RUST_LOG", "info");
    let (_daemon, _log) = spawn_serving(cmd, Duration::from_secs(90)).await;
    let (slack, _) = user(&nats.url(), "slack").await;
    let (discord, _) = user(&nats.url(), "discord").await;
    let turn = Duration::from_secs(90);

    let secret = format!("DB_PASSWORD=s3cr3t-{}", std::process::id());
    let text = format!("[tool:bash seq 1 3000; echo {secret}]");
    let r = request(&slack, "opencode.prompt.slack.ops", &text, turn).await;
    assert_well_formed(&r);
    assert_eq!(terminal(&r)["kind"], "final", "{:.500}", format!("{r:?}"));
    // OpenCode saved the whole output in its one folder.
    let folder = env.tmp.path().join("data/opencode/tool-output");
    let saved: Vec<_> = std::fs::read_dir(&folder)
        .expect("the tool-output folder")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(
        saved.iter().any(|p| std::fs::read_to_string(p)
            .unwrap_or_default()
            .contains(&secret)),
        "no saved output holds the secret: {saved:?}"
    );
    let hint = r
        .iter()
        .find(|(_, v)| v["kind"] == "tool_result")
        .map(|(_, v)| v["result"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default();
    assert!(
        hint.contains("saved to: tool-output/tool_") && !hint.contains(folder.to_str().unwrap()),
        "{hint:.300}"
    );
    let seen_before = llm.chat_requests().len();

    let dir = folder.to_str().unwrap().to_string();
    let file = saved[0].to_str().unwrap().to_string();
    let attempts = [
        ("read", json!({"filePath": file})),
        ("grep", json!({"pattern": "DB_PASSWORD", "path": dir})),
        ("glob", json!({"pattern": "*", "path": dir})),
        // OpenCode 1.18.34 has no `list` tool: `read` of a folder lists it.
        ("read", json!({"filePath": dir})),
    ];
    for (tool, args) in attempts {
        let text = format!("[call:{tool} {args}:call]");
        let r = request(&discord, "opencode.prompt.discord.D1", &text, turn).await;
        assert_well_formed(&r);
        let all = format!("{r:?}");
        assert_eq!(terminal(&r)["kind"], "final", "{tool}: {all:.500}");
        let result = r
            .iter()
            .find(|(_, v)| v["kind"] == "tool_result")
            .unwrap_or_else(|| panic!("{tool}: no tool_result: {all:.500}"));
        assert_eq!(
            result.1["success"],
            false,
            "{tool} reached the folder: {:.300}",
            result.1.to_string()
        );
        // What came back (the result, the answer) holds nothing of it: not
        // the secret, not a saved file's name (the attacker's own call
        // names the file it tried).
        let back: String = r
            .iter()
            .filter(|(_, v)| v["kind"] != "tool_call")
            .map(|(_, v)| v.to_string())
            .collect();
        eprintln!("{tool}: {:.300}", result.1["result"].to_string());
        assert!(
            !back.contains("s3cr3t") && !back.contains("tool_0"),
            "{tool}: {back:.500}"
        );
        // The denial the caller sees names the folder without the host's
        // path to it (the model's own answer repeats what OpenCode told it).
        let told = result.1["result"].as_str().unwrap_or_default();
        assert!(!told.contains(&dir), "{tool}: the host path in {told}");
    }
    // Nothing of it reached discord's model either.
    for body in &llm.chat_requests()[seen_before..] {
        assert!(
            !body.to_string().contains("s3cr3t"),
            "the secret reached the model"
        );
    }
}

/// Stores a job published as `c` with `Nats-Msg-Id: id`; the ack, or the
/// refusal's text.
async fn publish_job(c: &Client, subject: &str, id: &str, body: Value) -> Result<bool, String> {
    let mut h = async_nats::HeaderMap::new();
    h.insert("Nats-Msg-Id", id);
    let js = async_nats::jetstream::new(c.clone());
    let ack = js
        .publish_with_headers(subject.to_string(), h, body.to_string().into())
        .await
        .map_err(|e| e.to_string())?;
    let ack = tokio::time::timeout(Duration::from_secs(10), ack)
        .await
        .map_err(|_| "no ack within 10s".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(ack.duplicate)
}

/// The terminal reply of `trace` on `sub` (other traces skipped).
async fn job_terminal(sub: &mut async_nats::Subscriber, trace: &str) -> Value {
    let deadline = tokio::time::Instant::now() + TURN;
    loop {
        let m = tokio::time::timeout_at(deadline, futures::StreamExt::next(sub))
            .await
            .unwrap_or_else(|_| panic!("no terminal reply for {trace}"))
            .expect("subscription open");
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        crate::support::leaks::assert_no_leak(&v);
        if v["trace_id"] == trace && matches!(v["kind"].as_str(), Some("final" | "error")) {
            return v;
        }
    }
}

/// `[shares] job_tenants`: each tenant's jobs in a stream of its own. The
/// attacker's job with the victim's `Nats-Msg-Id` does not make the
/// victim's job a duplicate; the attacker filling its stream has its own
/// publishes refused while the victim's job is stored and served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_have_a_stream_per_tenant_ids_and_room_included() {
    let s = Shipped::start(|c| {
        c.jetstream.jobs = opencode_nats_bridge::config::Switch::On;
        c.shares.job_tenants = vec!["slack".into(), "discord".into()];
        c.shares.jobs_bytes = 16 * 1024;
    })
    .await;
    let mut replies = s.slack.subscribe("opencode.reply.slack.>").await.unwrap();
    s.slack.flush().await.unwrap();

    // The attacker takes the victim's id first.
    let shadow = publish_job(
        &s.discord,
        "opencode.job.discord.D1",
        "slack-order-1001",
        json!({"text": "hi from discord", "trace_id": "d-1001"}),
    )
    .await;
    assert_eq!(shadow, Ok(false));
    let dup = publish_job(
        &s.slack,
        "opencode.job.slack.C1",
        "slack-order-1001",
        json!({"text": "order 1001", "trace_id": "s-1001"}),
    )
    .await;
    assert_eq!(dup, Ok(false), "the victim's job was taken for a duplicate");
    let t = job_terminal(&mut replies, "s-1001").await;
    assert_eq!(t["kind"], "final", "{t}");

    // The attacker fills its own stream with jobs that never end.
    let pad = "p".repeat(3000);
    let mut refused = None;
    for i in 0..20 {
        let body = json!({"text": format!("[hang] {pad}"), "trace_id": format!("d-fill-{i}")});
        if let Err(e) = publish_job(
            &s.discord,
            "opencode.job.discord.D2",
            &format!("fill-{i}"),
            body,
        )
        .await
        {
            refused = Some((i, e));
            break;
        }
    }
    let (stored, why) = refused.expect("the attacker's stream never filled");
    assert!(stored >= 2, "refused at once: {why}");
    eprintln!("the attacker's job {stored} was refused: {why}");
    // The victim's job is still stored and served.
    let dup = publish_job(
        &s.slack,
        "opencode.job.slack.C1",
        "slack-order-1002",
        json!({"text": "order 1002", "trace_id": "s-1002"}),
    )
    .await;
    assert_eq!(dup, Ok(false));
    let t = job_terminal(&mut replies, "s-1002").await;
    assert_eq!(t["kind"], "final", "{t}");
    s.bridge.stop().await.unwrap();
}
