//! Turn-level counters and histograms, fed by the reply sink (it sees every
//! reply, its kind and the terminal code), and their Prometheus text.
//!
//! A turn starts when its prompt is accepted (its sink is created) and ends
//! with its terminal reply, so `started = completed + sum(failed) +
//! in_flight` at any instant (a sink dropped without a terminal reply, a
//! bug, counts as failed `internal`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::protocol::{ErrorCode, ReplyBody};

/// Upper bounds (seconds) of the turn duration buckets.
const DURATION_BUCKETS: &[f64] = &[
    0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];
/// Upper bounds (seconds) of the time-to-first-token buckets.
const TTFT_BUCKETS: &[f64] = &[0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0];

/// The reply kinds of the base vocabulary (extension kinds are added as
/// they are seen).
const KINDS: &[&str] = &[
    "delta",
    "reasoning",
    "tool_call",
    "tool_result",
    "final",
    "error",
];

/// A fixed-bucket histogram.
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative); the last one is `+Inf`.
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            let le = match self.bounds.get(i) {
                Some(v) => v.to_string(),
                None => "+Inf".to_string(),
            };
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {}", self.count());
    }
}

/// What every turn of this daemon adds up to.
pub struct Metrics {
    started: AtomicU64,
    completed: AtomicU64,
    failed: Mutex<BTreeMap<&'static str, u64>>,
    in_flight: AtomicU64,
    replies: Mutex<BTreeMap<&'static str, u64>>,
    duration: Histogram,
    ttft: Histogram,
    /// Messages the NATS client dropped because a subscription's buffer
    /// was full (a slow consumer): at least this many.
    dropped: AtomicU64,
    /// Prompts read and waiting for a `turn.max_in_flight` slot.
    waiting: AtomicU64,
    /// Durable jobs: taken, acked, naked, terminated (`crate::jobs`).
    jobs: [AtomicU64; 4],
}

/// What happened to durable jobs on this daemon (`status`, metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct JobCounts {
    /// Deliveries pulled from the jobs stream.
    pub taken: u64,
    /// Acknowledged after their terminal reply.
    pub acked: u64,
    /// Handed back, to come again (OpenCode unavailable, stopping).
    pub naked: u64,
    /// Removed with their terminal reply (`bad_request`, `forbidden`,
    /// `undeliverable`).
    pub terminated: u64,
}

/// One event in a job's life, for [`Metrics::job`].
#[derive(Debug, Clone, Copy)]
pub enum JobEvent {
    Taken,
    Acked,
    Naked,
    Terminated,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            started: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            // Every code, so a code that never happened still shows as 0.
            failed: Mutex::new(ErrorCode::ALL.iter().map(|c| (c.as_str(), 0)).collect()),
            in_flight: AtomicU64::new(0),
            replies: Mutex::new(KINDS.iter().map(|k| (*k, 0)).collect()),
            duration: Histogram::new(DURATION_BUCKETS),
            ttft: Histogram::new(TTFT_BUCKETS),
            dropped: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            jobs: Default::default(),
        }
    }
}

/// A copy of the turn counters, for the status endpoint.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct TurnCounts {
    pub started: u64,
    pub completed: u64,
    /// By error code; codes that never happened are left out.
    pub failed: BTreeMap<String, u64>,
    pub in_flight: u64,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Metrics::default())
    }

    /// Turns accepted and not yet ended.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn turns(&self) -> TurnCounts {
        TurnCounts {
            started: self.started.load(Ordering::Relaxed),
            completed: self.completed.load(Ordering::Relaxed),
            failed: lock(&self.failed)
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(k, n)| (k.to_string(), *n))
                .collect(),
            in_flight: self.in_flight(),
        }
    }

    /// A message dropped by the NATS client (slow consumer).
    pub fn dropped_message(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Messages dropped by the NATS client so far (at least).
    pub fn dropped_messages(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// How many prompts wait for a slot now.
    pub fn set_waiting(&self, n: usize) {
        self.waiting.store(n as u64, Ordering::Relaxed);
    }

    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Counts a job event.
    pub fn job(&self, e: JobEvent) {
        self.jobs[e as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn jobs(&self) -> JobCounts {
        let n = |e: JobEvent| self.jobs[e as usize].load(Ordering::Relaxed);
        JobCounts {
            taken: n(JobEvent::Taken),
            acked: n(JobEvent::Acked),
            naked: n(JobEvent::Naked),
            terminated: n(JobEvent::Terminated),
        }
    }

    /// Replies published, by kind.
    pub fn replies(&self) -> BTreeMap<&'static str, u64> {
        lock(&self.replies).clone()
    }

    fn end(&self, failed: Option<&'static str>, took: Duration) {
        match failed {
            None => {
                self.completed.fetch_add(1, Ordering::Relaxed);
            }
            Some(code) => *lock(&self.failed).entry(code).or_default() += 1,
        }
        self.duration.observe(took);
        // Never below zero, whatever the order of updates.
        let _ = self
            .in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
    }

    /// The durable jobs' counters.
    fn render_jobs(&self, out: &mut String) {
        let j = self.jobs();
        for (what, help, n) in [
            (
                "taken",
                "Durable jobs pulled from the jobs stream (deliveries).",
                j.taken,
            ),
            (
                "acked",
                "Durable jobs acknowledged after their terminal reply.",
                j.acked,
            ),
            (
                "naked",
                "Durable jobs handed back to come again (OpenCode unavailable, stopping).",
                j.naked,
            ),
            (
                "terminated",
                "Durable jobs removed with a bad_request, forbidden or undeliverable reply.",
                j.terminated,
            ),
        ] {
            counter(out, &format!("opencode_bridge_jobs_{what}_total"), help, n);
        }
    }

    /// Appends the turn metrics in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let t = self.turns();
        counter(
            out,
            "opencode_bridge_turns_started_total",
            "Prompts accepted (each ends as completed or failed).",
            t.started,
        );
        counter(
            out,
            "opencode_bridge_turns_completed_total",
            "Turns that ended with a final reply.",
            t.completed,
        );
        let _ = writeln!(
            out,
            "# HELP opencode_bridge_turns_failed_total Turns that ended with an error reply, by code."
        );
        let _ = writeln!(out, "# TYPE opencode_bridge_turns_failed_total counter");
        for (code, n) in lock(&self.failed).iter() {
            let _ = writeln!(
                out,
                "opencode_bridge_turns_failed_total{{code=\"{code}\"}} {n}"
            );
        }
        gauge(
            out,
            "opencode_bridge_turns_in_flight",
            "Turns accepted and not ended (running or queued).",
            t.in_flight,
        );
        gauge(
            out,
            "opencode_bridge_prompts_waiting",
            "Prompts read and waiting for a turn.max_in_flight slot (turn.max_waiting).",
            self.waiting(),
        );
        counter(
            out,
            "opencode_bridge_nats_dropped_messages_total",
            "Messages the NATS client dropped for a full subscription buffer (slow consumer); should stay 0.",
            self.dropped_messages(),
        );
        self.render_jobs(out);
        self.duration.render(
            out,
            "opencode_bridge_turn_duration_seconds",
            "From the prompt's acceptance to the terminal reply.",
        );
        self.ttft.render(
            out,
            "opencode_bridge_time_to_first_token_seconds",
            "From the prompt's acceptance to the first delta.",
        );
        let _ = writeln!(
            out,
            "# HELP opencode_bridge_replies_total Replies published, by kind."
        );
        let _ = writeln!(out, "# TYPE opencode_bridge_replies_total counter");
        for (kind, n) in lock(&self.replies).iter() {
            let _ = writeln!(out, "opencode_bridge_replies_total{{kind=\"{kind}\"}} {n}");
        }
    }
}

/// One turn as the sink sees it: counts it started when made, each reply
/// by kind, the time to the first delta, and the end with its outcome.
pub struct TurnObserver {
    metrics: Arc<Metrics>,
    started: Instant,
    first_token: bool,
    ended: bool,
}

impl TurnObserver {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        metrics.started.fetch_add(1, Ordering::Relaxed);
        metrics.in_flight.fetch_add(1, Ordering::Relaxed);
        TurnObserver {
            metrics,
            started: Instant::now(),
            first_token: false,
            ended: false,
        }
    }

    /// Called for every reply published.
    pub fn on_reply(&mut self, body: &ReplyBody) {
        if self.ended {
            return;
        }
        *lock(&self.metrics.replies).entry(body.kind()).or_default() += 1;
        match body {
            ReplyBody::Delta { .. } if !self.first_token => {
                self.first_token = true;
                self.metrics.ttft.observe(self.started.elapsed());
            }
            ReplyBody::Final(_) => self.end(None),
            ReplyBody::Error { code, .. } => self.end(Some(code.as_str())),
            _ => {}
        }
    }

    fn end(&mut self, failed: Option<&'static str>) {
        self.ended = true;
        self.metrics.end(failed, self.started.elapsed());
    }
}

impl Drop for TurnObserver {
    fn drop(&mut self) {
        if !self.ended {
            self.end(Some(ErrorCode::Internal.as_str()));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A `counter` with its HELP and TYPE lines.
pub fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
    );
}

/// A `gauge` with its HELP and TYPE lines.
pub fn gauge(out: &mut String, name: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}

/// A label value escaped for the text format.
pub fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta() -> ReplyBody {
        ReplyBody::Delta {
            content: "hi".into(),
            part_id: "prt_1".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_turn_is_counted_from_acceptance_to_its_end() {
        let m = Metrics::new();
        let mut t = TurnObserver::new(m.clone());
        assert_eq!(m.in_flight(), 1);
        tokio::time::advance(Duration::from_millis(300)).await;
        t.on_reply(&delta());
        tokio::time::advance(Duration::from_secs(2)).await;
        t.on_reply(&delta());
        t.on_reply(&ReplyBody::Final(Box::default()));
        // Nothing counts after the terminal reply.
        t.on_reply(&delta());
        drop(t);

        let mut f = TurnObserver::new(m.clone());
        f.on_reply(&ReplyBody::error(ErrorCode::Timeout, "late"));
        // Dropped without a terminal reply: a bug, counted as internal.
        drop(TurnObserver::new(m.clone()));

        let c = m.turns();
        assert_eq!((c.started, c.completed, c.in_flight), (3, 1, 0));
        assert_eq!(c.failed.get("timeout"), Some(&1));
        assert_eq!(c.failed.get("internal"), Some(&1));
        assert_eq!(m.replies()["delta"], 2);
        assert_eq!(m.replies()["final"], 1);
        assert_eq!(m.replies()["error"], 1);
        assert_eq!(m.ttft.count(), 1);
        assert_eq!(m.duration.count(), 3);

        let mut text = String::new();
        m.render(&mut text);
        assert!(
            text.contains("opencode_bridge_turns_completed_total 1\n"),
            "{text}"
        );
        assert!(text.contains("opencode_bridge_turns_failed_total{code=\"timeout\"} 1\n"));
        assert!(text.contains("opencode_bridge_turns_failed_total{code=\"aborted\"} 0\n"));
        assert!(text.contains("opencode_bridge_replies_total{kind=\"delta\"} 2\n"));
        // 0.3 s to the first token: in the 0.5 s bucket, not the 0.25 s one.
        assert!(
            text.contains("opencode_bridge_time_to_first_token_seconds_bucket{le=\"0.25\"} 0\n")
        );
        assert!(text.contains("opencode_bridge_time_to_first_token_seconds_bucket{le=\"0.5\"} 1\n"));
        assert!(text.contains("opencode_bridge_turn_duration_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("opencode_bridge_time_to_first_token_seconds_sum 0.3\n"));
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
