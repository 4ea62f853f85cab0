//! Provider trouble, made visible and fast: OpenCode's provider retries
//! told to the caller (`status` replies, for prompts with `progress`) and
//! cut short at `[turn] provider_retry_limit`; every `provider_error` says
//! which model and endpoint failed, whether a retry can help, and what to
//! do about it.

use tracing::{info, warn};

use super::context::{TurnContext, TurnError};
use super::sink::ReplySink;
use crate::protocol::{ErrorCode, Prompt, ReplyBody, StatusEvent};

/// Counts one turn's provider retries.
pub struct ProviderRetries {
    limit: u32,
    progress: bool,
}

impl ProviderRetries {
    pub fn new(limit: u32, progress: bool) -> Self {
        ProviderRetries { limit, progress }
    }

    /// OpenCode announced retry `attempt` (from 1) because of `reason`:
    /// logged, told to a caller who asked for progress; at the limit, the
    /// turn's error (the caller aborts the session and ends the turn).
    pub async fn on_retry(
        &mut self,
        sink: &mut ReplySink,
        attempt: Option<u64>,
        reason: Option<String>,
    ) -> Option<TurnError> {
        let attempt = attempt.unwrap_or(1).max(1);
        let reason = reason.unwrap_or_default();
        info!(
            attempt,
            reason = %reason,
            limit = self.limit,
            "OpenCode is retrying the model provider"
        );
        // The caller hears the reason without the provider's hosts or paths.
        let reason = crate::protocol::redact::public_error(&reason);
        if self.progress {
            sink.send(ReplyBody::Status {
                event: StatusEvent::ProviderRetry,
                attempt,
                reason: reason.clone(),
                retry_limit: self.limit,
            })
            .await;
        }
        if self.limit == 0 || attempt < u64::from(self.limit) {
            return None;
        }
        warn!(
            attempt,
            "the model provider keeps failing; ending the turn ([turn] provider_retry_limit)"
        );
        Some(TurnError {
            code: ErrorCode::ProviderError,
            message: format!(
                "the model provider failed {attempt} times in a row ({}); the bridge stopped waiting at [turn] provider_retry_limit = {}",
                if reason.is_empty() { "no reason given" } else { &reason },
                self.limit
            ),
            retryable: true,
        })
    }
}

/// Adds to a `provider_error` which model failed and where, whether a
/// retry can help, and one line of what to do. Other errors pass as they
/// are.
pub async fn explain(
    ctx: &TurnContext,
    prompt: &Prompt,
    session_id: Option<&str>,
    mut e: TurnError,
) -> TurnError {
    if e.code != ErrorCode::ProviderError {
        return e;
    }
    // Not the provider's fault: the conversation is too long, or the answer.
    let about_size = ["ContextOverflowError", "MessageOutputLengthError"]
        .iter()
        .any(|n| e.message.starts_with(n));
    let model = match session_id {
        Some(id) => last_model(ctx, id).await,
        None => None,
    }
    .or_else(|| {
        prompt
            .model
            .as_ref()
            .map(|m| (m.provider.clone(), m.model.clone()))
    });
    let endpoint = match &model {
        Some((p, m)) => ctx
            .client
            .provider_endpoint(p, m)
            .await
            .ok()
            .flatten()
            .map(|u| crate::opencode::client::host_of(&u)),
        None => None,
    };
    // Where the provider is goes to the log, never to the caller.
    if let Some(h) = &endpoint {
        warn!(endpoint = %h, error = %e.message, "the model provider failed");
    }
    let which = match &model {
        Some((p, m)) => format!("model {p}/{m}"),
        None => "OpenCode's default model".to_string(),
    };
    let message = e.message.trim_end_matches('.');
    let auth = is_auth(&e.message);
    let retry = if e.retryable {
        "Sending the prompt again later can help if the provider recovers."
    } else {
        "Sending the prompt again will not help until this is fixed."
    };
    let todo = if about_size {
        "What to do: start a new conversation, or choose a model with a larger context (the prompt's \"model\" field)."
            .to_string()
    } else if auth {
        format!(
            "What to do: give OpenCode a key for {} (`opencode auth login` as the user the daemon runs as, then restart the daemon), or choose another model (the prompt's \"model\" field, `prompt --model provider/model`).",
            model.as_ref().map_or("the provider", |(p, _)| p.as_str())
        )
    } else {
        "What to do: check that the provider is reachable and working (the daemon's log names its endpoint), configure a provider (`opencode auth login`) or choose another model (the prompt's \"model\" field, `prompt --model provider/model`, or OpenCode's \"model\" setting).".to_string()
    };
    e.message = format!("{message} ({which}). {retry} {todo}");
    e
}

/// The provider and model of the session's last assistant message.
async fn last_model(ctx: &TurnContext, session_id: &str) -> Option<(String, String)> {
    let messages = ctx.client.messages(session_id).await.ok()?;
    messages.iter().rev().find_map(|m| {
        Some((
            m.info.provider_id.clone().filter(|s| !s.is_empty())?,
            m.info.model_id.clone().filter(|s| !s.is_empty())?,
        ))
    })
}

/// Whether an error message says the provider refused our credentials.
fn is_auth(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.starts_with("providerautherror")
        || m.contains("401")
        || m.contains("403")
        || m.contains("api key")
        || m.contains("unauthorized")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_auth() {
        assert_eq!(
            crate::opencode::client::host_of("http://127.0.0.1:8080/v1"),
            "127.0.0.1:8080"
        );
        assert_eq!(
            crate::opencode::client::host_of("https://api.openai.com/v1"),
            "api.openai.com"
        );
        assert_eq!(crate::opencode::client::host_of("not a url"), "not a url");
        assert!(is_auth("APIError: Incorrect API key provided"));
        assert!(is_auth("ProviderAuthError: no key"));
        assert!(!is_auth("APIError: Internal Server Error"));
    }
}
