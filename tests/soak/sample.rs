//! Every daemon's resources over time, every 10 s: RSS and open file
//! descriptors (from /proc), tokio tasks, the conversation map and turns in
//! flight (its metrics endpoint), and its OpenCode's sessions.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::stack::Stack;
use crate::Settings;

pub const EVERY: Duration = Duration::from_secs(10);

/// One daemon at one moment (`None`: not readable then, e.g. killed).
#[derive(Debug, Clone)]
pub struct Sample {
    pub t: f64,
    pub daemon: usize,
    pub pid: Option<u32>,
    /// Which start of the daemon this process is (1 = the first).
    pub start: u32,
    pub rss_kb: Option<u64>,
    pub fds: Option<u64>,
    pub tasks: Option<u64>,
    pub conversations: Option<u64>,
    pub in_flight: Option<u64>,
    pub sessions: usize,
}

pub struct Sampler {
    cancel: CancellationToken,
    task: JoinHandle<Vec<Sample>>,
}

impl Sampler {
    pub fn start(stack: Arc<Mutex<Stack>>, s: &Settings) -> Sampler {
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        let csv = s.out.join("samples.csv");
        let task = tokio::spawn(async move {
            let mut out = Vec::new();
            let mut file = String::from(
                "t_s,daemon,pid,start,rss_kb,fds,tasks,conversations,in_flight,opencode_sessions\n",
            );
            loop {
                for sample in take(&stack).await {
                    file.push_str(&row(&sample));
                    out.push(sample);
                }
                let _ = std::fs::write(&csv, &file);
                tokio::select! {
                    _ = c.cancelled() => return out,
                    _ = tokio::time::sleep(EVERY) => {}
                }
            }
        });
        Sampler { cancel, task }
    }

    pub async fn stop(self) -> Vec<Sample> {
        self.cancel.cancel();
        self.task.await.unwrap_or_default()
    }
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map(ToString::to_string).unwrap_or_default()
}

fn row(s: &Sample) -> String {
    format!(
        "{:.1},{},{},{},{},{},{},{},{},{}\n",
        s.t,
        s.daemon,
        opt(&s.pid),
        s.start,
        opt(&s.rss_kb),
        opt(&s.fds),
        opt(&s.tasks),
        opt(&s.conversations),
        opt(&s.in_flight),
        s.sessions
    )
}

async fn take(stack: &Mutex<Stack>) -> Vec<Sample> {
    let targets: Vec<(usize, Option<u32>, u32, u16, usize)> = {
        let s = stack.lock().await;
        s.daemons
            .iter()
            .map(|d| {
                (
                    d.index,
                    d.pid(),
                    d.starts,
                    d.metrics_port,
                    d.fake.session_count(),
                )
            })
            .collect()
    };
    let mut out = Vec::new();
    for (daemon, pid, start, port, sessions) in targets {
        let metrics = scrape(port).await.unwrap_or_default();
        let m = |name: &str| gauge(&metrics, name);
        out.push(Sample {
            t: crate::now_s(),
            daemon,
            pid,
            start,
            rss_kb: pid.and_then(rss_kb),
            fds: pid.and_then(fds),
            tasks: m("opencode_bridge_tokio_tasks_alive"),
            conversations: m("opencode_bridge_conversations_known"),
            in_flight: m("opencode_bridge_turns_in_flight"),
            sessions,
        });
    }
    out
}

fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn fds(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// `GET /metrics` on the daemon's listener (HTTP/1.0, read to the end).
async fn scrape(port: u16) -> Option<String> {
    let get = async {
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        conn.read_to_string(&mut body).await.ok()?;
        Some(body)
    };
    tokio::time::timeout(Duration::from_secs(3), get)
        .await
        .ok()
        .flatten()
}

/// The value of an unlabelled metric.
fn gauge(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))?
        .split_whitespace()
        .nth(1)?
        .parse::<f64>()
        .ok()
        .map(|v| v as u64)
}
