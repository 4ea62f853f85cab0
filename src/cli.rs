//! The client commands of the binary: `prompt` sends one prompt
//! request-style and renders its replies live; `status` lists every
//! running daemon; `turn` (in [`turn`]) fetches a turn's state again. Both find NATS like the daemon does (the config file,
//! then `OPENCODE_BRIDGE__NATS__URL`), or from `--server`.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use opencode_nats_bridge::bus::{Caller, Received, ReplyStream};
use opencode_nats_bridge::config::Config;
use opencode_nats_bridge::ops::status::Status;
use opencode_nats_bridge::protocol::reply::FinalReply;
use opencode_nats_bridge::protocol::{
    validate_subject, ErrorCode, ReplyBody, ReplyOwned, StatusEvent,
};
use serde_json::{json, Value};

mod control;
mod job;
mod turn;
pub use control::{control, ControlCommand};
pub use turn::{turn, TurnArgs};

/// The turn ended with an `error` reply.
pub const EXIT_ERROR_REPLY: u8 = 2;
/// No terminal reply within `--timeout` (or nobody answered `status`).
pub const EXIT_TIMEOUT: u8 = 3;
/// NATS could not be reached, no bridge listens on the prompt subject, or
/// the server refused the prompt (permissions).
pub const EXIT_UNREACHABLE: u8 = 1;
/// Bad usage (no prompt text).
pub const EXIT_USAGE: u8 = 64;
/// A bad config file (the daemon's too: systemd's `RestartPreventExitStatus`).
pub const EXIT_CONFIG: u8 = 78;
/// Interrupted (Ctrl-C) and the turn did not complete.
pub const EXIT_INTERRUPTED: u8 = 130;

/// How long `prompt` waits for the terminal reply after Ctrl-C, beyond
/// `[turn] abort_timeout`.
const AFTER_ABORT: Duration = Duration::from_secs(3);

/// Where NATS is.
#[derive(Args, Debug)]
pub struct Connection {
    /// NATS server URL(s), comma-separated. Default: `[nats] url` of the
    /// config file, `OPENCODE_BRIDGE__NATS__URL`, else nats://127.0.0.1:4222.
    #[arg(long, short = 's', value_name = "URL")]
    pub server: Option<String>,
    /// A config file in the daemon's format: NATS address, auth, inbox
    /// prefix and subjects are read from it.
    #[arg(long, short, value_name = "PATH")]
    pub config: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct PromptArgs {
    #[command(flatten)]
    pub conn: Connection,
    /// Conversation key: prompts with the same key share one OpenCode
    /// session (context). Sent as the subject tail (`<prompt>.<C>`).
    #[arg(long, value_name = "C")]
    pub conversation: Option<String>,
    /// `provider/model` for this turn.
    #[arg(long, value_name = "M")]
    pub model: Option<String>,
    /// OpenCode agent (`build`, `plan`, ...).
    #[arg(long, value_name = "A")]
    pub agent: Option<String>,
    /// Print every reply as received, one JSON object per line, on stdout
    /// (a cut `final` as it came, naming its `content_object`).
    #[arg(long)]
    pub json: bool,
    /// Ask for the terminal reply only (`"stream": "final"`): no deltas;
    /// the whole answer comes with the `final` (fetched from the object
    /// store when it was too long for one message).
    #[arg(long)]
    pub final_only: bool,
    /// Publish a durable job (`[jetstream] jobs_subject`, stored by
    /// JetStream before this returns) instead of a request-style prompt,
    /// then follow its replies on the default reply subject. A job waits
    /// in the stream until a daemon serves it.
    #[arg(long)]
    pub job: bool,
    /// Give up when no `final` or `error` arrived within this long (exit 3).
    #[arg(long, value_name = "D", default_value = "30m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// The prompt (several words are joined with spaces); read from stdin
    /// when absent.
    #[arg(value_name = "TEXT")]
    pub text: Vec<String>,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub conn: Connection,
    /// Print each daemon's status document as one JSON line.
    #[arg(long)]
    pub json: bool,
    /// How long to wait for answers.
    #[arg(long, value_name = "D", default_value = "2s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

fn load(conn: &Connection) -> Result<Config, ExitCode> {
    let mut cfg = Config::load(conn.config.as_deref()).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(EXIT_CONFIG)
    })?;
    if let Some(url) = &conn.server {
        cfg.nats.url = url.clone();
    }
    // A command line tool fails fast when NATS is not there.
    cfg.nats.retry_on_initial_connect = false;
    Ok(cfg)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Connects to NATS; a failure says which URL and where it came from
/// (`--server` when given, else the config and environment).
async fn connect(cfg: &Config, conn: &Connection) -> Result<Caller, ExitCode> {
    Caller::connect(&cfg.nats).await.map_err(|e| {
        match (&e, &conn.server) {
            (opencode_nats_bridge::bus::BusError::Connect { urls, source }, Some(_)) => eprintln!(
                "cannot connect to NATS at {urls}: {source} (is a nats-server running there? --server gave this URL)"
            ),
            _ => eprintln!("{e}"),
        }
        ExitCode::from(EXIT_UNREACHABLE)
    })
}

/// `opencode-nats-bridge prompt`.
pub fn prompt(args: PromptArgs) -> ExitCode {
    let cfg = match load(&args.conn) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let text = if args.text.is_empty() {
        let stdin = std::io::stdin();
        if stdin.is_terminal() {
            eprintln!("(reading the prompt from stdin; end it with Ctrl-D)");
        }
        let mut t = String::new();
        if let Err(e) = stdin.lock().read_to_string(&mut t) {
            eprintln!("cannot read the prompt from stdin: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
        t
    } else {
        args.text.join(" ")
    };
    if text.trim().is_empty() {
        eprintln!("no prompt text: give it as an argument or on stdin");
        return ExitCode::from(EXIT_USAGE);
    }
    // The conversation rides in the subject (`<prompt>.<conversation>`), so
    // per-user NATS permissions on prompt subjects apply to it.
    let base = if args.job {
        &cfg.jetstream.jobs_subject
    } else {
        &cfg.subjects.prompt
    };
    let subject = match &args.conversation {
        Some(c) => match validate_subject(c) {
            Ok(()) => format!("{base}.{c}"),
            Err(e) => {
                eprintln!("--conversation {c:?} {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        },
        None => base.clone(),
    };
    runtime().block_on(run_prompt(cfg, args, subject, text))
}

async fn run_prompt(cfg: Config, args: PromptArgs, subject: String, text: String) -> ExitCode {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigint = match signal(SignalKind::interrupt()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot watch for Ctrl-C: {e}");
            return ExitCode::from(EXIT_UNREACHABLE);
        }
    };
    let caller = match connect(&cfg, &args.conn).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let trace_id = uuid::Uuid::new_v4().to_string();
    let body = prompt_body(&args, &text, &trace_id);
    let mut replies = match open(&caller, &cfg, &args, &subject, &trace_id, body).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_UNREACHABLE);
        }
    };
    let subject = mirrored(&cfg, args.job, subject);
    let mut view = View::new(
        args.json,
        std::io::stdout().is_terminal(),
        std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
    );
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr();
    let mut deadline = tokio::time::Instant::now() + args.timeout;
    let mut interrupted = false;
    let code = loop {
        tokio::select! {
            biased;
            _ = sigint.recv() => {
                if interrupted {
                    view.note(&mut out, &mut err, "interrupted again; not waiting for the bridge");
                    break EXIT_INTERRUPTED;
                }
                interrupted = true;
                view.note(&mut out, &mut err, "aborting the turn...");
                let abort = json!({"trace_id": trace_id}).to_string().into_bytes();
                if let Err(e) = caller.publish(&abort_subject(&cfg, &subject), abort).await {
                    view.note(&mut out, &mut err, &format!("could not send the abort: {e}"));
                }
                deadline = deadline.min(tokio::time::Instant::now() + cfg.turn.abort_timeout + AFTER_ABORT);
            }
            r = tokio::time::timeout_at(deadline, replies.next()) => {
                let r = match r {
                    Ok(Some(Received::Reply(raw))) if !args.json => {
                        let (raw, note) = turn::whole_final(&caller, raw).await;
                        if let Some(note) = note {
                            view.note(&mut out, &mut err, &note);
                        }
                        Ok(Some(Received::Reply(raw)))
                    }
                    r => r,
                };
                let (code, note) = outcome(r, interrupted, &subject, &args, &trace_id, |raw| {
                    view.reply(&mut out, &mut err, raw)
                });
                if let Some(note) = note {
                    view.note(&mut out, &mut err, &note);
                }
                if let Some(code) = code {
                    break code;
                }
            }
        }
    };
    let _ = out.flush();
    drop(out);
    caller.close().await;
    ExitCode::from(code)
}

/// The prompt sent (request style) or the job published, and its replies.
async fn open(
    caller: &Caller,
    cfg: &Config,
    args: &PromptArgs,
    subject: &str,
    trace_id: &str,
    body: String,
) -> Result<ReplyStream, String> {
    if args.job {
        return job::open_job(caller, cfg, subject, trace_id, body).await;
    }
    caller
        .stream(subject, &[], body.into_bytes())
        .await
        .map_err(|e| e.to_string())
}

/// Aborts and messages name the prompt subject a job mirrors.
fn mirrored(cfg: &Config, job: bool, subject: String) -> String {
    if !job {
        return subject;
    }
    opencode_nats_bridge::protocol::job::as_prompt_subject(
        &cfg.jetstream.jobs_subject,
        &cfg.subjects.prompt,
        &subject,
    )
    .unwrap_or(subject)
}

/// The prompt: `progress` to hear of provider retries while waiting
/// (`status` replies).
fn prompt_body(args: &PromptArgs, text: &str, trace_id: &str) -> String {
    let mut body = json!({"text": text, "trace_id": trace_id, "progress": true});
    if args.final_only {
        body["stream"] = json!("final");
    }
    for (k, v) in [("model", &args.model), ("agent", &args.agent)] {
        if let Some(v) = v {
            body[k] = json!(v);
        }
    }
    body.to_string()
}

/// Where Ctrl-C sends the abort: a tenant's prompt
/// (`opencode.prompt.<tenant>...`) is aborted on `opencode.abort.<tenant>`,
/// the operator's on `opencode.abort`.
fn abort_subject(cfg: &Config, subject: &str) -> String {
    use opencode_nats_bridge::protocol::tenant::{Caller, Route};
    match Route::of(&cfg.route_subjects(), subject) {
        Route::Prompt {
            caller: Caller::Tenant(t),
            ..
        } => format!("{}.{t}", cfg.subjects.abort),
        _ => cfg.subjects.abort.clone(),
    }
}

/// What one wait for a reply means: an exit code once the turn is over,
/// and a note for the user.
fn outcome(
    r: Result<Option<Received>, tokio::time::error::Elapsed>,
    interrupted: bool,
    subject: &str,
    args: &PromptArgs,
    trace_id: &str,
    mut show: impl FnMut(&[u8]) -> Option<Terminal>,
) -> (Option<u8>, Option<String>) {
    match r {
        Err(_) if interrupted => (
            Some(EXIT_INTERRUPTED),
            Some("no answer to the abort; giving up".into()),
        ),
        Err(_) => (
            Some(EXIT_TIMEOUT),
            Some(format!(
                "no final or error reply within {} (trace id {trace_id})",
                humantime::format_duration(args.timeout)
            )),
        ),
        Ok(None) => (
            Some(EXIT_UNREACHABLE),
            Some("the NATS connection closed".into()),
        ),
        Ok(Some(Received::NoResponders)) => (
            Some(EXIT_UNREACHABLE),
            Some(format!("no bridge is listening on {subject}")),
        ),
        Ok(Some(Received::ServerError(e))) => (
            Some(EXIT_UNREACHABLE),
            Some(format!(
                "the NATS server refused the prompt on {subject}: {e}"
            )),
        ),
        Ok(Some(Received::Reply(raw))) => match show(&raw) {
            Some(Terminal::Final) => (Some(0), None),
            Some(Terminal::Error) if interrupted => (Some(EXIT_INTERRUPTED), None),
            Some(Terminal::Error) => (Some(EXIT_ERROR_REPLY), None),
            None => (None, None),
        },
    }
}

/// How a turn ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Terminal {
    Final,
    Error,
}

/// A reply as the CLI reads it: the typed contract, or, from a bridge that
/// sends a kind (or a shape) this version does not know, its kind and seq.
enum Incoming {
    Known(Box<ReplyOwned>),
    Unknown { kind: String, seq: Option<u64> },
}

impl Incoming {
    /// `None`: not JSON at all.
    fn read(raw: &[u8]) -> Option<Incoming> {
        if let Ok(r) = ReplyOwned::from_json(raw) {
            return Some(Incoming::Known(Box::new(r)));
        }
        let v: Value = serde_json::from_slice(raw).ok()?;
        Some(Incoming::Unknown {
            kind: v["kind"].as_str().unwrap_or("").to_string(),
            seq: v["seq"].as_u64(),
        })
    }

    fn terminal(&self) -> Option<Terminal> {
        let kind = match self {
            Incoming::Known(r) => r.body.kind(),
            Incoming::Unknown { kind, .. } => kind,
        };
        match kind {
            "final" => Some(Terminal::Final),
            "error" => Some(Terminal::Error),
            _ => None,
        }
    }
}

/// Renders replies: answer text on stdout as it arrives; reasoning, tool
/// activity and problems on stderr (dimmed on a terminal); or, with
/// `--json`, every reply verbatim on stdout.
struct View {
    json: bool,
    /// stdout is a terminal: keep lines tidy (a final newline, a newline
    /// before notes); otherwise stdout gets exactly the answer's bytes.
    tty_out: bool,
    dim: bool,
    /// The answer text written so far.
    printed: String,
    next_seq: u64,
    out_mid_line: bool,
    err_mid_line: bool,
}

impl View {
    fn new(json: bool, tty_out: bool, dim: bool) -> Self {
        View {
            json,
            tty_out,
            dim,
            printed: String::new(),
            next_seq: 0,
            out_mid_line: false,
            err_mid_line: false,
        }
    }

    /// Renders one reply; the turn's end if it was terminal.
    fn reply(
        &mut self,
        out: &mut impl Write,
        err: &mut impl Write,
        raw: &[u8],
    ) -> Option<Terminal> {
        let incoming = Incoming::read(raw);
        let terminal = incoming.as_ref().and_then(Incoming::terminal);
        if self.json {
            let _ = out.write_all(raw);
            let _ = out.write_all(b"\n");
            let _ = out.flush();
            return terminal;
        }
        let Some(incoming) = incoming else {
            self.note(
                out,
                err,
                &format!("unreadable reply: {}", String::from_utf8_lossy(raw)),
            );
            return None;
        };
        match incoming {
            Incoming::Known(r) => {
                self.count(out, err, r.seq);
                self.body(out, err, r.body);
            }
            Incoming::Unknown { kind, seq } => {
                if let Some(seq) = seq {
                    self.count(out, err, seq);
                }
                self.side(out, err, &format!("[{kind}]"));
            }
        }
        terminal
    }

    /// Notes replies that never arrived (a gap before `seq`).
    fn count(&mut self, out: &mut impl Write, err: &mut impl Write, seq: u64) {
        if seq > self.next_seq {
            let lost = seq - self.next_seq;
            self.note(
                out,
                err,
                &format!(
                    "{lost} repl{} lost on the way",
                    if lost == 1 { "y" } else { "ies" }
                ),
            );
        }
        self.next_seq = self.next_seq.max(seq + 1);
    }

    fn body(&mut self, out: &mut impl Write, err: &mut impl Write, body: ReplyBody) {
        match body {
            ReplyBody::Delta { content, .. } => self.answer(out, err, &content),
            ReplyBody::Reasoning { content, .. } => self.reasoning(out, err, &content),
            ReplyBody::ToolCall { tool, args, .. } => {
                let args = args.to_string();
                self.side(out, err, &format!("→ {tool} {}", clip(&args, 200)));
            }
            ReplyBody::ToolResult {
                tool,
                success,
                result,
                ..
            } => self.tool_result(out, err, &tool, success, &result),
            ReplyBody::Status {
                event: StatusEvent::ProviderRetry,
                attempt,
                reason,
                retry_limit,
            } => {
                let limit = match retry_limit {
                    0 => String::new(),
                    n => format!(" (the bridge gives up at {n})"),
                };
                self.side(
                    out,
                    err,
                    &format!(
                        "the model provider failed; OpenCode retries it: attempt {attempt}{limit}: {}",
                        clip(&reason, 200)
                    ),
                );
            }
            ReplyBody::Final(fin) => self.final_reply(out, err, &fin),
            ReplyBody::Error {
                error,
                code,
                retryable,
                ..
            } => self.error_reply(out, err, code, retryable, &error),
            other @ (ReplyBody::Permission { .. } | ReplyBody::Question { .. }) => {
                self.side(out, err, &format!("[{}]", other.kind()));
            }
        }
    }

    /// Reasoning text on stderr, dimmed.
    fn reasoning(&mut self, out: &mut impl Write, err: &mut impl Write, content: &str) {
        self.end_out_line(out);
        let _ = write!(err, "{}", self.dimmed(content));
        if !content.is_empty() {
            self.err_mid_line = !content.ends_with('\n');
        }
        let _ = err.flush();
    }

    /// A tool's outcome: its first line and how many follow.
    fn tool_result(
        &mut self,
        out: &mut impl Write,
        err: &mut impl Write,
        tool: &str,
        success: bool,
        result: &str,
    ) {
        let how = if success { "ok" } else { "failed" };
        let first = result.lines().next().unwrap_or("");
        let more = match result.lines().count().saturating_sub(1) {
            0 => String::new(),
            more => format!(" (+{more} lines)"),
        };
        self.side(
            out,
            err,
            &format!("← {tool} {how}: {}{more}", clip(first, 200)),
        );
    }

    /// The rest of the answer the stream did not carry, then (when stderr
    /// is a terminal) model, time, tokens and notes.
    fn final_reply(&mut self, out: &mut impl Write, err: &mut impl Write, fin: &FinalReply) {
        if fin.content_truncated && self.printed.starts_with(&fin.content) {
            // A cut final the stream already carried whole.
        } else if let Some(rest) = fin.content.strip_prefix(self.printed.as_str()) {
            // Text the stream did not carry (the bridge's catch-up
            // normally makes this empty).
            self.answer(out, err, rest);
        } else {
            self.note(
                out,
                err,
                "the stream lost part of the answer; the whole answer follows",
            );
            self.answer(out, err, &fin.content);
        }
        if self.tty_out && self.out_mid_line {
            let _ = writeln!(out);
            self.out_mid_line = false;
        }
        let _ = out.flush();
        if self.dim {
            let mut facts: Vec<String> = fin.model.iter().cloned().collect();
            facts.push(format!("{:.1}s", fin.duration_ms as f64 / 1000.0));
            facts.push(format!(
                "{} in / {} out tokens",
                fin.usage.input, fin.usage.output
            ));
            facts.extend(fin.notes.iter().cloned());
            self.side(out, err, &facts.join(" · "));
        }
    }

    fn error_reply(
        &mut self,
        out: &mut impl Write,
        err: &mut impl Write,
        code: ErrorCode,
        retryable: bool,
        error: &str,
    ) {
        let retry = if retryable { ", retryable" } else { "" };
        self.end_out_line(out);
        if self.err_mid_line {
            let _ = writeln!(err);
        }
        let _ = writeln!(err, "error ({}{retry}): {error}", code.as_str());
        self.err_mid_line = false;
    }

    /// Answer text on stdout.
    fn answer(&mut self, out: &mut impl Write, err: &mut impl Write, text: &str) {
        if text.is_empty() {
            return;
        }
        if self.err_mid_line {
            let _ = writeln!(err);
            self.err_mid_line = false;
        }
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
        self.printed.push_str(text);
        self.out_mid_line = !text.ends_with('\n');
    }

    /// Before writing on stderr: end stdout's line if both share a terminal.
    fn end_out_line(&mut self, out: &mut impl Write) {
        if self.tty_out && self.out_mid_line {
            let _ = writeln!(out);
            let _ = out.flush();
            self.out_mid_line = false;
        }
    }

    /// One dimmed line on stderr.
    fn side(&mut self, out: &mut impl Write, err: &mut impl Write, line: &str) {
        self.end_out_line(out);
        if self.err_mid_line {
            let _ = writeln!(err);
        }
        let _ = writeln!(err, "{}", self.dimmed(line));
        let _ = err.flush();
        self.err_mid_line = false;
    }

    /// A message from this tool (not from the bridge) on stderr.
    fn note(&mut self, out: &mut impl Write, err: &mut impl Write, line: &str) {
        self.side(out, err, &format!("opencode-nats-bridge: {line}"));
    }

    fn dimmed(&self, s: &str) -> String {
        if self.dim {
            format!("\x1b[2m{s}\x1b[22m")
        } else {
            s.to_string()
        }
    }
}

/// At most `max` bytes of `s`, on a character boundary, with `…` if cut.
fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let end = opencode_nats_bridge::protocol::reply::floor_char_boundary(s, max);
    format!("{}…", &s[..end])
}

/// `opencode-nats-bridge status`.
pub fn status(args: StatusArgs) -> ExitCode {
    let cfg = match load(&args.conn) {
        Ok(c) => c,
        Err(code) => return code,
    };
    runtime().block_on(async {
        let caller = match connect(&cfg, &args.conn).await {
            Ok(c) => c,
            Err(code) => return code,
        };
        let subject = &cfg.subjects.status;
        let asked = std::time::Instant::now();
        let answers = caller
            .gather(
                subject,
                Vec::new(),
                args.timeout,
                Duration::from_millis(500),
            )
            .await;
        caller.close().await;
        let answers = match answers {
            Ok(a) => a,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(EXIT_UNREACHABLE);
            }
        };
        if answers.is_empty() {
            // Before the timeout only NATS' "no responders" ends the wait.
            let waited = asked.elapsed();
            if waited < args.timeout {
                eprintln!(
                    "no bridge answered on {subject}: NATS says nothing subscribes to it (after {} ms); is a daemon running on this NATS server?",
                    waited.as_millis()
                );
            } else {
                eprintln!(
                    "no bridge answered on {subject} within {}",
                    humantime::format_duration(args.timeout)
                );
            }
            return ExitCode::from(EXIT_TIMEOUT);
        }
        let mut all: Vec<(Status, &[u8])> = answers
            .iter()
            .filter_map(|raw| Some((serde_json::from_slice(raw).ok()?, raw.as_ref())))
            .collect();
        all.sort_by(|a, b| (&a.0.host, &a.0.instance).cmp(&(&b.0.host, &b.0.instance)));
        let mut out = std::io::stdout().lock();
        if args.json {
            for (_, raw) in &all {
                let _ = out.write_all(raw);
                let _ = out.write_all(b"\n");
            }
        } else {
            let _ = out.write_all(table(all.iter().map(|(s, _)| s)).as_bytes());
        }
        ExitCode::SUCCESS
    })
}

/// `http://127.0.0.1:4096 (1.18.34, up, embedded)`.
fn opencode_cell(s: &Status) -> String {
    let mut about = Vec::new();
    if !s.opencode_version.is_empty() {
        about.push(s.opencode_version.as_str());
    }
    about.push(if s.opencode_connected { "up" } else { "down" });
    if s.opencode_embedded {
        about.push("embedded");
    }
    format!("{} ({})", s.opencode_url, about.join(", "))
}

/// The status documents as an aligned table.
fn table<'a>(all: impl Iterator<Item = &'a Status>) -> String {
    let mut rows = vec![[
        "HOST",
        "VERSION",
        "HEALTH",
        "NATS",
        "OPENCODE",
        "TURNS",
        "CONVERSATIONS",
        "UPTIME",
    ]
    .map(String::from)];
    for s in all {
        let health = if s.stopping {
            "stopping".to_string()
        } else if s.healthy {
            "ok".to_string()
        } else {
            "unhealthy".to_string()
        };
        rows.push([
            s.host.clone(),
            s.version.clone(),
            health,
            if s.nats_connected { "up" } else { "down" }.to_string(),
            opencode_cell(s),
            s.turns_in_flight.to_string(),
            match s.conversations_known {
                Some(known) => format!("{known} ({} active)", s.conversations),
                None => format!("{} active", s.conversations),
            },
            humantime::format_duration(Duration::from_secs(s.uptime_s)).to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut text = String::new();
    for r in &rows {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        text.push_str(cells.join("  ").trim_end());
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(view: &mut View, replies: &[Value]) -> (String, String, Option<Terminal>) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut end = None;
        for r in replies {
            end = view.reply(&mut out, &mut err, r.to_string().as_bytes());
        }
        (
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
            end,
        )
    }

    fn turn() -> Vec<Value> {
        vec![
            json!({"trace_id": "t", "kind": "reasoning", "seq": 0, "content": "Thinking.", "part_id": "p0"}),
            json!({"trace_id": "t", "kind": "delta", "seq": 1, "content": "Hello ", "part_id": "p1"}),
            json!({"trace_id": "t", "kind": "tool_call", "seq": 2, "tool": "bash", "call_id": "c", "args": {"command": "ls"}}),
            json!({"trace_id": "t", "kind": "tool_result", "seq": 3, "tool": "bash", "call_id": "c", "success": true, "result": "a\nb\n"}),
            json!({"trace_id": "t", "kind": "delta", "seq": 4, "content": "world", "part_id": "p1"}),
            json!({"trace_id": "t", "kind": "final", "seq": 5, "content": "Hello world", "model": "p/m",
                   "usage": {"input": 10, "output": 20, "reasoning": 0, "cache_read": 0, "cache_write": 0},
                   "cost": 0.0, "duration_ms": 1500}),
        ]
    }

    #[test]
    fn stdout_gets_exactly_the_answer_when_piped() {
        let (out, err, end) = run(&mut View::new(false, false, false), &turn());
        assert_eq!(out, "Hello world");
        assert_eq!(end, Some(Terminal::Final));
        assert_eq!(
            err,
            "Thinking.\n→ bash {\"command\":\"ls\"}\n← bash ok: a (+1 lines)\n"
        );
    }

    #[test]
    fn on_a_terminal_lines_stay_tidy_and_side_output_is_dimmed() {
        let (out, err, _) = run(&mut View::new(false, true, true), &turn());
        assert_eq!(out, "Hello \nworld\n");
        assert!(
            err.starts_with("\x1b[2mThinking.\x1b[22m\n\x1b[2m→ bash"),
            "{err:?}"
        );
        assert!(
            err.ends_with("\x1b[2mp/m · 1.5s · 10 in / 20 out tokens\x1b[22m\n"),
            "{err:?}"
        );
    }

    #[test]
    fn a_final_completes_what_the_stream_missed() {
        let replies = vec![
            json!({"trace_id": "t", "kind": "delta", "seq": 0, "content": "Hel", "part_id": "p1"}),
            json!({"trace_id": "t", "kind": "final", "seq": 2, "content": "Hello",
                   "usage": {"input": 1, "output": 1, "reasoning": 0, "cache_read": 0, "cache_write": 0},
                   "cost": 0.0, "duration_ms": 10}),
        ];
        let (out, err, end) = run(&mut View::new(false, false, false), &replies);
        assert_eq!(out, "Hello");
        assert!(err.contains("1 reply lost"), "{err}");
        assert_eq!(end, Some(Terminal::Final));
    }

    #[test]
    fn an_error_goes_to_stderr() {
        let replies = vec![
            json!({"trace_id": "t", "kind": "error", "seq": 0, "code": "timeout", "error": "late", "retryable": true}),
        ];
        let (out, err, end) = run(&mut View::new(false, false, false), &replies);
        assert_eq!(out, "");
        assert_eq!(err, "error (timeout, retryable): late\n");
        assert_eq!(end, Some(Terminal::Error));
    }

    #[test]
    fn json_mode_prints_each_reply_verbatim() {
        let replies = turn();
        let (out, err, end) = run(&mut View::new(true, true, true), &replies);
        let lines: Vec<Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines, replies);
        assert_eq!(err, "");
        assert_eq!(end, Some(Terminal::Final));
    }

    #[test]
    fn kinds_it_does_not_render_are_named() {
        let replies = [
            json!({"trace_id": "t", "kind": "permission", "seq": 0, "request_id": "per_1",
                   "permission": "bash", "patterns": ["ls"], "description": "",
                   "reply_subject": "r.per_1"}),
            json!({"trace_id": "t", "kind": "status", "seq": 1, "event": "later"}),
            json!({"trace_id": "t", "kind": "news", "seq": 3}),
            json!("not a reply"),
            json!({"trace_id": "t", "kind": "error", "seq": 4, "code": "aborted", "error": "stop", "retryable": false}),
        ];
        let (out, err, end) = run(&mut View::new(false, false, false), &replies);
        assert_eq!(out, "");
        assert_eq!(end, Some(Terminal::Error));
        assert_eq!(
            err,
            "[permission]\n[status]\nopencode-nats-bridge: 1 reply lost on the way\n[news]\n[]\nerror (aborted): stop\n"
        );
        let (_, err, end) = run(&mut View::new(false, false, false), &[]);
        assert_eq!((err.as_str(), end), ("", None));
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let end = View::new(false, false, false).reply(&mut out, &mut err, b"{oops");
        assert_eq!(end, None);
        assert_eq!(
            String::from_utf8(err).unwrap(),
            "opencode-nats-bridge: unreadable reply: {oops\n"
        );
    }

    #[test]
    fn clip_respects_characters() {
        assert_eq!(clip("héllo", 2), "h…");
        assert_eq!(clip("abc", 3), "abc");
    }

    #[test]
    fn provider_retries_are_shown_on_stderr() {
        let replies = [
            json!({"trace_id": "t", "kind": "status", "seq": 0, "event": "provider_retry", "attempt": 1, "reason": "Internal Server Error", "retry_limit": 3}),
            json!({"trace_id": "t", "kind": "error", "seq": 1, "code": "provider_error", "error": "failed", "retryable": true}),
        ];
        let (out, err, end) = run(&mut View::new(false, false, false), &replies);
        assert_eq!(out, "");
        assert_eq!(end, Some(Terminal::Error));
        assert!(
            err.starts_with("the model provider failed; OpenCode retries it: attempt 1 (the bridge gives up at 3): Internal Server Error\n"),
            "{err}"
        );
    }

    #[test]
    fn the_table_aligns() {
        let s = Status {
            host: "h1".into(),
            version: "0.1.0".into(),
            healthy: true,
            nats_connected: true,
            opencode_url: "http://127.0.0.1:4096".into(),
            opencode_connected: true,
            opencode_version: "1.18.34".into(),
            turns_in_flight: 2,
            conversations: 1,
            conversations_known: Some(4),
            uptime_s: 3700,
            ..Status::default()
        };
        let t = table([s].iter());
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("HOST  VERSION  HEALTH"), "{t}");
        assert!(lines[1].starts_with("h1    0.1.0    ok"), "{t}");
        assert!(
            lines[1].contains("http://127.0.0.1:4096 (1.18.34, up)"),
            "{t}"
        );
        assert!(lines[1].ends_with("1h 1m 40s"), "{t}");
        assert!(lines[1].contains("4 (1 active)"), "{t}");
    }
}
