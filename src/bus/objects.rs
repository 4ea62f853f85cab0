//! JetStream beyond KV: object store buckets (the whole text of a `final`
//! too long for one message), the optional stream of every reply, and the
//! client side of both (the CLI fetches a final's object).

use std::time::Duration;

use async_nats::jetstream::{self, object_store, stream};
use tokio::io::AsyncReadExt;
use tracing::info;

use super::jetstream::JetStream;
use super::{BusError, Caller};

fn failed(what: String) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> BusError {
    move |source| BusError::JetStream { what, source }
}

/// An object store bucket.
#[derive(Clone)]
pub struct Objects {
    store: object_store::ObjectStore,
    name: String,
}

impl JetStream {
    /// The object store bucket `name`, created when missing with `max_age`
    /// (zero: keep) and at most `max_bytes` (a full bucket refuses new
    /// objects), in [`replicas`](JetStream::replicas) copies. An existing
    /// bucket is used as it is (another replica count is logged).
    pub async fn objects(
        &self,
        name: &str,
        max_age: Duration,
        max_bytes: u64,
    ) -> Result<Objects, BusError> {
        let store = match self.ctx.get_object_store(name).await {
            Ok(s) => {
                let stream = super::replicas::object_stream(name);
                self.report_replicas("object store", name, &stream).await;
                s
            }
            Err(_) => self
                .ctx
                .create_object_store(object_store::Config {
                    bucket: name.to_string(),
                    max_age,
                    max_bytes: i64::try_from(max_bytes).unwrap_or(i64::MAX),
                    num_replicas: self.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| self.create_failed(format!("create object store {name}"), e.into()))?,
        };
        Ok(Objects {
            store,
            name: name.to_string(),
        })
    }

    /// The stream `name` capturing `subjects`, created when missing with
    /// `max_age`, in [`replicas`](JetStream::replicas) copies. An existing
    /// stream is used as it is (logged if its subjects or replicas differ).
    pub async fn capture(
        &self,
        name: &str,
        subjects: Vec<String>,
        max_age: Duration,
    ) -> Result<(), BusError> {
        let config = stream::Config {
            name: name.to_string(),
            subjects: subjects.clone(),
            max_age,
            num_replicas: self.replicas,
            ..Default::default()
        };
        let mut s = self
            .ctx
            .get_or_create_stream(config)
            .await
            .map_err(|e| self.create_failed(format!("create stream {name}"), e.into()))?;
        let info = s
            .info()
            .await
            .map_err(|e| failed(format!("read stream {name}"))(e.into()))?;
        if info.config.subjects != subjects {
            info!(stream = name, configured = ?subjects, found = ?info.config.subjects, "the stream exists with other subjects; using it as it is");
        }
        self.report_replicas("stream", name, name).await;
        Ok(())
    }
}

impl Objects {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stores `data` as the object `name` (replacing one of that name).
    pub async fn put(&self, name: &str, data: &[u8]) -> Result<(), BusError> {
        let mut reader = data;
        self.store
            .put(name, &mut reader)
            .await
            .map(|_| ())
            .map_err(|e| failed(format!("write {name} in object store {}", self.name))(e.into()))
    }
}

impl Caller {
    /// The object `name` of the object store bucket `bucket`, whole.
    pub async fn fetch_object(&self, bucket: &str, name: &str) -> Result<Vec<u8>, BusError> {
        let what = || format!("read {name} from object store {bucket}");
        let ctx = jetstream::new(self.client.clone());
        let store = ctx
            .get_object_store(bucket)
            .await
            .map_err(|e| failed(what())(e.into()))?;
        let mut object = store
            .get(name)
            .await
            .map_err(|e| failed(what())(e.into()))?;
        let mut out = Vec::new();
        object
            .read_to_end(&mut out)
            .await
            .map_err(|e| failed(what())(e.into()))?;
        Ok(out)
    }

    /// One request, its first answer (`None`: nobody answered within
    /// `timeout`). A server error (a permissions violation) is
    /// [`BusError::Refused`].
    pub async fn request_one(
        &self,
        subject: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Option<bytes::Bytes>, BusError> {
        let mut answers = self.stream(subject, &[], payload).await?;
        match tokio::time::timeout(timeout, answers.next()).await {
            Ok(Some(super::Received::Reply(p))) => Ok(Some(p)),
            Ok(Some(super::Received::ServerError(detail))) => Err(BusError::Refused {
                subject: subject.to_string(),
                detail,
            }),
            _ => Ok(None),
        }
    }
}
