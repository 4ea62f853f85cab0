//! The conversation map: conversation key -> OpenCode session.
//!
//! Sessions are created with the title `<title_prefix><conversation>`, so the
//! map can be rebuilt from `GET /session` after a daemon restart. The map is
//! behind [`SessionStore`] so a shared store (a NATS KV bucket) can replace
//! the in-memory one when several daemons serve one OpenCode server.

use std::collections::HashMap;
use std::sync::Mutex;

use futures::future::BoxFuture;
use futures::FutureExt;

use crate::opencode::{OpenCodeClient, OpenCodeError};

/// Stores conversation -> session id.
pub trait SessionStore: Send + Sync {
    fn get<'a>(&'a self, conversation: &'a str) -> BoxFuture<'a, Option<String>>;
    fn put<'a>(&'a self, conversation: &'a str, session_id: &'a str) -> BoxFuture<'a, ()>;
    fn remove<'a>(&'a self, conversation: &'a str) -> BoxFuture<'a, ()>;
    /// How many conversations the store knows, when it can say cheaply
    /// (`status` shows it).
    fn known(&self) -> Option<usize> {
        None
    }
}

/// The in-memory store (rebuilt from session titles at start), bounded:
/// beyond `capacity` conversations the least recently used is forgotten.
/// It is a cache over OpenCode's session titles, so forgetting loses no
/// session, only the shortcut to it.
pub struct MemoryStore {
    map: Mutex<Lru>,
}

#[derive(Default)]
struct Lru {
    /// conversation -> (session id, last use).
    entries: HashMap<String, (String, u64)>,
    tick: u64,
    capacity: usize,
}

impl Lru {
    fn touch(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    fn insert(&mut self, conversation: &str, session_id: &str) {
        let t = self.touch();
        self.entries
            .insert(conversation.to_string(), (session_id.to_string(), t));
        if self.entries.len() > self.capacity {
            // O(n), only when full: n is bounded by the capacity.
            if let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
            {
                self.entries.remove(&oldest);
            }
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::with_capacity(usize::MAX)
    }
}

impl MemoryStore {
    pub fn with_capacity(capacity: usize) -> Self {
        MemoryStore {
            map: Mutex::new(Lru {
                capacity: capacity.max(1),
                ..Lru::default()
            }),
        }
    }

    /// Rebuilds the map from OpenCode's session titles. Where several
    /// sessions carry one conversation, the newest (greatest id... OpenCode
    /// session ids descend, so the smallest) wins.
    pub async fn rebuild(
        client: &OpenCodeClient,
        title_prefix: &str,
        capacity: usize,
    ) -> Result<Self, OpenCodeError> {
        let sessions = client.list_sessions().await?;
        Ok(Self::from_sessions(sessions, title_prefix, capacity))
    }

    fn from_sessions(
        sessions: Vec<crate::opencode::client::SessionInfo>,
        title_prefix: &str,
        capacity: usize,
    ) -> Self {
        let mut newest: HashMap<String, String> = HashMap::new();
        for s in sessions {
            if s.parent_id.is_some() {
                continue;
            }
            let Some(conv) = s.title.strip_prefix(title_prefix) else {
                continue;
            };
            if conv.is_empty() {
                continue;
            }
            match newest.get(conv) {
                Some(existing) if existing.as_str() <= s.id.as_str() => {}
                _ => {
                    newest.insert(conv.to_string(), s.id);
                }
            }
        }
        // Older sessions first, so the newest are kept when over capacity.
        let mut by_age: Vec<(String, String)> = newest.into_iter().collect();
        by_age.sort_by(|a, b| b.1.cmp(&a.1));
        let store = MemoryStore::with_capacity(capacity);
        {
            let mut lru = store.lock();
            for (conv, id) in by_age {
                lru.insert(&conv, &id);
            }
        }
        store
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl SessionStore for MemoryStore {
    fn get<'a>(&'a self, conversation: &'a str) -> BoxFuture<'a, Option<String>> {
        let v = {
            let mut lru = self.lock();
            let t = lru.touch();
            lru.entries.get_mut(conversation).map(|(id, used)| {
                *used = t;
                id.clone()
            })
        };
        async move { v }.boxed()
    }

    fn put<'a>(&'a self, conversation: &'a str, session_id: &'a str) -> BoxFuture<'a, ()> {
        self.lock().insert(conversation, session_id);
        async {}.boxed()
    }

    fn remove<'a>(&'a self, conversation: &'a str) -> BoxFuture<'a, ()> {
        self.lock().entries.remove(conversation);
        async {}.boxed()
    }

    fn known(&self) -> Option<usize> {
        Some(self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::opencode::client::SessionInfo;

    fn get(s: &MemoryStore, c: &str) -> Option<String> {
        futures::executor::block_on(s.get(c))
    }

    #[test]
    fn the_least_recently_used_conversation_is_forgotten() {
        let s = MemoryStore::with_capacity(2);
        futures::executor::block_on(s.put("a", "ses_a"));
        futures::executor::block_on(s.put("b", "ses_b"));
        assert_eq!(get(&s, "a").as_deref(), Some("ses_a")); // a is now newer than b
        futures::executor::block_on(s.put("c", "ses_c"));
        assert_eq!(s.len(), 2);
        assert_eq!(get(&s, "b"), None);
        assert_eq!(get(&s, "a").as_deref(), Some("ses_a"));
        assert_eq!(get(&s, "c").as_deref(), Some("ses_c"));
    }

    #[test]
    fn a_rebuild_keeps_the_newest_session_of_each_conversation_within_capacity() {
        let info = |id: &str, title: &str| SessionInfo {
            id: id.into(),
            title: title.into(),
            parent_id: None,
            directory: None,
        };
        // OpenCode's ids descend: ses_1 is newer than ses_2.
        let sessions = vec![
            info("ses_3", "nats:old"),
            info("ses_2", "nats:x"),
            info("ses_1", "nats:x"),
            info("ses_0", "nats:new"),
            info("ses_9", "someone else's"),
        ];
        let s = MemoryStore::from_sessions(sessions.clone(), "nats:", 10);
        assert_eq!(get(&s, "x").as_deref(), Some("ses_1"));
        assert_eq!(s.len(), 3);
        let s = MemoryStore::from_sessions(sessions, "nats:", 2);
        assert_eq!(s.len(), 2);
        assert_eq!(get(&s, "old"), None, "the oldest conversation goes first");
        assert_eq!(get(&s, "new").as_deref(), Some("ses_0"));
    }
}
