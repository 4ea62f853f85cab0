//! Every prompt the soak sent and every reply it heard, by trace id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Where every reply of the soak's turns goes: `opencode.reply.soak.<trace>`
/// (a core prompt's `reply_to`, and a tenant job's default reply subject).
pub const REPLIES: &str = "opencode.reply.soak.>";

/// How a prompt was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Path {
    /// Core NATS, `reply_to` (at most once).
    Prompt,
    /// A durable job (at least once).
    Job,
    /// A core prompt of a burst (a conversation of its own).
    Burst,
}

/// One terminal reply as heard.
#[derive(Debug, Clone)]
pub struct Terminal {
    pub at: Instant,
    pub body: Value,
}

/// One prompt and what came back.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub trace: String,
    pub conversation: String,
    pub text: String,
    pub path: Path,
    pub sent: Instant,
    /// The publish was refused (a job the stream never acknowledged).
    pub refused: bool,
    pub first_reply: Option<Instant>,
    pub replies: usize,
    pub terminals: Vec<Terminal>,
}

#[derive(Clone, Default)]
pub struct Ledger {
    prompts: Arc<Mutex<HashMap<String, Prompt>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Ledger {
    pub fn new() -> Ledger {
        Ledger::default()
    }

    /// Hears every reply of the soak (until aborted).
    pub async fn listen(&self, client: &async_nats::Client) -> JoinHandle<()> {
        let mut sub = crate::support::nats::subscribe_ready(client, REPLIES).await;
        let ledger = self.clone();
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                let Ok(body) = serde_json::from_slice::<Value>(&m.payload) else {
                    continue;
                };
                ledger.heard(body);
            }
        })
    }

    fn heard(&self, body: Value) {
        let now = Instant::now();
        let Some(trace) = body.get("trace_id").and_then(Value::as_str) else {
            return;
        };
        let mut p = lock(&self.prompts);
        let Some(rec) = p.get_mut(trace) else {
            return;
        };
        rec.replies += 1;
        rec.first_reply.get_or_insert(now);
        if crate::support::nats::is_terminal(&body) {
            rec.terminals.push(Terminal { at: now, body });
        }
    }

    pub fn sent(&self, p: Prompt) {
        lock(&self.prompts).insert(p.trace.clone(), p);
    }

    pub fn refused(&self, trace: &str) {
        if let Some(p) = lock(&self.prompts).get_mut(trace) {
            p.refused = true;
        }
    }

    /// How many terminal replies `trace` has had.
    pub fn terminals(&self, trace: &str) -> usize {
        lock(&self.prompts)
            .get(trace)
            .map_or(0, |p| p.terminals.len())
    }

    pub fn all(&self) -> Vec<Prompt> {
        lock(&self.prompts).values().cloned().collect()
    }

    /// Prompts sent and not refused that have no terminal reply yet.
    pub fn open(&self) -> Vec<String> {
        lock(&self.prompts)
            .values()
            .filter(|p| !p.refused && p.terminals.is_empty())
            .map(|p| p.trace.clone())
            .collect()
    }
}
