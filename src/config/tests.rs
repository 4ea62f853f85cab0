//! The configuration's tests: every key, every message.
use super::*;
use std::collections::HashMap;

fn write(text: &str) -> tempfile::NamedTempFile {
    let f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(f.path(), text).unwrap();
    f
}

fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

#[test]
fn defaults_are_valid() {
    let c = Config::load_with_env(None, env(&[])).unwrap();
    assert_eq!(c.nats.url, "nats://127.0.0.1:4222");
    assert_eq!(c.turn.first_event_timeout, Duration::from_secs(120));
    assert!(c.opencode.base_url.is_none());
}

#[test]
fn example_file_is_valid_and_complete() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    Config::load_with_env(Some(&path), env(&[])).unwrap();
    // Every key of the defaults appears in the example.
    let text = std::fs::read_to_string(&path).unwrap();
    let example: toml_keys::Keys = toml_keys::keys(&text);
    for key in [
        "nats.url",
        "nats.subscription_capacity",
        "subjects.prompt",
        "opencode.base_url",
        "opencode.password",
        "turn.first_event_timeout",
        "limits.max_prompt_bytes",
        "limits.max_attachment_bytes",
        "limits.max_attachments_bytes",
        "shutdown.grace",
        "log.format",
        "nats.inbox_prefix",
        "subjects.status",
        "subjects.heartbeat",
        "service.name",
        "service.host",
        "service.heartbeat_interval",
        "metrics.listen",
        "opencode.password_file",
        "turn.provider_retry_limit",
        "nats.retry_on_initial_connect",
        "turn.max_waiting",
        "cluster.enabled",
        "cluster.instance_id",
        "cluster.opencode_id",
        "cluster.conversations_bucket",
        "cluster.instances_bucket",
        "cluster.turns_bucket",
        "cluster.lease_ttl",
        "cluster.turn_ttl",
        "cluster.instance_prefix",
        "cluster.forward_timeout",
        "jetstream.jobs",
        "jetstream.jobs_stream",
        "jetstream.jobs_subject",
        "jetstream.jobs_consumer",
        "jetstream.jobs_max_bytes",
        "jetstream.ack_wait",
        "jetstream.max_deliver",
        "jetstream.retry_delay",
        "jetstream.replies_stream",
        "jetstream.replies_max_age",
        "jetstream.replicas",
        "subjects.turn_status",
        "limits.large_final_bucket",
        "limits.max_attachments",
        "limits.max_image_pixels",
        "shares.attachment_bytes_in_flight",
        "shares.turn_states_bytes",
        "shares.finals_bytes",
        "shares.job_tenants",
        "shares.jobs_bytes",
    ] {
        assert!(
            example.iter().any(|k| k == key),
            "config.example.toml lacks {key}"
        );
    }
}

mod toml_keys {
    pub type Keys = Vec<String>;
    /// `section.key` for every `key =` line, commented out or not.
    pub fn keys(text: &str) -> Keys {
        let mut section = String::new();
        let mut out = Vec::new();
        for line in text.lines() {
            let l = line.trim().trim_start_matches('#').trim();
            if l.starts_with('[') && l.ends_with(']') {
                section = l.trim_matches(['[', ']']).to_string();
            } else if let Some((k, _)) = l.split_once('=') {
                let k = k.trim();
                if !k.is_empty() && !k.contains(' ') {
                    out.push(format!("{section}.{k}"));
                }
            }
        }
        out
    }
}

#[test]
fn file_and_env_layer() {
    let f = write(
        "[nats]\nurl = \"nats://file:4222\"\n[turn]\nidle_timeout = \"90s\"\n[opencode]\nbase_url = \"http://127.0.0.1:4096\"\n",
    );
    let c = Config::load_with_env(
        Some(f.path()),
        env(&[
            ("OPENCODE_BRIDGE__NATS__URL", "nats://env:4222"),
            ("OPENCODE_BRIDGE__OPENCODE__PASSWORD", "s3cret"),
            ("OPENCODE_BRIDGE__TURN__CONVERSATION_QUEUE", "3"),
        ]),
    )
    .unwrap();
    assert_eq!(c.nats.url, "nats://env:4222");
    assert_eq!(c.turn.idle_timeout, Duration::from_secs(90));
    assert_eq!(c.turn.conversation_queue, 3);
    assert_eq!(c.opencode.password.as_deref(), Some("s3cret"));
    assert_eq!(
        c.opencode.base_url.as_deref(),
        Some("http://127.0.0.1:4096")
    );
}

#[test]
fn unknown_keys_are_named() {
    let f = write("[nats]\nurll = \"x\"\n");
    let e = Config::load_with_env(Some(f.path()), env(&[])).unwrap_err();
    assert!(e.to_string().contains("urll"), "{e}");
    let f = write("[natz]\nurl = \"x\"\n");
    let e = Config::load_with_env(Some(f.path()), env(&[])).unwrap_err();
    assert!(e.to_string().contains("natz"), "{e}");
    let e = Config::load_with_env(None, env(&[("OPENCODE_BRIDGE__TURN__IDEL_TIMEOUT", "1s")]))
        .unwrap_err();
    assert!(e.to_string().contains("idel_timeout"), "{e}");
}

#[test]
fn bad_values_are_named() {
    let cases = [
        ("[turn]\nidle_timeout = \"soon\"\n", "idle_timeout"),
        ("[turn]\nidle_timeout = \"0s\"\n", "[turn] idle_timeout"),
        ("[subjects]\nprompt = \"a.*\"\n", "[subjects] prompt"),
        (
            "[opencode]\nbase_url = \"localhost:4096\"\n",
            "[opencode] base_url",
        ),
        ("[nats]\nurl = \" , \"\n", "[nats] url"),
        ("[log]\nformat = \"xml\"\n", "xml"),
        ("[service]\nname = \"a.b\"\n", "[service] name"),
        ("[subjects]\nstatus = \"a.>\"\n", "[subjects] status"),
        ("[metrics]\nlisten = \"localhost\"\n", "listen"),
    ];
    for (text, needle) in cases {
        let f = write(text);
        let e = Config::load_with_env(Some(f.path()), env(&[])).unwrap_err();
        assert!(e.to_string().contains(needle), "{text:?}: {e}");
    }
    let e = Config::load_with_env(Some(Path::new("/nonexistent.toml")), env(&[])).unwrap_err();
    assert!(e.to_string().contains("/nonexistent.toml"), "{e}");
}

/// Each message names the source, the key, what was given and what is
/// valid.
#[test]
fn config_errors_in_plain_words() {
    let msg = |text: &str| {
        let f = write(text);
        let e = Config::load_with_env(Some(f.path()), env(&[])).unwrap_err();
        (e.to_string(), f.path().display().to_string())
    };
    let (e, path) = msg("[turn]\nidle_timeout = 600\n");
    assert_eq!(
        e,
        format!("config file {path}, [turn] idle_timeout = 600: not a duration; write a duration such as \"10m\", \"90s\" or \"1h 30m\"")
    );
    let (e, path) = msg("[turn]\nidle_timeout = \"soon\"\n");
    assert_eq!(
        e,
        format!("config file {path}, [turn] idle_timeout = \"soon\": not a duration; write a duration such as \"10m\", \"90s\" or \"1h 30m\"")
    );
    let (e, path) = msg("[log]\nformat = \"yaml\"\n");
    assert_eq!(
        e,
        format!("config file {path}, [log] format = \"yaml\": not a valid value; valid values are \"text\", \"json\"")
    );
    let (e, path) = msg("[subjects]\nreply_headers = \"thin\"\n");
    assert_eq!(
        e,
        format!("config file {path}, [subjects] reply_headers = \"thin\": not a valid value; valid values are \"full\", \"lean\"")
    );
    let (e, _) = msg("[turn]\nidel_timeout = \"1s\"\n");
    assert!(
        e.contains("[turn] idel_timeout = \"1s\": idel_timeout is not a key of [turn]; its keys are first_event_timeout, idle_timeout,"),
        "{e}"
    );
    let (e, path) = msg("[natz]\nurl = \"x\"\n");
    assert!(
        e.starts_with(&format!("config file {path}, [natz] url = \"x\": [natz] is not a known section; the sections are nats, subjects,")),
        "{e}"
    );
    let (e, _) = msg("[turn]\nconversation_queue = \"eight\"\n");
    assert!(
        e.contains("[turn] conversation_queue = \"eight\": expected a whole number"),
        "{e}"
    );
    let (e, path) = msg("[nats]\nurl = \"http://foo\"\n");
    assert_eq!(
        e,
        format!("config file {path}, [nats] url: \"http://foo\" is not a NATS URL: use nats://, tls://, ws:// or wss:// (as in nats://127.0.0.1:4222)")
    );
    let (e, path) = msg("[turn\n");
    assert!(
        e.starts_with(&format!("config file {path}: not valid TOML")),
        "{e}"
    );

    // A missing file is a missing file.
    let e = Config::load_with_env(Some(Path::new("/nonexistent.toml")), env(&[])).unwrap_err();
    assert_eq!(
        e.to_string(),
        "config file /nonexistent.toml does not exist"
    );

    // From the environment: the variable is named, with its value.
    let e = Config::load_with_env(None, env(&[("OPENCODE_BRIDGE__TURN__IDLE_TIMEOUT", "600")]))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "environment variable OPENCODE_BRIDGE__TURN__IDLE_TIMEOUT=\"600\" ([turn] idle_timeout): not a duration; write a duration such as \"10m\", \"90s\" or \"1h 30m\""
    );
    let e =
        Config::load_with_env(None, env(&[("OPENCODE_BRIDGE__LOG__FORMAT", "yaml")])).unwrap_err();
    assert_eq!(
        e.to_string(),
        "environment variable OPENCODE_BRIDGE__LOG__FORMAT=\"yaml\" ([log] format): not a valid value; valid values are \"text\", \"json\""
    );
    let e = Config::load_with_env(None, env(&[("OPENCODE_BRIDGE__NATS__URL", "http://foo")]))
        .unwrap_err();
    assert!(
        e.to_string().starts_with(
            "environment variable OPENCODE_BRIDGE__NATS__URL ([nats] url): \"http://foo\" is not a NATS URL"
        ),
        "{e}"
    );
    let e = Config::load_with_env(None, env(&[("OPENCODE_BRIDGE__URL", "nats://x")])).unwrap_err();
    assert!(
        e.to_string().contains("OPENCODE_BRIDGE__<SECTION>__<KEY>"),
        "{e}"
    );
    // Numbers and booleans from the environment where a key wants them;
    // a numeric string where it wants a string.
    let c = Config::load_with_env(
        None,
        env(&[
            ("OPENCODE_BRIDGE__NATS__RETRY_ON_INITIAL_CONNECT", "false"),
            ("OPENCODE_BRIDGE__NATS__PASSWORD", "1234"),
            ("OPENCODE_BRIDGE__NATS__USER", "u"),
            (
                "OPENCODE_BRIDGE__NATS__URL",
                "tls://a:4222, ws://b:80, c:4222",
            ),
        ]),
    )
    .unwrap();
    assert!(!c.nats.retry_on_initial_connect);
    assert_eq!(c.nats.password.as_deref(), Some("1234"));
}

#[test]
fn the_sources_read_are_said() {
    let (_, s) = Config::load_inner(None, env(&[])).unwrap();
    assert_eq!(
        s.to_string(),
        "built-in defaults only (no --config file, no OPENCODE_BRIDGE__* environment variables)"
    );
    let f = write("[turn]\nidle_timeout = \"90s\"\n");
    let (_, s) = Config::load_inner(
        Some(f.path()),
        env(&[
            ("OPENCODE_BRIDGE__NATS__URL", "nats://n:4222"),
            ("OTHER", "x"),
        ]),
    )
    .unwrap();
    assert_eq!(
        s.to_string(),
        format!(
            "built-in defaults, config file {}, environment OPENCODE_BRIDGE__NATS__URL",
            f.path().display()
        )
    );
}

#[test]
fn the_opencode_password_can_come_from_a_file() {
    let f = write("s3cret-from-file\n");
    let c = Config::load_with_env(
        None,
        env(&[(
            "OPENCODE_BRIDGE__OPENCODE__PASSWORD_FILE",
            f.path().to_str().unwrap(),
        )]),
    )
    .unwrap();
    assert_eq!(
        c.opencode.resolved_password().as_deref(),
        Some("s3cret-from-file")
    );
    let e = Config::load_with_env(
        None,
        env(&[(
            "OPENCODE_BRIDGE__OPENCODE__PASSWORD_FILE",
            "/nonexistent/pw",
        )]),
    )
    .unwrap_err();
    assert!(e.to_string().contains("[opencode] password_file"), "{e}");
    assert!(e.to_string().contains("/nonexistent/pw"), "{e}");
}

#[test]
fn ops_keys_are_off_by_default_and_layer() {
    let c = Config::load_with_env(None, env(&[])).unwrap();
    assert!(c.metrics.listen.is_none());
    assert_eq!(c.service.name, "opencode-bridge");
    assert_eq!(c.service.heartbeat_interval, Duration::from_secs(30));
    assert_eq!(c.nats.inbox_prefix, "_INBOX");
    let c = Config::load_with_env(
        None,
        env(&[
            ("OPENCODE_BRIDGE__METRICS__LISTEN", "127.0.0.1:9464"),
            ("OPENCODE_BRIDGE__SERVICE__HEARTBEAT_INTERVAL", "0s"),
            ("OPENCODE_BRIDGE__NATS__INBOX_PREFIX", "_INBOX.bridge"),
        ]),
    )
    .unwrap();
    assert_eq!(c.metrics.listen, Some("127.0.0.1:9464".parse().unwrap()));
    assert!(c.service.heartbeat_interval.is_zero());
    assert_eq!(c.nats.inbox_prefix, "_INBOX.bridge");
}

#[test]
fn several_urls() {
    let c = NatsConfig {
        url: "nats://a:1, nats://b:2".into(),
        ..Default::default()
    };
    assert_eq!(c.urls(), vec!["nats://a:1", "nats://b:2"]);
}

#[test]
fn cluster_settings_are_checked() {
    let bad = |pairs: &[(&str, &str)], key: &str| {
        let e = Config::load_with_env(None, env(pairs))
            .unwrap_err()
            .to_string();
        let (section, name) = key.split_once('.').unwrap();
        assert!(e.contains(&format!("[{section}] {name}")), "{e}");
    };
    bad(
        &[("OPENCODE_BRIDGE__CLUSTER__INSTANCE_ID", "a.b")],
        "cluster.instance_id",
    );
    bad(
        &[("OPENCODE_BRIDGE__CLUSTER__LEASE_TTL", "1s")],
        "cluster.lease_ttl",
    );
    bad(
        &[("OPENCODE_BRIDGE__CLUSTER__TURNS_BUCKET", "a.b")],
        "cluster.turns_bucket",
    );
    bad(
        &[("OPENCODE_BRIDGE__JETSTREAM__MAX_DELIVER", "0")],
        "jetstream.max_deliver",
    );
    bad(
        &[("OPENCODE_BRIDGE__JETSTREAM__JOBS_SUBJECT", "opencode.job.>")],
        "jetstream.jobs_subject",
    );
    bad(
        &[("OPENCODE_BRIDGE__JETSTREAM__REPLICAS", "0")],
        "jetstream.replicas",
    );
    bad(
        &[("OPENCODE_BRIDGE__JETSTREAM__REPLICAS", "7")],
        "jetstream.replicas",
    );
    let three = env(&[("OPENCODE_BRIDGE__JETSTREAM__REPLICAS", "3")]);
    assert_eq!(
        Config::load_with_env(None, three)
            .unwrap()
            .jetstream
            .replicas,
        3
    );
    let c =
        Config::load_with_env(None, env(&[("OPENCODE_BRIDGE__CLUSTER__ENABLED", "off")])).unwrap();
    assert_eq!(c.cluster.enabled, Switch::Off);
}

#[test]
fn a_tenant_has_its_own_stream_default() {
    use crate::protocol::tenant::Caller;
    use crate::protocol::StreamMode;
    let f = write(
        "[tenancy.stream]\nslack = { coalesce_ms = 1000 }\ndiscord = \"final\"\n\"*\" = \"full\"\n",
    );
    let c = Config::load_with_env(Some(f.path()), env(&[])).unwrap();
    let t = &c.tenancy;
    assert_eq!(
        t.stream_default(&Caller::Tenant("slack".into())),
        StreamMode::Coalesce { ms: 1000 }
    );
    assert_eq!(
        t.stream_default(&Caller::Tenant("discord".into())),
        StreamMode::Final
    );
    assert_eq!(
        t.stream_default(&Caller::Tenant("matrix".into())),
        StreamMode::Full
    );
    assert_eq!(t.stream_default(&Caller::Operator), StreamMode::Full);
    let bad = write("[tenancy.stream]\nslack = \"sometimes\"\n");
    let e = Config::load_with_env(Some(bad.path()), env(&[]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("stream") && e.contains("slack"), "{e}");
}

/// `[opencode] max_idle_connections` (the old name) is read as
/// `max_connections` from the file and the environment alike, the later
/// source winning as for any key, with a note that says what changed; both
/// names at once are not a duplicate.
#[test]
fn a_renamed_key_is_read_under_its_new_name_with_a_note() {
    let old_in_file = write("[opencode]\nmax_idle_connections = 16\n");
    let (c, s) = Config::load_inner(
        Some(old_in_file.path()),
        env(&[("OPENCODE_BRIDGE__OPENCODE__MAX_CONNECTIONS", "64")]),
    )
    .unwrap();
    assert_eq!(c.opencode.max_connections, 64, "the environment wins");
    assert_eq!(s.renamed.len(), 1, "{:?}", s.renamed);
    assert!(
        s.renamed[0].contains("max_idle_connections is read as [opencode] max_connections"),
        "{:?}",
        s.renamed
    );

    let new_in_file = write("[opencode]\nmax_connections = 8\n");
    let (c, s) = Config::load_inner(
        Some(new_in_file.path()),
        env(&[("OPENCODE_BRIDGE__OPENCODE__MAX_IDLE_CONNECTIONS", "4")]),
    )
    .unwrap();
    assert_eq!(c.opencode.max_connections, 4);
    assert_eq!(s.renamed.len(), 1);

    let (c, s) = Config::load_inner(None, env(&[])).unwrap();
    assert_eq!(c.opencode.max_connections, 32);
    assert!(s.renamed.is_empty());

    // A bad value under the old name is named by where it came from.
    let e = Config::load_with_env(
        Some(write("[opencode]\nmax_idle_connections = 0\n").path()),
        env(&[]),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("max_idle_connections") && e.contains("max_connections"),
        "{e}"
    );
}
