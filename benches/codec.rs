//! The pure path of the bridge on one core, over recorded real OpenCode
//! 1.18.34 streams (`tests/fixtures/opencode-1.18.34/`):
//!
//! ```text
//! SSE bytes -> sse::SseDecoder -> events::parse_event -> mapper::TurnMapper -> Reply::to_json
//! ```
//!
//! Each stage is measured alone (its input prepared outside the timing) and
//! all four combined, for three turns:
//!
//! - `text`: the recorded plain turn (86 events, 13 deltas, plugin noise);
//! - `tool`: the recorded tool turn (43 events, tool call + result);
//! - `deltas10k`: a synthetic turn of 10,000 `message.part.delta` events of
//!   the recorded shape (same ids and field order, token-sized text),
//!   framed by the recorded turn's other events.
//!
//! Criterion reports events/s (`Throughput::Elements`); the summary printed
//! at the end adds MB/s, read from criterion's own estimates. Time is the
//! benchmark thread's CPU time (one core, even on a shared machine);
//! `CODEC_CLOCK=wall` measures wall time instead.
//!
//! ```sh
//! cargo bench --bench codec                 # everything (~2 min)
//! cargo bench --bench codec -- deltas10k    # one turn
//! cargo bench --bench codec -- --quick      # a fast, rougher pass
//! CODEC_PROFILE=combined/deltas10k/20 target/release/deps/codec-<hash>   # no criterion: for perf/callgrind
//! ```

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{BenchmarkId, Criterion, Throughput};
use opencode_nats_bridge::mapper::TurnMapper;
use opencode_nats_bridge::opencode::events::{parse_event, Event};
use opencode_nats_bridge::opencode::sse::{SseDecoder, SseItem};
use opencode_nats_bridge::protocol::{Reply, ReplyBody};
use serde_json::Value;

/// The daemon's allocator (src/main.rs), so the codec is measured as it
/// runs there (remove these two lines to measure it on glibc's malloc).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The daemon's default `limits.max_event_bytes`.
const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;
/// Read size of the daemon's HTTP body chunks is not fixed; 16 KiB is a
/// typical hyper read for a busy stream.
const CHUNK: usize = 16 * 1024;
/// Deltas in the synthetic turn.
const SYNTHETIC_DELTAS: usize = 10_000;

const TRACE_ID: &str = "0b0f3c5e-7f1a-4c1e-9d1b-5a7e2c9d4f10";
const CONVERSATION: &str = "bench.codec";

/// One turn's input, and every stage's output prepared in advance.
struct Turn {
    name: &'static str,
    session_id: String,
    user_message_id: String,
    sse: Vec<u8>,
    /// SSE `data` payloads, decoded.
    data: Vec<String>,
    events: Vec<Event>,
    replies: Vec<ReplyBody>,
    /// Bytes of `replies` as JSON.
    reply_bytes: usize,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/opencode-1.18.34")
}

fn scenario(name: &str) -> (String, String) {
    let m: Value = serde_json::from_slice(
        &std::fs::read(fixtures().join("manifest.json")).expect("manifest.json"),
    )
    .expect("manifest is JSON");
    let s = m["scenarios"]
        .as_array()
        .expect("scenarios")
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no scenario {name}"));
    (
        s["sessionID"].as_str().expect("sessionID").to_string(),
        s["messageIDs"][0].as_str().expect("messageIDs").to_string(),
    )
}

fn decode(sse: &[u8]) -> Vec<String> {
    let mut dec = SseDecoder::new(MAX_EVENT_BYTES);
    let mut items = Vec::new();
    for c in sse.chunks(CHUNK) {
        dec.feed(c, &mut items);
    }
    items
        .into_iter()
        .map(|i| match i {
            SseItem::Event(e) => e.data,
            SseItem::Error(e) => panic!("fixture does not decode: {e}"),
        })
        .collect()
}

/// The synthetic turn: the recorded `text` turn with its deltas replaced by
/// `n` deltas of the same shape (ids of the recorded part, event ids
/// ascending, token-sized text).
fn synthetic(text_sse: &[u8], n: usize) -> Vec<u8> {
    let data = decode(text_sse);
    let is_delta = |d: &str| d.contains(r#""type":"message.part.delta""#);
    let first = data.iter().position(|d| is_delta(d)).expect("a delta");
    let last = data.iter().rposition(|d| is_delta(d)).expect("a delta");
    // The recorded line, field order kept: `{"id":"evt_..","type":..,
    // "properties":{..,"delta":"Hello "}}`.
    let template = &data[first];
    let id_at = template.find("evt_").expect("an event id");
    let id_len = template[id_at..].find('"').expect("id end");
    let delta_at = template.rfind(r#""delta":""#).expect("a delta field") + r#""delta":""#.len();
    assert!(template.ends_with("\"}}"), "{template}");
    let mut out = Vec::new();
    let mut push = |d: &str| {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(d.as_bytes());
        out.extend_from_slice(b"\n\n");
    };
    for d in &data[..first] {
        push(d);
    }
    const WORDS: &[&str] = &[
        "The ", "quick ", "brown ", "fox ", "jumps ", "over ", "the ", "lazy ", "dog", ". ",
        "Queues ", "wait", ", ", "bytes ", "flow", "\n",
    ];
    for i in 0..n {
        let id = format!("evt_2013333{i:05x}01benchDeltaXY");
        assert_eq!(id.len(), id_len);
        let line = format!(
            "{}{id}{}{}\"}}}}",
            &template[..id_at],
            &template[id_at + id_len..delta_at],
            WORDS[i % WORDS.len()].replace('\n', "\\n")
        );
        push(&line);
    }
    for d in &data[last + 1..] {
        push(d);
    }
    out
}

fn map_all(t_session: &str, t_user: &str, events: &[Event], out: &mut Vec<ReplyBody>) {
    let mut mapper = TurnMapper::new(t_session, t_user);
    for e in events {
        mapper.on_event(e, out);
    }
}

fn reply<'a>(session_id: &'a str, seq: u64, body: &'a ReplyBody) -> Reply<'a> {
    Reply {
        trace_id: TRACE_ID,
        seq,
        conversation: Some(CONVERSATION),
        session_id: Some(session_id),
        body,
    }
}

impl Turn {
    fn new(name: &'static str, scenario_name: &str, sse: Vec<u8>) -> Turn {
        let (session_id, user_message_id) = scenario(scenario_name);
        let data = decode(&sse);
        let events: Vec<Event> = data
            .iter()
            .map(|d| parse_event(d).expect("fixture events parse"))
            .collect();
        let mut replies = Vec::new();
        map_all(&session_id, &user_message_id, &events, &mut replies);
        let reply_bytes = replies
            .iter()
            .enumerate()
            .map(|(i, b)| reply(&session_id, i as u64, b).to_json().len())
            .sum();
        Turn {
            name,
            session_id,
            user_message_id,
            sse,
            data,
            events,
            replies,
            reply_bytes,
        }
    }

    fn data_bytes(&self) -> usize {
        self.data.iter().map(String::len).sum()
    }
}

fn turns() -> Vec<Turn> {
    let read = |n: &str| std::fs::read(fixtures().join(format!("{n}.sse"))).expect("fixture");
    let text = read("text");
    vec![
        Turn::new("text", "text", text.clone()),
        Turn::new("tool", "tool", read("tool")),
        Turn::new("deltas10k", "text", synthetic(&text, SYNTHETIC_DELTAS)),
    ]
}

/// The whole pure path, as the stream reader and one turn do it: decode,
/// parse, map, serialise. Returns the JSON bytes produced.
fn pipeline(t: &Turn) -> usize {
    let mut dec = SseDecoder::new(MAX_EVENT_BYTES);
    let mut mapper = TurnMapper::new(&t.session_id, &t.user_message_id);
    let mut items = Vec::new();
    let mut out = Vec::new();
    let mut seq = 0u64;
    let mut bytes = 0;
    for chunk in t.sse.chunks(CHUNK) {
        dec.feed(chunk, &mut items);
        for item in items.drain(..) {
            let SseItem::Event(ev) = item else { continue };
            let Ok(event) = parse_event(&ev.data) else {
                continue;
            };
            if event.session_id() != Some(t.session_id.as_str()) {
                continue; // the reader routes by session; nobody follows it
            }
            mapper.on_event_owned(event, &mut out); // as the turn driver does
            for body in out.drain(..) {
                bytes += black_box(reply(&t.session_id, seq, &body).to_json()).len();
                seq += 1;
            }
        }
    }
    bytes
}

/// What one benchmark measured, for the summary.
struct Row {
    group: &'static str,
    turn: &'static str,
    /// Elements per iteration (events, or replies for `serialise`).
    elements: usize,
    /// Bytes per iteration (SSE bytes, data bytes, or JSON bytes).
    bytes: usize,
    unit: &'static str,
}

fn bench<M: Measurement>(c: &mut Criterion<M>, turns: &[Turn]) -> Vec<Row> {
    let mut rows = Vec::new();

    let mut g = c.benchmark_group("sse_decode");
    for t in turns {
        g.throughput(Throughput::Elements(t.data.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(t.name), t, |b, t| {
            let mut items = Vec::with_capacity(1024);
            b.iter(|| {
                let mut dec = SseDecoder::new(MAX_EVENT_BYTES);
                let mut n = 0;
                for c in t.sse.chunks(CHUNK) {
                    dec.feed(black_box(c), &mut items);
                    n += items.len();
                    items.clear();
                }
                n
            })
        });
        rows.push(Row {
            group: "sse_decode",
            turn: t.name,
            elements: t.data.len(),
            bytes: t.sse.len(),
            unit: "SSE",
        });
    }
    g.finish();

    let mut g = c.benchmark_group("event_parse");
    for t in turns {
        g.throughput(Throughput::Elements(t.data.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(t.name), t, |b, t| {
            b.iter(|| {
                let mut n = 0;
                for d in &t.data {
                    if black_box(parse_event(black_box(d))).is_ok() {
                        n += 1;
                    }
                }
                n
            })
        });
        rows.push(Row {
            group: "event_parse",
            turn: t.name,
            elements: t.data.len(),
            bytes: t.data_bytes(),
            unit: "data",
        });
    }
    g.finish();

    let mut g = c.benchmark_group("map");
    for t in turns {
        g.throughput(Throughput::Elements(t.events.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(t.name), t, |b, t| {
            let mut out = Vec::with_capacity(t.replies.len());
            b.iter(|| {
                out.clear();
                map_all(
                    &t.session_id,
                    &t.user_message_id,
                    black_box(&t.events),
                    &mut out,
                );
                out.len()
            })
        });
        rows.push(Row {
            group: "map",
            turn: t.name,
            elements: t.events.len(),
            bytes: t.data_bytes(),
            unit: "data",
        });
    }
    g.finish();

    let mut g = c.benchmark_group("serialise");
    for t in turns {
        g.throughput(Throughput::Elements(t.replies.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(t.name), t, |b, t| {
            b.iter(|| {
                let mut n = 0;
                for (i, body) in t.replies.iter().enumerate() {
                    n += black_box(reply(&t.session_id, i as u64, black_box(body)).to_json()).len();
                }
                n
            })
        });
        rows.push(Row {
            group: "serialise",
            turn: t.name,
            elements: t.replies.len(),
            bytes: t.reply_bytes,
            unit: "JSON",
        });
    }
    g.finish();

    let mut g = c.benchmark_group("combined");
    for t in turns {
        g.throughput(Throughput::Elements(t.data.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(t.name), t, |b, t| {
            b.iter(|| pipeline(black_box(t)))
        });
        rows.push(Row {
            group: "combined",
            turn: t.name,
            elements: t.data.len(),
            bytes: t.sse.len(),
            unit: "SSE",
        });
    }
    g.finish();
    rows
}

/// Criterion measurement: the CPU time of the benchmark thread
/// (`CLOCK_THREAD_CPUTIME_ID`), so that "one core" means one core even when
/// other work shares the machine. `CODEC_CLOCK=wall` for wall time.
struct ThreadCpu;

fn thread_cpu() -> Duration {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .expect("CLOCK_THREAD_CPUTIME_ID");
    Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32)
}

impl Measurement for ThreadCpu {
    type Intermediate = Duration;
    type Value = Duration;

    fn start(&self) -> Duration {
        thread_cpu()
    }

    fn end(&self, started: Duration) -> Duration {
        thread_cpu().saturating_sub(started)
    }

    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }

    fn zero(&self) -> Duration {
        Duration::ZERO
    }

    fn to_f64(&self, v: &Duration) -> f64 {
        v.as_nanos() as f64
    }

    fn formatter(&self) -> &dyn ValueFormatter {
        &CpuFormatter
    }
}

/// Nanoseconds of CPU, shown like criterion shows wall time.
struct CpuFormatter;

impl ValueFormatter for CpuFormatter {
    fn scale_values(&self, typical_ns: f64, values: &mut [f64]) -> &'static str {
        let (factor, unit) = if typical_ns < 1e3 {
            (1.0, "ns cpu")
        } else if typical_ns < 1e6 {
            (1e-3, "µs cpu")
        } else if typical_ns < 1e9 {
            (1e-6, "ms cpu")
        } else {
            (1e-9, "s cpu")
        };
        for v in values {
            *v *= factor;
        }
        unit
    }

    fn scale_throughputs(
        &self,
        typical_ns: f64,
        t: &Throughput,
        values: &mut [f64],
    ) -> &'static str {
        let (per_iter, units) = match *t {
            Throughput::Bytes(b) | Throughput::BytesDecimal(b) => {
                (b as f64, ["B/s", "KB/s", "MB/s", "GB/s"])
            }
            Throughput::Elements(e) => (e as f64, [" elem/s", "Kelem/s", "Melem/s", "Gelem/s"]),
            Throughput::Bits(b) => (b as f64, ["b/s", "Kb/s", "Mb/s", "Gb/s"]),
        };
        let typical = per_iter * 1e9 / typical_ns;
        let (div, unit) = if typical < 1e3 {
            (1.0, units[0])
        } else if typical < 1e6 {
            (1e3, units[1])
        } else if typical < 1e9 {
            (1e6, units[2])
        } else {
            (1e9, units[3])
        };
        for v in values {
            *v = per_iter * 1e9 / *v / div;
        }
        unit
    }

    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "ns"
    }
}

fn criterion_home() -> PathBuf {
    if let Some(h) = std::env::var_os("CRITERION_HOME") {
        return h.into();
    }
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("criterion")
}

/// Criterion's mean time per iteration, from its `new/estimates.json`, if
/// this run wrote it (a filtered run leaves older ones in place).
fn mean_ns(group: &str, id: &str, since: SystemTime) -> Option<f64> {
    let path = criterion_home()
        .join(group)
        .join(id)
        .join("new/estimates.json");
    let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok()?;
    if modified < since {
        return None;
    }
    let v: Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    v["mean"]["point_estimate"].as_f64()
}

fn summary(turns: &[Turn], rows: &[Row], since: SystemTime, clock: &str) {
    let measured: Vec<(&Row, f64)> = rows
        .iter()
        .filter_map(|r| Some((r, mean_ns(r.group, r.turn, since)?)))
        .collect();
    if measured.is_empty() {
        return;
    }
    println!();
    println!(
        "sizes: Event {} B, ReplyBody {} B, SseItem {} B",
        std::mem::size_of::<Event>(),
        std::mem::size_of::<ReplyBody>(),
        std::mem::size_of::<SseItem>()
    );
    println!("Inputs:");
    for t in turns {
        println!(
            "  {:<10} {:>7} SSE bytes, {:>6} events, {:>6} replies ({} JSON bytes)",
            t.name,
            t.sse.len(),
            t.data.len(),
            t.replies.len(),
            t.reply_bytes
        );
    }
    println!();
    println!(
        "{:<12} {:<10} {:>12} {:>12} {:>10} {:>6}",
        "stage", "turn", "time/iter", "M elem/s", "MB/s", "of"
    );
    for (r, ns) in measured {
        let secs = ns / 1e9;
        println!(
            "{:<12} {:<10} {:>10.1}us {:>12.3} {:>10.1} {:>6}",
            r.group,
            r.turn,
            ns / 1e3,
            r.elements as f64 / secs / 1e6,
            r.bytes as f64 / secs / 1e6,
            r.unit
        );
    }
    println!(
        "(time: {clock} time per iteration. elements: SSE events; replies for `serialise`. \
         MB/s of the bytes named in `of`.)"
    );
}

/// `CODEC_PROFILE=<stage>/<turn>/<iterations>`: runs one stage that many
/// times without criterion, for `perf record` or `valgrind --tool=callgrind`
/// (deterministic instruction counts).
#[inline(never)]
fn profile(turns: &[Turn], spec: &str) {
    let parts: Vec<&str> = spec.split('/').collect();
    let [stage, turn, iterations] = parts[..] else {
        panic!("CODEC_PROFILE=<stage>/<turn>/<iterations>, not {spec:?}");
    };
    let t = turns
        .iter()
        .find(|t| t.name == turn)
        .unwrap_or_else(|| panic!("no turn {turn}"));
    let iterations: usize = iterations.parse().expect("iterations");
    let mut items = Vec::new();
    let mut out = Vec::new();
    let mut n = 0usize;
    for _ in 0..iterations {
        match stage {
            "sse_decode" => {
                let mut dec = SseDecoder::new(MAX_EVENT_BYTES);
                for c in t.sse.chunks(CHUNK) {
                    dec.feed(c, &mut items);
                    n += items.len();
                    items.clear();
                }
            }
            "event_parse" => n += t.data.iter().filter(|d| parse_event(d).is_ok()).count(),
            "map" => {
                out.clear();
                map_all(&t.session_id, &t.user_message_id, &t.events, &mut out);
                n += out.len();
            }
            "serialise" => {
                for (i, body) in t.replies.iter().enumerate() {
                    n += reply(&t.session_id, i as u64, body).to_json().len();
                }
            }
            "combined" => n += pipeline(t),
            _ => panic!("no stage {stage}"),
        }
    }
    println!("{stage}/{turn} x{iterations}: {}", black_box(n));
}

fn main() {
    let started = SystemTime::now();
    let turns = turns();
    if let Ok(spec) = std::env::var("CODEC_PROFILE") {
        return profile(&turns, &spec);
    }
    let wall = std::env::var("CODEC_CLOCK").is_ok_and(|c| c == "wall");
    let rows = if wall {
        let mut c = Criterion::default()
            .with_measurement(WallTime)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3))
            .configure_from_args();
        let rows = bench(&mut c, &turns);
        c.final_summary();
        rows
    } else {
        let mut c = Criterion::default()
            .with_measurement(ThreadCpu)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3))
            .configure_from_args();
        let rows = bench(&mut c, &turns);
        c.final_summary();
        rows
    };
    summary(&turns, &rows, started, if wall { "wall" } else { "CPU" });
}
