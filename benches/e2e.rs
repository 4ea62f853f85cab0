//! End-to-end benchmark: the release daemon between a fake OpenCode and a
//! real nats-server, side by side with a bare relay.
//!
//! ```text
//! bench (fake OpenCode + subscriber) --SSE--> daemon --NATS--> nats-server --> bench subscriber
//! bench (fake OpenCode + subscriber) --SSE--> relay  --NATS--> nats-server --> bench subscriber
//! ```
//!
//! - The fake OpenCode (in this process) serves what the daemon calls:
//!   health, `GET/POST /session`, `prompt_async` (204; the prompt's
//!   `messageID` becomes the user message id and the assistant's
//!   `parentID`), `GET /session/{id}/message`, `GET /session/status`,
//!   abort, and `GET /event`. One writer task owns the event stream and
//!   formats every `message.part.delta` just before writing it, with the
//!   write timestamp in the delta text (`@<turn>:<ns> `).
//! - Rate phases: N concurrent turns, each emitting deltas at a fixed rate
//!   (default 1, 100 and 1,000 turns of 50 events/s for 10 s): added latency
//!   (fake write -> NATS receive) p50/p99/p99.9.
//! - Throughput phase: turns emitting as fast as the daemon takes them,
//!   each with at most `E2E_WINDOW` deltas in flight (written, reply not yet
//!   received; below the daemon's per-turn `event_buffer`, so no event is
//!   dropped for lag). `E2E_WINDOW=0`: no window, TCP backpressure only.
//! - The bare relay (this binary re-run with `E2E_RELAY_CHILD=1`): reads the
//!   same `GET /event` with reqwest and publishes each raw `data:` line to
//!   NATS, no parsing. Same phases, same fake, same subscriber.
//! - Per phase: CPU of daemon/relay, nats-server and this process
//!   (`/proc/<pid>/stat`), the daemon's VmRSS (sampled) and VmHWM.
//!
//! Run: `cargo bench --bench e2e` (builds the daemon in the bench profile
//! = release; `E2E_DAEMON_BIN` to use another binary). nats-server:
//! `$NATS_SERVER_BIN`, else `.tools/bin/nats-server`, else `PATH`.
//!
//! | env | default | |
//! |---|---|---|
//! | `E2E_RATE_TURNS` | `1,100,1000` | concurrent turns of each rate phase (empty: none) |
//! | `E2E_RATE_EPS` | `50` | delta events per second per turn |
//! | `E2E_RATE_SECS` | `10` | length of each turn of a rate phase |
//! | `E2E_TPUT_TURNS` | `32` | concurrent turns of the throughput phase (0: skip) |
//! | `E2E_TPUT_DELTAS` | `10000` | deltas per turn of the throughput phase |
//! | `E2E_WINDOW` | `256` | deltas in flight per turn in the throughput phase (0: unbounded) |
//! | `E2E_RELAY` | `1` | run the bare relay baseline too (0: skip) |
//! | `E2E_WARMUP` | `2` | seconds at the start of a phase left out of the steady-state latency |
//! | `E2E_PHASE_TIMEOUT` | `120` | seconds a phase may take before it is cut |
//! | `E2E_DAEMON_BIN` | the bench build | the daemon binary |
//! | `E2E_RELAY_HEADERS` | `0` | `1`: the relay adds the daemon's four reply headers (isolates their cost) |
//! | `OPENCODE_BRIDGE__SUBJECTS__REPLY_HEADERS` | `full` | the daemon's reply headers (`lean`: deltas carry `Trace-Id` only) |
//! | `E2E_PERF_DIR` | unset | `perf record` the daemon/relay during every phase into this directory (`E2E_PERF_CALLGRAPH=1`: with call graphs) |

/// The leak check `nats.rs` runs on every reply it reads.
#[path = "../tests/it/support/leaks.rs"]
#[allow(dead_code)]
mod leaks;
/// nats-server as the integration tests start it.
#[path = "../tests/it/support/nats.rs"]
#[allow(dead_code)]
mod nats;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};

const DAEMON_BIN: &str = env!("CARGO_BIN_EXE_opencode-nats-bridge");
const REPLY_PREFIX: &str = "bench.reply";
const RELAY_SUBJECT: &str = "bench.relay";

// ---------------------------------------------------------------- clock

static T0: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since this process started measuring (monotonic; the fake
/// and the subscriber share it).
fn now_ns() -> u64 {
    T0.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------- config

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not valid")),
        _ => default,
    }
}

struct Params {
    rate_turns: Vec<usize>,
    rate_eps: u64,
    rate_secs: u64,
    tput_turns: usize,
    tput_deltas: u64,
    window: u64,
    relay: bool,
    phase_timeout: Duration,
    /// `E2E_STREAM`: the prompts' `"stream"` (JSON), e.g.
    /// `{"coalesce_ms":100}` or `"final"`.
    stream: Option<Value>,
}

impl Params {
    fn from_env() -> Params {
        let rate_turns = std::env::var("E2E_RATE_TURNS").unwrap_or_else(|_| "1,100,1000".into());
        Params {
            rate_turns: rate_turns
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.trim().parse().expect("E2E_RATE_TURNS: numbers"))
                .collect(),
            rate_eps: env_or("E2E_RATE_EPS", 50),
            rate_secs: env_or("E2E_RATE_SECS", 10),
            tput_turns: env_or("E2E_TPUT_TURNS", 32),
            tput_deltas: env_or("E2E_TPUT_DELTAS", 10_000),
            window: env_or("E2E_WINDOW", 256),
            relay: env_or("E2E_RELAY", 1u8) != 0,
            phase_timeout: Duration::from_secs(env_or("E2E_PHASE_TIMEOUT", 120)),
            stream: std::env::var("E2E_STREAM").ok().map(|s| {
                serde_json::from_str(&s).expect("E2E_STREAM: JSON, e.g. {\"coalesce_ms\":100}")
            }),
        }
    }
}

// ---------------------------------------------------------------- /proc

#[derive(Clone, Copy, Default)]
struct ProcSample {
    cpu_ticks: u64,
    rss_kb: u64,
    hwm_kb: u64,
}

fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

fn proc_sample(pid: u32) -> ProcSample {
    let mut s = ProcSample::default();
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Fields after "pid (comm) ": state is field 3; utime 14, stime 15.
        if let Some((_, rest)) = stat.rsplit_once(')') {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            s.cpu_ticks = n(11) + n(12);
        }
    }
    if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
        for line in status.lines() {
            let kb = || {
                line.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            if line.starts_with("VmRSS:") {
                s.rss_kb = kb();
            } else if line.starts_with("VmHWM:") {
                s.hwm_kb = kb();
            }
        }
    }
    s
}

fn cpu_secs(a: ProcSample, b: ProcSample) -> f64 {
    b.cpu_ticks.saturating_sub(a.cpu_ticks) as f64 / clk_tck()
}

// ---------------------------------------------------------------- phases

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Daemon,
    Relay,
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    /// `deltas` per turn, each `period` apart.
    Rate { deltas: u64, period: Duration },
    /// `deltas` per turn as fast as they are taken, at most `window` in
    /// flight (0: unbounded).
    Throughput { deltas: u64, window: u64 },
}

impl Mode {
    fn deltas(&self) -> u64 {
        match *self {
            Mode::Rate { deltas, .. } | Mode::Throughput { deltas, .. } => deltas,
        }
    }
}

/// One phase: its turns' counters, shared by the fake and the subscriber.
struct Phase {
    id: usize,
    mode: Mode,
    turns: usize,
    /// Delta replies received, per turn (the window's feedback).
    received: Vec<AtomicU64>,
    notify: Vec<Notify>,
    /// When the fake wrote each turn's end (its last events, `session.idle`).
    finished_ns: Vec<AtomicU64>,
}

impl Phase {
    fn new(id: usize, mode: Mode, turns: usize) -> Arc<Phase> {
        Arc::new(Phase {
            id,
            mode,
            turns,
            received: (0..turns).map(|_| AtomicU64::new(0)).collect(),
            notify: (0..turns).map(|_| Notify::new()).collect(),
            finished_ns: (0..turns).map(|_| AtomicU64::new(0)).collect(),
        })
    }
}

// ---------------------------------------------------------------- fake OpenCode

/// One turn as the fake plays it.
struct TurnState {
    phase: Arc<Phase>,
    turn: usize,
    session_id: String,
    user_id: String,
    asst_id: String,
    part_id: String,
    created_ms: u64,
    /// The text part so far (what the deltas written added up to).
    text: Mutex<String>,
    done: AtomicBool,
}

/// What the writer task turns into SSE bytes.
enum Ev {
    /// A whole `data: ...\n\n` block, formatted by the producer.
    Raw(Bytes),
    /// A delta of this turn, formatted (and timestamped) by the writer.
    Delta(Arc<TurnState>),
    /// The end of this turn: finished part, completed message, idle.
    Finish(Arc<TurnState>),
}

struct Session {
    title: String,
    /// The phase and turn this session's prompts belong to.
    turn: Option<(usize, usize)>,
    state: Option<Arc<TurnState>>,
}

struct Fake {
    addr: std::net::SocketAddr,
    tx: mpsc::Sender<Ev>,
    sched: mpsc::UnboundedSender<(Arc<TurnState>, Duration)>,
    sessions: Mutex<HashMap<String, Session>>,
    next_session: AtomicU64,
    next_event: AtomicU64,
    /// The `GET /event` connection the writer should take over next.
    new_stream: Mutex<Option<TcpStream>>,
    streams_opened: AtomicU64,
    /// TCP connections accepted (the daemon's HTTP client pool).
    connections: AtomicU64,
    events_written: AtomicU64,
    phase: Mutex<Option<Arc<Phase>>>,
}

/// `data: {"id","type","properties"}` in OpenCode's field order (the
/// daemon reads `type` before `properties` in one pass).
fn event_block(id: &str, kind: &str, props: &Value) -> Bytes {
    let mut b = Vec::with_capacity(256);
    b.extend_from_slice(b"data: {\"id\":\"");
    b.extend_from_slice(id.as_bytes());
    b.extend_from_slice(b"\",\"type\":\"");
    b.extend_from_slice(kind.as_bytes());
    b.extend_from_slice(b"\",\"properties\":");
    serde_json::to_writer(&mut b, props).expect("serialise");
    b.extend_from_slice(b"}\n\n");
    Bytes::from(b)
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Fake {
    async fn start() -> Arc<Fake> {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (tx, rx) = mpsc::channel(1 << 16);
        let (sched, sched_rx) = mpsc::unbounded_channel();
        let fake = Arc::new(Fake {
            addr: listener.local_addr().expect("addr"),
            tx,
            sched,
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            next_event: AtomicU64::new(1),
            new_stream: Mutex::new(None),
            streams_opened: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            events_written: AtomicU64::new(0),
            phase: Mutex::new(None),
        });
        tokio::spawn(writer(fake.clone(), rx));
        tokio::spawn(scheduler(fake.clone(), sched_rx));
        let f = fake.clone();
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                let _ = sock.set_nodelay(true);
                f.connections.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(serve(f.clone(), sock));
            }
        });
        fake
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn event_id(&self) -> String {
        format!(
            "evt_bench{:012x}",
            self.next_event.fetch_add(1, Ordering::Relaxed)
        )
    }

    fn new_session(&self, title: &str) -> String {
        let sid = format!(
            "ses_bench{:010}",
            self.next_session.fetch_add(1, Ordering::Relaxed)
        );
        // "nats:bench.<phase>.<turn>" names the phase and turn.
        let turn = title
            .strip_prefix("nats:bench.")
            .and_then(|t| t.split_once('.'))
            .and_then(|(p, t)| Some((p.parse().ok()?, t.parse().ok()?)));
        lock(&self.sessions).insert(
            sid.clone(),
            Session {
                title: title.to_string(),
                turn,
                state: None,
            },
        );
        sid
    }

    /// Starts a turn of `phase` in session `sid` whose user message is
    /// `user_id`.
    fn start_turn(self: &Arc<Self>, phase: Arc<Phase>, turn: usize, sid: &str, user_id: &str) {
        let n = self.next_event.fetch_add(1, Ordering::Relaxed);
        let st = Arc::new(TurnState {
            phase: phase.clone(),
            turn,
            session_id: sid.to_string(),
            user_id: user_id.to_string(),
            asst_id: format!("{user_id}zA{n:x}"),
            part_id: format!("prt_bench{n:016x}"),
            created_ms: unix_ms(),
            text: Mutex::new(String::new()),
            done: AtomicBool::new(false),
        });
        if let Some(s) = lock(&self.sessions).get_mut(sid) {
            s.state = Some(st.clone());
        }
        let fake = self.clone();
        tokio::spawn(async move {
            for ev in fake.prelude(&st) {
                if fake.tx.send(Ev::Raw(ev)).await.is_err() {
                    return;
                }
            }
            match phase.mode {
                Mode::Rate { period, .. } => {
                    let _ = fake.sched.send((st, period));
                }
                Mode::Throughput { deltas, window } => {
                    let received = &phase.received[turn];
                    for k in 0..deltas {
                        while window > 0 && k >= received.load(Ordering::Acquire) + window {
                            phase.notify[turn].notified().await;
                        }
                        if fake.tx.send(Ev::Delta(st.clone())).await.is_err() {
                            return;
                        }
                    }
                    let _ = fake.tx.send(Ev::Finish(st)).await;
                }
            }
        });
    }

    /// What OpenCode 1.18.34 emits before the first text delta (shapes of
    /// the recorded fixtures).
    fn prelude(&self, st: &TurnState) -> Vec<Bytes> {
        let sid = &st.session_id;
        let ev = |kind: &str, props: Value| event_block(&self.event_id(), kind, &props);
        vec![
            ev(
                "session.status",
                json!({"sessionID": sid, "status": {"type": "busy"}}),
            ),
            ev(
                "message.updated",
                json!({"sessionID": sid, "info": self.user_info(st)}),
            ),
            ev(
                "message.updated",
                json!({"sessionID": sid, "info": self.asst_info(st, false)}),
            ),
            ev(
                "message.part.updated",
                json!({"sessionID": sid, "part": self.text_part(st, "", false), "time": unix_ms()}),
            ),
        ]
    }

    fn user_info(&self, st: &TurnState) -> Value {
        json!({"id": st.user_id, "role": "user", "sessionID": st.session_id,
               "time": {"created": st.created_ms}, "agent": "build",
               "model": {"providerID": "fake", "modelID": "m1"}})
    }

    fn asst_info(&self, st: &TurnState, completed: bool) -> Value {
        let mut v = json!({"id": st.asst_id, "parentID": st.user_id, "role": "assistant",
            "mode": "build", "agent": "build", "path": {"cwd": "/bench", "root": "/"},
            "cost": 0, "tokens": {"input": 0, "output": 0, "reasoning": 0, "cache": {"read": 0, "write": 0}},
            "modelID": "m1", "providerID": "fake", "time": {"created": st.created_ms},
            "sessionID": st.session_id});
        if completed {
            v["time"]["completed"] = json!(unix_ms());
            v["finish"] = json!("stop");
            v["tokens"] = json!({"input": 100, "output": 22, "reasoning": 0, "cache": {"read": 20, "write": 0}});
        }
        v
    }

    fn text_part(&self, st: &TurnState, text: &str, finished: bool) -> Value {
        let mut time = json!({"start": st.created_ms});
        if finished {
            time["end"] = json!(unix_ms());
        }
        json!({"id": st.part_id, "sessionID": st.session_id, "messageID": st.asst_id,
               "type": "text", "text": text, "time": time})
    }

    fn messages(&self, sid: &str) -> Value {
        let state = lock(&self.sessions).get(sid).and_then(|s| s.state.clone());
        let Some(st) = state else {
            return json!([]);
        };
        let done = st.done.load(Ordering::Acquire);
        let text = lock(&st.text).clone();
        json!([
            {"info": self.user_info(&st), "parts": [
                {"id": format!("{}u", st.part_id), "sessionID": sid, "messageID": st.user_id,
                 "type": "text", "text": "bench prompt"}]},
            {"info": self.asst_info(&st, done), "parts": [self.text_part(&st, &text, done)]},
        ])
    }

    fn busy(&self) -> Value {
        let mut m = serde_json::Map::new();
        for (sid, s) in lock(&self.sessions).iter() {
            if let Some(st) = &s.state {
                if !st.done.load(Ordering::Acquire) {
                    m.insert(sid.clone(), json!({"type": "busy"}));
                }
            }
        }
        Value::Object(m)
    }

    /// Formats one event into `out` (called by the writer, just before the
    /// write).
    fn format(&self, ev: Ev, out: &mut Vec<u8>) -> u64 {
        match ev {
            Ev::Raw(b) => {
                out.extend_from_slice(&b);
                u64::from(!b.is_empty())
            }
            Ev::Delta(st) => {
                let n = self.next_event.fetch_add(1, Ordering::Relaxed);
                let mut piece = String::with_capacity(24);
                let _ = write!(piece, "@{}:{} ", st.turn, now_ns());
                let _ = write!(
                    out,
                    "data: {{\"id\":\"evt_bench{n:012x}\",\"type\":\"message.part.delta\",\"properties\":{{\"sessionID\":\"{}\",\"messageID\":\"{}\",\"partID\":\"{}\",\"field\":\"text\",\"delta\":\"{piece}\"}}}}\n\n",
                    st.session_id, st.asst_id, st.part_id
                );
                lock(&st.text).push_str(&piece);
                1
            }
            Ev::Finish(st) => {
                let sid = &st.session_id;
                let text = lock(&st.text).clone();
                st.done.store(true, Ordering::Release);
                let ev = |kind: &str, props: Value| event_block(&self.event_id(), kind, &props);
                let evs = [
                    ev(
                        "message.part.updated",
                        json!({"sessionID": sid, "part": self.text_part(&st, &text, true), "time": unix_ms()}),
                    ),
                    ev(
                        "message.updated",
                        json!({"sessionID": sid, "info": self.asst_info(&st, true)}),
                    ),
                    ev(
                        "session.status",
                        json!({"sessionID": sid, "status": {"type": "idle"}}),
                    ),
                    ev("session.idle", json!({"sessionID": sid})),
                ];
                for e in &evs {
                    out.extend_from_slice(e);
                }
                if let Some(f) = st.phase.finished_ns.get(st.turn) {
                    f.store(now_ns(), Ordering::Release);
                }
                evs.len() as u64
            }
        }
    }

    fn route(self: &Arc<Self>, method: &str, target: &str, body: &[u8]) -> Vec<u8> {
        let path = target.split_once('?').map_or(target, |(p, _)| p);
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (method, segs.as_slice()) {
            ("GET", ["global", "health"]) => {
                respond_json(200, &json!({"healthy": true, "version": "1.18.34"}))
            }
            ("GET", ["session"]) => respond_json(200, &json!([])),
            ("POST", ["session"]) => {
                let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                let title = v["title"].as_str().unwrap_or("").to_string();
                let sid = self.new_session(&title);
                respond_json(
                    200,
                    &json!({"id": sid, "title": title, "version": "1.18.34", "time": {"created": unix_ms()}}),
                )
            }
            ("GET", ["session", "status"]) => respond_json(200, &self.busy()),
            ("GET", ["session", sid]) => match lock(&self.sessions).get(*sid) {
                Some(s) => respond_json(200, &json!({"id": sid, "title": s.title})),
                None => respond_json(404, &json!({"name": "NotFoundError"})),
            },
            ("POST", ["session", sid, "prompt_async"]) => {
                let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                let user_id = v["messageID"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("msg_bench{:016x}", now_ns()));
                let turn = lock(&self.sessions).get(*sid).map(|s| s.turn);
                let phase = lock(&self.phase).clone();
                match (turn, phase) {
                    (None, _) => respond_json(404, &json!({"name": "NotFoundError"})),
                    (Some(Some((p, t))), Some(phase)) if p == phase.id && t < phase.turns => {
                        self.start_turn(phase, t, sid, &user_id);
                        b"HTTP/1.1 204 No Content\r\n\r\n".to_vec()
                    }
                    _ => respond_json(
                        400,
                        &json!({"name": "BadRequest", "data": {"message": "not a bench turn"}}),
                    ),
                }
            }
            ("GET", ["session", sid, "message"]) => respond_json(200, &self.messages(sid)),
            ("POST", ["session", _, "abort"]) => respond_json(200, &json!(true)),
            _ => respond_json(404, &json!({"name": "NotFoundError"})),
        }
    }
}

fn respond_json(status: u16, v: &Value) -> Vec<u8> {
    let body = serde_json::to_vec(v).expect("serialise");
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        _ => "Not Found",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One HTTP/1.1 keep-alive connection (Content-Length bodies only, which
/// is what reqwest sends for JSON).
async fn serve(fake: Arc<Fake>, mut sock: TcpStream) {
    let mut buf = BytesMut::with_capacity(8192);
    loop {
        let head_end = loop {
            if let Some(p) = find(&buf, b"\r\n\r\n") {
                break p;
            }
            match sock.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        };
        let head = buf.split_to(head_end + 4);
        let head = String::from_utf8_lossy(&head).into_owned();
        let mut lines = head.split("\r\n");
        let mut rl = lines.next().unwrap_or("").split(' ');
        let method = rl.next().unwrap_or("").to_string();
        let target = rl.next().unwrap_or("").to_string();
        let len: usize = lines
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < len {
            match sock.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
        let body = buf.split_to(len);
        if method == "GET" && target.split('?').next() == Some("/event") {
            let connected = event_block(&fake.event_id(), "server.connected", &json!({}));
            let mut head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            head.extend_from_slice(format!("{:x}\r\n", connected.len()).as_bytes());
            head.extend_from_slice(&connected);
            head.extend_from_slice(b"\r\n");
            if sock.write_all(&head).await.is_err() {
                return;
            }
            *lock(&fake.new_stream) = Some(sock);
            fake.streams_opened.fetch_add(1, Ordering::SeqCst);
            // Wake the writer so it takes the stream over now.
            let _ = fake.tx.send(Ev::Raw(Bytes::new())).await;
            return;
        }
        let resp = fake.route(&method, &target, &body);
        if sock.write_all(&resp).await.is_err() {
            return;
        }
    }
}

/// The only writer of the event stream: formats a batch of events (each
/// delta stamped now) and writes it as one HTTP chunk.
async fn writer(fake: Arc<Fake>, mut rx: mpsc::Receiver<Ev>) {
    let mut stream: Option<TcpStream> = None;
    let mut evs = Vec::with_capacity(512);
    let mut body = Vec::with_capacity(1 << 17);
    let mut frame = Vec::with_capacity(1 << 17);
    loop {
        if rx.recv_many(&mut evs, 512).await == 0 {
            return;
        }
        if let Some(s) = lock(&fake.new_stream).take() {
            stream = Some(s);
        }
        body.clear();
        let mut n = 0;
        for ev in evs.drain(..) {
            n += fake.format(ev, &mut body);
        }
        if body.is_empty() {
            continue;
        }
        frame.clear();
        frame.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
        frame.extend_from_slice(&body);
        frame.extend_from_slice(b"\r\n");
        if let Some(s) = &mut stream {
            if s.write_all(&frame).await.is_ok() {
                fake.events_written.fetch_add(n, Ordering::Relaxed);
            } else {
                stream = None;
            }
        }
    }
}

/// Fixed-rate turns: every delta is due `period` after the previous one.
async fn scheduler(fake: Arc<Fake>, mut rx: mpsc::UnboundedReceiver<(Arc<TurnState>, Duration)>) {
    struct Entry {
        st: Arc<TurnState>,
        period: Duration,
        left: u64,
    }
    let mut entries: Vec<Option<Entry>> = Vec::new();
    let mut heap: BinaryHeap<Reverse<(Instant, usize)>> = BinaryHeap::new();
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    loop {
        let next = heap.peek().map(|Reverse((t, _))| *t);
        tokio::select! {
            reg = rx.recv() => {
                let Some((st, period)) = reg else { return };
                let left = st.phase.mode.deltas();
                // A random phase within one period: turns are not in lockstep.
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let offset = period.mul_f64((seed % 1000) as f64 / 1000.0);
                entries.push(Some(Entry { st, period, left }));
                heap.push(Reverse((Instant::now() + offset, entries.len() - 1)));
            }
            _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now).into()), if next.is_some() => {
                let now = Instant::now();
                while let Some(Reverse((due, i))) = heap.peek().copied() {
                    if due > now {
                        break;
                    }
                    heap.pop();
                    let Some(e) = entries[i].as_mut() else { continue };
                    let ev = if e.left == 0 {
                        let st = e.st.clone();
                        entries[i] = None;
                        Ev::Finish(st)
                    } else {
                        e.left -= 1;
                        heap.push(Reverse((due + e.period, i)));
                        Ev::Delta(e.st.clone())
                    };
                    if fake.tx.send(ev).await.is_err() {
                        return;
                    }
                }
                if heap.is_empty() {
                    entries.clear();
                }
            }
        }
    }
}

// ---------------------------------------------------------------- processes

fn wait_for_log(path: &Path, needle: &str, child: &mut Child, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.contains(needle) {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{} exited with {status}; log:\n{log}", path.display());
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in {} within {timeout:?}:\n{log}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Proc {
    child: Child,
    name: &'static str,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn sample(&self) -> ProcSample {
        proc_sample(self.pid())
    }

    /// SIGTERM, then wait (SIGKILL after 30 s).
    fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} did not stop on SIGTERM; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn start_daemon(dir: &Path, nats_url: &str, fake_url: &str) -> Proc {
    let bin = std::env::var("E2E_DAEMON_BIN").unwrap_or_else(|_| DAEMON_BIN.to_string());
    let log = dir.join("daemon.log");
    let f = std::fs::File::create(&log).expect("log file");
    let mut child = Command::new(&bin)
        .arg("run")
        .env("OPENCODE_BRIDGE__NATS__URL", nats_url)
        .env("OPENCODE_BRIDGE__NATS__RETRY_ON_INITIAL_CONNECT", "false")
        .env("OPENCODE_BRIDGE__OPENCODE__BASE_URL", fake_url)
        .env("OPENCODE_BRIDGE__SHUTDOWN__GRACE", "5s")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(f)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
    wait_for_log(
        &log,
        "opencode-nats-bridge is serving",
        &mut child,
        Duration::from_secs(30),
    );
    Proc {
        child,
        name: "daemon",
    }
}

fn start_relay(dir: &Path, nats_url: &str, fake_url: &str) -> Proc {
    let log = dir.join("relay.log");
    let f = std::fs::File::create(&log).expect("log file");
    let mut child = Command::new(std::env::current_exe().expect("current exe"))
        .env("E2E_RELAY_CHILD", "1")
        .env("E2E_RELAY_NATS", nats_url)
        .env("E2E_RELAY_SSE", format!("{fake_url}/event"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(f)
        .spawn()
        .expect("spawn the relay");
    wait_for_log(&log, "relay ready", &mut child, Duration::from_secs(30));
    Proc {
        child,
        name: "relay",
    }
}

// ---------------------------------------------------------------- the bare relay

/// The baseline: SSE in, each raw `data:` line out to NATS. No JSON, no
/// routing, no mapping. Same runtime shape as the daemon (multi-thread
/// tokio without the LIFO slot, reqwest, async-nats).
fn relay_child() {
    let nats_url = std::env::var("E2E_RELAY_NATS").expect("E2E_RELAY_NATS");
    let sse_url = std::env::var("E2E_RELAY_SSE").expect("E2E_RELAY_SSE");
    // The daemon's runtime (src/main.rs): no LIFO slot where the build
    // allows it.
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    let rt = builder.build().expect("runtime");
    rt.block_on(async move {
        let nats = async_nats::ConnectOptions::new()
            .client_capacity(8192)
            .connect(nats_url.as_str())
            .await
            .expect("relay: connect NATS");
        let resp = reqwest::Client::new()
            .get(&sse_url)
            .header("accept", "text/event-stream")
            .send()
            .await
            .expect("relay: GET /event");
        eprintln!("relay ready");
        let mut body = resp.bytes_stream();
        let mut carry = BytesMut::new();
        let headers = std::env::var_os("E2E_RELAY_HEADERS").is_some_and(|v| v == "1");
        const TRACE_ID: &str = "0b0f3c5e-7f1a-4c1e-9d1b-5a7e2c9d4f10";
        let mut seq = 0u64;
        while let Some(Ok(chunk)) = body.next().await {
            carry.extend_from_slice(&chunk);
            while let Some(pos) = carry.iter().position(|&b| b == b'\n') {
                let line = carry.split_to(pos + 1).freeze();
                let mut end = pos;
                if end > 0 && line[end - 1] == b'\r' {
                    end -= 1;
                }
                if !line[..end].starts_with(b"data: ") {
                    continue;
                }
                let payload = line.slice(6..end);
                if headers {
                    // The daemon's per-reply headers, built the same way.
                    let mut h = async_nats::HeaderMap::new();
                    h.insert("Trace-Id", TRACE_ID);
                    h.insert("Reply-Kind", "delta");
                    h.insert("Reply-Seq", seq.to_string().as_str());
                    h.insert("Nats-Msg-Id", format!("{TRACE_ID}-{seq}").as_str());
                    seq += 1;
                    let _ = nats.publish_with_headers(RELAY_SUBJECT, h, payload).await;
                } else {
                    let _ = nats.publish(RELAY_SUBJECT, payload).await;
                }
            }
        }
        let _ = nats.flush().await;
    });
}

// ---------------------------------------------------------------- subscriber

#[derive(Default)]
struct Collected {
    latencies_ns: Vec<u64>,
    /// Per turn: from the fake writing the turn's end to its terminal
    /// reply here (the daemon only).
    end_ns: Vec<u64>,
    /// Write time of each delta of `latencies_ns` (same order).
    written_ns: Vec<u64>,
    deltas: u64,
    replies: u64,
    terminals: u64,
    errors: u64,
    first_ns: u64,
    last_ns: u64,
    timed_out: bool,
}

/// `@<turn>:<ns>` anywhere in `payload` (the delta text).
fn marker(payload: &[u8]) -> Option<(usize, u64)> {
    let at = payload.iter().position(|&b| b == b'@')?;
    let rest = &payload[at + 1..];
    let colon = rest.iter().position(|&b| b == b':')?;
    let turn = std::str::from_utf8(&rest[..colon]).ok()?.parse().ok()?;
    let digits = rest[colon + 1..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    let ns = std::str::from_utf8(&rest[colon + 1..colon + 1 + digits])
        .ok()?
        .parse()
        .ok()?;
    Some((turn, ns))
}

async fn collect(
    mut sub: async_nats::Subscriber,
    phase: Arc<Phase>,
    target: Target,
    timeout: Duration,
) -> Collected {
    let mut c = Collected {
        latencies_ns: Vec::with_capacity((phase.turns as u64 * phase.mode.deltas()) as usize),
        ..Collected::default()
    };
    let expected = phase.turns as u64 * phase.mode.deltas();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let done = match target {
            Target::Daemon => c.terminals >= phase.turns as u64,
            Target::Relay => c.deltas >= expected,
        };
        if done {
            break;
        }
        let msg = match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(Some(m)) => m,
            _ => {
                c.timed_out = true;
                break;
            }
        };
        let now = now_ns();
        if c.replies == 0 {
            c.first_ns = now;
        }
        c.last_ns = now;
        c.replies += 1;
        let is_delta = match target {
            Target::Daemon => {
                // `Reply-Kind`, or (`reply_headers = "lean"` deltas) the body.
                let kind = msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Reply-Kind"))
                    .map(|v| v.as_str().to_string())
                    .or_else(|| {
                        find(&msg.payload, b"\"kind\":\"delta\"").map(|_| "delta".to_string())
                    });
                match kind.as_deref() {
                    Some("delta") => true,
                    Some("final") => {
                        c.terminals += 1;
                        let end = marker(&msg.payload)
                            .and_then(|(turn, _)| phase.finished_ns.get(turn))
                            .map(|f| f.load(Ordering::Acquire))
                            .filter(|&f| f > 0);
                        if let Some(f) = end {
                            c.end_ns.push(now.saturating_sub(f));
                        }
                        false
                    }
                    Some("error") => {
                        c.terminals += 1;
                        c.errors += 1;
                        if c.errors <= 3 {
                            eprintln!("error reply: {}", String::from_utf8_lossy(&msg.payload));
                        }
                        false
                    }
                    _ => false,
                }
            }
            Target::Relay => {
                let head = &msg.payload[..msg.payload.len().min(96)];
                find(head, b"\"type\":\"message.part.delta\"").is_some()
            }
        };
        if !is_delta {
            continue;
        }
        let Some((turn, ts)) = marker(&msg.payload) else {
            continue;
        };
        c.deltas += 1;
        c.latencies_ns.push(now.saturating_sub(ts));
        c.written_ns.push(ts);
        if let (Some(r), Some(n)) = (phase.received.get(turn), phase.notify.get(turn)) {
            r.fetch_add(1, Ordering::Release);
            n.notify_one();
        }
    }
    c
}

// ---------------------------------------------------------------- a phase

struct PhaseResult {
    /// Sorted latencies of the deltas written in the steady state (see
    /// `steady_state`).
    steady_ns: Vec<u64>,
    target: Target,
    label: String,
    turns: usize,
    expected_deltas: u64,
    collected: Collected,
    events_written: u64,
    wall: f64,
    cpu_target: f64,
    cpu_nats: f64,
    cpu_bench: f64,
    rss_before_kb: u64,
    rss_max_kb: u64,
    rss_mid_kb: u64,
    hwm_kb: u64,
}

impl PhaseResult {
    fn replies_per_sec(&self) -> f64 {
        let span = (self.collected.last_ns - self.collected.first_ns) as f64 / 1e9;
        if span > 0.0 {
            self.collected.replies as f64 / span
        } else {
            0.0
        }
    }

    fn deltas_per_sec(&self) -> f64 {
        let span = (self.collected.last_ns - self.collected.first_ns) as f64 / 1e9;
        if span > 0.0 {
            self.collected.deltas as f64 / span
        } else {
            0.0
        }
    }

    fn pct(&self, p: f64) -> f64 {
        pct(&self.collected.latencies_ns, p)
    }

    fn steady_pct(&self, p: f64) -> f64 {
        pct(&self.steady_ns, p)
    }

    fn cpu_per_m_events(&self) -> f64 {
        if self.events_written == 0 {
            return f64::NAN;
        }
        self.cpu_target / self.events_written as f64 * 1e6
    }
}

/// Percentile `p` of sorted nanoseconds, in microseconds.
fn pct(l: &[u64], p: f64) -> f64 {
    if l.is_empty() {
        return f64::NAN;
    }
    let i = ((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1;
    l[i] as f64 / 1e3
}

/// `E2E_WARMUP` (seconds, default 2): the start of a phase left out of the
/// steady-state latency.
fn warmup() -> Duration {
    Duration::from_secs_f64(
        std::env::var("E2E_WARMUP")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2.0),
    )
}

/// Latencies (sorted) of the deltas written from `warmup` after the phase's
/// first write to 1 s before its last: without the start (every turn's
/// session and prompt made at once) and the end (every turn concluding at
/// once), which the whole-phase percentiles include.
fn steady_state(c: &Collected, warmup: Duration) -> Vec<u64> {
    let (Some(&first), Some(&last)) = (c.written_ns.iter().min(), c.written_ns.iter().max()) else {
        return Vec::new();
    };
    let from = first + warmup.as_nanos() as u64;
    let to = last.saturating_sub(1_000_000_000);
    let mut v: Vec<u64> = c
        .latencies_ns
        .iter()
        .zip(&c.written_ns)
        .filter(|(_, &w)| w >= from && w <= to)
        .map(|(&l, _)| l)
        .collect();
    v.sort_unstable();
    v
}

struct Rig {
    fake: Arc<Fake>,
    nats: async_nats::Client,
    nats_pid: u32,
    phase_seq: usize,
    timeout: Duration,
    stream: Option<Value>,
}

impl Rig {
    async fn run_phase(
        &mut self,
        target: &Proc,
        which: Target,
        label: &str,
        mode: Mode,
        turns: usize,
    ) -> PhaseResult {
        self.phase_seq += 1;
        let phase = Phase::new(self.phase_seq, mode, turns);
        *lock(&self.fake.phase) = Some(phase.clone());
        let subject = match which {
            Target::Daemon => format!("{REPLY_PREFIX}.{}.>", phase.id),
            Target::Relay => RELAY_SUBJECT.to_string(),
        };
        let sub = self.nats.subscribe(subject).await.expect("subscribe");
        barrier(&self.nats).await;

        // Memory sampler.
        let stop = Arc::new(AtomicBool::new(false));
        let pid = target.pid();
        let sampler = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let mut samples = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    samples.push((started.elapsed().as_secs_f64(), proc_sample(pid).rss_kb));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                samples.push((started.elapsed().as_secs_f64(), proc_sample(pid).rss_kb));
                samples
            })
        };
        let before = (
            target.sample(),
            proc_sample(self.nats_pid),
            proc_sample(std::process::id()),
        );
        // `E2E_PERF_DIR`: `perf record` the daemon/relay during every phase.
        let perf = match std::env::var_os("E2E_PERF_DIR") {
            Some(dir) => Command::new("perf")
                .arg("record")
                // `E2E_PERF_CALLGRAPH=1`: with DWARF call graphs (large files).
                .args(if std::env::var_os("E2E_PERF_CALLGRAPH").is_some() {
                    &["-F", "499", "--call-graph", "dwarf,16384"][..]
                } else {
                    &["-F", "1999"][..]
                })
                .args(["-p", &pid.to_string(), "-o"])
                .arg(Path::new(&dir).join(format!("{which:?}-{}.perf.data", phase.id)))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .ok(),
            _ => None,
        };
        let events_before = self.fake.events_written.load(Ordering::Relaxed);
        let started = Instant::now();
        let collector = tokio::spawn(collect(sub, phase.clone(), which, self.timeout));

        match which {
            Target::Daemon => {
                for t in 0..turns {
                    let mut payload = json!({
                        "text": "bench prompt",
                        "trace_id": format!("bench-{}-{t}", phase.id),
                        "conversation": format!("bench.{}.{t}", phase.id),
                    });
                    if let Some(stream) = &self.stream {
                        payload["stream"] = stream.clone();
                    }
                    self.nats
                        .publish_with_reply(
                            "opencode.prompt",
                            format!("{REPLY_PREFIX}.{}.{t}", phase.id),
                            Bytes::from(payload.to_string()),
                        )
                        .await
                        .expect("publish prompt");
                }
                let _ = self.nats.flush().await;
            }
            Target::Relay => {
                for t in 0..turns {
                    let sid = self
                        .fake
                        .new_session(&format!("nats:bench.{}.{t}", phase.id));
                    let user = format!("msg_relay{:08}{t:08}", phase.id);
                    self.fake.start_turn(phase.clone(), t, &sid, &user);
                }
            }
        }
        let mut collected = collector.await.expect("collector");
        // Let the last events of the turns (idle...) be written.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let wall = started.elapsed().as_secs_f64();
        let after = (
            target.sample(),
            proc_sample(self.nats_pid),
            proc_sample(std::process::id()),
        );
        stop.store(true, Ordering::Relaxed);
        let samples = sampler.await.unwrap_or_default();
        let rss_max_kb = samples.iter().map(|s| s.1).max().unwrap_or(0);
        // Steady state: every turn started, none concluded yet (rate
        // phases); the middle of the phase.
        let mid = samples.last().map_or(0.0, |s| s.0) / 2.0;
        let rss_mid_kb = samples
            .iter()
            .min_by(|a, b| (a.0 - mid).abs().total_cmp(&(b.0 - mid).abs()))
            .map_or(0, |s| s.1);
        if let Some(mut p) = perf {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            );
            let _ = p.wait();
        }
        let steady_ns = steady_state(&collected, warmup());
        collected.latencies_ns.sort_unstable();
        collected.end_ns.sort_unstable();
        PhaseResult {
            steady_ns,
            target: which,
            label: label.to_string(),
            turns,
            expected_deltas: turns as u64 * mode.deltas(),
            collected,
            events_written: self.fake.events_written.load(Ordering::Relaxed) - events_before,
            wall,
            cpu_target: cpu_secs(before.0, after.0),
            cpu_nats: cpu_secs(before.1, after.1),
            cpu_bench: cpu_secs(before.2, after.2),
            rss_before_kb: before.0.rss_kb,
            rss_max_kb,
            rss_mid_kb,
            hwm_kb: after.0.hwm_kb,
        }
    }
}

/// Once this returns, the server has registered every earlier SUB of this
/// connection.
async fn barrier(client: &async_nats::Client) {
    let inbox = client.new_inbox();
    let mut probe = client.subscribe(inbox.clone()).await.expect("subscribe");
    client.publish(inbox, Bytes::new()).await.expect("publish");
    tokio::time::timeout(Duration::from_secs(10), probe.next())
        .await
        .expect("barrier round trip");
}

async fn wait_streams(fake: &Fake, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while fake.streams_opened.load(Ordering::SeqCst) < n {
        assert!(Instant::now() < deadline, "no GET /event within 30s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Let the writer take the stream over.
    tokio::time::sleep(Duration::from_millis(50)).await;
}

fn phases(p: &Params) -> Vec<(String, Mode, usize)> {
    let mut v = Vec::new();
    let period = Duration::from_secs_f64(1.0 / p.rate_eps.max(1) as f64);
    for &turns in &p.rate_turns {
        v.push((
            format!("rate {turns}x{}/s", p.rate_eps),
            Mode::Rate {
                deltas: p.rate_eps * p.rate_secs,
                period,
            },
            turns,
        ));
    }
    if p.tput_turns > 0 {
        v.push((
            format!("max {}x{}", p.tput_turns, p.tput_deltas),
            Mode::Throughput {
                deltas: p.tput_deltas,
                window: p.window,
            },
            p.tput_turns,
        ));
    }
    v
}

// ---------------------------------------------------------------- report

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn report(
    results: &[PhaseResult],
    idle: ProcSample,
    relay_idle: Option<ProcSample>,
    load_before: &str,
) {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{} CPUs; load average before the run {load_before}, after {} (other work on \
         the machine inflates latency and lowers replies/s; CPU s/M ev is the steadier figure)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );
    let _ = writeln!(
        out,
        "daemon reply_headers: {}",
        std::env::var("OPENCODE_BRIDGE__SUBJECTS__REPLY_HEADERS").unwrap_or_else(|_| "full".into())
    );
    if let Ok(stream) = std::env::var("E2E_STREAM") {
        let _ = writeln!(
            out,
            "daemon prompts' stream: {stream} (deltas = delta replies, each carrying merged text; \
             lost does not apply; latency is from the first merged delta's write)"
        );
    }
    let _ = writeln!(
        out,
        "\n{:<7} {:<16} {:>8} {:>8} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9} {:>7} {:>8} {:>7} {:>7} {:>8} {:>8} {:>9}",
        "target", "phase", "events", "deltas", "lost", "replies/s", "p50 us", "p99 us", "p99.9 us", "max us",
        "cpu s", "s/M ev", "nats s", "bench s", "RSS MB", "KB/turn", "peak/turn"
    );
    for r in results {
        let c = &r.collected;
        let lost = r.expected_deltas.saturating_sub(c.deltas);
        let per_turn = |kb: u64| kb.saturating_sub(r.rss_before_kb) as f64 / r.turns as f64;
        let _ = writeln!(
            out,
            "{:<7} {:<16} {:>8} {:>8} {:>9} {:>10.0} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>7.2} {:>8.2} {:>7.2} {:>7.2} {:>8.1} {:>8.1} {:>9.1}{}",
            format!("{:?}", r.target).to_lowercase(),
            r.label,
            r.events_written,
            c.deltas,
            lost,
            r.replies_per_sec(),
            r.pct(0.50),
            r.pct(0.99),
            r.pct(0.999),
            r.pct(1.0),
            r.cpu_target,
            r.cpu_per_m_events(),
            r.cpu_nats,
            r.cpu_bench,
            mb(r.rss_max_kb),
            per_turn(r.rss_mid_kb),
            per_turn(r.rss_max_kb),
            if c.timed_out { "  TIMED OUT" } else if c.errors > 0 { "  ERRORS" } else { "" },
        );
    }
    let _ = writeln!(
        out,
        "\nsteady state (deltas written from {:?} after a phase's first write to 1 s before its last):",
        warmup()
    );
    let _ = writeln!(
        out,
        "{:<7} {:<16} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "target", "phase", "deltas", "p50 us", "p99 us", "p99.9 us", "max us"
    );
    for r in results.iter().filter(|r| !r.steady_ns.is_empty()) {
        let _ = writeln!(
            out,
            "{:<7} {:<16} {:>8} {:>9.0} {:>9.0} {:>9.0} {:>9.0}",
            format!("{:?}", r.target).to_lowercase(),
            r.label,
            r.steady_ns.len(),
            r.steady_pct(0.50),
            r.steady_pct(0.99),
            r.steady_pct(0.999),
            r.steady_pct(1.0),
        );
    }
    let _ = writeln!(
        out,
        "\nend of turn (the fake writing a turn's last events, session.idle included, to its final here):"
    );
    let _ = writeln!(
        out,
        "{:<16} {:>6} {:>9} {:>9} {:>9}",
        "phase", "turns", "p50 us", "p99 us", "max us"
    );
    for r in results.iter().filter(|r| !r.collected.end_ns.is_empty()) {
        let e = &r.collected.end_ns;
        let _ = writeln!(
            out,
            "{:<16} {:>6} {:>9.0} {:>9.0} {:>9.0}",
            r.label,
            e.len(),
            pct(e, 0.50),
            pct(e, 0.99),
            pct(e, 1.0),
        );
    }
    let _ = writeln!(
        out,
        "\nidle daemon: VmRSS {:.1} MB, VmHWM {:.1} MB",
        mb(idle.rss_kb),
        mb(idle.hwm_kb)
    );
    if let Some(r) = relay_idle {
        let _ = writeln!(
            out,
            "idle relay:  VmRSS {:.1} MB, VmHWM {:.1} MB",
            mb(r.rss_kb),
            mb(r.hwm_kb)
        );
    }
    let peak = results
        .iter()
        .filter(|r| r.target == Target::Daemon)
        .map(|r| r.hwm_kb)
        .max()
        .unwrap_or(0);
    let _ = writeln!(out, "daemon peak VmHWM over the run: {:.1} MB", mb(peak));
    let _ = writeln!(
        out,
        "replies/s: every message received per second between the phase's first and last one \
         (daemon: delta + final replies; relay: every data line). lost: deltas that never came \
         back as their own reply. s/M ev: CPU seconds of the daemon/relay per million SSE events \
         written. KB/turn: (VmRSS in the middle of the phase - VmRSS before) / turns; \
         peak/turn: the same with the phase's highest VmRSS (turns concluding together)."
    );

    // Side by side.
    for d in results.iter().filter(|r| r.target == Target::Daemon) {
        if let Some(r) = results
            .iter()
            .find(|r| r.target == Target::Relay && r.label == d.label)
        {
            let _ = writeln!(
                out,
                "{:<16} daemon/relay: delta throughput {:.2}x, CPU per event {:.2}x, p99 {:.0} us vs {:.0} us, steady p99 {:.0} us vs {:.0} us",
                d.label,
                d.deltas_per_sec() / r.deltas_per_sec(),
                d.cpu_per_m_events() / r.cpu_per_m_events(),
                d.pct(0.99),
                r.pct(0.99),
                d.steady_pct(0.99),
                r.steady_pct(0.99)
            );
        }
    }
    print!("{out}");
    let _ = std::io::stdout().flush();
}

// ---------------------------------------------------------------- main

fn main() {
    if std::env::var_os("E2E_RELAY_CHILD").is_some() {
        relay_child();
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test --benches` runs bench targets without `--bench`: this
        // benchmark needs minutes and a nats-server, so it only runs from
        // `cargo bench`.
        println!("e2e: run with `cargo bench --bench e2e`");
        return;
    }
    let params = Params::from_env();
    now_ns();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(params));
}

async fn run(params: Params) {
    let load_before = loadavg();
    let dir = tempfile::Builder::new()
        .prefix("e2e-bench-")
        .tempdir()
        .expect("temp dir");
    // The tests' launcher: a free port, JetStream, its own temp dir.
    let mut nats_server = nats::NatsServer::start();
    let nats_url = nats_server.url();
    let fake = Fake::start().await;
    let nats = async_nats::ConnectOptions::new()
        .subscription_capacity(1 << 20)
        .connect(nats_url.as_str())
        .await
        .expect("connect NATS");
    let mut rig = Rig {
        fake: fake.clone(),
        nats,
        nats_pid: nats_server.pid().expect("nats-server runs"),
        phase_seq: 0,
        timeout: params.phase_timeout,
        stream: params.stream.clone(),
    };
    assert!(
        params.stream.is_none() || params.tput_turns == 0,
        "E2E_STREAM: the throughput phase's window counts delta replies; set E2E_TPUT_TURNS=0"
    );
    let plan = phases(&params);
    let mut results = Vec::new();

    // The daemon.
    let daemon = start_daemon(dir.path(), &nats_url, &fake.url());
    wait_streams(&fake, 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = daemon.sample();
    eprintln!(
        "daemon idle: VmRSS {:.1} MB, VmHWM {:.1} MB",
        mb(idle.rss_kb),
        mb(idle.hwm_kb)
    );
    for (label, mode, turns) in &plan {
        eprintln!("daemon: {label} ...");
        let r = rig
            .run_phase(&daemon, Target::Daemon, label, *mode, *turns)
            .await;
        eprintln!(
            "  {} deltas in {:.1}s, {:.0} replies/s, p99 {:.0} us",
            r.collected.deltas,
            r.wall,
            r.replies_per_sec(),
            r.pct(0.99)
        );
        results.push(r);
    }
    eprintln!(
        "the daemon opened {} HTTP connections to the fake OpenCode",
        fake.connections.load(Ordering::Relaxed)
    );
    let daemon_log = dir.path().join("daemon.log");
    daemon.stop();
    let log = std::fs::read_to_string(&daemon_log).unwrap_or_default();
    let warnings = log.lines().filter(|l| l.contains("WARN")).count();
    if warnings > 0 {
        eprintln!("daemon log: {warnings} warnings, e.g.:");
        for l in log.lines().filter(|l| l.contains("WARN")).take(3) {
            eprintln!("  {l}");
        }
    }

    // The bare relay, same phases.
    let mut relay_idle = None;
    if params.relay {
        let opened = fake.streams_opened.load(Ordering::SeqCst);
        let relay = start_relay(dir.path(), &nats_url, &fake.url());
        wait_streams(&fake, opened + 1).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        relay_idle = Some(relay.sample());
        for (label, mode, turns) in &plan {
            eprintln!("relay: {label} ...");
            let r = rig
                .run_phase(&relay, Target::Relay, label, *mode, *turns)
                .await;
            eprintln!(
                "  {} deltas in {:.1}s, {:.0} msgs/s, p99 {:.0} us",
                r.collected.deltas,
                r.wall,
                r.replies_per_sec(),
                r.pct(0.99)
            );
            results.push(r);
        }
        relay.stop();
    }
    report(&results, idle, relay_idle, &load_before);
    nats_server.kill();
}
