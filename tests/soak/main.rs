//! The soak: N conversations for T minutes against three nats-servers in a
//! cluster and two daemons (separate processes, each on its own server and
//! its own fake OpenCode behind a TCP proxy), with random faults from a
//! seeded list; every prompt's fate counted, every daemon's resources
//! sampled. Ends with a table (stdout and `<SOAK_OUT>/report.md`) and a
//! non-zero exit when a prompt was lost or duplicated, or a resource grew
//! without bound. docs/RELIABILITY.md reports an hour of it.
//!
//! `cargo test --release --test soak` (two minutes by default; `.ci/test`
//! runs it). Settings (environment):
//!
//! | variable | default | |
//! |---|---|---|
//! | `SOAK_MINUTES` | 2 | how long prompts are sent |
//! | `SOAK_SEED` | 1 | the fault schedule and the texts |
//! | `SOAK_CONVERSATIONS` | 12 | conversations sending one prompt after another |
//! | `SOAK_JOBS` | 0.5 | the share of them that send durable jobs |
//! | `SOAK_FAULT_EVERY` | 15 | mean seconds between faults (exponential) |
//! | `SOAK_THINK_MS` | 1500 | mean pause between a conversation's prompts |
//! | `SOAK_OUT` | `target/soak` | the report, samples (CSV), fault list, daemon logs |
//!
//! A filter argument (`cargo test --test soak x`) that does not name the
//! soak skips it, so `cargo test <filter>` stays quick.

#[path = "../it/support/mod.rs"]
mod support;

mod faults;
mod ledger;
mod load;
mod report;
mod sample;
mod stack;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// What one run does.
#[derive(Debug, Clone)]
pub struct Settings {
    pub minutes: f64,
    pub seed: u64,
    pub conversations: usize,
    pub jobs_share: f64,
    pub fault_every: Duration,
    pub think: Duration,
    pub out: PathBuf,
}

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

impl Settings {
    fn from_env() -> Settings {
        let out = std::env::var_os("SOAK_OUT")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/soak"));
        Settings {
            minutes: env("SOAK_MINUTES", 2.0),
            seed: env("SOAK_SEED", 1),
            conversations: env("SOAK_CONVERSATIONS", 12),
            jobs_share: env("SOAK_JOBS", 0.5),
            fault_every: Duration::from_secs_f64(env("SOAK_FAULT_EVERY", 15.0)),
            think: Duration::from_millis(env("SOAK_THINK_MS", 1500)),
            out,
        }
    }
}

/// When the run began (every time in the report is seconds since).
static T0: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// Seconds since the run began.
pub fn now_s() -> f64 {
    secs(std::time::Instant::now())
}

/// `at` in seconds since the run began.
pub fn secs(at: std::time::Instant) -> f64 {
    at.saturating_duration_since(*T0.get_or_init(std::time::Instant::now))
        .as_secs_f64()
}

/// Whether `cargo test --test soak <args>` asked for something else (a
/// filter not naming the soak, `--list`).
fn skipped() -> bool {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        return true;
    }
    args.iter()
        .filter(|a| !a.starts_with('-'))
        .any(|f| !"soak".contains(f.as_str()))
}

fn main() {
    if skipped() {
        return;
    }
    let settings = Settings::from_env();
    std::fs::create_dir_all(&settings.out).expect("create SOAK_OUT");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let ok = rt.block_on(run(Arc::new(settings)));
    rt.shutdown_timeout(Duration::from_secs(5));
    if !ok {
        std::process::exit(1);
    }
}

async fn run(s: Arc<Settings>) -> bool {
    eprintln!("soak: {s:?}");
    let _ = now_s();
    let stack = stack::Stack::start(&s).await;
    let stack = Arc::new(tokio::sync::Mutex::new(stack));
    let ledger = ledger::Ledger::new();
    let client = stack.lock().await.client().await;
    let listener = ledger.listen(&client).await;
    let sampler = sample::Sampler::start(stack.clone(), &s);
    let run_for = Duration::from_secs_f64(s.minutes * 60.0);
    let load = load::Load::new(s.clone(), client.clone(), ledger.clone());
    let faults = faults::Injector::new(s.clone(), stack.clone(), load.clone());
    let started = tokio::time::Instant::now();
    let (_, fault_log) = tokio::join!(load.run(run_for), faults.run(run_for));
    eprintln!(
        "soak: sending stopped after {:?}; waiting for the last turns",
        started.elapsed()
    );
    load.settle().await;
    let samples = sampler.stop().await;
    let mut stack = stack.lock().await;
    let seen = stack.sessions_by_fake();
    let reached = stack.turns_by_text();
    let starts = stack
        .daemons
        .iter()
        .map(|d| (d.starts, d.failed_starts))
        .collect();
    let statuses = load.fetch_missing(&client).await;
    listener.abort();
    stack.stop().await;
    let r = report::Report::build(
        &s,
        &ledger.all(),
        &fault_log,
        &samples,
        &report::Seen {
            sessions: seen,
            reached,
            statuses,
            starts,
        },
    );
    r.write(&s.out);
    r.ok()
}
