//! The conversation control subcommands (`new`, `undo`, `redo`, `compact`,
//! `diff`, `fork`, `history`, `list`, `info`): one request on
//! `<[controls] subject>[.<tenant>].<op>`, its one JSON answer printed.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::{connect, load, runtime, Connection};
use super::{EXIT_ERROR_REPLY, EXIT_TIMEOUT, EXIT_UNREACHABLE, EXIT_USAGE};

/// What every control subcommand takes.
#[derive(Args, Debug)]
pub struct Common {
    #[command(flatten)]
    pub conn: Connection,
    /// Ask as this tenant (`<controls subject>.<T>.<op>`: its own
    /// conversations only); the operator's subject otherwise.
    #[arg(long, value_name = "T")]
    pub tenant: Option<String>,
    /// Print the answer verbatim, one JSON line.
    #[arg(long)]
    pub json: bool,
    /// How long to wait for the answer.
    #[arg(long, value_name = "D", default_value = "60s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// A control on one conversation.
#[derive(Args, Debug)]
pub struct Conv {
    #[command(flatten)]
    pub common: Common,
    /// The conversation key, as replies show it (`slack.C042`).
    #[arg(long, value_name = "C")]
    pub conversation: String,
}

/// The conversation control subcommands (docs/PROTOCOL.md, "Conversation
/// controls"). Exit status: 0 `ok`; 2 refused (the answer says why); 3 no
/// answer within `--timeout`; 1 NATS unreachable; 64 bad usage; 78 bad
/// config.
#[derive(Subcommand, Debug)]
pub enum ControlCommand {
    /// Start the conversation's next prompt in a new OpenCode session.
    New {
        #[command(flatten)]
        conv: Conv,
        /// Abort a running turn (and drop the queued ones) first.
        #[arg(long)]
        abort: bool,
    },
    /// Revert the conversation's last turn: its messages and the files it
    /// changed.
    Undo(Conv),
    /// Restore what `undo` reverted.
    Redo(Conv),
    /// Summarize the conversation's session (fewer tokens of context).
    Compact(Conv),
    /// The files the conversation changed, as unified diffs.
    Diff {
        #[command(flatten)]
        conv: Conv,
        /// Only the turn of this user message (`msg_...`).
        #[arg(long, value_name = "ID")]
        message: Option<String>,
    },
    /// A new conversation continuing this one (from its last turn, or the
    /// turn of `--message`).
    Fork {
        #[command(flatten)]
        conv: Conv,
        /// The new conversation's key (generated when absent).
        #[arg(long, value_name = "C")]
        to: Option<String>,
        /// Fork after the turn of this user message (`msg_...`).
        #[arg(long, value_name = "ID")]
        message: Option<String>,
    },
    /// The conversation's turns, newest page first.
    History {
        #[command(flatten)]
        conv: Conv,
        /// Turns before this user message (the `next` of a page).
        #[arg(long, value_name = "ID")]
        before: Option<String>,
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
    },
    /// The caller's conversations, by key.
    List {
        #[command(flatten)]
        common: Common,
        /// Conversations after this key (the `next` of a page).
        #[arg(long, value_name = "C")]
        after: Option<String>,
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
    },
    /// One conversation: model, usage, busy, queued turns.
    Info(Conv),
    /// The OpenCode commands prompts may run (`"command"`).
    Commands(Common),
}

impl ControlCommand {
    /// The op, the common arguments and the request payload.
    fn request(&self) -> (&'static str, &Common, Value) {
        let conv = |c: &Conv| json!({"conversation": c.conversation});
        let with = |mut v: Value, k: &str, x: &Option<String>| {
            if let Some(x) = x {
                v[k] = json!(x);
            }
            v
        };
        match self {
            ControlCommand::New { conv: c, abort } => (
                "new",
                &c.common,
                json!({"conversation": c.conversation, "abort": abort}),
            ),
            ControlCommand::Undo(c) => ("undo", &c.common, conv(c)),
            ControlCommand::Redo(c) => ("redo", &c.common, conv(c)),
            ControlCommand::Compact(c) => ("compact", &c.common, conv(c)),
            ControlCommand::Info(c) => ("info", &c.common, conv(c)),
            ControlCommand::Commands(common) => ("commands", common, json!({})),
            ControlCommand::Diff { conv: c, message } => {
                ("diff", &c.common, with(conv(c), "message", message))
            }
            ControlCommand::Fork {
                conv: c,
                to,
                message,
            } => {
                let v = with(with(conv(c), "to", to), "message", message);
                ("fork", &c.common, v)
            }
            ControlCommand::History {
                conv: c,
                before,
                limit,
            } => {
                let mut v = with(conv(c), "before", before);
                if let Some(n) = limit {
                    v["limit"] = json!(n);
                }
                ("history", &c.common, v)
            }
            ControlCommand::List {
                common,
                after,
                limit,
            } => {
                let mut v = with(json!({}), "after", after);
                if let Some(n) = limit {
                    v["limit"] = json!(n);
                }
                ("list", common, v)
            }
        }
    }
}

/// Runs one control subcommand.
pub fn control(cmd: ControlCommand) -> ExitCode {
    let (op, common, payload) = cmd.request();
    let cfg = match load(&common.conn) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let base = &cfg.controls.subject;
    let subject = match &common.tenant {
        Some(t) if t.is_empty() || t.contains(['.', '*', '>', ' ']) => {
            eprintln!("--tenant {t:?} must be one subject token");
            return ExitCode::from(EXIT_USAGE);
        }
        Some(t) => format!("{base}.{t}.{op}"),
        None => format!("{base}.{op}"),
    };
    runtime().block_on(async {
        let caller = match connect(&cfg, &common.conn).await {
            Ok(c) => c,
            Err(code) => return code,
        };
        let answer = caller
            .request_one(&subject, payload.to_string().into_bytes(), common.timeout)
            .await;
        caller.close().await;
        match answer {
            Ok(Some(raw)) => show(op, &raw, common.json),
            Ok(None) => {
                eprintln!(
                    "no bridge answered on {subject} within {}",
                    humantime::format_duration(common.timeout)
                );
                ExitCode::from(EXIT_TIMEOUT)
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_UNREACHABLE)
            }
        }
    })
}

/// The answer: pretty JSON (a `diff`: its patches), or as received.
fn show(op: &str, raw: &[u8], json: bool) -> ExitCode {
    let mut out = std::io::stdout().lock();
    let v: Value = match serde_json::from_slice(raw) {
        Ok(v) => v,
        Err(_) => {
            eprintln!("the bridge answered: {}", String::from_utf8_lossy(raw));
            return ExitCode::from(EXIT_UNREACHABLE);
        }
    };
    if v["ok"] != true {
        eprintln!(
            "{}: {}",
            v["code"].as_str().unwrap_or("error"),
            v["error"].as_str().unwrap_or_default()
        );
        return ExitCode::from(EXIT_ERROR_REPLY);
    }
    if json {
        let _ = out.write_all(raw);
        let _ = out.write_all(b"\n");
    } else if op == "diff" {
        for f in v["files"].as_array().into_iter().flatten() {
            let _ = write!(out, "{}", f["patch"].as_str().unwrap_or_default());
        }
        if v["truncated"] == true {
            let _ = writeln!(out, "[diff truncated]");
        }
    } else {
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_default()
        );
    }
    ExitCode::SUCCESS
}
