//! The `turn` subcommand (a turn's state and terminal reply, fetched again
//! from `[subjects] turn_status`), and the whole text of a cut `final`
//! fetched from the object store it names (`content_object`), for `prompt`.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use opencode_nats_bridge::bus::Caller;
use opencode_nats_bridge::protocol::turn_state::{TurnState, TurnStatus};
use opencode_nats_bridge::protocol::{validate_subject, ReplyBody, ReplyOwned};

use super::{connect, load, runtime, Connection, EXIT_TIMEOUT, EXIT_UNREACHABLE, EXIT_USAGE};

#[derive(Args, Debug)]
pub struct TurnArgs {
    #[command(flatten)]
    pub conn: Connection,
    /// Ask as this tenant (`<turn_status>.<T>`: its own turns only); the
    /// operator's bare subject otherwise.
    #[arg(long, value_name = "T")]
    pub tenant: Option<String>,
    /// Print the answer verbatim, one JSON line.
    #[arg(long)]
    pub json: bool,
    /// How long to wait for the answer.
    #[arg(long, value_name = "D", default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// The turn's trace id (the `trace_id` of its prompt and replies).
    #[arg(value_name = "TRACE_ID")]
    pub trace_id: String,
}

/// `opencode-nats-bridge turn`.
pub fn turn(args: TurnArgs) -> ExitCode {
    let cfg = match load(&args.conn) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let subject = match &args.tenant {
        Some(t) if validate_subject(t).is_err() || t.contains('.') => {
            eprintln!("--tenant {t:?} must be one subject token");
            return ExitCode::from(EXIT_USAGE);
        }
        Some(t) => format!("{}.{t}", cfg.subjects.turn_status),
        None => cfg.subjects.turn_status.clone(),
    };
    let request = serde_json::json!({"trace_id": args.trace_id}).to_string();
    runtime().block_on(async {
        let caller = match connect(&cfg, &args.conn).await {
            Ok(c) => c,
            Err(code) => return code,
        };
        let answer = caller
            .request_one(&subject, request.into_bytes(), args.timeout)
            .await;
        // Nobody answered: a server without JetStream is the likelier cause.
        let no_jetstream = match answer {
            Ok(None) => caller.jetstream_missing().await,
            _ => None,
        };
        caller.close().await;
        match (answer, no_jetstream) {
            (Ok(Some(raw)), _) => show(&raw, args.json),
            (Ok(None), Some(why)) => {
                eprintln!(
                    "no turn states on this NATS server: {why}; daemons keep turn states only with JetStream (docs/CLUSTER.md)"
                );
                ExitCode::from(EXIT_TIMEOUT)
            }
            (Ok(None), None) => {
                eprintln!(
                    "no bridge answered on {subject} within {} (is a daemon running on this NATS server? `status` lists them)",
                    humantime::format_duration(args.timeout)
                );
                ExitCode::from(EXIT_TIMEOUT)
            }
            (Err(e), _) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_UNREACHABLE)
            }
        }
    })
}

/// The state on the first line, then the terminal reply (one JSON line);
/// `--json`: the answer as received.
fn show(raw: &[u8], json: bool) -> ExitCode {
    let mut out = std::io::stdout().lock();
    if json {
        let _ = out.write_all(raw);
        let _ = out.write_all(b"\n");
        return ExitCode::SUCCESS;
    }
    let status: TurnStatus = match serde_json::from_slice(raw) {
        Ok(s) => s,
        Err(_) => {
            eprintln!("the bridge answered: {}", String::from_utf8_lossy(raw));
            return ExitCode::from(EXIT_UNREACHABLE);
        }
    };
    let state = match status.state {
        TurnState::Queued => "queued",
        TurnState::Running => "running",
        TurnState::Done => "done",
        TurnState::Unknown => "unknown",
    };
    let _ = writeln!(out, "{state}");
    if let Some(t) = status.terminal {
        let _ = writeln!(out, "{t}");
    }
    ExitCode::SUCCESS
}

/// A `final` that names its whole text in an object store: the same reply
/// with the whole text as `content` (no longer `content_truncated`), and a
/// note if it could not be fetched. Any other reply as it came.
pub async fn whole_final(caller: &Caller, raw: Bytes) -> (Bytes, Option<String>) {
    let Ok(mut reply) = ReplyOwned::from_json(&raw) else {
        return (raw, None);
    };
    let ReplyBody::Final(fin) = &mut reply.body else {
        return (raw, None);
    };
    let Some(object) = fin.content_object.clone() else {
        return (raw, None);
    };
    match caller.fetch_object(&object.bucket, &object.name).await {
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(text) => {
                fin.content = text;
                fin.content_truncated = false;
                let whole = serde_json::to_vec(&reply).map(Bytes::from);
                (whole.unwrap_or(raw), None)
            }
            Err(_) => (raw, Some("the stored final is not UTF-8 text".into())),
        },
        Err(e) => (
            raw,
            Some(format!("the whole final could not be fetched: {e}")),
        ),
    }
}
