//! Per-tenant shares of the daemon's memory (`[shares]`): the decoded
//! attachment bytes one tenant may have in turns queued or running. A
//! share is a semaphore of bytes per tenant; its permit rides with the
//! turn's reply sink and is given back when the turn ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::protocol::tenant::Caller;
use crate::protocol::Prompt;

/// Tenants' semaphores kept at most; idle ones are dropped beyond it.
const MAX_TENANTS: usize = 4096;

/// Each tenant's share of attachment bytes in flight.
pub struct AttachmentShares {
    /// Bytes per tenant; 0: no limit.
    per_tenant: usize,
    tenants: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl AttachmentShares {
    pub fn new(per_tenant: usize) -> AttachmentShares {
        AttachmentShares {
            per_tenant,
            tenants: Mutex::new(HashMap::new()),
        }
    }

    /// Takes the prompt's attachment bytes from its tenant's share:
    /// `Ok(None)` when there is nothing to take (no attachments, the
    /// operator, no limit), `Err` with the refusal's reason when the share
    /// cannot hold them now.
    pub fn take(&self, prompt: &Prompt) -> Result<Option<OwnedSemaphorePermit>, String> {
        let bytes: usize = prompt.attachments.iter().map(|a| a.size).sum();
        let Caller::Tenant(tenant) = &prompt.caller else {
            return Ok(None);
        };
        if bytes == 0 || self.per_tenant == 0 {
            return Ok(None);
        }
        let refused = || {
            format!(
                "{tenant} has attachments of turns queued or running that, with this prompt's {bytes} bytes, pass its share of {} bytes ([shares] attachment_bytes_in_flight); send again when one of its turns has ended",
                self.per_tenant
            )
        };
        let n = u32::try_from(bytes).map_err(|_| refused())?;
        self.semaphore(tenant)
            .try_acquire_many_owned(n)
            .map(Some)
            .map_err(|_| refused())
    }

    fn semaphore(&self, tenant: &str) -> Arc<Semaphore> {
        let mut tenants = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        if tenants.len() >= MAX_TENANTS && !tenants.contains_key(tenant) {
            // An idle tenant's semaphore is only its full count: forget it.
            tenants
                .retain(|_, s| Arc::strong_count(s) > 1 || s.available_permits() < self.per_tenant);
        }
        tenants
            .entry(tenant.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_tenant)))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{parse_prompt, PromptHeaders, PromptLimits};

    fn prompt(tenant: Option<&str>, bytes: usize) -> Prompt {
        use base64::Engine as _;
        let content = base64::engine::general_purpose::STANDARD.encode(vec![b'x'; bytes]);
        let body = serde_json::json!({"text": "x", "attachments": [{"filename": "a.txt", "content": content}]});
        let mut p = parse_prompt(
            body.to_string().as_bytes(),
            &PromptHeaders::default(),
            None,
            PromptLimits::payload(1 << 20),
        )
        .unwrap();
        p.caller = tenant.map_or(Caller::Operator, |t| Caller::Tenant(t.into()));
        p
    }

    #[test]
    fn a_tenant_holds_its_share_and_gets_it_back() {
        let shares = AttachmentShares::new(100);
        let a = shares.take(&prompt(Some("discord"), 60)).unwrap();
        assert!(a.is_some());
        let e = shares.take(&prompt(Some("discord"), 60)).unwrap_err();
        assert!(
            e.contains("share of 100 bytes ([shares] attachment_bytes_in_flight)")
                && e.contains("60 bytes"),
            "{e}"
        );
        // Another tenant and the operator are not touched.
        assert!(shares.take(&prompt(Some("slack"), 100)).unwrap().is_some());
        assert!(shares.take(&prompt(None, 1000)).unwrap().is_none());
        // The turn ended: its bytes come back.
        drop(a);
        assert!(shares.take(&prompt(Some("discord"), 60)).unwrap().is_some());
        assert!(AttachmentShares::new(0)
            .take(&prompt(Some("x"), 10))
            .unwrap()
            .is_none());
    }
}
