//! A chat client for opencode-nats-bridge in Rust, on the crate's own
//! client side of the contract ([`Caller`]: the NATS connection with every
//! `[nats]` option, request-style prompts whose replies stream back to an
//! inbox) and its config loader.
//!
//! ```sh
//! cargo run --example rust_client -- 'Run ls and tell me what you see'
//! OPENCODE_BRIDGE__NATS__URL=nats://nats:4222 cargo run --example rust_client -- 'hello'
//! ```
//!
//! It streams the answer to stdout, shows tool activity and provider
//! retries on stderr, and answers permission requests with `once` (the
//! prompt says `"interactive": true`; the daemon asks only for what its
//! `[permissions] rules` mark `ask`). Exit status: 0 `final`, 2 `error`,
//! 3 no reply in time, 1 NATS or the bridge not there.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use opencode_nats_bridge::bus::{Caller, Received};
use opencode_nats_bridge::config::Config;
use serde::Deserialize;
use serde_json::{json, Value};

/// The replies this client reads (docs/PROTOCOL.md, "Replies"); any other
/// kind is an extension it skips.
#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Reply {
    Delta {
        content: String,
    },
    Reasoning {
        content: String,
    },
    ToolCall {
        tool: String,
        args: Value,
    },
    ToolResult {
        tool: String,
        success: bool,
        result: String,
    },
    Status {
        event: String,
        attempt: u64,
        reason: String,
    },
    Permission {
        permission: String,
        patterns: Vec<String>,
        reply_subject: String,
    },
    Final {
        content: String,
        model: Option<String>,
        /// Set when `content` was cut to fit one NATS message: the whole
        /// text is this object of a NATS object store bucket.
        content_object: Option<ContentObject>,
    },
    Error {
        error: String,
        code: String,
        retryable: bool,
    },
    #[serde(other)]
    Other,
}

/// Where a cut final's whole text is (docs/PROTOCOL.md, "final").
#[derive(Debug, Deserialize)]
struct ContentObject {
    bucket: String,
    name: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let text = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
    if text.trim().is_empty() {
        eprintln!("usage: rust_client PROMPT");
        return ExitCode::from(64);
    }
    // Defaults + OPENCODE_BRIDGE__* from the environment, as the daemon reads them.
    let mut cfg = match Config::load(None) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(78);
        }
    };
    cfg.nats.retry_on_initial_connect = false;
    let caller = match Caller::connect(&cfg.nats).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    let prompt = json!({"text": text, "interactive": true, "progress": true});
    let mut replies = match caller
        .stream(&cfg.subjects.prompt, &[], prompt.to_string().into_bytes())
        .await
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    let mut out = std::io::stdout();
    // The answer text printed so far (the deltas).
    let mut printed = String::new();
    let code = loop {
        let received = match tokio::time::timeout(Duration::from_secs(600), replies.next()).await {
            Ok(Some(r)) => r,
            Ok(None) => break 1,
            Err(_) => {
                eprintln!("no reply within 10 minutes");
                break 3;
            }
        };
        let payload = match received {
            Received::Reply(p) => p,
            Received::NoResponders => {
                eprintln!("no bridge listens on {}", cfg.subjects.prompt);
                break 1;
            }
            Received::ServerError(e) => {
                eprintln!("NATS refused: {e}");
                break 1;
            }
        };
        let reply: Reply = match serde_json::from_slice(&payload) {
            Ok(r) => r,
            Err(e) => {
                eprintln!(
                    "an unreadable reply ({e}): {}",
                    String::from_utf8_lossy(&payload)
                );
                continue;
            }
        };
        match reply {
            Reply::Delta { content } => {
                printed.push_str(&content);
                let _ = out.write_all(content.as_bytes());
                let _ = out.flush();
            }
            Reply::Reasoning { content } => eprintln!("(thinking) {content}"),
            Reply::ToolCall { tool, args } => eprintln!("-> {tool} {args}"),
            Reply::ToolResult {
                tool,
                success,
                result,
            } => eprintln!(
                "<- {tool} {}: {}",
                if success { "ok" } else { "failed" },
                result.trim()
            ),
            Reply::Status {
                event,
                attempt,
                reason,
            } => eprintln!("({event} {attempt}: {reason})"),
            Reply::Permission {
                permission,
                patterns,
                reply_subject,
            } => {
                eprintln!("permission {permission} {patterns:?}: once");
                let answer = json!({"reply": "once"}).to_string().into_bytes();
                if let Err(e) = caller.publish(&reply_subject, answer).await {
                    eprintln!("answering failed: {e}");
                }
            }
            Reply::Final {
                content,
                model,
                content_object,
            } => {
                // A final too long for NATS names its whole text.
                let whole = match content_object {
                    Some(o) => match caller.fetch_object(&o.bucket, &o.name).await {
                        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                        Err(e) => {
                            eprintln!("(the whole answer could not be fetched: {e})");
                            content
                        }
                    },
                    None => content,
                };
                // What the deltas did not carry (normally nothing).
                if let Some(rest) = whole.strip_prefix(printed.as_str()) {
                    let _ = out.write_all(rest.as_bytes());
                }
                let content = whole;
                let _ = writeln!(out);
                eprintln!(
                    "[{} chars from {}]",
                    content.len(),
                    model.unwrap_or_default()
                );
                break 0;
            }
            Reply::Error {
                error,
                code,
                retryable,
            } => {
                let _ = writeln!(out);
                eprintln!(
                    "error ({code}{}): {error}",
                    if retryable { ", retryable" } else { "" }
                );
                break 2;
            }
            Reply::Other => {}
        }
    };
    caller.close().await;
    ExitCode::from(code)
}
