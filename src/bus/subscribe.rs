//! Subscriptions: the prompts (queue group, drained on shutdown) and the
//! control subjects (every daemon listens), and the barrier that proves the
//! server has them.

use std::time::Duration;

use bytes::Bytes;
use futures::stream::SelectAll;
use futures::StreamExt;
use tracing::{info, warn};

use super::publish::publish_failed;
use super::{BusError, Incoming};
use crate::config::SubjectsConfig;

/// The prompt subscriptions (`<prompt>` and `<prompt>.>`, queue group).
pub struct PromptSubscription {
    subs: SelectAll<async_nats::Subscriber>,
    drained: bool,
    client: async_nats::Client,
    subjects: Vec<String>,
}

impl PromptSubscription {
    pub async fn subscribe(
        client: &async_nats::Client,
        cfg: &SubjectsConfig,
    ) -> Result<Self, BusError> {
        let subjects = vec![cfg.prompt.clone(), format!("{}.>", cfg.prompt)];
        let subs = subscribe_all(client, &subjects, Some(&cfg.queue_group)).await?;
        info!(subjects = ?subjects, queue_group = %cfg.queue_group, "listening for prompts");
        Ok(PromptSubscription {
            subs: futures::stream::select_all(subs),
            drained: false,
            client: client.clone(),
            subjects,
        })
    }

    /// The next prompt; `None` once drained and empty (or the connection
    /// closed).
    pub async fn next(&mut self) -> Option<Incoming> {
        self.subs.next().await.map(Incoming::from)
    }

    /// Stops taking new prompts: unsubscribes at the server but delivers
    /// what is already on the way (keep calling [`next`](Self::next) until
    /// `None`).
    pub async fn drain(&mut self) {
        if self.drained {
            return;
        }
        self.drained = true;
        for sub in self.subs.iter_mut() {
            if let Err(e) = sub.drain().await {
                warn!(error = %e, "draining a prompt subscription failed");
            }
        }
        let _ = self.client.flush().await;
        info!(subjects = ?self.subjects, "draining prompt subscriptions");
    }
}

/// A plain subscription to a control subject (every daemon listens).
pub struct ControlSubscription {
    subs: SelectAll<async_nats::Subscriber>,
}

impl ControlSubscription {
    pub async fn subscribe(
        client: &async_nats::Client,
        subjects: &[String],
    ) -> Result<Self, BusError> {
        Self::subscribe_in(client, subjects, None).await
    }

    /// As [`subscribe`](Self::subscribe), in the queue group `queue` when
    /// given (one daemon gets each message).
    pub async fn subscribe_in(
        client: &async_nats::Client,
        subjects: &[String],
        queue: Option<&str>,
    ) -> Result<Self, BusError> {
        let subs = subscribe_all(client, subjects, queue).await?;
        Ok(ControlSubscription {
            subs: futures::stream::select_all(subs),
        })
    }

    pub async fn next(&mut self) -> Option<Incoming> {
        self.subs.next().await.map(Incoming::from)
    }
}

/// Subscribes to each subject (in `queue` when given), then proves the
/// server has them all.
async fn subscribe_all(
    client: &async_nats::Client,
    subjects: &[String],
    queue: Option<&str>,
) -> Result<Vec<async_nats::Subscriber>, BusError> {
    let mut subs = Vec::new();
    for subject in subjects {
        subs.push(subscribe_one(client, subject, queue).await?);
    }
    barrier(client).await?;
    Ok(subs)
}

/// One subscription, its error naming the subject.
pub(super) async fn subscribe_one(
    client: &async_nats::Client,
    subject: &str,
    queue: Option<&str>,
) -> Result<async_nats::Subscriber, BusError> {
    let sub = match queue {
        Some(q) => {
            client
                .queue_subscribe(subject.to_string(), q.to_string())
                .await
        }
        None => client.subscribe(subject.to_string()).await,
    };
    sub.map_err(|e| BusError::Subscribe {
        subject: subject.to_string(),
        source: e.into(),
    })
}

/// Proves the server has registered our subscriptions: a round trip through
/// a fresh inbox on the same connection (`flush()` alone only writes bytes).
pub async fn barrier(client: &async_nats::Client) -> Result<(), BusError> {
    let inbox = client.new_inbox();
    let mut sub = subscribe_one(client, &inbox, None).await?;
    client
        .publish(inbox.clone(), Bytes::new())
        .await
        .map_err(publish_failed(&inbox))?;
    let _ = client.flush().await;
    match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
        Ok(Some(_)) => Ok(()),
        _ => Err(BusError::Subscribe {
            subject: inbox,
            source: "the server did not confirm the subscription within 10s".into(),
        }),
    }
}
