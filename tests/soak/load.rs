//! The load: conversations that each send a prompt, wait for its terminal
//! reply (or give up at a deadline), pause and send the next; some by core
//! NATS, some as durable jobs; bursts of extra prompts on demand.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::ledger::{Ledger, Path, Prompt};
use crate::Settings;

/// A core prompt with no terminal reply this long is given up (its turn
/// timeout is 60 s); a job is given longer (redelivery after `ack_wait`,
/// retries while OpenCode is down).
pub const PROMPT_DEADLINE: Duration = Duration::from_secs(75);
pub const JOB_DEADLINE: Duration = Duration::from_secs(240);

const WORDS: &[&str] = &[
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
];

#[derive(Clone)]
pub struct Load {
    s: Arc<Settings>,
    client: async_nats::Client,
    ledger: Ledger,
    bursts: Arc<AtomicU64>,
}

/// What `opencode.turn.status` said about a prompt heard of no terminal.
pub type Statuses = HashMap<String, Value>;

impl Load {
    pub fn new(s: Arc<Settings>, client: async_nats::Client, ledger: Ledger) -> Load {
        Load {
            s,
            client,
            ledger,
            bursts: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Runs every conversation for `run_for`.
    pub async fn run(&self, run_for: Duration) {
        let end = Instant::now() + run_for;
        let jobs = (self.s.conversations as f64 * self.s.jobs_share).round() as usize;
        let mut tasks = Vec::new();
        for c in 0..self.s.conversations {
            let path = if c < jobs { Path::Job } else { Path::Prompt };
            let me = self.clone();
            tasks.push(tokio::spawn(
                async move { me.conversation(c, path, end).await },
            ));
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    async fn conversation(&self, c: usize, path: Path, end: Instant) {
        let mut rng = StdRng::seed_from_u64(self.s.seed ^ ((c as u64 + 1) << 32));
        let mut k = 0u64;
        // Spread the starts over the first pause.
        let first = rng.random_range(0..self.s.think.as_millis().max(1) as u64);
        tokio::time::sleep(Duration::from_millis(first)).await;
        while Instant::now() < end {
            let word = WORDS[rng.random_range(0..WORDS.len())];
            let trace = format!("s{}-c{c}-{k}", self.s.seed);
            let text = format!("c{c} n{k} {word}");
            self.send(&trace, &format!("c{c}"), &text, path).await;
            let deadline = match path {
                Path::Job => JOB_DEADLINE,
                _ => PROMPT_DEADLINE,
            };
            self.wait_terminal(&trace, deadline).await;
            k += 1;
            let mean = self.s.think.as_secs_f64();
            let pause = -mean * (1.0 - rng.random::<f64>()).ln();
            tokio::time::sleep(Duration::from_secs_f64(pause.min(mean * 5.0))).await;
        }
    }

    async fn wait_terminal(&self, trace: &str, deadline: Duration) {
        let until = Instant::now() + deadline;
        while self.ledger.terminals(trace) == 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Publishes one prompt (a job: with a message id, retried until the
    /// stream acknowledges it or a minute passes) and records it.
    async fn send(&self, trace: &str, conversation: &str, text: &str, path: Path) {
        self.ledger.sent(Prompt {
            trace: trace.to_string(),
            conversation: format!("soak.{conversation}"),
            text: text.to_string(),
            path,
            sent: Instant::now(),
            refused: false,
            first_reply: None,
            replies: 0,
            terminals: Vec::new(),
        });
        if path == Path::Job {
            let payload = json!({"text": text, "trace_id": trace}).to_string();
            if !self
                .publish_job(&format!("opencode.job.soak.{conversation}"), trace, payload)
                .await
            {
                self.ledger.refused(trace);
            }
            return;
        }
        let payload = json!({
            "text": text,
            "trace_id": trace,
            "reply_to": format!("opencode.reply.soak.{trace}"),
        });
        let subject = format!("opencode.prompt.soak.{conversation}");
        if self
            .client
            .publish(subject, Bytes::from(payload.to_string()))
            .await
            .is_err()
        {
            self.ledger.refused(trace);
        }
    }

    async fn publish_job(&self, subject: &str, trace: &str, payload: String) -> bool {
        let js = async_nats::jetstream::new(self.client.clone());
        let until = Instant::now() + Duration::from_secs(60);
        while Instant::now() < until {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", trace);
            let ack = js
                .publish_with_headers(subject.to_string(), headers, Bytes::from(payload.clone()))
                .await;
            if let Ok(ack) = ack {
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(5), ack).await {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        false
    }

    /// A burst's `i`-th prompt: a core prompt on the conversation `b<i>`
    /// (the same few conversations in every burst: the map stays bounded).
    pub async fn burst(&self, i: usize) {
        let b = self.bursts.fetch_add(1, Ordering::Relaxed);
        {
            let trace = format!("s{}-b{b}", self.s.seed);
            let conversation = format!("b{i}");
            self.send(
                &trace,
                &conversation,
                &format!("burst {b} {i}"),
                Path::Burst,
            )
            .await;
        }
    }

    /// The prompts a burst of ten times the usual rate sends: ten times
    /// what the conversations send in the burst's `seconds`.
    pub fn burst_size(&self, seconds: f64) -> usize {
        let per_second = self.s.conversations as f64 / (self.s.think.as_secs_f64() + 0.3);
        (10.0 * per_second * seconds).ceil() as usize
    }

    /// Waits until every prompt has its terminal reply or is past its
    /// deadline.
    pub async fn settle(&self) {
        loop {
            let now = Instant::now();
            let waiting = self
                .ledger
                .all()
                .into_iter()
                .filter(|p| !p.refused && p.terminals.is_empty())
                .any(|p| {
                    let d = if p.path == Path::Job {
                        JOB_DEADLINE
                    } else {
                        PROMPT_DEADLINE
                    };
                    now < p.sent + d
                });
            if !waiting {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// `opencode.turn.status.soak` of every prompt heard of no terminal.
    pub async fn fetch_missing(&self, client: &async_nats::Client) -> Statuses {
        let mut out = HashMap::new();
        for trace in self.ledger.open() {
            let body = json!({"trace_id": trace}).to_string();
            let got = tokio::time::timeout(
                Duration::from_secs(5),
                client.request("opencode.turn.status.soak", Bytes::from(body)),
            )
            .await;
            if let Ok(Ok(m)) = got {
                if let Ok(v) = serde_json::from_slice::<Value>(&m.payload) {
                    out.insert(trace, v);
                }
            }
        }
        out
    }
}
