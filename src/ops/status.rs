//! The daemon's health, read from the live parts (NATS connection, the
//! OpenCode event stream, the dispatcher, the turn metrics): one
//! [`Status`] document for the `status` endpoint, the heartbeat and the
//! micro service stats; the Prometheus text; and the yes/no the systemd
//! watchdog acts on.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::bus::Publisher;
use crate::config::Config;
use crate::metrics::{counter, gauge, label, Metrics, TurnCounts};
use crate::opencode::compat::SeenVersion;
use crate::opencode::EventHub;
use crate::turn::Dispatcher;

/// What one daemon says about itself (JSON on the wire).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Status {
    pub host: String,
    pub version: String,
    /// The micro service instance id (`$SRV.PING` answers carry it).
    pub instance: String,
    /// NATS connected and OpenCode's event stream connected.
    pub healthy: bool,
    /// Why not healthy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// Shutting down: no new prompts, in-flight turns finishing.
    pub stopping: bool,
    pub nats_connected: bool,
    pub opencode_url: String,
    /// The daemon runs `opencode serve` itself.
    pub opencode_embedded: bool,
    /// The version OpenCode reports (`GET /global/health`), read at
    /// start-up and after every reconnect; empty until read.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub opencode_version: String,
    /// OpenCode's event stream is connected.
    pub opencode_connected: bool,
    /// Prompts accepted and not ended (running or queued).
    pub turns_in_flight: u64,
    /// Prompts read and waiting for a `turn.max_in_flight` slot.
    pub prompts_waiting: u64,
    /// Messages the NATS client dropped for a full subscription buffer
    /// (slow consumer): should stay 0; each is also logged at error level.
    pub nats_dropped_messages: u64,
    /// Durable jobs taken, acknowledged, handed back and terminated.
    #[serde(default)]
    pub jobs: crate::metrics::JobCounts,
    /// The cluster this daemon is part of (docs/CLUSTER.md); absent when
    /// it runs single-host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatus>,
    /// Workspaces and tenants' servers (`[workspaces]`, `[isolation]`);
    /// absent without a workspaces root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<crate::isolation::IsolationStatus>,
    /// Conversations with a turn running or queued.
    pub conversations: usize,
    /// Conversations the bridge has a session for (its conversation map,
    /// rebuilt from OpenCode at start), idle ones included; absent when the
    /// store cannot count them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conversations_known: Option<usize>,
    pub uptime_s: u64,
    /// Start time, seconds since the Unix epoch.
    pub started_unix: u64,
    pub turns: TurnCounts,
    pub nats_reconnects: u64,
    pub opencode_reconnects: u64,
    pub opencode_restarts: u64,
    /// Where this daemon takes prompts.
    pub prompt_subject: String,
    /// Permissions OpenCode's own config allows without asking, although
    /// the bridge's policy would deny or ask (empty: none; see
    /// `[opencode] require_ask`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub permission_bypasses: Vec<String>,
}

/// This daemon in the cluster.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClusterStatus {
    /// Its id: forwarded prompts reach it on `<instance_prefix>.<id>.prompt`.
    pub instance_id: String,
    /// The OpenCode server it drives, as the cluster names it.
    pub opencode_id: String,
}

/// The live parts the health is read from.
pub struct Sources {
    /// Set when the daemon is part of a cluster.
    pub cluster: Option<ClusterStatus>,
    pub publisher: Publisher,
    pub hub: Arc<EventHub>,
    pub dispatcher: Arc<Dispatcher>,
    pub metrics: Arc<Metrics>,
    /// Restarts of the embedded `opencode serve`.
    pub embedded_restarts: Arc<AtomicU64>,
    pub opencode_url: String,
    pub embedded: bool,
    /// Found at start-up ([`Status::permission_bypasses`]).
    pub permission_bypasses: Vec<String>,
    /// OpenCode's version as last read ([`Status::opencode_version`]).
    pub opencode_version: Arc<SeenVersion>,
}

pub struct Health {
    host: String,
    prompt_subject: String,
    started: Instant,
    started_unix: u64,
    sources: Sources,
    stopping: AtomicBool,
    instance: OnceLock<String>,
}

impl Health {
    pub fn new(config: &Config, sources: Sources) -> Arc<Health> {
        Arc::new(Health {
            host: config.service.host.clone().unwrap_or_else(hostname),
            prompt_subject: config.subjects.prompt.clone(),
            started: Instant::now(),
            started_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            sources,
            stopping: AtomicBool::new(false),
            instance: OnceLock::new(),
        })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// The version OpenCode last reported.
    pub fn opencode_version(&self) -> Option<String> {
        self.sources.opencode_version.version()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.sources.metrics
    }

    pub(super) fn set_instance(&self, id: &str) {
        let _ = self.instance.set(id.to_string());
    }

    pub(super) fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// `Ok` when NATS and OpenCode's event stream are both connected;
    /// else what is wrong.
    pub fn check(&self) -> Result<(), String> {
        if !self.sources.publisher.is_connected() {
            return Err("NATS is disconnected".into());
        }
        if let Some(why) = self.sources.opencode_version.refused() {
            return Err(why);
        }
        if !self.opencode_connected() {
            return Err(format!(
                "OpenCode's event stream at {} is not connected",
                self.sources.opencode_url
            ));
        }
        Ok(())
    }

    fn opencode_connected(&self) -> bool {
        self.sources.hub.state().borrow().connected
    }

    pub fn status(&self) -> Status {
        let s = &self.sources;
        let problem = self.check().err();
        Status {
            host: self.host.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            instance: self.instance.get().cloned().unwrap_or_default(),
            healthy: problem.is_none(),
            problem,
            stopping: self.stopping.load(Ordering::Relaxed),
            nats_connected: s.publisher.is_connected(),
            opencode_url: s.opencode_url.clone(),
            opencode_embedded: s.embedded,
            opencode_version: self.opencode_version().unwrap_or_default(),
            opencode_connected: self.opencode_connected(),
            turns_in_flight: s.metrics.in_flight(),
            prompts_waiting: s.metrics.waiting(),
            nats_dropped_messages: s.metrics.dropped_messages(),
            jobs: s.metrics.jobs(),
            cluster: s.cluster.clone(),
            isolation: s
                .dispatcher
                .context()
                .isolation
                .as_ref()
                .map(|i| i.status()),
            conversations: s.dispatcher.active_conversations(),
            conversations_known: s.dispatcher.context().sessions.known(),
            uptime_s: self.started.elapsed().as_secs(),
            started_unix: self.started_unix,
            turns: s.metrics.turns(),
            nats_reconnects: s.publisher.reconnects(),
            opencode_reconnects: s.hub.stats.reconnects.load(Ordering::Relaxed),
            opencode_restarts: s.embedded_restarts.load(Ordering::Relaxed),
            prompt_subject: self.prompt_subject.clone(),
            permission_bypasses: self.sources.permission_bypasses.clone(),
        }
    }

    /// What must stay bounded however long the daemon runs (the soak
    /// watches them, docs/RELIABILITY.md): the conversation map, the tasks.
    fn render_sizes(&self, out: &mut String) {
        if let Some(n) = self.sources.dispatcher.context().sessions.known() {
            gauge(
                out,
                "opencode_bridge_conversations_known",
                "Conversations in the map to their OpenCode sessions.",
                n,
            );
        }
        gauge(
            out,
            "opencode_bridge_tokio_tasks_alive",
            "Tasks alive on the daemon's runtime (a leak shows as growth).",
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks(),
        );
    }

    /// Everything in the Prometheus text format (version 0.0.4).
    pub fn prometheus(&self) -> String {
        let s = &self.sources;
        let st = &s.hub.stats;
        let mut out = String::with_capacity(8192);
        let _ = std::fmt::Write::write_fmt(
            &mut out,
            format_args!(
                "# HELP opencode_bridge_info The daemon's version and host.\n# TYPE opencode_bridge_info gauge\nopencode_bridge_info{{version=\"{}\",host=\"{}\"}} 1\n",
                env!("CARGO_PKG_VERSION"),
                label(&self.host)
            ),
        );
        gauge(
            &mut out,
            "opencode_bridge_uptime_seconds",
            "Seconds since the daemon started.",
            self.started.elapsed().as_secs(),
        );
        s.metrics.render(&mut out);
        gauge(
            &mut out,
            "opencode_bridge_conversations_active",
            "Conversations with a turn running or queued.",
            s.dispatcher.active_conversations(),
        );
        self.render_sizes(&mut out);
        gauge(
            &mut out,
            "opencode_bridge_nats_connected",
            "1 while the NATS connection is up.",
            u8::from(s.publisher.is_connected()),
        );
        counter(
            &mut out,
            "opencode_bridge_nats_reconnects_total",
            "Reconnections to NATS after the first connection.",
            s.publisher.reconnects(),
        );
        gauge(
            &mut out,
            "opencode_bridge_opencode_connected",
            "1 while OpenCode's event stream is connected.",
            u8::from(self.opencode_connected()),
        );
        let counters = [
            (
                "opencode_bridge_opencode_stream_reconnects_total",
                "Times OpenCode's event stream ended or failed and was retried.",
                st.reconnects.load(Ordering::Relaxed),
            ),
            (
                "opencode_bridge_opencode_events_total",
                "Events read from OpenCode's event stream.",
                st.events.load(Ordering::Relaxed),
            ),
            (
                "opencode_bridge_opencode_bad_events_total",
                "Events from OpenCode that could not be decoded (skipped).",
                st.bad_events.load(Ordering::Relaxed),
            ),
            (
                "opencode_bridge_opencode_events_dropped_total",
                "Events dropped for a turn that fell behind (it catches up over HTTP).",
                st.dropped_for_lag.load(Ordering::Relaxed),
            ),
            (
                "opencode_bridge_opencode_restarts_total",
                "Restarts of the embedded opencode serve.",
                s.embedded_restarts.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in counters {
            counter(&mut out, name, help, value);
        }
        out
    }
}

/// The machine's host name (Linux), else `localhost`.
pub fn hostname() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|h| h.trim().to_string())
        .find(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// `host` as one subject token: lowercase letters, digits, `-` and `_`
/// (`build-01.example.com` -> `build-01-example-com`).
pub fn subject_token(host: &str) -> String {
    let t = crate::protocol::subject::to_token(host, usize::MAX);
    if t.is_empty() {
        "unknown".into()
    } else {
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_become_one_token() {
        assert_eq!(
            subject_token("build-01.Example.com"),
            "build-01-example-com"
        );
        assert_eq!(subject_token("a b*>c"), "a-b--c");
        assert_eq!(subject_token(""), "unknown");
        assert!(!hostname().is_empty());
    }

    #[test]
    fn status_reads_what_an_older_or_newer_daemon_sends() {
        let s: Status =
            serde_json::from_str(r#"{"host":"h","turns_in_flight":2,"future":true}"#).unwrap();
        assert_eq!(s.host, "h");
        assert_eq!(s.turns_in_flight, 2);
        assert!(!s.healthy);
    }
}
