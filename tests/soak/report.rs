//! The verdict: every prompt classified, latencies, resource slopes; a
//! table on stdout and in `<SOAK_OUT>/report.md`, the faults in
//! `faults.csv`.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::path::Path as FsPath;

use serde_json::Value;

use crate::faults::{Fault, Kind};
use crate::ledger::{Path, Prompt};
use crate::load::{JOB_DEADLINE, PROMPT_DEADLINE};
use crate::sample::Sample;
use crate::support::fake_opencode::echo_reply;
use crate::Settings;

/// What the stack saw, for the verdict.
pub struct Seen {
    /// Session id -> (the fake that has it, its title).
    pub sessions: HashMap<String, (usize, String)>,
    /// Prompt text -> (daemon whose OpenCode got it, seconds).
    pub reached: HashMap<String, Vec<(usize, f64)>>,
    /// `opencode.turn.status` of prompts heard of no terminal.
    pub statuses: HashMap<String, Value>,
    /// Per daemon: (starts, starts that failed and were tried again).
    pub starts: Vec<(u32, u32)>,
}

/// A prompt's fate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fate {
    /// Exactly one terminal reply, right text and session (or a typed error).
    One,
    /// No terminal heard, but `opencode.turn.status` had it.
    Fetched,
    /// Never sent: the publish (a job's stream acknowledgement) failed.
    Refused,
    /// A core prompt without a terminal while daemon 1 was killed -9
    /// (docs/CLUSTER.md: no guarantee without JetStream).
    LostKill9,
    /// A core prompt that never reached an OpenCode while a nats-server
    /// was killed (core NATS is at most once).
    LostNatsKill,
    /// A job's final twice around a kill -9 (the daemon died between its
    /// final and its ack: documented).
    DuplicatedKill9,
    Lost,
    Duplicated,
    WrongSession,
    WrongText,
}

impl Fate {
    /// Whether this fate fails the run.
    pub fn fails(self) -> bool {
        matches!(
            self,
            Fate::Lost | Fate::Duplicated | Fate::WrongSession | Fate::WrongText
        )
    }
}

pub struct Report {
    text: String,
    failed: Vec<String>,
}

fn at(i: tokio::time::Instant) -> f64 {
    crate::secs(i.into_std())
}

fn overlaps(faults: &[Fault], kind: Kind, from: f64, to: f64) -> bool {
    faults
        .iter()
        .any(|f| f.kind == kind && f.start <= to && f.end >= from)
}

/// The fate of one prompt.
pub fn fate(p: &Prompt, faults: &[Fault], seen: &Seen) -> Fate {
    if p.refused {
        return Fate::Refused;
    }
    let sent = at(p.sent);
    match p.terminals.len() {
        0 => {
            let status = seen.statuses.get(&p.trace);
            if status.is_some_and(|s| s["state"] == "done" && s["terminal"].is_object()) {
                return Fate::Fetched;
            }
            if p.path == Path::Job {
                return Fate::Lost;
            }
            let until = sent + PROMPT_DEADLINE.as_secs_f64();
            let reached = seen.reached.get(&p.text);
            let on_survivor = reached.is_some_and(|r| r.iter().any(|(d, _)| *d == 0));
            if !on_survivor && overlaps(faults, Kind::DaemonKill9, sent - 1.0, until) {
                return Fate::LostKill9;
            }
            if reached.is_none() && overlaps(faults, Kind::NatsKill, sent - 2.0, sent + 5.0) {
                return Fate::LostNatsKill;
            }
            Fate::Lost
        }
        1 => check(p, &p.terminals[0].body, seen),
        _ => {
            let first = at(p.terminals[0].at);
            let last = at(p.terminals[p.terminals.len() - 1].at);
            if p.path == Path::Job
                && overlaps(faults, Kind::DaemonKill9, first - 1.0, last)
                && p.terminals.len() == 2
            {
                return Fate::DuplicatedKill9;
            }
            Fate::Duplicated
        }
    }
}

/// A final's text and session; an error is a right answer (typed).
fn check(p: &Prompt, t: &Value, seen: &Seen) -> Fate {
    if t["kind"] != "final" {
        return Fate::One;
    }
    if t["content"].as_str() != Some(echo_reply(&p.text).as_str()) {
        return Fate::WrongText;
    }
    let sid = t["session_id"].as_str().unwrap_or_default();
    match seen.sessions.get(sid) {
        Some((_, title)) if title.contains(&p.conversation) => Fate::One,
        _ => Fate::WrongSession,
    }
}

fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v[i]
}

/// Least-squares slope of `y` over `x` (per unit of x).
pub fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mx, my) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x / n, b + y / n));
    let (num, den) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
    });
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

impl Report {
    pub fn build(
        s: &Settings,
        prompts: &[Prompt],
        faults: &[Fault],
        samples: &[Sample],
        seen: &Seen,
    ) -> Report {
        let mut text = String::new();
        let mut failed = Vec::new();
        let run_s = s.minutes * 60.0;
        let _ = writeln!(
            text,
            "# Soak: seed {}, {} min, {} conversations ({:.0}% jobs), a fault every ~{:?}\n",
            s.seed,
            s.minutes,
            s.conversations,
            s.jobs_share * 100.0,
            s.fault_every
        );
        fates(&mut text, &mut failed, prompts, faults, seen);
        flagged(&s.out, prompts, faults, seen);
        latencies(&mut text, prompts);
        fault_table(&mut text, faults);
        for (d, (ok, failed)) in seen.starts.iter().enumerate() {
            let _ = writeln!(
                text,
                "\nDaemon {d}: {ok} starts, {failed} failed starts (tried again)."
            );
        }
        resources(&mut text, &mut failed, samples, run_s, s.conversations);
        if failed.is_empty() {
            let _ = writeln!(text, "\n**Verdict: pass.**");
        } else {
            let _ = writeln!(text, "\n**Verdict: FAIL**: {}", failed.join("; "));
        }
        let mut csv = String::from("start_s,end_s,kind,detail\n");
        for f in faults {
            let _ = writeln!(csv, "{:.1},{:.1},{:?},{}", f.start, f.end, f.kind, f.detail);
        }
        let _ = std::fs::write(s.out.join("faults.csv"), csv);
        Report { text, failed }
    }

    pub fn write(&self, out: &FsPath) {
        println!("{}", self.text);
        let _ = std::fs::write(out.join("report.md"), &self.text);
    }

    pub fn ok(&self) -> bool {
        self.failed.is_empty()
    }
}

fn fates(
    text: &mut String,
    failed: &mut Vec<String>,
    prompts: &[Prompt],
    faults: &[Fault],
    seen: &Seen,
) {
    let mut table: BTreeMap<(Path, Fate), usize> = BTreeMap::new();
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let mut examples: BTreeMap<Fate, Vec<String>> = BTreeMap::new();
    for p in prompts {
        let f = fate(p, faults, seen);
        *table.entry((p.path, f)).or_default() += 1;
        if f == Fate::One && p.terminals[0].body["kind"] == "error" {
            let code = p.terminals[0].body["code"]
                .as_str()
                .unwrap_or("?")
                .to_string();
            *errors.entry(code).or_default() += 1;
        }
        if f.fails()
            || matches!(
                f,
                Fate::LostKill9 | Fate::LostNatsKill | Fate::DuplicatedKill9
            )
        {
            let e = examples.entry(f).or_default();
            if e.len() < 5 {
                e.push(format!(
                    "{} ({:?}, sent at {:.1}s)",
                    p.trace,
                    p.path,
                    at(p.sent)
                ));
            }
        }
    }
    let _ = writeln!(text, "## Prompts: {}\n", prompts.len());
    let _ = writeln!(text, "| path | fate | prompts |\n|---|---|---:|");
    for ((path, fate), n) in &table {
        let _ = writeln!(text, "| {path:?} | {fate:?} | {n} |");
        if fate.fails() {
            failed.push(format!("{n} {path:?} prompts {fate:?}"));
        }
    }
    let _ = writeln!(
        text,
        "\nTyped errors among the single terminals: {errors:?}\n"
    );
    for (fate, e) in &examples {
        let _ = writeln!(text, "- {fate:?}, e.g.: {}", e.join(", "));
    }
}

/// Every prompt not of fate `One`, whole, one JSON per line
/// (`<SOAK_OUT>/flagged.jsonl`), to find out what happened.
fn flagged(out: &FsPath, prompts: &[Prompt], faults: &[Fault], seen: &Seen) {
    let mut lines = String::new();
    for p in prompts {
        let f = fate(p, faults, seen);
        if f == Fate::One {
            continue;
        }
        let v = serde_json::json!({
            "fate": format!("{f:?}"),
            "trace": p.trace,
            "path": format!("{:?}", p.path),
            "text": p.text,
            "sent_s": at(p.sent),
            "replies": p.replies,
            "terminals": p.terminals.iter().map(|t| serde_json::json!({"at_s": at(t.at), "body": t.body})).collect::<Vec<_>>(),
            "reached": seen.reached.get(&p.text),
            "status": seen.statuses.get(&p.trace),
        });
        let _ = writeln!(lines, "{v}");
    }
    let _ = std::fs::write(out.join("flagged.jsonl"), lines);
}

fn latencies(text: &mut String, prompts: &[Prompt]) {
    let _ = writeln!(text, "\n## Latency of the finals (seconds)\n");
    let _ = writeln!(text, "| path | finals | first reply p50 | p99 | terminal p50 | p99 |\n|---|---:|---:|---:|---:|---:|");
    for path in [Path::Prompt, Path::Job, Path::Burst] {
        let (mut first, mut term) = (Vec::new(), Vec::new());
        for p in prompts
            .iter()
            .filter(|p| p.path == path && p.terminals.len() == 1)
        {
            if p.terminals[0].body["kind"] != "final" {
                continue;
            }
            if let Some(f) = p.first_reply {
                first.push((f - p.sent).as_secs_f64());
            }
            term.push((p.terminals[0].at - p.sent).as_secs_f64());
        }
        let n = term.len();
        let _ = writeln!(
            text,
            "| {path:?} | {n} | {:.3} | {:.3} | {:.3} | {:.3} |",
            percentile(&mut first, 0.5),
            percentile(&mut first, 0.99),
            percentile(&mut term, 0.5),
            percentile(&mut term, 0.99)
        );
    }
}

fn fault_table(text: &mut String, faults: &[Fault]) {
    let mut by: BTreeMap<Kind, usize> = BTreeMap::new();
    for f in faults {
        *by.entry(f.kind).or_default() += 1;
    }
    let _ = writeln!(
        text,
        "\n## Faults: {}\n\n| fault | times |\n|---|---:|",
        faults.len()
    );
    for (k, n) in by {
        let _ = writeln!(text, "| {k:?} | {n} |");
    }
}

/// Per daemon process: first and last value, the max, and the slope after
/// warm-up (the first fifth of the run, at least a minute); daemon 0 lives
/// the whole run and must not grow without bound.
fn resources(
    text: &mut String,
    failed: &mut Vec<String>,
    samples: &[Sample],
    run_s: f64,
    conversations: usize,
) {
    let warm = (run_s / 5.0).max(60.0);
    let _ = writeln!(
        text,
        "\n## Resources after warm-up ({warm:.0} s), per daemon process\n"
    );
    let _ = writeln!(text, "| daemon | start | samples | RSS first..last (MiB) | RSS slope (KiB/min) | fds first..last | fds slope (/min) | tasks first..last, max | conversations max | OpenCode sessions last |\n|---|---:|---:|---|---:|---|---:|---|---:|---:|");
    let mut procs: BTreeMap<(usize, u32), Vec<&Sample>> = BTreeMap::new();
    for s in samples.iter().filter(|s| s.pid.is_some()) {
        procs.entry((s.daemon, s.start)).or_default().push(s);
    }
    for ((daemon, start), v) in procs {
        let late: Vec<&&Sample> = v.iter().filter(|s| s.t >= warm).collect();
        let series = |f: &dyn Fn(&Sample) -> Option<u64>| -> Vec<(f64, f64)> {
            late.iter()
                .filter_map(|s| f(s).map(|y| (s.t / 60.0, y as f64)))
                .collect()
        };
        let rss = series(&|s| s.rss_kb);
        let fds = series(&|s| s.fds);
        let tasks = series(&|s| s.tasks);
        let conv_max = v.iter().filter_map(|s| s.conversations).max().unwrap_or(0);
        let ends = |p: &[(f64, f64)]| match (p.first(), p.last()) {
            (Some(a), Some(b)) => (a.1, b.1),
            _ => (f64::NAN, f64::NAN),
        };
        let (r0, r1) = ends(&rss);
        let (f0, f1) = ends(&fds);
        let (t0, t1) = ends(&tasks);
        let tmax = tasks.iter().map(|p| p.1).fold(0.0, f64::max);
        let (rs, fs) = (slope(&rss), slope(&fds));
        let _ = writeln!(
            text,
            "| {daemon} | {start} | {} | {:.1}..{:.1} | {rs:.1} | {f0}..{f1} | {fs:.2} | {t0}..{t1}, {tmax} | {conv_max} | {} |",
            late.len(),
            r0 / 1024.0,
            r1 / 1024.0,
            v.last().map_or(0, |s| s.sessions)
        );
        // Only a process that lived past warm-up for most of the run is judged.
        let span = rss.last().map_or(0.0, |l| l.0) - rss.first().map_or(0.0, |f| f.0);
        if span * 60.0 < (run_s - warm) * 0.5 {
            continue;
        }
        let minutes = span.max(1.0);
        if rs * minutes > (r0 * 0.25).max(16.0 * 1024.0) {
            failed.push(format!(
                "daemon {daemon} RSS grew {:.1} MiB after warm-up",
                rs * minutes / 1024.0
            ));
        }
        if fs * minutes > 20.0 {
            failed.push(format!(
                "daemon {daemon} open fds grew by {:.0} after warm-up",
                fs * minutes
            ));
        }
        if slope(&tasks) * minutes > 200.0 {
            failed.push(format!(
                "daemon {daemon} tasks grew by {:.0} after warm-up",
                slope(&tasks) * minutes
            ));
        }
        // Each conversation, plus the burst conversations (b0..), at most.
        let bound = conversations as u64 + 2048;
        if conv_max > bound {
            failed.push(format!(
                "daemon {daemon} knows {conv_max} conversations (> {bound})"
            ));
        }
    }
    let _ = JOB_DEADLINE;
}
