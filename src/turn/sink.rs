//! Where a turn's replies go: stamps trace id and `seq`, splits long text
//! under the payload limit, and guarantees that nothing follows the
//! terminal reply. It also counts the turn (`crate::metrics`: replies by
//! kind, time to first token, duration, outcome) and echoes the prompt's
//! W3C `traceparent`.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tracing::{debug, info, warn};

use crate::bus::{Publisher, TurnHeaders};
use crate::metrics::{Metrics, TurnObserver};
use crate::protocol::agent::{ack, Encoder};
use crate::protocol::redact;
use crate::protocol::reply::split_utf8;
use crate::protocol::traceparent::TraceParent;
use crate::protocol::turn_state::TurnState;
use crate::protocol::{ErrorCode, Reply, ReplyBody, StreamMode};

use super::states::TurnRecord;

/// Room left in a payload for the JSON envelope and headers around the text.
const ENVELOPE_ROOM: usize = 1024;
/// Room left in a payload for the headers of a reply.
const HEADER_ROOM: usize = 512;

pub struct ReplySink {
    publisher: Publisher,
    subject: String,
    trace_id: String,
    conversation: Option<String>,
    session_id: Option<String>,
    seq: u64,
    terminated: bool,
    /// Longest delta/reasoning text in one reply (its worst-case escaping
    /// fits the payload).
    max_content: usize,
    /// The largest reply body published (`limits.max_reply_bytes` and the
    /// server's `max_payload`, less room for the headers).
    max_body: usize,
    /// The turn's span (`traceparent` of every reply), when the prompt
    /// came with a trace context.
    traceparent: Option<String>,
    /// The subject and the headers every reply shares, built once.
    headers: TurnHeaders,
    observer: Option<TurnObserver>,
    /// How replies are encoded on the subject.
    wire: Wire,
    /// At what pace the caller wants text (`"stream"` in the prompt).
    stream: StreamMode,
    /// Text held back by `coalesce_ms`, and when text last went out.
    held: Option<Held>,
    last_text: Option<Instant>,
    /// The turn's state in KV and its large final's store
    /// (`turn::states`), once the dispatcher accepted it with JetStream.
    record: Option<TurnRecord>,
    /// A durable job's turn: its terminal reply decides the job's fate.
    job: Option<super::job::JobHook>,
    /// The tenant's share this turn holds (`[shares]`), given back when
    /// the sink is dropped after the terminal reply.
    share: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Why the turn was aborted, when the aborter said (the dispatcher:
    /// a newer prompt steered); the `aborted` reply carries it.
    abort_reason: AbortReason,
}

/// Why a turn is being aborted: a word for the `aborted` reply's `reason`
/// and a sentence for its message; set once by whoever aborts it.
pub type AbortReason = std::sync::Arc<std::sync::OnceLock<(&'static str, String)>>;

/// Text of one part held back for `coalesce_ms`.
struct Held {
    reasoning: bool,
    part_id: String,
    text: String,
}

impl Held {
    fn into_body(self) -> ReplyBody {
        let (content, part_id) = (self.text, self.part_id);
        if self.reasoning {
            ReplyBody::Reasoning { content, part_id }
        } else {
            ReplyBody::Delta { content, part_id }
        }
    }
}

/// The encoding of a turn's replies.
enum Wire {
    /// The bridge's own contract: one JSON reply per message, with headers.
    Bridge,
    /// The Synadia Agent Protocol reply stream ([`crate::protocol::agent`]).
    Agent(AgentStream),
}

/// An agent-protocol reply stream: its encoder, and the lock that keeps
/// the periodic `ack` from following the terminator.
struct AgentStream {
    encoder: Encoder,
    /// `true` once the terminator is out; held while publishing.
    ended: Arc<tokio::sync::Mutex<bool>>,
    /// Stops the `ack` keeper when the sink goes.
    _keeper: Option<tokio_util::sync::DropGuard>,
}

impl ReplySink {
    pub fn new(
        publisher: Publisher,
        subject: String,
        trace_id: String,
        conversation: Option<String>,
        max_reply_bytes: usize,
    ) -> Self {
        let limit = max_reply_bytes.min(publisher.max_payload().max(4096));
        // JSON escaping can grow text up to 6x (`\u0000`); keep the worst
        // case under the limit.
        let max_content = (limit.saturating_sub(ENVELOPE_ROOM) / 6).max(64);
        let max_body = limit.saturating_sub(HEADER_ROOM);
        let headers = TurnHeaders::new(&subject, &trace_id, None);
        ReplySink {
            headers,
            publisher,
            subject,
            trace_id,
            conversation,
            session_id: None,
            seq: 0,
            terminated: false,
            max_content,
            max_body,
            traceparent: None,
            observer: None,
            wire: Wire::Bridge,
            stream: StreamMode::Full,
            held: None,
            last_text: None,
            abort_reason: AbortReason::default(),
            record: None,
            job: None,
            share: None,
        }
    }

    /// Keeps this turn's state from now on: `state` now, the terminal
    /// reply when it goes out.
    pub fn record(&mut self, record: TurnRecord, state: TurnState) {
        record.set(state);
        self.record = Some(record);
    }

    /// The turn's state changed (queued -> running).
    pub fn record_state(&self, state: TurnState) {
        if let Some(r) = &self.record {
            r.set(state);
        }
    }

    /// Makes this the sink of a durable job's turn (`crate::jobs`): its
    /// terminal reply goes through `hook` first.
    pub fn job(mut self, hook: super::job::JobHook) -> Self {
        self.job = Some(hook);
        self
    }

    /// Encodes this turn's replies as a Synadia Agent Protocol reply stream
    /// on the subject; [`ack`](Self::ack) must come first.
    pub fn agent_protocol(mut self) -> Self {
        self.wire = Wire::Agent(AgentStream {
            encoder: Encoder::default(),
            ended: Arc::new(tokio::sync::Mutex::new(false)),
            _keeper: None,
        });
        self
    }

    /// Agent protocol: publishes the first `ack` now and another every
    /// `every` until the terminator (none on the bridge's own wire).
    pub async fn ack(&mut self, every: Duration) {
        let Wire::Agent(stream) = &mut self.wire else {
            return;
        };
        if let Err(e) = self.publisher.publish_chunk(&self.subject, &ack()).await {
            warn!(trace_id = %self.trace_id, error = %e, "publishing the agent ack failed");
        }
        let stop = tokio_util::sync::CancellationToken::new();
        let (publisher, subject, ended) = (
            self.publisher.clone(),
            self.subject.clone(),
            stream.ended.clone(),
        );
        let stopped = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stopped.cancelled() => break,
                    _ = tokio::time::sleep(every) => {}
                }
                let ended = ended.lock().await;
                if *ended {
                    break;
                }
                let _ = publisher.publish_chunk(&subject, &ack()).await;
            }
        });
        stream._keeper = Some(stop.drop_guard());
    }

    /// Makes the turn a child span of the prompt's `traceparent` (if it is
    /// valid): every reply carries the same trace id with the turn's own
    /// span id.
    pub fn traced(mut self, parent: Option<&str>) -> Self {
        if let Some(parent) = parent.and_then(TraceParent::parse) {
            let turn = parent.child();
            info!(
                trace_id = %self.trace_id,
                traceparent = %parent,
                otel_trace_id = parent.trace_id(),
                span_id = turn.span_id(),
                "prompt carries a trace context"
            );
            let turn = turn.to_string();
            self.headers = TurnHeaders::new(&self.subject, &self.trace_id, Some(&turn));
            self.traceparent = Some(turn);
        }
        self
    }

    /// Counts this turn in `metrics` from now to its terminal reply.
    /// The caller's pace (`"stream"`): every delta, merged text at most
    /// every N ms, or the terminal reply only.
    pub fn streaming(mut self, stream: StreamMode) -> Self {
        self.stream = stream;
        self
    }

    /// Holds `share` until the turn ends (`turn::shares`).
    pub fn holding(mut self, share: Option<tokio::sync::OwnedSemaphorePermit>) -> Self {
        self.share = share;
        self
    }

    pub fn observed(mut self, metrics: &Arc<Metrics>) -> Self {
        self.observer = Some(TurnObserver::new(metrics.clone()));
        self
    }

    /// The `traceparent` header of this turn's replies.
    pub fn traceparent(&self) -> Option<&str> {
        self.traceparent.as_deref()
    }

    pub fn set_session(&mut self, session_id: &str) {
        self.session_id = Some(session_id.to_string());
    }

    /// The OpenCode session this turn drives, once known.
    pub fn session_id(&self) -> Option<&str> {
        self.session_id.as_deref()
    }

    pub fn subject(&self) -> &str {
        &self.subject
    }

    pub fn trace_id(&self) -> &str {
        &self.trace_id
    }

    pub fn is_terminated(&self) -> bool {
        self.terminated
    }

    /// Replies published so far.
    pub fn count(&self) -> u64 {
        self.seq
    }

    /// Publishes one reply (several, if its text must be split).
    /// Where an aborter says why (see [`AbortReason`]).
    pub fn abort_reason(&self) -> AbortReason {
        self.abort_reason.clone()
    }

    pub async fn send(&mut self, body: ReplyBody) {
        let body = match (body, self.abort_reason.get()) {
            (
                ReplyBody::Error {
                    error,
                    code: ErrorCode::Aborted,
                    retryable,
                    reason: None,
                },
                Some((word, why)),
            ) => ReplyBody::Error {
                error: format!("{why} ({error})"),
                code: ErrorCode::Aborted,
                retryable,
                reason: Some(word.to_string()),
            },
            (body, _) => body,
        };
        if self.terminated {
            warn!(trace_id = %self.trace_id, kind = body.kind(), "reply after the terminal reply suppressed");
            return;
        }
        let body = public(body, &self.trace_id);
        let body = match &mut self.job {
            Some(job) if body.is_terminal() => match job.gate(body) {
                super::job::Gate::Publish(b) => b,
                super::job::Gate::Hold(b) => {
                    info!(trace_id = %self.trace_id, "the job's turn did not run to its end: no reply, the job comes back");
                    if let Some(o) = &mut self.observer {
                        o.on_reply(&b);
                    }
                    self.held = None;
                    self.terminated = true;
                    return;
                }
            },
            _ => body,
        };
        let text = matches!(body, ReplyBody::Delta { .. } | ReplyBody::Reasoning { .. });
        match self.stream {
            StreamMode::Full => self.send_now(body).await,
            StreamMode::Final => {
                let progress_only = text
                    || matches!(
                        body,
                        ReplyBody::ToolCall { .. } | ReplyBody::ToolResult { .. }
                    );
                if !progress_only {
                    self.send_now(body).await;
                }
            }
            StreamMode::Coalesce { .. } if !text => {
                // Held text goes first: the order of a turn's replies stays.
                self.flush_held().await;
                self.send_now(body).await;
            }
            StreamMode::Coalesce { ms } => self.coalesce(body, ms).await,
        }
    }

    /// Holds text of one part and sends it at most every `ms` ms (the
    /// first at once): a deterministic merge, whatever the event rate.
    async fn coalesce(&mut self, body: ReplyBody, ms: u64) {
        let (reasoning, content, part_id) = match body {
            ReplyBody::Delta { content, part_id } => (false, content, part_id),
            ReplyBody::Reasoning { content, part_id } => (true, content, part_id),
            other => return self.send_now(other).await,
        };
        match &mut self.held {
            Some(h) if h.reasoning == reasoning && h.part_id == part_id => {
                h.text.push_str(&content)
            }
            _ => {
                self.flush_held().await;
                self.held = Some(Held {
                    reasoning,
                    part_id,
                    text: content,
                });
            }
        }
        let due = self
            .last_text
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(ms));
        if due {
            self.flush_held().await;
        }
    }

    async fn flush_held(&mut self) {
        if let Some(h) = self.held.take() {
            self.last_text = Some(Instant::now());
            self.send_now(h.into_body()).await;
        }
    }

    /// Publishes one reply now (several, if its text must be split).
    async fn send_now(&mut self, body: ReplyBody) {
        let body = self.noted(body);
        match &body {
            ReplyBody::Delta { content, part_id } | ReplyBody::Reasoning { content, part_id }
                if content.len() > self.max_content =>
            {
                let is_delta = matches!(body, ReplyBody::Delta { .. });
                for piece in split_utf8(content, self.max_content) {
                    let piece = piece.to_string();
                    let b = if is_delta {
                        ReplyBody::Delta {
                            content: piece,
                            part_id: part_id.clone(),
                        }
                    } else {
                        ReplyBody::Reasoning {
                            content: piece,
                            part_id: part_id.clone(),
                        }
                    };
                    self.publish(&b).await;
                }
            }
            ReplyBody::Final(fin) if self.encoded_len(&body) > self.max_body => {
                let fin = self.store_whole(fin).await;
                let fin = self.cut_final(&fin);
                self.publish(&ReplyBody::Final(fin)).await
            }
            _ => self.publish(&body).await,
        }
    }

    /// A final whose owner's turn states share is full says so: its state
    /// will not be kept, and what to do.
    fn noted(&self, body: ReplyBody) -> ReplyBody {
        match (body, &self.record) {
            (ReplyBody::Final(mut fin), Some(r)) if r.states_full() => {
                fin.notes.push("this turn's state is not kept: this tenant's share of the turn states is full ([shares] turn_states_bytes), so opencode.turn.status may not know it; older states expire after [cluster] turn_ttl".to_string());
                ReplyBody::Final(fin)
            }
            (body, _) => body,
        }
    }

    /// The size of `body` as it would go out now (its real JSON encoding).
    fn encoded_len(&self, body: &ReplyBody) -> usize {
        self.wire_json(body).len()
    }

    /// A final too long for NATS: its whole text in the object store, when
    /// the turn has one (named in `content_object`).
    async fn store_whole(
        &self,
        fin: &crate::protocol::reply::FinalReply,
    ) -> crate::protocol::reply::FinalReply {
        let mut fin = fin.clone();
        if let Some(r) = &self.record {
            match r.store_final(&fin.content).await {
                Ok(object) => fin.content_object = Some(Box::new(object)),
                Err(e) => {
                    warn!(trace_id = %self.trace_id, error = %e, "storing the whole final failed");
                    fin.notes.push(final_not_stored(&e));
                }
            }
        }
        fin
    }

    /// A final whose encoding exceeds what NATS carries keeps the longest
    /// prefix of its content that fits, says so, and `content_truncated`
    /// (the deltas carry the whole text). Every content byte is at least
    /// one encoded byte, so cutting the excess converges in a few rounds.
    fn cut_final(
        &self,
        fin: &crate::protocol::reply::FinalReply,
    ) -> Box<crate::protocol::reply::FinalReply> {
        let mut fin = Box::new(fin.clone());
        let total = fin.content.len();
        fin.content_truncated = true;
        let whole_in = match &fin.content_object {
            Some(o) => format!("content_object (bucket {}, name {})", o.bucket, o.name),
            None => "the deltas".to_string(),
        };
        fin.notes.push(format!(
            "final.content cut to fit the payload limit ({} bytes); the {total} bytes are whole in {whole_in}",
            self.max_body
        ));
        loop {
            let size = self.encoded_len(&ReplyBody::Final(fin.clone()));
            if size <= self.max_body || fin.content.is_empty() {
                return fin;
            }
            let keep = fin.content.len().saturating_sub(size - self.max_body);
            let cut = crate::protocol::reply::floor_char_boundary(&fin.content, keep);
            fin.content.truncate(cut);
        }
    }

    /// `body` as the next reply's JSON (a terminal reply is stored so, also
    /// on the agent protocol's wire).
    fn wire_json(&self, body: &ReplyBody) -> Vec<u8> {
        Reply {
            trace_id: &self.trace_id,
            seq: self.seq,
            conversation: self.conversation.as_deref(),
            session_id: self.session_id.as_deref(),
            body,
        }
        .to_json()
    }

    pub async fn send_all(&mut self, bodies: &mut Vec<ReplyBody>) {
        for b in bodies.drain(..) {
            self.send(b).await;
        }
    }

    async fn publish(&mut self, body: &ReplyBody) {
        if let Wire::Agent(stream) = &mut self.wire {
            publish_agent(&self.publisher, &self.subject, &self.trace_id, stream, body).await;
            return self.published(body);
        }
        let reply = Reply {
            trace_id: &self.trace_id,
            seq: self.seq,
            conversation: self.conversation.as_deref(),
            session_id: self.session_id.as_deref(),
            body,
        };
        if let Err(e) = self.publisher.publish_turn(&self.headers, &reply).await {
            warn!(trace_id = %self.trace_id, seq = self.seq, error = %e, "publishing a reply failed");
            if body.is_terminal()
                && !matches!(
                    body,
                    ReplyBody::Error {
                        code: ErrorCode::Internal,
                        ..
                    }
                )
            {
                // The turn must still end: a small error in its place, same seq.
                let fallback = ReplyBody::error(
                    ErrorCode::Internal,
                    format!("the {} reply could not be published: {e}", body.kind()),
                );
                return Box::pin(self.publish(&fallback)).await;
            }
        } else {
            debug!(trace_id = %self.trace_id, seq = self.seq, kind = body.kind(), "reply published");
        }
        self.published(body);
    }

    /// Counts a reply that went out. After the fallback above: the metrics
    /// count the reply that stands (and the turn's real outcome).
    fn published(&mut self, body: &ReplyBody) {
        if let Some(o) = &mut self.observer {
            o.on_reply(body);
        }
        if body.is_terminal() {
            if let Some(r) = &self.record {
                r.done(&self.wire_json(body));
            }
        }
        self.seq += 1;
        if body.is_terminal() {
            self.terminated = true;
            if let Some(job) = &mut self.job {
                job.published(body);
            }
        }
    }
}

/// One reply as agent-protocol chunks; after the terminal one, the
/// terminator (under the lock, so no `ack` follows it).
async fn publish_agent(
    publisher: &Publisher,
    subject: &str,
    trace_id: &str,
    stream: &mut AgentStream,
    body: &ReplyBody,
) {
    let mut ended = stream.ended.lock().await;
    if *ended {
        return;
    }
    for chunk in stream.encoder.encode(body) {
        if let Err(e) = publisher.publish_chunk(subject, &chunk).await {
            warn!(%trace_id, kind = body.kind(), error = %e, "publishing an agent chunk failed");
        }
    }
    if body.is_terminal() {
        if let Err(e) = publisher.publish_terminator(subject).await {
            warn!(%trace_id, error = %e, "publishing the agent terminator failed");
        }
        *ended = true;
    }
    debug!(%trace_id, kind = body.kind(), "agent reply published");
}

/// An `error` body as a caller may see it ([`redact::public_error`]): the
/// original goes to the log when anything was taken out.
fn public(body: ReplyBody, trace_id: &str) -> ReplyBody {
    match body {
        ReplyBody::Error {
            error,
            code,
            retryable,
            reason,
        } => {
            let public = redact::public_error(&error);
            if public != error {
                warn!(%trace_id, code = code.as_str(), detail = %error, "an error reply was stripped of detail (stack trace, URL, host or path); the detail is here");
            }
            ReplyBody::Error {
                error: public,
                code,
                retryable,
                reason,
            }
        }
        other => other,
    }
}

/// The note of a final whose whole text could not be stored: a full share
/// says what to do; anything else says where the detail is (the log).
fn final_not_stored(error: &str) -> String {
    if super::states::is_out_of_room(error) {
        "the whole final was not kept: this tenant's share of the large-finals store is full ([shares] finals_bytes); older finals expire after [cluster] turn_ttl. The deltas carried the whole text.".to_string()
    } else {
        "the whole final could not be stored (the daemon's log says why); the deltas carried the whole text".to_string()
    }
}
