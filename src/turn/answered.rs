//! The jobs this daemon answered (their terminal reply published), by
//! stream and sequence, the last [`CAPACITY`] of them. JetStream can
//! deliver a job again although its acknowledgement was confirmed: the
//! soak (docs/RELIABILITY.md) saw it when the daemon's nats-server had
//! just restarted and took the ack before it caught up with the cluster.
//! A redelivery of a job found here is acknowledged again and not
//! answered twice.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

/// Jobs remembered; older ones are forgotten first.
pub const CAPACITY: usize = 4096;

/// A bounded set of (stream, sequence).
#[derive(Default)]
pub struct Answered {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    order: VecDeque<(String, u64)>,
    set: HashSet<(String, u64)>,
}

impl Answered {
    /// Remembers that the job `sequence` of `stream` was answered.
    pub fn insert(&self, stream: &str, sequence: u64) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let key = (stream.to_string(), sequence);
        if !g.set.insert(key.clone()) {
            return;
        }
        g.order.push_back(key);
        if g.order.len() > CAPACITY {
            if let Some(old) = g.order.pop_front() {
                g.set.remove(&old);
            }
        }
    }

    /// Whether that job was answered here.
    pub fn contains(&self, stream: &str, sequence: u64) -> bool {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.set.contains(&(stream.to_string(), sequence))
    }

    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .order
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_is_remembered_until_capacity_newer_ones_push_it_out() {
        let a = Answered::default();
        a.insert("JOBS", 1);
        a.insert("JOBS", 1);
        assert!(a.contains("JOBS", 1));
        assert!(!a.contains("JOBS", 2));
        assert!(!a.contains("OTHER", 1));
        for s in 2..=CAPACITY as u64 {
            a.insert("JOBS", s);
        }
        assert_eq!(a.len(), CAPACITY);
        assert!(a.contains("JOBS", 1), "still within capacity");
        a.insert("JOBS", CAPACITY as u64 + 1);
        assert_eq!(a.len(), CAPACITY);
        assert!(!a.contains("JOBS", 1), "the oldest is forgotten");
        assert!(a.contains("JOBS", CAPACITY as u64 + 1));
    }
}
