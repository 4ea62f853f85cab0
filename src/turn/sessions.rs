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

/// The in-memory store (rebuilt from session titles at start).
#[derive(Default)]
pub struct MemoryStore {
    map: Mutex<HashMap<String, String>>,
}

impl MemoryStore {
    /// Rebuilds the map from OpenCode's session titles. Where several
    /// sessions carry one conversation, the newest (greatest id... OpenCode
    /// session ids descend, so the smallest) wins.
    pub async fn rebuild(
        client: &OpenCodeClient,
        title_prefix: &str,
    ) -> Result<Self, OpenCodeError> {
        let store = MemoryStore::default();
        let sessions = client.list_sessions().await?;
        {
            let mut map = store.map.lock().unwrap_or_else(|p| p.into_inner());
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
                match map.get(conv) {
                    Some(existing) if existing.as_str() <= s.id.as_str() => {}
                    _ => {
                        map.insert(conv.to_string(), s.id);
                    }
                }
            }
        }
        Ok(store)
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl SessionStore for MemoryStore {
    fn get<'a>(&'a self, conversation: &'a str) -> BoxFuture<'a, Option<String>> {
        let v = self
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(conversation)
            .cloned();
        async move { v }.boxed()
    }

    fn put<'a>(&'a self, conversation: &'a str, session_id: &'a str) -> BoxFuture<'a, ()> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(conversation.to_string(), session_id.to_string());
        async {}.boxed()
    }

    fn remove<'a>(&'a self, conversation: &'a str) -> BoxFuture<'a, ()> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(conversation);
        async {}.boxed()
    }

    fn known(&self) -> Option<usize> {
        Some(self.len())
    }
}
