//! A turn's deadlines as one value: the whole turn, the first event and the
//! gap between meaningful events (one idle deadline: the first event's
//! until something meaningful arrives, then the gap's), and an optional
//! recheck of the message list. While a caller is asked a permission or a
//! question the turn and idle deadlines are suspended; when the answer
//! comes, the whole-turn deadline moves by the time spent waiting.
//!
//! Plain arithmetic over `tokio::time::Instant`, so tests run on paused
//! time.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::TurnConfig;

/// Which deadline is next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deadline {
    FirstEvent,
    Idle,
    Turn,
    Recheck,
}

/// Far enough to mean "not armed".
const FAR: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, Clone)]
pub struct Deadlines {
    turn: Instant,
    idle: Instant,
    recheck: Option<Instant>,
    got_first: bool,
    idle_timeout: Duration,
}

impl Deadlines {
    /// `started`: when the turn began (the whole-turn deadline counts from
    /// there); `prompted`: when OpenCode accepted the prompt (the first
    /// event is awaited from there).
    pub fn new(started: Instant, prompted: Instant, cfg: &TurnConfig) -> Self {
        Deadlines {
            turn: started + cfg.turn_timeout,
            idle: prompted + cfg.first_event_timeout,
            recheck: None,
            got_first: false,
            idle_timeout: cfg.idle_timeout,
        }
    }

    /// Something of the turn arrived that does not re-arm the idle
    /// deadline (an error report): the first event is no longer awaited.
    pub fn started(&mut self) {
        self.got_first = true;
    }

    /// A meaningful event: the idle deadline starts again from `now`.
    pub fn progress(&mut self, now: Instant) {
        self.got_first = true;
        self.idle = now + self.idle_timeout;
    }

    /// A caller who was asked since `waited_since` answered (or time ran
    /// out): the whole-turn deadline moves by the wait, the idle deadline
    /// starts again.
    pub fn resume(&mut self, waited_since: Instant, now: Instant) {
        self.turn += now.saturating_duration_since(waited_since);
        self.idle = now + self.idle_timeout;
    }

    /// Look at the message list again at `now + delay`.
    pub fn recheck_in(&mut self, now: Instant, delay: Duration) {
        self.recheck = Some(now + delay);
    }

    pub fn clear_recheck(&mut self) {
        self.recheck = None;
    }

    pub fn recheck_pending(&self) -> bool {
        self.recheck.is_some()
    }

    /// The next deadline, and which it is. `waiting`: a caller is being
    /// asked (the turn and idle deadlines are suspended; a recheck is not).
    pub fn next(&self, now: Instant, waiting: bool) -> (Instant, Deadline) {
        let far = now + FAR;
        let (turn, idle) = if waiting {
            (far, far)
        } else {
            (self.turn, self.idle)
        };
        let mut best = (turn, Deadline::Turn);
        if idle < best.0 {
            let which = if self.got_first {
                Deadline::Idle
            } else {
                Deadline::FirstEvent
            };
            best = (idle, which);
        }
        if let Some(r) = self.recheck {
            if r < best.0 {
                best = (r, Deadline::Recheck);
            }
        }
        best
    }
}

impl Deadline {
    /// The config key and its value, for the `timeout` error.
    pub fn describe(self, cfg: &TurnConfig) -> (&'static str, Duration) {
        match self {
            Deadline::FirstEvent => ("first_event_timeout", cfg.first_event_timeout),
            Deadline::Idle => ("idle_timeout", cfg.idle_timeout),
            Deadline::Turn | Deadline::Recheck => ("turn_timeout", cfg.turn_timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> TurnConfig {
        TurnConfig {
            first_event_timeout: Duration::from_secs(120),
            idle_timeout: Duration::from_secs(600),
            turn_timeout: Duration::from_secs(1800),
            ..TurnConfig::default()
        }
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    /// Sleeps (on paused time) until the next deadline and says which.
    async fn fires(d: &Deadlines, waiting: bool) -> (Deadline, Duration) {
        let t0 = Instant::now();
        let (at, which) = d.next(t0, waiting);
        tokio::time::sleep_until(at).await;
        (which, t0.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_event_deadline_then_the_idle_one() {
        let c = cfg();
        let t0 = Instant::now();
        let mut d = Deadlines::new(t0, t0 + S(2), &c);
        // Prompt accepted 2 s after the start: the first event is awaited
        // 120 s from then.
        assert_eq!(fires(&d, false).await, (Deadline::FirstEvent, S(122)));
        // A meaningful event re-arms a 600 s idle deadline from now.
        let now = Instant::now();
        d.progress(now);
        assert_eq!(d.next(now, false), (now + S(600), Deadline::Idle));
        // An error report marks the start without re-arming.
        let mut e = Deadlines::new(t0, t0, &c);
        e.started();
        assert_eq!(e.next(t0, false), (t0 + S(120), Deadline::Idle));
    }

    #[tokio::test(start_paused = true)]
    async fn the_whole_turn_deadline_wins_when_it_comes_first() {
        let c = TurnConfig {
            turn_timeout: S(100),
            ..cfg()
        };
        let t0 = Instant::now();
        let mut d = Deadlines::new(t0, t0, &c);
        d.progress(t0);
        assert_eq!(fires(&d, false).await, (Deadline::Turn, S(100)));
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_a_caller_suspends_and_then_moves_the_turn_deadline() {
        let c = cfg();
        let t0 = Instant::now();
        let mut d = Deadlines::new(t0, t0, &c);
        d.progress(t0);
        // While asking, neither the idle nor the turn deadline is due.
        let (at, _) = d.next(t0, true);
        assert!(at > t0 + S(100_000));
        // A recheck still is.
        d.recheck_in(t0, Duration::from_millis(200));
        assert_eq!(fires(&d, true).await.0, Deadline::Recheck);
        d.clear_recheck();
        assert!(!d.recheck_pending());
        // The caller answers after 1000 s: the turn deadline moves by 1000 s,
        // the idle one starts again.
        tokio::time::advance(S(1000)).await;
        let now = Instant::now();
        d.resume(t0, now);
        assert_eq!(d.next(now, false), (now + S(600), Deadline::Idle));
        // Once the idle deadline is pushed past it, the moved turn deadline
        // is next: the wait (the recheck's 200 ms and 1000 s) added.
        d.progress(now + S(1300));
        let waited = now - t0;
        assert_eq!(waited, S(1000) + Duration::from_millis(200));
        assert_eq!(d.next(now, false), (t0 + S(1800) + waited, Deadline::Turn));
    }

    #[test]
    fn each_deadline_names_its_key() {
        let c = cfg();
        assert_eq!(Deadline::Idle.describe(&c), ("idle_timeout", S(600)));
        assert_eq!(Deadline::FirstEvent.describe(&c).0, "first_event_timeout");
        assert_eq!(Deadline::Turn.describe(&c).0, "turn_timeout");
    }
}
