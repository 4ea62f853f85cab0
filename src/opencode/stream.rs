//! The one event-stream reader per OpenCode server, and its demultiplexer.
//!
//! One task reads `GET /event`, decodes it ([`super::sse`]), parses it
//! ([`super::events`]) and routes each event by session id into the bounded
//! channel of the turn that subscribed to that session. The reader never
//! waits for a turn: when a turn's channel is full the event is dropped and
//! the turn is flagged as lagged, so it reconciles over HTTP instead. The
//! same flag is raised on every route after a reconnect, because OpenCode's
//! stream has no resume and events in the gap are gone. The flag knows where
//! the gap is: the turn first takes the events routed to it before the loss
//! (they are whole and in order), and sees the flag only after them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::client::{error_chain, OpenCodeClient};
use super::events::{parse_event, Event};
use super::sse::{SseDecoder, SseItem};

/// The stream's state as turns see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamState {
    /// `server.connected` seen on the current connection.
    pub connected: bool,
    /// Counts connections; changes on every reconnect.
    pub epoch: u64,
    /// Not connected, and OpenCode has been unreachable for `[opencode]
    /// unavailable_after` while the reader's connects kept failing: it is
    /// gone, not blipping.
    pub unreachable: bool,
    /// Counts the exits of the embedded server behind the stream: a turn
    /// that sees it change lost its server and ends at once.
    pub exits: u64,
    /// The embedded server exited and is being started again: a new turn
    /// waits for it (`[opencode] startup_timeout`) instead of failing.
    pub restarting: bool,
}

/// Counters, for logs and metrics.
#[derive(Debug, Default)]
pub struct StreamStats {
    pub events: AtomicU64,
    pub bad_events: AtomicU64,
    pub reconnects: AtomicU64,
    pub dropped_for_lag: AtomicU64,
}

struct Route {
    tx: mpsc::Sender<Event>,
    lagged: Arc<Gap>,
}

/// Where a follower's channel lost events.
#[derive(Debug)]
struct Gap {
    /// Events put into the channel (only the reader task sends).
    sent: AtomicU64,
    /// `sent` when the first loss not yet taken happened; `NO_GAP`: none.
    at: AtomicU64,
}

const NO_GAP: u64 = u64::MAX;

impl Gap {
    fn new() -> Arc<Gap> {
        Arc::new(Gap {
            sent: AtomicU64::new(0),
            at: AtomicU64::new(NO_GAP),
        })
    }

    /// Events were lost after everything sent so far. An earlier loss not
    /// yet taken keeps its (earlier) position.
    fn mark(&self) {
        let sent = self.sent.load(Ordering::Acquire);
        let _ = self
            .at
            .compare_exchange(NO_GAP, sent, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// Routes events to turns. Shared by the reader task and every turn.
pub struct EventHub {
    routes: Mutex<HashMap<String, Route>>,
    state: watch::Sender<StreamState>,
    /// Wakes the reader from its reconnect backoff (the embedded server is
    /// back).
    kick: tokio::sync::Notify,
    buffer: usize,
    pub stats: StreamStats,
}

/// Already subscribed: two turns never follow one session at once.
#[derive(Debug, thiserror::Error)]
#[error("session {0} already has a turn following it")]
pub struct AlreadySubscribed(pub String);

impl EventHub {
    pub fn new(buffer: usize) -> Arc<Self> {
        let (state, _) = watch::channel(StreamState {
            connected: false,
            epoch: 0,
            unreachable: false,
            exits: 0,
            restarting: false,
        });
        Arc::new(EventHub {
            routes: Mutex::new(HashMap::new()),
            state,
            kick: tokio::sync::Notify::new(),
            buffer: buffer.max(1),
            stats: StreamStats::default(),
        })
    }

    /// Follows `session_id`'s events until the subscription is dropped.
    pub fn subscribe(
        self: &Arc<Self>,
        session_id: &str,
    ) -> Result<Subscription, AlreadySubscribed> {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        if routes.contains_key(session_id) {
            return Err(AlreadySubscribed(session_id.to_string()));
        }
        let (tx, rx) = mpsc::channel(self.buffer);
        let lagged = Gap::new();
        routes.insert(
            session_id.to_string(),
            Route {
                tx,
                lagged: lagged.clone(),
            },
        );
        Ok(Subscription {
            rx,
            lagged,
            received: 0,
            hub: self.clone(),
            session_id: session_id.to_string(),
            followed: Vec::new(),
        })
    }

    pub fn state(&self) -> watch::Receiver<StreamState> {
        self.state.subscribe()
    }

    /// Waits until the stream is connected (`server.connected` seen), at
    /// most `timeout`. Returns whether it is.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let mut rx = self.state.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|s| s.connected))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Routes one event. Never blocks.
    pub fn route(&self, event: Event) {
        self.stats.events.fetch_add(1, Ordering::Relaxed);
        let Some(sid) = event.session_id() else {
            return;
        };
        let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(route) = routes.get(sid) {
            if route.tx.try_send(event).is_ok() {
                route.lagged.sent.fetch_add(1, Ordering::AcqRel);
            } else {
                route.lagged.mark();
                self.stats.dropped_for_lag.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn set_connected(&self, connected: bool) {
        self.state.send_modify(|s| {
            if connected && !s.connected {
                s.epoch += 1;
            }
            s.connected = connected;
            if connected {
                s.unreachable = false;
                s.restarting = false;
            }
        });
    }

    /// The embedded server behind this stream exited (its supervisor knows
    /// at once): every turn on it ends now with `opencode_unavailable`,
    /// and new turns wait for the restart.
    pub fn server_exited(&self) {
        self.state.send_modify(|s| {
            s.exits += 1;
            s.connected = false;
            s.restarting = true;
        });
        self.flag_all_lagged();
    }

    /// The embedded server is healthy again: reconnect now, not after the
    /// backoff the failed connects built up.
    pub fn server_restarted(&self) {
        self.kick.notify_one();
    }

    /// The embedded server could not be started again: new turns stop
    /// waiting for it.
    pub fn server_gone(&self) {
        self.state.send_modify(|s| s.restarting = false);
    }

    /// After a failed connect: says when OpenCode has been unreachable for
    /// `unavailable_after` (turns end then), and how long to wait before
    /// the next connect, `backoff` shortened so that one comes right after
    /// the window ends (a turn learns it is gone without waiting a long
    /// backoff out).
    fn judge_reach(&self, client: &OpenCodeClient, backoff: Duration) -> Duration {
        let window = client.unavailable_after();
        let down_for = client.unreachable_for();
        let gone = down_for.is_some_and(|d| d >= window);
        if gone != self.state.borrow().unreachable {
            if gone {
                warn!(
                    ?window,
                    "OpenCode has been unreachable for unavailable_after; turns in flight fail"
                );
            }
            self.state.send_modify(|s| s.unreachable = gone);
        }
        match down_for {
            Some(d) if !gone => backoff.min(window - d + Duration::from_millis(10)),
            _ => backoff,
        }
    }

    /// Every follower may have missed events: flag them all.
    fn flag_all_lagged(&self) {
        let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        for r in routes.values() {
            r.lagged.mark();
        }
    }

    /// Reads the event stream until `cancel`, reconnecting with jittered,
    /// capped exponential backoff that resets after a good connection.
    pub async fn run(
        self: Arc<Self>,
        client: OpenCodeClient,
        opts: StreamOptions,
        cancel: CancellationToken,
    ) {
        let mut delay = opts.reconnect_min;
        let mut first = true;
        loop {
            if cancel.is_cancelled() {
                break;
            }
            let outcome = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                r = self.read_once(&client, &opts) => r,
            };
            self.set_connected(false);
            self.flag_all_lagged();
            match outcome {
                ReadOutcome::Good(reason) => {
                    delay = opts.reconnect_min;
                    warn!(reason = %reason, "OpenCode event stream ended; reconnecting");
                }
                ReadOutcome::Failed(reason) => {
                    if first {
                        info!(reason = %reason, "OpenCode event stream not available yet");
                    } else {
                        warn!(reason = %reason, retry_in = ?delay, "OpenCode event stream failed");
                    }
                }
            }
            first = false;
            self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
            let sleep = self.judge_reach(&client, jitter(delay));
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                _ = self.kick.notified() => delay = opts.reconnect_min,
                _ = tokio::time::sleep(sleep) => {}
            }
            delay = (delay * 2).min(opts.reconnect_max);
        }
        self.set_connected(false);
        debug!("event stream reader stopped");
    }

    async fn read_once(&self, client: &OpenCodeClient, opts: &StreamOptions) -> ReadOutcome {
        // A server that is starting can accept the connection and answer
        // nothing: bound the wait for the response headers too.
        let started = tokio::time::Instant::now();
        let resp = match tokio::time::timeout(opts.stall_timeout, client.open_events()).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return ReadOutcome::Failed(e.to_string()),
            Err(_) => {
                client.note_unreachable(started);
                return ReadOutcome::Failed(format!(
                    "no answer to GET /event within {:?}",
                    opts.stall_timeout
                ));
            }
        };
        let mut body = resp.bytes_stream();
        let mut decoder = SseDecoder::new(opts.max_event_bytes);
        let mut items = Vec::new();
        let mut saw_connected = false;
        loop {
            let chunk = match tokio::time::timeout(opts.stall_timeout, body.next()).await {
                Err(_) => {
                    let why = format!("no bytes for {:?} (stalled)", opts.stall_timeout);
                    return if saw_connected {
                        ReadOutcome::Good(why)
                    } else {
                        ReadOutcome::Failed(why)
                    };
                }
                Ok(None) => {
                    return if saw_connected {
                        ReadOutcome::Good("end of stream".into())
                    } else {
                        ReadOutcome::Failed("end of stream before server.connected".into())
                    }
                }
                Ok(Some(Err(e))) => {
                    let why = error_chain(&e);
                    return if saw_connected {
                        ReadOutcome::Good(why)
                    } else {
                        ReadOutcome::Failed(why)
                    };
                }
                Ok(Some(Ok(c))) => c,
            };
            decoder.feed(&chunk, &mut items);
            for item in items.drain(..) {
                match item {
                    SseItem::Event(ev) => match parse_event(&ev.data) {
                        Ok(Event::ServerConnected) => {
                            if !saw_connected {
                                saw_connected = true;
                                info!(url = client.base_url(), "OpenCode event stream connected");
                            }
                            self.set_connected(true);
                        }
                        Ok(event) => self.route(event),
                        Err(e) => {
                            self.stats.bad_events.fetch_add(1, Ordering::Relaxed);
                            warn!(error = %e, "skipping an OpenCode event");
                        }
                    },
                    SseItem::Error(e) => {
                        self.stats.bad_events.fetch_add(1, Ordering::Relaxed);
                        warn!(error = %e, "skipping an undecodable OpenCode event");
                        // The event is gone; whoever it was for may lag.
                        self.flag_all_lagged();
                    }
                }
            }
        }
    }
}

enum ReadOutcome {
    /// The connection had worked (backoff resets).
    Good(String),
    /// It never came up.
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct StreamOptions {
    pub max_event_bytes: usize,
    pub stall_timeout: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

impl StreamOptions {
    pub fn from(
        opencode: &crate::config::OpenCodeConfig,
        limits: &crate::config::LimitsConfig,
    ) -> Self {
        StreamOptions {
            max_event_bytes: limits.max_event_bytes,
            stall_timeout: opencode.stream_stall_timeout,
            reconnect_min: opencode.reconnect_min,
            reconnect_max: opencode.reconnect_max,
        }
    }
}

fn jitter(d: Duration) -> Duration {
    let f: f64 = rand::random_range(0.5..1.0);
    d.mul_f64(f)
}

/// One turn's view of the stream.
pub struct Subscription {
    rx: mpsc::Receiver<Event>,
    lagged: Arc<Gap>,
    /// Events taken from `rx`.
    received: u64,
    hub: Arc<EventHub>,
    session_id: String,
    /// Subagent sessions routed here too.
    followed: Vec<String>,
}

impl Subscription {
    pub async fn recv(&mut self) -> Option<Event> {
        let ev = self.rx.recv().await;
        self.received += u64::from(ev.is_some());
        ev
    }

    /// An event already queued, without waiting.
    pub fn try_recv(&mut self) -> Option<Event> {
        let ev = self.rx.try_recv().ok();
        self.received += u64::from(ev.is_some());
        ev
    }

    /// Whether events were lost just before the event last received (so
    /// reconcile before mapping it). Clears the flag when true.
    pub fn take_gap_before_last(&self) -> bool {
        self.take_gap_if(|at, received| at < received)
    }

    /// Whether events were lost anywhere up to now, including after the
    /// event last received (use it when nothing is queued, before the first
    /// event, or to clear the flag before a full reconciliation). Clears the
    /// flag when true.
    pub fn take_gap(&self) -> bool {
        self.take_gap_if(|at, received| at <= received)
    }

    fn take_gap_if(&self, cond: impl Fn(u64, u64) -> bool) -> bool {
        let at = self.lagged.at.load(Ordering::Acquire);
        if at == NO_GAP || !cond(at, self.received) {
            return false;
        }
        // Only a take clears it; a loss while it is set keeps the earlier
        // position, and the reconciliation that follows reads OpenCode
        // after both.
        self.lagged.at.store(NO_GAP, Ordering::Release);
        true
    }

    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    /// Also delivers `other_session`'s events here (a subagent session the
    /// turn started). Ignored if that session already has a follower.
    pub fn follow(&mut self, other_session: &str) {
        let mut routes = self.hub.routes.lock().unwrap_or_else(|p| p.into_inner());
        if routes.contains_key(other_session) {
            return;
        }
        let Some(tx) = routes.get(&self.session_id).map(|r| r.tx.clone()) else {
            return;
        };
        routes.insert(
            other_session.to_string(),
            Route {
                tx,
                lagged: self.lagged.clone(),
            },
        );
        self.followed.push(other_session.to_string());
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut routes = self.hub.routes.lock().unwrap_or_else(|p| p.into_inner());
        routes.remove(&self.session_id);
        for s in &self.followed {
            routes.remove(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::opencode::events::Event;

    #[tokio::test(start_paused = true)]
    async fn opencode_is_gone_only_after_unavailable_after_of_failures() {
        let s = Duration::from_secs;
        let cfg = crate::config::OpenCodeConfig {
            unavailable_after: s(5),
            ..Default::default()
        };
        let client = OpenCodeClient::new("http://127.0.0.1:9", None, None, &cfg).unwrap();
        let hub = EventHub::new(4);
        // Answering: the backoff as it is.
        assert_eq!(hub.judge_reach(&client, s(30)), s(30));
        client.note_unreachable(tokio::time::Instant::now());
        tokio::time::advance(s(2)).await;
        // Not gone yet; the next connect comes right after the window.
        assert_eq!(
            hub.judge_reach(&client, s(30)),
            s(3) + Duration::from_millis(10)
        );
        assert_eq!(hub.judge_reach(&client, s(1)), s(1));
        assert!(!hub.state().borrow().unreachable);
        tokio::time::advance(s(3)).await;
        assert_eq!(hub.judge_reach(&client, s(30)), s(30));
        assert!(hub.state().borrow().unreachable, "gone after 5 s");
        hub.set_connected(true);
        assert!(!hub.state().borrow().unreachable, "back");
    }

    fn idle(s: &str) -> Event {
        Event::SessionIdle {
            session_id: s.into(),
        }
    }

    #[tokio::test]
    async fn routes_by_session_and_flags_lag_instead_of_blocking() {
        let hub = EventHub::new(2);
        let mut a = hub.subscribe("ses_a").unwrap();
        let mut b = hub.subscribe("ses_b").unwrap();
        assert!(hub.subscribe("ses_a").is_err());
        hub.route(idle("ses_a"));
        hub.route(idle("ses_b"));
        hub.route(idle("ses_zzz"));
        assert_eq!(a.recv().await, Some(idle("ses_a")));
        assert_eq!(b.recv().await, Some(idle("ses_b")));
        // b is slow: a third event for it while two are queued is dropped
        // and flagged, and never blocks a.
        for _ in 0..3 {
            hub.route(idle("ses_b"));
        }
        hub.route(idle("ses_a"));
        assert_eq!(a.recv().await, Some(idle("ses_a")));
        assert!(!a.take_gap());
        // The gap is after the two queued events: they come first, whole.
        assert!(
            !b.take_gap(),
            "not before the events queued before the loss"
        );
        assert_eq!(b.try_recv(), Some(idle("ses_b")));
        assert!(!b.take_gap_before_last());
        assert!(!b.take_gap());
        assert_eq!(b.try_recv(), Some(idle("ses_b")));
        assert!(!b.take_gap_before_last(), "the loss is after this one");
        // The next event comes after the loss.
        hub.route(idle("ses_b"));
        assert_eq!(b.recv().await, Some(idle("ses_b")));
        assert!(b.take_gap_before_last(), "the loss, right before it");
        assert!(!b.take_gap(), "taken once");
        // A loss with nothing queued after it: seen by take_gap.
        for _ in 0..3 {
            hub.route(idle("ses_b"));
        }
        assert_eq!(b.try_recv(), Some(idle("ses_b")));
        assert_eq!(b.try_recv(), Some(idle("ses_b")));
        assert_eq!(b.try_recv(), None);
        assert!(!b.take_gap_before_last());
        assert!(b.take_gap());
        assert_eq!(hub.stats.dropped_for_lag.load(Ordering::Relaxed), 2);
        drop(a);
        assert!(hub.subscribe("ses_a").is_ok());
    }
}
