//! JetStream, as the daemon uses it: found or not at start (a server
//! without it means single-host, logged once), and KV buckets with
//! compare-and-swap on the revision.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use tracing::info;

use super::BusError;

/// The oldest nats-server whose JetStream API this daemon can use.
pub const MIN_VERSION: &str = "2.10";

/// What a daemon without JetStream does without, in words.
const OFF: &str = "running single-host: cluster, jobs and turn states are off";

/// Whether nats-server `version` ("2.9.10", "2.15.1-beta") is
/// [`MIN_VERSION`] or newer; an unreadable version is given the benefit of
/// the doubt (the account request decides).
fn usable_version(version: &str) -> bool {
    let mut parts = version.split(|c: char| !c.is_ascii_digit());
    let (Some(Ok(major)), Some(Ok(minor))) = (
        parts.next().map(str::parse::<u32>),
        parts.next().map(str::parse::<u32>),
    ) else {
        return true;
    };
    (major, minor) >= (2, 10)
}

/// Why the server behind `client` offers no JetStream this daemon can use,
/// in words naming its version; `None` when it does. Older than
/// [`MIN_VERSION`]: 2.9's JetStream API answers in a shape this client
/// cannot read. Else the account request decides (JetStream off, or not
/// for this user).
pub(super) async fn missing(client: &async_nats::Client) -> Option<String> {
    let version = client.server_info().version;
    if !usable_version(&version) {
        return Some(format!(
            "nats-server {version} has no JetStream API this daemon can use ({MIN_VERSION} or newer)"
        ));
    }
    let ctx = jetstream::new(client.clone());
    match tokio::time::timeout(PROBE_TIMEOUT, ctx.query_account()).await {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(format!(
            "nats-server {version} offers no JetStream to this user (JetStream off: start it with -js; or not enabled for this account: {e})"
        )),
        Err(_) => Some(format!(
            "nats-server {version} did not answer a JetStream account request within 5s"
        )),
    }
}
/// Bound on one JetStream account request at start, and the pause before
/// the next one when it goes unanswered.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
const PROBE_PAUSE: Duration = Duration::from_secs(1);

/// A JetStream context on the daemon's connection.
#[derive(Clone)]
pub struct JetStream {
    pub(super) ctx: jetstream::Context,
    /// Copies of every bucket and stream created (`bus::replicas`).
    pub(super) replicas: usize,
}

/// One key's last value and its revision (a deleted key reads as none).
#[derive(Debug, Clone)]
pub struct Entry {
    pub value: Bytes,
    pub revision: u64,
}

/// A KV bucket.
#[derive(Clone)]
pub struct Bucket {
    store: kv::Store,
    name: String,
}

fn failed(
    what: impl Into<String>,
) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> BusError {
    let what = what.into();
    move |source| BusError::JetStream { what, source }
}

impl JetStream {
    /// JetStream on `client`, or `None` (logged once, naming the server's
    /// version and what is off) when [`missing`] says why not. With
    /// `patience` an unanswered or refused account request is tried again
    /// until that much time has passed: a JetStream cluster electing its
    /// meta leader (a nats-server of it restarting) answers no account
    /// request for a few seconds, and a daemon that requires JetStream must
    /// not exit for that (docs/RELIABILITY.md). A server too old is final.
    pub async fn probe(client: &async_nats::Client, patience: Duration) -> Option<JetStream> {
        let deadline = tokio::time::Instant::now() + patience;
        let mut tries = 0u32;
        loop {
            tries += 1;
            let Some(why) = missing(client).await else {
                return Some(JetStream {
                    ctx: jetstream::new(client.clone()),
                    replicas: 1,
                });
            };
            let version = client.server_info().version;
            if !usable_version(&version) || tokio::time::Instant::now() >= deadline {
                info!(nats_server = %version, tries, "{why}: {OFF}; docs/CLUSTER.md");
                return None;
            }
            info!(reason = %why, "JetStream did not answer; asking again (a JetStream cluster may be electing its leader)");
            tokio::time::sleep(PROBE_PAUSE).await;
        }
    }

    /// The bucket `name`, created when missing with `max_age` (zero: keep),
    /// one value per key and at most `max_bytes` (`None`: no bound; a full
    /// bucket refuses new writes), in [`replicas`](Self::replicas) copies. An
    /// existing bucket is used as it is (another replica count is logged).
    pub async fn bucket(
        &self,
        name: &str,
        max_age: Duration,
        max_bytes: Option<u64>,
    ) -> Result<Bucket, BusError> {
        let store = match self.ctx.get_key_value(name).await {
            Ok(s) => {
                let stream = super::replicas::kv_stream(name);
                self.report_replicas("KV bucket", name, &stream).await;
                s
            }
            Err(_) => self
                .ctx
                .create_key_value(kv::Config {
                    bucket: name.to_string(),
                    history: 1,
                    max_age,
                    max_bytes: max_bytes.map_or(-1, |b| i64::try_from(b).unwrap_or(i64::MAX)),
                    num_replicas: self.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| self.create_failed(format!("create KV bucket {name}"), e.into()))?,
        };
        Ok(Bucket {
            store,
            name: name.to_string(),
        })
    }
}

impl Bucket {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key's value and revision; `None` if never set, deleted, purged
    /// or expired.
    pub async fn get(&self, key: &str) -> Result<Option<Entry>, BusError> {
        let e = self
            .store
            .entry(key)
            .await
            .map_err(|e| failed(format!("read {} in {}", key, self.name))(e.into()))?;
        Ok(e.filter(|e| e.operation == kv::Operation::Put)
            .map(|e| Entry {
                value: e.value,
                revision: e.revision,
            }))
    }

    /// Sets the key only if it has no value: `Some(revision)`, or `None`
    /// when another writer got there first.
    pub async fn create(&self, key: &str, value: Bytes) -> Result<Option<u64>, BusError> {
        match self.store.create(key, value).await {
            Ok(rev) => Ok(Some(rev)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(failed(format!("create {} in {}", key, self.name))(e.into())),
        }
    }

    /// Sets the key only if its revision is still `revision`: `Some(new
    /// revision)`, or `None` when it changed meanwhile.
    pub async fn update(
        &self,
        key: &str,
        value: Bytes,
        revision: u64,
    ) -> Result<Option<u64>, BusError> {
        match self.store.update(key, value, revision).await {
            Ok(rev) => Ok(Some(rev)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(e) => Err(failed(format!("update {} in {}", key, self.name))(e.into())),
        }
    }

    /// Sets the key whatever it held.
    pub async fn put(&self, key: &str, value: Bytes) -> Result<u64, BusError> {
        self.store
            .put(key, value)
            .await
            .map_err(|e| failed(format!("write {} in {}", key, self.name))(e.into()))
    }

    /// Deletes the key if its revision is still `revision`; `false` when it
    /// changed meanwhile.
    pub async fn delete_if(&self, key: &str, revision: u64) -> Result<bool, BusError> {
        match self.store.delete_expect_revision(key, Some(revision)).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
            Err(e) => Err(failed(format!("delete {} in {}", key, self.name))(e.into())),
        }
    }

    /// Deletes the key.
    pub async fn delete(&self, key: &str) -> Result<(), BusError> {
        self.store
            .delete(key)
            .await
            .map_err(|e| failed(format!("delete {} in {}", key, self.name))(e.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::usable_version;

    #[test]
    fn nats_server_2_10_or_newer_has_a_usable_jetstream_api() {
        for (v, ok) in [
            ("2.9.10", false),
            ("2.9.25", false),
            ("2.2.0", false),
            ("1.4.1", false),
            ("2.10.0", true),
            ("2.15.1", true),
            ("2.11.0-RC.1", true),
            ("3.0.0", true),
            ("", true),
            ("dev", true),
        ] {
            assert_eq!(usable_version(v), ok, "{v:?}");
        }
    }
}
