//! A message as it came off the bus: subject, reply subject, the prompt
//! headers and a valid `traceparent`.

use async_nats::HeaderMap;
use bytes::Bytes;

use crate::protocol::traceparent::TraceParent;
use crate::protocol::PromptHeaders;

/// A prompt as it came off the bus.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub subject: String,
    /// The NATS reply subject (request style), if any.
    pub reply: Option<String>,
    pub headers: PromptHeaders,
    /// A valid W3C `traceparent` header, normalised (an invalid one is
    /// dropped, as the specification says).
    pub traceparent: Option<String>,
    pub payload: Bytes,
    /// Set on a prompt another daemon forwarded here (its instance id): it
    /// is never forwarded again (`bus::forward`).
    pub forwarded_by: Option<String>,
}

fn header(h: Option<&HeaderMap>, name: &str) -> Option<String> {
    h.and_then(|h| h.get(name))
        .map(|v| v.as_str().trim().to_string())
        .filter(|v| !v.is_empty())
}

/// A header whose name is matched without regard to case: W3C trace
/// context names are lowercase, but Go's NATS client canonicalises them
/// (`Traceparent`).
fn header_any_case(h: Option<&HeaderMap>, name: &str) -> Option<String> {
    h?.iter()
        .find(|(k, _)| AsRef::<str>::as_ref(*k).eq_ignore_ascii_case(name))
        .and_then(|(_, v)| v.first())
        .map(|v| v.as_str().trim().to_string())
        .filter(|v| !v.is_empty())
}

impl From<async_nats::Message> for Incoming {
    fn from(m: async_nats::Message) -> Self {
        let h = m.headers.as_ref();
        Incoming {
            subject: m.subject.to_string(),
            reply: m.reply.map(|r| r.to_string()),
            headers: PromptHeaders {
                trace_id: header(h, "Trace-Id"),
                conversation: header(h, "Conversation"),
                model: header(h, "Model"),
                agent: header(h, "Agent"),
            },
            traceparent: header_any_case(h, "traceparent")
                .and_then(|v| TraceParent::parse(&v))
                .map(|t| t.to_string()),
            payload: m.payload,
            forwarded_by: None,
        }
    }
}
