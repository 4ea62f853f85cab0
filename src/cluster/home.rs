//! [pure] A conversation's home in the cluster: the records kept in the
//! KV buckets, their keys, and the decision a daemon takes for a prompt
//! from what it read there (docs/CLUSTER.md).

use serde::{Deserialize, Serialize};

/// Who owns a conversation (the value under its key in
/// `[cluster] conversations_bucket`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Home {
    /// The owner daemon's instance id.
    pub instance: String,
    /// Its host, named in the note when the conversation moves.
    pub host: String,
    /// The OpenCode server it drives (`[cluster] opencode_id`).
    pub opencode: String,
    /// The conversation's session on that server, once made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// Handed back by a daemon that stopped gracefully: the next daemon
    /// takes it over at once, without waiting for the lease to expire.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub released: bool,
}

/// A live daemon (the value under its instance id in
/// `[cluster] instances_bucket`, renewed every third of the lease TTL).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub host: String,
    pub opencode: String,
    /// Seconds since the Unix epoch when the daemon started.
    pub started_unix: u64,
}

/// This daemon, as the cluster knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Me {
    pub instance: String,
    pub host: String,
    pub opencode: String,
}

impl Me {
    /// A fresh claim on a conversation.
    pub fn home(&self, session_id: Option<String>) -> Home {
        Home {
            instance: self.instance.clone(),
            host: self.host.clone(),
            opencode: self.opencode.clone(),
            session_id,
            released: false,
        }
    }
}

/// What to do with a prompt, given the conversation's home as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// This daemon is the home.
    Serve,
    /// No home yet: claim it (create; another daemon may win the race).
    Claim,
    /// Another live daemon is the home: forward the prompt there (or, for
    /// a prompt already forwarded once, refuse it: `session_busy`).
    Forward { instance: String },
    /// The home daemon is dead: take the conversation over (compare-and-
    /// swap on `revision`). `session` is kept when this daemon drives the
    /// same OpenCode; otherwise a new session is made and the final says
    /// `session_recreated`, naming `lost_host`.
    TakeOver {
        revision: u64,
        session: Option<String>,
        lost_host: Option<String>,
    },
}

/// The decision for a conversation whose home is `home` (with its KV
/// revision), `owner_alive` telling whether the home daemon's lease is
/// still there (not asked when the home is this daemon). A released home
/// is taken over like a dead one.
pub fn decide(me: &Me, home: Option<(&Home, u64)>, owner_alive: bool) -> Decision {
    let Some((home, revision)) = home else {
        return Decision::Claim;
    };
    if home.instance == me.instance && !home.released {
        return Decision::Serve;
    }
    if owner_alive && !home.released {
        return Decision::Forward {
            instance: home.instance.clone(),
        };
    }
    let same = home.opencode == me.opencode;
    Decision::TakeOver {
        revision,
        session: if same { home.session_id.clone() } else { None },
        lost_host: (!same).then(|| home.host.clone()),
    }
}

/// A conversation key as a KV key: letters, digits, `-` and `_` stay;
/// every other byte becomes `=XX` (hex). Distinct keys stay distinct, and
/// the result is always a valid KV key (never empty, no dots).
pub fn key(conversation: &str) -> String {
    let mut out = String::with_capacity(conversation.len() + 2);
    out.push('c');
    out.push('_');
    for b in conversation.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(b as char);
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    out
}

/// This daemon's instance id when none is configured: the host name as a
/// subject token and a random suffix (`build-01-3fa9c2d1`).
pub fn instance_id(host: &str, random: u32) -> String {
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(48)
        .collect();
    format!("{host}-{random:08x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me(opencode: &str) -> Me {
        Me {
            instance: "b-1".into(),
            host: "b".into(),
            opencode: opencode.into(),
        }
    }

    fn home_of(instance: &str, opencode: &str) -> Home {
        Home {
            instance: instance.into(),
            host: format!("host-of-{instance}"),
            opencode: opencode.into(),
            session_id: Some("ses_1".into()),
            released: false,
        }
    }

    #[test]
    fn a_conversation_without_a_home_is_claimed() {
        assert_eq!(decide(&me("oc-b"), None, false), Decision::Claim);
    }

    #[test]
    fn its_home_serves_it_and_another_live_home_gets_it_forwarded() {
        let h = home_of("b-1", "oc-b");
        assert_eq!(decide(&me("oc-b"), Some((&h, 3)), false), Decision::Serve);
        let h = home_of("a-1", "oc-a");
        assert_eq!(
            decide(&me("oc-b"), Some((&h, 3)), true),
            Decision::Forward {
                instance: "a-1".into()
            }
        );
    }

    #[test]
    fn a_dead_home_is_taken_over_keeping_the_session_only_on_the_same_opencode() {
        let h = home_of("a-1", "shared");
        assert_eq!(
            decide(&me("shared"), Some((&h, 7)), false),
            Decision::TakeOver {
                revision: 7,
                session: Some("ses_1".into()),
                lost_host: None
            }
        );
        let h = home_of("a-1", "oc-a");
        assert_eq!(
            decide(&me("oc-b"), Some((&h, 7)), false),
            Decision::TakeOver {
                revision: 7,
                session: None,
                lost_host: Some("host-of-a-1".into())
            }
        );
    }

    #[test]
    fn a_released_home_is_taken_over_even_while_its_daemon_lives() {
        let mut h = home_of("a-1", "shared");
        h.released = true;
        assert_eq!(
            decide(&me("shared"), Some((&h, 9)), true),
            Decision::TakeOver {
                revision: 9,
                session: Some("ses_1".into()),
                lost_host: None
            }
        );
        // Its own released home (it stopped and came back): taken again.
        let mut h = home_of("b-1", "oc-b");
        h.released = true;
        assert!(matches!(
            decide(&me("oc-b"), Some((&h, 2)), true),
            Decision::TakeOver {
                lost_host: None,
                ..
            }
        ));
    }

    #[test]
    fn keys_are_valid_kv_keys_and_distinct() {
        let ks: Vec<String> = ["slack.C1", "slack_2EC1", "slack=2EC1", "", "é/x y", "."]
            .iter()
            .map(|c| key(c))
            .collect();
        for k in &ks {
            assert!(!k.is_empty());
            assert!(k
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_=".contains(&b)));
        }
        let unique: std::collections::HashSet<&String> = ks.iter().collect();
        assert_eq!(unique.len(), ks.len(), "{ks:?}");
        assert_eq!(key("slack.C1"), "c_slack=2EC1");
    }

    #[test]
    fn a_generated_instance_id_is_one_subject_token() {
        let id = instance_id("build-01.example.com", 0x3fa9c2d1);
        assert_eq!(id, "build-01-example-com-3fa9c2d1");
        assert!(!instance_id("x y.z*>", 1).contains(['.', '*', '>', ' ']));
    }
}
