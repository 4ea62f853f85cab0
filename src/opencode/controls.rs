//! The OpenCode routes behind the conversation controls (`crate::controls`):
//! revert and unrevert, fork, summarize, the turns' diffs, a session's detail and the
//! session list with times, titles. Each takes `?directory=` like the rest.

use std::time::Duration;

use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};

use super::client::{Lane, OpenCodeClient, OpenCodeError, MAX_SESSION_LIST_BYTES};
use super::retry::{decode, Failure, Retry};

/// A session as OpenCode describes it (what the controls read).
#[derive(Debug, Clone, Deserialize)]
pub struct SessionDetail {
    pub id: String,
    #[serde(default)]
    pub title: String,
    #[serde(default, rename = "parentID")]
    pub parent_id: Option<String>,
    #[serde(default)]
    pub time: SessionTime,
    /// Set while the session is reverted (`undo`): the first message hidden.
    #[serde(default)]
    pub revert: Option<Revert>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct SessionTime {
    #[serde(default)]
    pub created: Option<f64>,
    #[serde(default)]
    pub updated: Option<f64>,
}

/// A session's revert point.
#[derive(Debug, Clone, Deserialize)]
pub struct Revert {
    #[serde(rename = "messageID")]
    pub message_id: String,
    /// The files the revert restored, as a unified diff (absent when
    /// OpenCode recorded no file changes).
    #[serde(default)]
    pub diff: Option<String>,
}

/// One changed file (`GET /session/{id}/diff`).
#[derive(Debug, Clone, Deserialize)]
pub struct FileDiff {
    #[serde(default)]
    pub file: String,
    #[serde(default)]
    pub patch: String,
    #[serde(default)]
    pub additions: f64,
    #[serde(default)]
    pub deletions: f64,
    #[serde(default)]
    pub status: Option<String>,
}

/// A message as the diff reads it: a user message's `summary.diffs` are
/// the files its turn changed (OpenCode 1.18 records them there; the
/// session-wide diff stays empty).
#[derive(Debug, Clone, Deserialize)]
struct DiffMessage {
    info: DiffInfo,
}

#[derive(Debug, Clone, Deserialize)]
struct DiffInfo {
    id: String,
    #[serde(default)]
    role: String,
    #[serde(default)]
    summary: Option<Value>,
}

impl OpenCodeClient {
    /// `GET /session/{id}` with its times and revert point.
    pub async fn session_detail(&self, id: &str) -> Result<SessionDetail, OpenCodeError> {
        let rb = self.request_for(Method::GET, &format!("/session/{id}"), None);
        self.json("reading a session", Retry::Idempotent, Lane::Pooled, rb)
            .await
    }

    /// `GET /session` with times (bounded like the start-up listing).
    pub async fn session_details(&self) -> Result<Vec<SessionDetail>, OpenCodeError> {
        let what = "listing sessions";
        let rb = self.request_for(Method::GET, "/session", None);
        let body = self
            .call(
                what,
                Retry::Idempotent,
                Lane::Pooled,
                rb,
                MAX_SESSION_LIST_BYTES,
            )
            .await
            .map_err(Failure::into_error)?;
        decode(what, &body)
    }

    /// `POST /session/{id}/revert`: hides `message_id` and everything after
    /// it, and restores the files those messages changed.
    pub async fn revert(&self, id: &str, message_id: &str) -> Result<SessionDetail, OpenCodeError> {
        let rb = self
            .request_for(Method::POST, &format!("/session/{id}/revert"), None)
            .json(&json!({ "messageID": message_id }));
        self.json("reverting a turn", Retry::Unsent, Lane::Pooled, rb)
            .await
    }

    /// `POST /session/{id}/unrevert`: brings back what `revert` hid.
    pub async fn unrevert(&self, id: &str) -> Result<SessionDetail, OpenCodeError> {
        let rb = self.request_for(Method::POST, &format!("/session/{id}/unrevert"), None);
        self.json("restoring a reverted turn", Retry::Unsent, Lane::Pooled, rb)
            .await
    }

    /// `POST /session/{id}/fork`: a new session with the messages up to
    /// (and without) `before` (`None`: all of them).
    pub async fn fork(
        &self,
        id: &str,
        before: Option<&str>,
    ) -> Result<SessionDetail, OpenCodeError> {
        let body = match before {
            Some(m) => json!({ "messageID": m }),
            None => json!({}),
        };
        let rb = self
            .request_for(Method::POST, &format!("/session/{id}/fork"), None)
            .json(&body);
        self.json("forking a session", Retry::Unsent, Lane::Pooled, rb)
            .await
    }

    /// `PATCH /session/{id}` with a new title.
    pub async fn set_title(&self, id: &str, title: &str) -> Result<(), OpenCodeError> {
        let rb = self
            .request_for(Method::PATCH, &format!("/session/{id}"), None)
            .json(&json!({ "title": title }));
        self.send("renaming a session", Retry::Idempotent, Lane::Pooled, rb)
            .await
    }

    /// `POST /session/{id}/summarize` with the model that summarizes;
    /// waits (at most `timeout`) for the summary to be written.
    pub async fn summarize(
        &self,
        id: &str,
        provider: &str,
        model: &str,
        timeout: Duration,
    ) -> Result<(), OpenCodeError> {
        let rb = self
            .request_for(
                Method::POST,
                &format!("/session/{id}/summarize"),
                Some(timeout),
            )
            .json(&json!({ "providerID": provider, "modelID": model }));
        let _: Value = self
            .json("compacting a session", Retry::Unsent, Lane::Pooled, rb)
            .await?;
        Ok(())
    }

    /// The files each turn changed, by its user message id, oldest first
    /// (`GET /session/{id}/message`, each user message's `summary.diffs`).
    pub async fn turn_diffs(
        &self,
        id: &str,
    ) -> Result<Vec<(String, Vec<FileDiff>)>, OpenCodeError> {
        let rb = self.request_for(Method::GET, &format!("/session/{id}/message"), None);
        let messages: Vec<DiffMessage> = self
            .json("reading messages", Retry::Idempotent, Lane::Pooled, rb)
            .await?;
        Ok(messages
            .into_iter()
            .filter(|m| m.info.role == "user")
            .map(|m| {
                let diffs = m
                    .info
                    .summary
                    .and_then(|s| serde_json::from_value(s.get("diffs")?.clone()).ok())
                    .unwrap_or_default();
                (m.info.id, diffs)
            })
            .collect())
    }
}

/// `POST /session/{id}/command`: an OpenCode command (`init`, the
/// project's `.opencode/command/*.md`) run as a turn.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CommandBody {
    /// The id of the user message OpenCode creates for it.
    #[serde(rename = "messageID")]
    pub message_id: String,
    pub command: String,
    pub arguments: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// `provider/model`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// A command as `GET /command` lists it.
#[derive(Debug, Clone, Deserialize)]
pub struct CommandInfo {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
}

impl OpenCodeClient {
    /// Runs a command; OpenCode answers when its turn has ended (bounded
    /// by `timeout`). Sent once: a command that may have reached OpenCode
    /// is never sent again.
    pub async fn command(
        &self,
        id: &str,
        body: &CommandBody,
        timeout: Duration,
    ) -> Result<(), OpenCodeError> {
        let rb = self
            .request_for(
                Method::POST,
                &format!("/session/{id}/command"),
                Some(timeout),
            )
            .json(body);
        self.send("running a command", Retry::Unsent, Lane::Control, rb)
            .await
    }

    /// `GET /command`: the commands OpenCode knows in the directory.
    pub async fn commands(&self) -> Result<Vec<CommandInfo>, OpenCodeError> {
        let rb = self.request_for(Method::GET, "/command", None);
        self.json("listing commands", Retry::Idempotent, Lane::Pooled, rb)
            .await
    }
}
