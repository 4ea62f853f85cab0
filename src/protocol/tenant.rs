//! [pure] Who sent a message, and what that caller may reach.
//!
//! The first token after a base subject names the caller's tenant:
//! `opencode.prompt.slack.C042` is tenant `slack`, conversation
//! `slack.C042`; `opencode.abort.slack` is an abort by `slack`. A message on
//! the bare base subject is the operator's (the deployment's NATS
//! permissions let only operators publish there): the operator may address
//! any conversation. A tenant reaches only conversations that are the
//! tenant itself or start with `<tenant>.`, replies under its own reply
//! space, and turns and requests it started (docs/PROTOCOL.md, "Tenants and
//! trust").

pub use super::caller::{is_under, Caller};
use super::prompt::Prompt;
use super::subject::validate_token;

/// The tail of `subject` below `base`: `None` when `subject` is not `base`
/// or below it, `Some(None)` for `base` itself.
pub fn tail<'a>(base: &str, subject: &'a str) -> Option<Option<&'a str>> {
    if subject == base {
        return Some(None);
    }
    let rest = subject.strip_prefix(base)?.strip_prefix('.')?;
    (!rest.is_empty()).then_some(Some(rest))
}

/// The daemon's own subjects, as far as routing needs them (borrowed from
/// the configuration, so this module stays free of it).
#[derive(Debug, Clone, Copy)]
pub struct Subjects<'a> {
    pub prompt: &'a str,
    pub abort: &'a str,
    pub permission_reply: &'a str,
    pub question_reply: &'a str,
    pub status: &'a str,
    pub heartbeat: &'a str,
    pub reply_prefix: &'a str,
    /// Turn state requests (`[subjects] turn_status`).
    pub turn_status: &'a str,
    /// Where jobs are published (`[jetstream] jobs_subject`).
    pub jobs: &'a str,
    /// Where daemons take forwarded prompts (`[cluster] instance_prefix`).
    pub instances: &'a str,
    /// Conversation control requests (`[controls] subject`).
    pub controls: &'a str,
}

/// Which kind of answer a control message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerKind {
    Permission,
    Question,
}

/// An incoming message, classified by its subject alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A prompt; `conversation` is the subject's tail (`slack.C042`).
    Prompt {
        caller: Caller,
        conversation: Option<String>,
    },
    /// An abort request.
    Abort { caller: Caller },
    /// An answer to a `permission` or `question` reply. `request_id` is in
    /// the subject (`<base>.<request_id>` for the operator,
    /// `<base>.<tenant>.<request_id>` for a tenant) or, on the bare base,
    /// in the payload.
    Answer {
        kind: AnswerKind,
        caller: Caller,
        request_id: Option<String>,
    },
    /// Not a subject the intake serves (or a malformed tail).
    Unknown,
}

impl Route {
    /// Classifies `subject`. Pure: the payload is parsed later.
    pub fn of(subjects: &Subjects<'_>, subject: &str) -> Route {
        if let Some(t) = tail(subjects.prompt, subject) {
            return match t {
                None => Route::Prompt {
                    caller: Caller::Operator,
                    conversation: None,
                },
                // A tenant token that could not be a subject token (a
                // server that let a user publish `*`) is nobody's.
                Some(t) if validate_token(first_token(t)).is_err() => Route::Unknown,
                Some(t) => Route::Prompt {
                    caller: Caller::Tenant(first_token(t).to_string()),
                    conversation: Some(t.to_string()),
                },
            };
        }
        if let Some(t) = tail(subjects.abort, subject) {
            return match t {
                None => Route::Abort {
                    caller: Caller::Operator,
                },
                Some(t) if validate_token(t).is_ok() => Route::Abort {
                    caller: Caller::Tenant(t.to_string()),
                },
                Some(_) => Route::Unknown,
            };
        }
        for (base, kind) in [
            (subjects.permission_reply, AnswerKind::Permission),
            (subjects.question_reply, AnswerKind::Question),
        ] {
            let Some(t) = tail(base, subject) else {
                continue;
            };
            let (caller, request_id) = match t.map(|t| t.split_once('.')) {
                None => (Caller::Operator, None),
                Some(None) => (Caller::Operator, t.map(str::to_string)),
                Some(Some((tenant, id)))
                    if validate_token(tenant).is_ok() && validate_token(id).is_ok() =>
                {
                    (Caller::Tenant(tenant.to_string()), Some(id.to_string()))
                }
                Some(Some(_)) => return Route::Unknown,
            };
            return Route::Answer {
                kind,
                caller,
                request_id,
            };
        }
        Route::Unknown
    }
}

fn first_token(s: &str) -> &str {
    s.split('.').next().unwrap_or(s)
}

/// What the operator lets prompts switch on or choose (`[prompt]`).
#[derive(Debug, Clone, Copy)]
pub struct PromptPolicy<'a> {
    /// Tools a prompt may enable with `"tools": {"<name>": true}`.
    pub allow_enable_tools: &'a [String],
    /// Agents a prompt may choose; empty: any.
    pub agents: &'a [String],
    /// Models (`provider/model`) a prompt may choose; empty: any.
    pub models: &'a [String],
    /// OpenCode commands a prompt may run; empty: none.
    pub commands: &'a [String],
}

/// Checks what a prompt asks for against its caller and the policy; the
/// error is the `forbidden` reply's message. The session a `session_id`
/// names is checked later, against OpenCode's record of it.
pub fn authorize(
    caller: &Caller,
    prompt: &Prompt,
    policy: &PromptPolicy<'_>,
) -> Result<(), String> {
    if let Some(c) = &prompt.conversation {
        if !caller.owns_conversation(c) {
            return Err(format!(
                "conversation {c:?} is not in the namespace of {caller} (it must be {t:?} or start with \"{t}.\")",
                t = caller.tenant().unwrap_or_default()
            ));
        }
    }
    if let Some(tools) = &prompt.tools {
        for (name, on) in tools {
            if *on && !policy.allow_enable_tools.iter().any(|t| t == name) {
                return Err(format!(
                    "`tools.{name}: true` would grant the tool without asking the permission policy; only `false` entries are accepted (the operator may allow enabling it in [prompt] allow_enable_tools)"
                ));
            }
        }
    }
    if let Some(a) = &prompt.agent {
        if !policy.agents.is_empty() && !policy.agents.iter().any(|x| x == a) {
            return Err(format!(
                "agent {a:?} is not allowed here (it is not in the operator's [prompt] agents)"
            ));
        }
    }
    if let Some(c) = &prompt.command {
        if !policy.commands.contains(&c.name) {
            return Err(format!(
                "command {:?} is not allowed here ([prompt] commands: {:?})",
                c.name, policy.commands
            ));
        }
    }
    if let Some(m) = &prompt.model {
        let m = m.to_string();
        if !policy.models.is_empty() && !policy.models.contains(&m) {
            return Err(format!(
                "model {m:?} is not allowed here (it is not in the operator's [prompt] models)"
            ));
        }
    }
    Ok(())
}

/// How replies may be routed (`[tenancy]`).
#[derive(Debug, Clone, Copy)]
pub struct ReplyRules<'a> {
    pub subjects: Subjects<'a>,
    /// Tenants' NATS reply subjects must be under `<inbox_prefix>.<tenant>.`
    /// and their `reply_to` under `<reply_prefix>.<tenant>.`.
    pub strict: bool,
    pub inbox_prefix: &'a str,
}

impl ReplyRules<'_> {
    /// The default reply subject: `<reply_prefix>.<tenant>.<trace_id>`, or
    /// `<reply_prefix>.<trace_id>` for the operator.
    pub fn default_subject(&self, caller: &Caller, trace_id: &str) -> String {
        match caller {
            Caller::Operator => format!("{}.{trace_id}", self.subjects.reply_prefix),
            Caller::Tenant(t) => format!("{}.{t}.{trace_id}", self.subjects.reply_prefix),
        }
    }

    /// Whether `s` is one of the subjects the daemon listens or publishes
    /// on itself: a reply there would act as a prompt, an abort, an answer,
    /// a status request, a heartbeat, a job or a forwarded prompt; or a
    /// system subject (`$JS.API`, `$KV`, `$O`, `$SRV`, `$SYS`...), where a
    /// reply published with the daemon's permissions would be a JetStream
    /// or service request.
    pub fn is_own(&self, s: &str) -> bool {
        let j = &self.subjects;
        [
            j.prompt,
            j.abort,
            j.permission_reply,
            j.question_reply,
            j.status,
            j.heartbeat,
            j.turn_status,
            j.jobs,
            j.instances,
            j.controls,
        ]
        .iter()
        .any(|base| is_under(s, base))
            || s.starts_with('$')
    }

    /// Where a turn's replies go: the NATS reply subject, else `reply_to`,
    /// else the default. `Err((reason, subject))`: the caller named a
    /// subject it may not use; the `forbidden` reply goes to `subject` (the
    /// caller's own default space), never to the one it named.
    pub fn route(
        &self,
        caller: &Caller,
        nats_reply: Option<&str>,
        reply_to: Option<&str>,
        trace_id: &str,
    ) -> Result<String, (String, String)> {
        let fallback = || self.default_subject(caller, trace_id);
        for (what, s) in [("reply subject", nats_reply), ("reply_to", reply_to)] {
            let Some(s) = s else { continue };
            if self.is_own(s) {
                return Err((
                    format!("{what} {s:?} is one of the bridge's own subjects"),
                    fallback(),
                ));
            }
            if let Caller::Tenant(t) = caller {
                let prefix = self.subjects.reply_prefix;
                let own_space = format!("{prefix}.{t}");
                if is_under(s, prefix) && !is_under(s, &own_space) {
                    return Err((
                        format!("{what} {s:?} is in another tenant's reply space (yours: {own_space}.>)"),
                        fallback(),
                    ));
                }
                if self.strict {
                    let (need, label) = if what == "reply_to" {
                        (own_space, "reply_to")
                    } else {
                        (format!("{}.{t}", self.inbox_prefix), "reply subject")
                    };
                    if !s.starts_with(&format!("{need}.")) {
                        return Err((
                            format!("{label} {s:?} must be under {need}.> ([tenancy] strict)"),
                            fallback(),
                        ));
                    }
                }
            }
        }
        Ok(match (nats_reply, reply_to) {
            (Some(r), _) | (None, Some(r)) => r.to_string(),
            (None, None) => fallback(),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The default subjects, for the pure modules' tests.
    pub(crate) const S: Subjects<'static> = Subjects {
        prompt: "opencode.prompt",
        abort: "opencode.abort",
        permission_reply: "opencode.permission.reply",
        question_reply: "opencode.question.reply",
        status: "opencode.bridge.status",
        heartbeat: "opencode.bridge.heartbeat",
        reply_prefix: "opencode.reply",
        turn_status: "opencode.turn.status",
        jobs: "opencode.job",
        instances: "opencode.bridge.instance",
        controls: "opencode.control",
    };

    fn tenant(t: &str) -> Caller {
        Caller::Tenant(t.into())
    }

    #[test]
    fn routes_by_subject() {
        assert_eq!(
            Route::of(&S, "opencode.prompt"),
            Route::Prompt {
                caller: Caller::Operator,
                conversation: None
            }
        );
        assert_eq!(
            Route::of(&S, "opencode.prompt.slack.C042"),
            Route::Prompt {
                caller: tenant("slack"),
                conversation: Some("slack.C042".into())
            }
        );
        assert_eq!(
            Route::of(&S, "opencode.prompt.slack"),
            Route::Prompt {
                caller: tenant("slack"),
                conversation: Some("slack".into())
            }
        );
        // A prefix that only looks alike is not the prompt subject.
        assert_eq!(Route::of(&S, "opencode.prompts.x"), Route::Unknown);
        assert_eq!(
            Route::of(&S, "opencode.abort"),
            Route::Abort {
                caller: Caller::Operator
            }
        );
        assert_eq!(
            Route::of(&S, "opencode.abort.discord"),
            Route::Abort {
                caller: tenant("discord")
            }
        );
        assert_eq!(Route::of(&S, "opencode.abort.a.b"), Route::Unknown);
        // A wildcard token is nobody's tenant.
        assert_eq!(Route::of(&S, "opencode.prompt.*.x"), Route::Unknown);
        assert_eq!(Route::of(&S, "opencode.abort.*"), Route::Unknown);
        assert_eq!(
            Route::of(&S, "opencode.permission.reply.>.per_1"),
            Route::Unknown
        );
        assert_eq!(
            Route::of(&S, "opencode.permission.reply.per_1"),
            Route::Answer {
                kind: AnswerKind::Permission,
                caller: Caller::Operator,
                request_id: Some("per_1".into())
            }
        );
        assert_eq!(
            Route::of(&S, "opencode.question.reply.slack.que_1"),
            Route::Answer {
                kind: AnswerKind::Question,
                caller: tenant("slack"),
                request_id: Some("que_1".into())
            }
        );
        assert_eq!(
            Route::of(&S, "opencode.permission.reply"),
            Route::Answer {
                kind: AnswerKind::Permission,
                caller: Caller::Operator,
                request_id: None
            }
        );
        assert_eq!(
            Route::of(&S, "opencode.permission.reply.a.b.c"),
            Route::Unknown
        );
    }

    #[test]
    fn tenants_own_their_namespace_only() {
        let d = tenant("discord");
        assert!(d.owns_conversation("discord"));
        assert!(d.owns_conversation("discord.D1"));
        assert!(!d.owns_conversation("discordx.D1"));
        assert!(!d.owns_conversation("slack.C1"));
        assert!(Caller::Operator.owns_conversation("slack.C1"));
        assert!(Caller::Operator.may_act_for(&d));
        assert!(d.may_act_for(&d));
        assert!(!d.may_act_for(&tenant("slack")));
        assert!(!d.may_act_for(&Caller::Operator));
    }

    fn prompt(json: &str) -> Prompt {
        crate::protocol::parse_prompt(
            json.as_bytes(),
            &Default::default(),
            None,
            crate::protocol::PromptLimits::payload(1 << 20),
        )
        .unwrap()
    }

    #[test]
    fn authorize_refuses_what_the_policy_keeps_closed() {
        let none: Vec<String> = vec![];
        let open = PromptPolicy {
            allow_enable_tools: &none,
            agents: &none,
            models: &none,
            commands: &none,
        };
        let d = tenant("discord");
        assert!(authorize(
            &d,
            &prompt(r#"{"text":"x","conversation":"slack.C1"}"#),
            &open
        )
        .unwrap_err()
        .contains("slack.C1"));
        assert!(authorize(
            &d,
            &prompt(r#"{"text":"x","conversation":"discord.D1"}"#),
            &open
        )
        .is_ok());
        assert!(authorize(
            &Caller::Operator,
            &prompt(r#"{"text":"x","conversation":"slack.C1"}"#),
            &open
        )
        .is_ok());
        for tools in [r#"{"bash":true}"#, r#"{"*":true}"#] {
            let p = prompt(&format!(r#"{{"text":"x","tools":{tools}}}"#));
            assert!(authorize(&d, &p, &open).unwrap_err().contains("tools"));
            // The operator may not either: nothing bypasses the policy.
            assert!(authorize(&Caller::Operator, &p, &open).is_err());
        }
        assert!(authorize(&d, &prompt(r#"{"text":"x","tools":{"bash":false}}"#), &open).is_ok());
        let bash = vec!["bash".to_string()];
        let agents = vec!["build".to_string()];
        let models = vec!["fake/m1".to_string()];
        let closed = PromptPolicy {
            allow_enable_tools: &bash,
            agents: &agents,
            models: &models,
            commands: &none,
        };
        assert!(authorize(
            &d,
            &prompt(r#"{"text":"x","tools":{"bash":true}}"#),
            &closed
        )
        .is_ok());
        assert!(authorize(&d, &prompt(r#"{"text":"x","tools":{"*":true}}"#), &closed).is_err());
        assert!(authorize(&d, &prompt(r#"{"text":"x","agent":"plan"}"#), &closed).is_err());
        assert!(authorize(&d, &prompt(r#"{"text":"x","agent":"build"}"#), &closed).is_ok());
        assert!(authorize(&d, &prompt(r#"{"text":"x","model":"fake/m2"}"#), &closed).is_err());
        assert!(authorize(&d, &prompt(r#"{"text":"x","model":"fake/m1"}"#), &closed).is_ok());
    }

    #[test]
    fn replies_stay_in_the_callers_space() {
        let lax = ReplyRules {
            subjects: S,
            strict: false,
            inbox_prefix: "_INBOX",
        };
        let strict = ReplyRules {
            strict: true,
            ..lax
        };
        let d = tenant("discord");
        // Defaults.
        assert_eq!(
            lax.route(&d, None, None, "t1").unwrap(),
            "opencode.reply.discord.t1"
        );
        assert_eq!(
            lax.route(&Caller::Operator, None, None, "t1").unwrap(),
            "opencode.reply.t1"
        );
        // The daemon's own subjects, for anybody.
        for own in [
            "opencode.abort",
            "opencode.abort.slack",
            "opencode.prompt.slack.C1",
            "opencode.permission.reply.slack.per_1",
            "opencode.question.reply",
            "opencode.bridge.status",
            "opencode.bridge.heartbeat.h",
            "$SRV.PING",
            // A reply there would be a JetStream request with the bridge's
            // permissions, a job, a turn state request, a forwarded prompt.
            "$JS.API.STREAM.DELETE.OPENCODE_JOBS",
            "$KV.opencode_bridge_conversations.c_x",
            "$O.opencode_bridge_finals.M.x",
            "opencode.job.slack.C1",
            "opencode.turn.status.slack",
            "opencode.bridge.instance.b1.prompt",
        ] {
            for caller in [&d, &Caller::Operator] {
                let (why, back) = lax.route(caller, Some(own), None, "t1").unwrap_err();
                assert!(why.contains("own subjects"), "{own}: {why}");
                assert!(back.ends_with(".t1") && back.starts_with("opencode.reply."));
                assert!(lax.route(caller, None, Some(own), "t1").is_err(), "{own}");
            }
        }
        // Another tenant's reply space, strict or not.
        let (_, back) = lax
            .route(&d, None, Some("opencode.reply.slack.C1"), "t1")
            .unwrap_err();
        assert_eq!(back, "opencode.reply.discord.t1");
        assert!(lax
            .route(&d, Some("opencode.reply.slack.x"), None, "t1")
            .is_err());
        assert_eq!(
            lax.route(&d, None, Some("opencode.reply.discord.D1"), "t1")
                .unwrap(),
            "opencode.reply.discord.D1"
        );
        // The operator may route anywhere but the daemon's own subjects.
        assert!(lax
            .route(
                &Caller::Operator,
                None,
                Some("opencode.reply.slack.C1"),
                "t1"
            )
            .is_ok());
        // Lax: any inbox. Strict: the tenant's own.
        assert!(lax.route(&d, Some("_INBOX.slack.abc"), None, "t1").is_ok());
        let (why, back) = strict
            .route(&d, Some("_INBOX.slack.abc"), None, "t1")
            .unwrap_err();
        assert!(why.contains("_INBOX.discord"), "{why}");
        assert_eq!(back, "opencode.reply.discord.t1");
        assert!(strict
            .route(&d, Some("_INBOX.discord.abc"), None, "t1")
            .is_ok());
        assert!(strict.route(&d, Some("elsewhere.x"), None, "t1").is_err());
        assert!(strict.route(&d, None, Some("my.replies"), "t1").is_err());
        assert!(strict
            .route(&d, None, Some("opencode.reply.discord.D1"), "t1")
            .is_ok());
        // Strict binds tenants only.
        assert!(strict
            .route(&Caller::Operator, Some("_INBOX.x.y"), None, "t1")
            .is_ok());
    }
}
