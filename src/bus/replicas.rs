//! Replicas of what the daemon creates in JetStream (`[jetstream]
//! replicas`, docs/CLUSTER.md): every bucket and stream is created with
//! that many copies; one the cluster cannot place fails with an error
//! that says so; one found with another count is used as it is and
//! reported (an operator may have set it, and changing it is theirs).

use tracing::warn;

use super::{BusError, JetStream, Source};

impl JetStream {
    /// This context creating everything with `replicas` copies (at least 1).
    pub fn with_replicas(mut self, replicas: usize) -> JetStream {
        self.replicas = replicas.max(1);
        self
    }

    /// The copies every bucket and stream is created with.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// Logs when the stream `stream` (a KV bucket's is `KV_<bucket>`, an
    /// object store's `OBJ_<bucket>`) exists with another replica count
    /// than configured; says nothing when it matches or cannot be read.
    pub(super) async fn report_replicas(&self, kind: &str, name: &str, stream: &str) {
        let Ok(s) = self.ctx.get_stream(stream).await else {
            return;
        };
        let found = s.cached_info().config.num_replicas.max(1);
        if found != self.replicas {
            warn!(
                kind,
                name,
                found,
                configured = self.replicas,
                "exists with another replica count than [jetstream] replicas; used as it is (change it with `nats stream edit {stream} --replicas {}`, docs/CLUSTER.md)",
                self.replicas
            );
        }
    }

    /// The error of creating `what` with this context's replicas: a clear
    /// word when the cluster has too few JetStream servers to place it.
    pub(super) fn create_failed(&self, what: String, source: Source) -> BusError {
        let text = source.to_string().to_lowercase();
        let placement = ["insufficient resources", "replicas", "no suitable peers"]
            .iter()
            .any(|m| text.contains(m));
        let what = if placement {
            format!(
                "{what} with {} replicas: the cluster cannot place them (it needs {} nats-servers with JetStream in one cluster; set [jetstream] replicas to what it has, docs/CLUSTER.md)",
                self.replicas, self.replicas
            )
        } else {
            format!("{what} (with {} replicas)", self.replicas)
        };
        BusError::JetStream { what, source }
    }
}

/// The stream behind a KV bucket.
pub(super) fn kv_stream(bucket: &str) -> String {
    format!("KV_{bucket}")
}

/// The stream behind an object store bucket.
pub(super) fn object_stream(bucket: &str) -> String {
    format!("OBJ_{bucket}")
}
