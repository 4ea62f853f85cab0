//! The reqwest adapter for OpenCode's HTTP API. Every call is bounded by
//! `request_timeout`; errors say whether OpenCode was unreachable or
//! answered badly. The password is never logged.

use std::collections::HashMap;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::events::MessageWithParts;
use crate::config::OpenCodeConfig;
use crate::protocol::{ErrorCode, ModelRef};

/// What went wrong talking to OpenCode.
#[derive(Debug, thiserror::Error)]
pub enum OpenCodeError {
    /// Connection refused, reset, timed out: OpenCode is not there.
    #[error("OpenCode is unreachable ({what}): {detail}")]
    Unavailable { what: String, detail: String },
    /// The thing asked for does not exist (a deleted session).
    #[error("OpenCode says not found ({what}): {body}")]
    NotFound { what: String, body: String },
    /// OpenCode refused our credentials.
    #[error("OpenCode refused the credentials ({what}): HTTP {status}")]
    Unauthorized { what: String, status: u16 },
    /// Any other non-2xx answer.
    #[error("OpenCode answered HTTP {status} ({what}): {body}")]
    Status {
        what: String,
        status: u16,
        body: String,
    },
    /// A 2xx answer we could not read.
    #[error("OpenCode sent an unreadable answer ({what}): {detail}")]
    Decode { what: String, detail: String },
}

impl OpenCodeError {
    /// The wire error code for a turn that fails with this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            OpenCodeError::Unavailable { .. } => ErrorCode::OpencodeUnavailable,
            _ => ErrorCode::OpencodeError,
        }
    }

    /// What a client may be told: what failed and how, without OpenCode's
    /// URL, the transport's detail or OpenCode's error body (those go to the
    /// log).
    pub fn public(&self) -> String {
        match self {
            OpenCodeError::Unavailable { what, .. } => format!("OpenCode is unreachable ({what})"),
            OpenCodeError::NotFound { what, .. } => format!("OpenCode says not found ({what})"),
            OpenCodeError::Unauthorized { what, status } => {
                format!("OpenCode refused the bridge's credentials ({what}): HTTP {status}")
            }
            OpenCodeError::Status { what, status, .. } => {
                format!("OpenCode answered HTTP {status} ({what})")
            }
            OpenCodeError::Decode { what, .. } => {
                format!("OpenCode sent an unreadable answer ({what})")
            }
        }
    }

    pub fn retryable(&self) -> bool {
        match self {
            OpenCodeError::Unavailable { .. } => true,
            OpenCodeError::Unauthorized { .. } => false,
            OpenCodeError::Status { status, .. } => *status >= 500,
            OpenCodeError::NotFound { .. } | OpenCodeError::Decode { .. } => true,
        }
    }
}

/// `host[:port]` of a URL (the whole string when it is not one).
pub fn host_of(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => match (u.host_str(), u.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            _ => url.to_string(),
        },
        Err(_) => url.to_string(),
    }
}

/// The most of `GET /session` read at start-up (about 100,000 sessions).
pub const MAX_SESSION_LIST_BYTES: usize = 64 << 20;

/// A session as OpenCode lists it (only what the bridge reads).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct SessionInfo {
    pub id: String,
    #[serde(default)]
    pub title: String,
    #[serde(default, rename = "parentID")]
    pub parent_id: Option<String>,
}

/// An agent as `GET /agent` lists it (only what the bridge reads).
#[derive(Debug, Clone, Deserialize)]
pub struct AgentInfo {
    pub name: String,
    /// Its merged rules, in order (the last match wins).
    #[serde(default)]
    pub permission: Vec<crate::protocol::interactive::OpenCodeRule>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Health {
    #[serde(default)]
    pub healthy: bool,
    #[serde(default)]
    pub version: String,
}

/// The body of `POST /session/{id}/prompt_async`.
#[derive(Debug, Clone, Serialize)]
pub struct PromptBody {
    /// The id of the user message OpenCode creates for this prompt.
    #[serde(rename = "messageID")]
    pub message_id: String,
    pub parts: Vec<PromptPart>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelBody>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tools: Option<std::collections::BTreeMap<String, bool>>,
}

/// One part of a prompt: the text, or a file as a `data:` URL (what
/// OpenCode 1.14-1.18 take in `prompt_async`; it hands images to the model
/// as images and inlines `text/*` files as text).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum PromptPart {
    Text {
        text: String,
    },
    File {
        mime: String,
        filename: String,
        url: String,
    },
}

impl PromptPart {
    /// The text, then one file part per attachment, in order.
    pub fn of(text: &str, attachments: &[crate::protocol::Attachment]) -> Vec<PromptPart> {
        let mut parts = Vec::with_capacity(1 + attachments.len());
        parts.push(PromptPart::Text {
            text: text.to_string(),
        });
        parts.extend(attachments.iter().map(|a| PromptPart::File {
            mime: a.mime.clone(),
            filename: a.filename.clone(),
            url: a.data_url(),
        }));
        parts
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelBody {
    #[serde(rename = "providerID")]
    pub provider_id: String,
    #[serde(rename = "modelID")]
    pub model_id: String,
}

impl From<&ModelRef> for ModelBody {
    fn from(m: &ModelRef) -> Self {
        ModelBody {
            provider_id: m.provider.clone(),
            model_id: m.model.clone(),
        }
    }
}

/// A client for one OpenCode server.
#[derive(Clone)]
pub struct OpenCodeClient {
    http: reqwest::Client,
    /// No `/event` deadline: the stream lives as long as it can.
    stream_http: reqwest::Client,
    base: String,
    username: String,
    password: Option<String>,
    directory: Option<String>,
}

impl std::fmt::Debug for OpenCodeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenCodeClient")
            .field("base", &self.base)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("directory", &self.directory)
            .finish()
    }
}

impl OpenCodeClient {
    pub fn new(
        base_url: &str,
        password: Option<String>,
        directory: Option<String>,
        cfg: &OpenCodeConfig,
    ) -> Result<Self, OpenCodeError> {
        let build = |timeout: Option<Duration>| {
            let mut b = reqwest::Client::builder()
                .connect_timeout(cfg.connect_timeout)
                .pool_idle_timeout(Duration::from_secs(30))
                // A burst of turns opens many connections at once; keeping
                // every one of them idle (with its buffers) cost ~20 KB per
                // turn in the end-to-end benchmark, keeping too few makes
                // every turn's calls open new ones (docs/BENCHMARKS.md):
                // `[opencode] max_idle_connections`.
                .pool_max_idle_per_host(cfg.max_idle_connections)
                .user_agent(concat!("opencode-nats-bridge/", env!("CARGO_PKG_VERSION")));
            if let Some(t) = timeout {
                b = b.timeout(t);
            }
            b.build().map_err(|e| OpenCodeError::Unavailable {
                what: "building the HTTP client".into(),
                detail: e.to_string(),
            })
        };
        Ok(OpenCodeClient {
            http: build(Some(cfg.request_timeout))?,
            stream_http: build(None)?,
            base: base_url.trim_end_matches('/').to_string(),
            username: cfg.username.clone(),
            password,
            directory,
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn request(
        &self,
        client: &reqwest::Client,
        method: Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        let mut rb = client.request(method, format!("{}{}", self.base, path));
        if let Some(dir) = &self.directory {
            rb = rb.query(&[("directory", dir)]);
        }
        if let Some(pw) = &self.password {
            rb = rb.basic_auth(&self.username, Some(pw));
        }
        rb
    }

    async fn send(
        &self,
        what: &str,
        rb: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, OpenCodeError> {
        let resp = rb.send().await.map_err(|e| OpenCodeError::Unavailable {
            what: what.to_string(),
            detail: error_chain(&e),
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        let body: String = body.chars().take(500).collect();
        Err(match status {
            StatusCode::NOT_FOUND => OpenCodeError::NotFound {
                what: what.to_string(),
                body,
            },
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => OpenCodeError::Unauthorized {
                what: what.to_string(),
                status: status.as_u16(),
            },
            _ => OpenCodeError::Status {
                what: what.to_string(),
                status: status.as_u16(),
                body,
            },
        })
    }

    async fn json<T: DeserializeOwned>(
        &self,
        what: &str,
        rb: reqwest::RequestBuilder,
    ) -> Result<T, OpenCodeError> {
        let resp = self.send(what, rb).await?;
        let bytes = resp.bytes().await.map_err(|e| OpenCodeError::Unavailable {
            what: what.to_string(),
            detail: error_chain(&e),
        })?;
        serde_json::from_slice(&bytes).map_err(|e| OpenCodeError::Decode {
            what: what.to_string(),
            detail: e.to_string(),
        })
    }

    /// `GET /global/health`.
    /// Bounded by `timeout` (a server still starting can accept the
    /// connection and not answer).
    pub async fn health(&self, timeout: Duration) -> Result<Health, OpenCodeError> {
        let rb = self
            .request(&self.http, Method::GET, "/global/health")
            .timeout(timeout);
        self.json("health check", rb).await
    }

    /// `POST /session` with a title.
    pub async fn create_session(&self, title: &str) -> Result<SessionInfo, OpenCodeError> {
        let rb = self
            .request(&self.http, Method::POST, "/session")
            .json(&serde_json::json!({ "title": title }));
        self.json("creating a session", rb).await
    }

    /// `GET /session`.
    /// Bounded by [`MAX_SESSION_LIST_BYTES`]: a server with more sessions
    /// than that is refused (the caller logs it) rather than read into
    /// memory whole.
    pub async fn list_sessions(&self) -> Result<Vec<SessionInfo>, OpenCodeError> {
        let what = "listing sessions";
        let mut resp = self
            .send(what, self.request(&self.http, Method::GET, "/session"))
            .await?;
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| OpenCodeError::Unavailable {
            what: what.to_string(),
            detail: error_chain(&e),
        })? {
            if body.len() + chunk.len() > MAX_SESSION_LIST_BYTES {
                return Err(OpenCodeError::Decode {
                    what: what.to_string(),
                    detail: format!("the list is above {MAX_SESSION_LIST_BYTES} bytes"),
                });
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&body).map_err(|e| OpenCodeError::Decode {
            what: what.to_string(),
            detail: e.to_string(),
        })
    }

    /// `GET /session/{id}`.
    pub async fn get_session(&self, id: &str) -> Result<SessionInfo, OpenCodeError> {
        let path = format!("/session/{id}");
        self.json(
            "reading a session",
            self.request(&self.http, Method::GET, &path),
        )
        .await
    }

    /// `GET /agent`: each agent with its merged permission rules.
    pub async fn agents(&self) -> Result<Vec<AgentInfo>, OpenCodeError> {
        self.json(
            "listing agents",
            self.request(&self.http, Method::GET, "/agent"),
        )
        .await
    }

    /// `POST /global/dispose`: OpenCode stops what its instances run, the
    /// tool processes included (they run in their own process groups, so
    /// stopping the server alone would leave them behind).
    pub async fn dispose(&self) -> Result<(), OpenCodeError> {
        let rb = self.request(&self.http, Method::POST, "/global/dispose");
        self.send("disposing", rb).await.map(drop)
    }

    /// `DELETE /session/{id}`.
    pub async fn delete_session(&self, id: &str) -> Result<(), OpenCodeError> {
        let path = format!("/session/{id}");
        let rb = self.request(&self.http, Method::DELETE, &path);
        self.send("deleting a session", rb).await.map(drop)
    }

    /// `POST /session/{id}/prompt_async` (204 on acceptance).
    pub async fn prompt_async(&self, id: &str, body: &PromptBody) -> Result<(), OpenCodeError> {
        let path = format!("/session/{id}/prompt_async");
        let rb = self.request(&self.http, Method::POST, &path).json(body);
        self.send("sending the prompt", rb).await.map(drop)
    }

    /// `GET /session/{id}/message`.
    pub async fn messages(&self, id: &str) -> Result<Vec<MessageWithParts>, OpenCodeError> {
        let path = format!("/session/{id}/message");
        self.json(
            "reading messages",
            self.request(&self.http, Method::GET, &path),
        )
        .await
    }

    /// `GET /session/status`: busy sessions (idle ones are absent).
    pub async fn session_status(&self) -> Result<HashMap<String, Value>, OpenCodeError> {
        self.json(
            "reading session status",
            self.request(&self.http, Method::GET, "/session/status"),
        )
        .await
    }

    /// `POST /session/{id}/abort`, bounded by `timeout`. OpenCode answers
    /// `true` even for an idle session: confirm from the events.
    pub async fn abort(&self, id: &str, timeout: Duration) -> Result<(), OpenCodeError> {
        let path = format!("/session/{id}/abort");
        let rb = self
            .request(&self.http, Method::POST, &path)
            .timeout(timeout);
        self.send("aborting the session", rb).await.map(drop)
    }

    /// Answers a permission request: `POST /permission/{id}/reply`, falling
    /// back to the older `POST /session/{sid}/permissions/{id}`.
    pub async fn reply_permission(
        &self,
        session_id: &str,
        request_id: &str,
        reply: &str,
        message: Option<&str>,
    ) -> Result<(), OpenCodeError> {
        let path = format!("/permission/{request_id}/reply");
        let mut body = serde_json::json!({ "reply": reply });
        if let Some(m) = message {
            body["message"] = m.into();
        }
        let rb = self.request(&self.http, Method::POST, &path).json(&body);
        match self.send("answering a permission request", rb).await {
            Ok(_) => Ok(()),
            Err(OpenCodeError::NotFound { .. }) => {
                let path = format!("/session/{session_id}/permissions/{request_id}");
                let rb = self
                    .request(&self.http, Method::POST, &path)
                    .json(&serde_json::json!({ "response": reply }));
                self.send("answering a permission request (old route)", rb)
                    .await
                    .map(drop)
            }
            Err(e) => Err(e),
        }
    }

    /// Answers a question: `POST /question/{id}/reply` with one list of
    /// chosen labels per question.
    pub async fn reply_question(
        &self,
        request_id: &str,
        answers: &[Vec<String>],
    ) -> Result<(), OpenCodeError> {
        let path = format!("/question/{request_id}/reply");
        let rb = self
            .request(&self.http, Method::POST, &path)
            .json(&serde_json::json!({ "answers": answers }));
        self.send("answering a question", rb).await.map(drop)
    }

    /// `GET /config/providers`: provider id -> its model ids.
    pub async fn providers(
        &self,
    ) -> Result<HashMap<String, std::collections::HashSet<String>>, OpenCodeError> {
        let v: Value = self
            .json(
                "listing providers",
                self.request(&self.http, Method::GET, "/config/providers"),
            )
            .await?;
        let mut out = HashMap::new();
        for p in v
            .get("providers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let Some(id) = p.get("id").and_then(Value::as_str) else {
                continue;
            };
            let models = p
                .get("models")
                .and_then(Value::as_object)
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            out.insert(id.to_string(), models);
        }
        Ok(out)
    }

    /// Where a provider's model is served (`GET /config/providers`): the
    /// provider's `options.baseURL`, else the model's `api.url`; `None`
    /// when OpenCode does not say.
    pub async fn provider_endpoint(
        &self,
        provider: &str,
        model: &str,
    ) -> Result<Option<String>, OpenCodeError> {
        let v: Value = self
            .json(
                "listing providers",
                self.request(&self.http, Method::GET, "/config/providers"),
            )
            .await?;
        let Some(p) = v
            .get("providers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|p| p.get("id").and_then(Value::as_str) == Some(provider))
        else {
            return Ok(None);
        };
        let url = p
            .pointer("/options/baseURL")
            .and_then(Value::as_str)
            .or_else(|| {
                p.get("models")?
                    .get(model)?
                    .pointer("/api/url")
                    .and_then(Value::as_str)
            })
            .filter(|u| !u.is_empty())
            .map(str::to_string);
        Ok(url)
    }

    /// Rejects a question: `POST /question/{id}/reject`.
    pub async fn reject_question(&self, request_id: &str) -> Result<(), OpenCodeError> {
        let path = format!("/question/{request_id}/reject");
        let rb = self.request(&self.http, Method::POST, &path);
        self.send("rejecting a question", rb).await.map(drop)
    }

    /// Opens `GET /event`, checking the status and the content type (a 401
    /// must not look like an early end of stream).
    pub async fn open_events(&self) -> Result<reqwest::Response, OpenCodeError> {
        let rb = self
            .request(&self.stream_http, Method::GET, "/event")
            .header(reqwest::header::ACCEPT, "text/event-stream");
        let resp = self.send("opening the event stream", rb).await?;
        let ct = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        if !ct.starts_with("text/event-stream") {
            return Err(OpenCodeError::Decode {
                what: "opening the event stream".into(),
                detail: format!("content type is {ct:?}, not text/event-stream"),
            });
        }
        Ok(resp)
    }
}

/// `reqwest` hides the useful part of an error in its sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Attachment;

    #[test]
    fn prompt_parts_are_the_text_then_data_url_files() {
        let a = Attachment {
            filename: "dot.png".into(),
            mime: "image/png".into(),
            base64: "iVBORw==".into(),
            size: 4,
        };
        let parts = PromptPart::of("look", std::slice::from_ref(&a));
        assert_eq!(
            serde_json::to_value(&parts).unwrap(),
            serde_json::json!([
                {"type": "text", "text": "look"},
                {"type": "file", "mime": "image/png", "filename": "dot.png",
                 "url": "data:image/png;base64,iVBORw=="}
            ])
        );
    }
}
