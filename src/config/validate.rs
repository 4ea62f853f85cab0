//! What serde cannot check.

use super::{Config, ConfigError};
use crate::protocol::subject::validate_subject;

/// The most `[opencode] max_connections` may say.
const MAX_CONNECTIONS: usize = 4096;

impl Config {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_nats()?;
        self.validate_subjects()?;
        self.validate_opencode()?;
        self.validate_sizes()?;
        self.validate_service()?;
        self.validate_cluster()?;
        self.validate_stream_defaults()?;
        self.shares
            .check_job_tenants()
            .map_err(|reason| ConfigError::Invalid {
                key: "shares.job_tenants",
                reason,
            })?;
        self.controls.validate()?;
        self.validate_isolation()?;
        self.validate_agent_protocol()?;
        super::sandbox::validate(self)
    }

    fn validate_stream_defaults(&self) -> Result<(), ConfigError> {
        for (tenant, v) in &self.tenancy.stream {
            if let Err(reason) = crate::protocol::prompt::parse_stream_mode(v.clone()) {
                return Err(ConfigError::Invalid {
                    key: "tenancy.stream",
                    reason: format!("{tenant}: {reason}"),
                });
            }
        }
        Ok(())
    }

    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: String| Err(ConfigError::Invalid { key, reason });
        let (c, j) = (&self.cluster, &self.jetstream);
        let name_ok = |v: &str| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if let Some(id) = &c.instance_id {
            if !name_ok(id) {
                return invalid(
                    "cluster.instance_id",
                    format!("{id:?} must be 1-64 letters, digits, - or _"),
                );
            }
        }
        for (key, v) in [
            ("cluster.conversations_bucket", &c.conversations_bucket),
            ("cluster.instances_bucket", &c.instances_bucket),
            ("cluster.turns_bucket", &c.turns_bucket),
            ("limits.large_final_bucket", &self.limits.large_final_bucket),
            ("jetstream.jobs_stream", &j.jobs_stream),
            ("jetstream.jobs_consumer", &j.jobs_consumer),
        ] {
            if !name_ok(v) {
                return invalid(key, format!("{v:?} must be 1-64 letters, digits, - or _"));
            }
        }
        if !(1..=5).contains(&j.replicas) {
            return invalid(
                "jetstream.replicas",
                format!(
                    "{} must be 1 to 5 (JetStream keeps at most 5 copies)",
                    j.replicas
                ),
            );
        }
        if !j.replies_stream.is_empty() && !name_ok(&j.replies_stream) {
            return invalid(
                "jetstream.replies_stream",
                "must be letters, digits, - or _".into(),
            );
        }
        for (key, v) in [
            ("cluster.instance_prefix", &c.instance_prefix),
            ("jetstream.jobs_subject", &j.jobs_subject),
        ] {
            if let Err(e) = validate_subject(v) {
                return invalid(key, format!("{v:?} {e}"));
            }
            if v.contains(['*', '>']) {
                return invalid(key, format!("{v:?} must not contain wildcards"));
            }
        }
        if c.lease_ttl < std::time::Duration::from_secs(3) {
            return invalid(
                "cluster.lease_ttl",
                "must be at least 3s (renewed every third)".into(),
            );
        }
        if j.jobs_max_bytes < 1024 * 1024 {
            return invalid("jetstream.jobs_max_bytes", "must be at least 1 MiB".into());
        }
        if j.max_deliver < 1 {
            return invalid("jetstream.max_deliver", "must be at least 1".into());
        }
        if j.ack_wait < std::time::Duration::from_secs(3) {
            return invalid(
                "jetstream.ack_wait",
                "must be at least 3s (in-progress acks every third)".into(),
            );
        }
        Ok(())
    }

    fn validate_agent_protocol(&self) -> Result<(), ConfigError> {
        let a = &self.agent_protocol;
        let token = |key, v: &str| {
            if v.is_empty()
                || v.len() > 63
                || !v
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(ConfigError::Invalid {
                    key,
                    reason: format!("{v:?} must be 1-63 letters, digits, - or _"),
                });
            }
            Ok(())
        };
        token("agent_protocol.owner", &a.owner)?;
        if let Some(name) = &a.name {
            token("agent_protocol.name", name)?;
        }
        for (key, d) in [
            ("agent_protocol.heartbeat_interval", a.heartbeat_interval),
            ("agent_protocol.ack_interval", a.ack_interval),
        ] {
            if d < std::time::Duration::from_secs(1) {
                return Err(ConfigError::Invalid {
                    key,
                    reason: "must be at least 1s".into(),
                });
            }
        }
        Ok(())
    }

    fn validate_nats(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: String| Err(ConfigError::Invalid { key, reason });
        if self.nats.urls().is_empty() {
            return invalid("nats.url", "no server URL given".into());
        }
        for url in self.nats.urls() {
            if let Some((scheme, _)) = url.split_once("://") {
                if !["nats", "tls", "ws", "wss"].contains(&scheme) {
                    return invalid(
                        "nats.url",
                        format!(
                            "{url:?} is not a NATS URL: use nats://, tls://, ws:// or wss:// (as in nats://127.0.0.1:4222)"
                        ),
                    );
                }
            }
        }
        if self.nats.tls_cert_file.is_some() != self.nats.tls_key_file.is_some() {
            return invalid(
                "nats.tls_cert_file",
                "tls_cert_file and tls_key_file go together".into(),
            );
        }
        if self.nats.user.is_some() != self.nats.password.is_some() {
            return invalid("nats.user", "user and password go together (a password kept out of the file comes from OPENCODE_BRIDGE__NATS__PASSWORD)".into());
        }
        Ok(())
    }

    /// Subjects are the daemon's own: no wildcard, no `$`, no empty token.
    fn validate_subjects(&self) -> Result<(), ConfigError> {
        for (key, s) in [
            ("subjects.prompt", &self.subjects.prompt),
            ("subjects.reply_prefix", &self.subjects.reply_prefix),
            ("subjects.queue_group", &self.subjects.queue_group),
            ("subjects.abort", &self.subjects.abort),
            ("subjects.status", &self.subjects.status),
            ("subjects.heartbeat", &self.subjects.heartbeat),
            ("nats.inbox_prefix", &self.nats.inbox_prefix),
            ("subjects.permission_reply", &self.subjects.permission_reply),
            ("subjects.question_reply", &self.subjects.question_reply),
            ("subjects.turn_status", &self.subjects.turn_status),
            ("tenancy.inbox_prefix", &self.tenancy.inbox_prefix),
        ] {
            if let Err(e) = validate_subject(s) {
                return Err(ConfigError::Invalid {
                    key,
                    reason: format!("{s:?} {e}"),
                });
            }
        }
        Ok(())
    }

    fn validate_opencode(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: String| Err(ConfigError::Invalid { key, reason });
        if let Some(u) = &self.opencode.base_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return invalid(
                    "opencode.base_url",
                    format!("{u:?} must start with http:// or https://"),
                );
            }
        }
        if self.opencode.max_connections > MAX_CONNECTIONS {
            return invalid(
                "opencode.max_connections",
                format!(
                    "{} is more connections than one OpenCode server should get (at most {MAX_CONNECTIONS})",
                    self.opencode.max_connections
                ),
            );
        }
        let positive = [
            ("turn.first_event_timeout", self.turn.first_event_timeout),
            ("turn.idle_timeout", self.turn.idle_timeout),
            ("turn.turn_timeout", self.turn.turn_timeout),
            ("turn.abort_timeout", self.turn.abort_timeout),
            ("opencode.request_timeout", self.opencode.request_timeout),
            ("opencode.connect_timeout", self.opencode.connect_timeout),
            ("opencode.startup_timeout", self.opencode.startup_timeout),
            (
                "opencode.stream_stall_timeout",
                self.opencode.stream_stall_timeout,
            ),
            ("opencode.reconnect_min", self.opencode.reconnect_min),
            (
                "opencode.unavailable_after",
                self.opencode.unavailable_after,
            ),
        ];
        for (key, d) in positive {
            if d.is_zero() {
                return invalid(key, "must be above zero".into());
            }
        }
        if self.opencode.reconnect_max < self.opencode.reconnect_min {
            return invalid(
                "opencode.reconnect_max",
                "must not be below opencode.reconnect_min".into(),
            );
        }
        if let Err(reason) = self.opencode.password_from_file() {
            return invalid("opencode.password_file", reason);
        }
        Ok(())
    }

    /// Every bound is a real bound.
    fn validate_sizes(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: String| Err(ConfigError::Invalid { key, reason });
        for (key, n) in [
            ("turn.max_in_flight", self.turn.max_in_flight),
            ("turn.max_waiting", self.turn.max_waiting),
            ("turn.event_buffer", self.turn.event_buffer),
            ("turn.max_conversations", self.turn.max_conversations),
            ("opencode.max_connections", self.opencode.max_connections),
            ("limits.max_prompt_bytes", self.limits.max_prompt_bytes),
            (
                "limits.max_attachment_bytes",
                self.limits.max_attachment_bytes,
            ),
            (
                "limits.max_attachments_bytes",
                self.limits.max_attachments_bytes,
            ),
            ("limits.max_event_bytes", self.limits.max_event_bytes),
            (
                "nats.subscription_capacity",
                self.nats.subscription_capacity,
            ),
            ("nats.client_capacity", self.nats.client_capacity),
        ] {
            if n == 0 {
                return invalid(key, "must be above zero".into());
            }
        }
        if self.limits.max_attachment_bytes > self.limits.max_attachments_bytes {
            return invalid(
                "limits.max_attachment_bytes",
                "must not be above limits.max_attachments_bytes (one attachment could never reach it)".into(),
            );
        }
        if self.limits.max_reply_bytes < 1024 {
            return invalid("limits.max_reply_bytes", "must be at least 1024".into());
        }
        Ok(())
    }

    fn validate_service(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: String| Err(ConfigError::Invalid { key, reason });
        let name = &self.service.name;
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return invalid(
                "service.name",
                format!("{name:?} may only have letters, digits, - and _"),
            );
        }
        if self
            .service
            .host
            .as_ref()
            .is_some_and(|h| h.trim().is_empty())
        {
            return invalid("service.host", "must not be empty when set".into());
        }
        Ok(())
    }
}
