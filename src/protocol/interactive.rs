//! [pure] Interactive turns: the permission policy, and the answers a caller
//! sends to a `permission` or `question` reply.

use serde::Deserialize;
use serde_json::Value;

/// What the policy says about one permission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
    Ask,
}

/// One policy rule: a permission type (`bash`, `edit`, `*`) and a glob over
/// the request's patterns (`*` any run, `?` one character).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Only prompts of this tenant (`opencode.prompt.<tenant>...`); unset:
    /// every caller, the operator included.
    #[serde(default)]
    pub tenant: Option<String>,
    pub permission: String,
    #[serde(default = "star")]
    pub pattern: String,
    pub action: Action,
}

fn star() -> String {
    "*".to_string()
}

/// OpenCode 1.18's permissions that only read the project, load a skill's
/// instructions or keep the agent's own to-do list: allowed by the built-in
/// policy when no configured rule matches (`read` of `*.env` files
/// excepted, as OpenCode's own default does). Everything else (bash, edit
/// and write, webfetch, websearch, task, external_directory, doom_loop, MCP
/// tools) is denied unless a rule allows or asks. A read outside the project
/// comes as `external_directory` first, so it is denied too.
pub const READ_ONLY: &[&str] = &["read", "glob", "grep", "list", "lsp", "todowrite", "skill"];

/// Patterns of `read` the built-in policy does not allow (secrets).
const SECRET_FILES: &[&str] = &["*.env", "*.env.*"];

/// The permissions OpenCode 1.18's tools ask for (MCP tools ask under their
/// own names), checked against OpenCode's own rules at start-up.
pub const OPENCODE_PERMISSIONS: &[&str] = &[
    "bash",
    "edit",
    "webfetch",
    "websearch",
    "external_directory",
    "task",
    "doom_loop",
    "skill",
    "read",
    "glob",
    "grep",
    "list",
    "lsp",
    "todowrite",
];

/// One rule of OpenCode's own merged ruleset (an agent's `permission` in
/// `GET /agent`); the last matching rule wins, no match means ask.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct OpenCodeRule {
    pub permission: String,
    #[serde(default = "star")]
    pub pattern: String,
    pub action: String,
}

/// Where OpenCode would allow, without asking, a permission the bridge's
/// policy would deny or ask about for some caller (the operator or a tenant
/// named in `rules`): the bridge's policy would never see it. Each finding
/// names the permission and the pattern OpenCode allows.
pub fn bypasses(rules: &[Rule], opencode: &[OpenCodeRule]) -> Vec<String> {
    let mut tenants: Vec<Option<&str>> = vec![None];
    tenants.extend(rules.iter().filter_map(|r| r.tenant.as_deref()).map(Some));
    let mut found = Vec::new();
    for p in OPENCODE_PERMISSIONS {
        let policy_allows = tenants
            .iter()
            .all(|t| decide(rules, *t, p, &["*".to_string()]) == Action::Allow);
        if policy_allows {
            continue;
        }
        let applies = |r: &OpenCodeRule| glob(&r.permission, p);
        // The last catch-all rule decides for every pattern, unless a
        // narrower rule after it says otherwise; no catch-all: ask.
        let from = opencode
            .iter()
            .rposition(|r| applies(r) && r.pattern == "*")
            .unwrap_or(0);
        for r in &opencode[from..] {
            // OpenCode's rule for its saved tool outputs (every session's,
            // every tenant's) is reported on its own ([`reads_saved_outputs`]),
            // not here: the bridge's policy cannot tell whose file it is.
            if applies(r) && r.action == "allow" && !is_saved_outputs_rule(r) {
                found.push(format!("`{p}` (pattern {:?})", r.pattern));
            }
        }
    }
    found
}

/// OpenCode's rule that lets `external_directory` reach its saved tool
/// outputs (`<data>/opencode/tool-output/*`).
fn is_saved_outputs_rule(r: &OpenCodeRule) -> bool {
    r.permission == "external_directory" && r.pattern.ends_with("/opencode/tool-output/*")
}

/// Whether OpenCode's rules let an agent read the saved tool outputs of
/// every session without asking: the last rule for that folder allows it.
/// With one OpenCode for all tenants, that is every tenant's output
/// (`opencode/tool_output.rs`).
pub fn reads_saved_outputs(opencode: &[OpenCodeRule]) -> bool {
    opencode
        .iter()
        .rev()
        .find(|r| {
            glob(&r.permission, "external_directory")
                && (is_saved_outputs_rule(r) || r.pattern == "*")
        })
        .is_some_and(|r| r.action == "allow" && is_saved_outputs_rule(r))
}

/// The configured rules first (first match wins; a rule matches when its
/// tenant, if any, is the caller's, its permission matches and its pattern
/// matches every pattern of the request); then the built-in policy:
/// [`READ_ONLY`] permissions are allowed, anything else is denied, so a
/// headless turn never waits on a question nobody will answer.
pub fn decide(
    rules: &[Rule],
    tenant: Option<&str>,
    permission: &str,
    patterns: &[String],
) -> Action {
    for r in rules {
        if r.tenant.is_some() && r.tenant.as_deref() != tenant {
            continue;
        }
        if !glob(&r.permission, permission) {
            continue;
        }
        let all = if patterns.is_empty() {
            r.pattern == "*"
        } else {
            patterns.iter().all(|p| glob(&r.pattern, p))
        };
        if all {
            return r.action;
        }
    }
    // Another tenant's saved tool output may be in OpenCode's one folder
    // for all sessions: no tenant reads there (`opencode/tool_output.rs`).
    let saved_outputs = tenant.is_some()
        && patterns
            .iter()
            .any(|p| p.contains("/opencode/tool-output/") || p.ends_with("/opencode/tool-output"));
    if saved_outputs {
        return Action::Deny;
    }
    let secret = permission == "read"
        && patterns
            .iter()
            .any(|p| SECRET_FILES.iter().any(|g| glob(g, p)));
    if READ_ONLY.contains(&permission) && !secret {
        Action::Allow
    } else {
        Action::Deny
    }
}

/// `*` matches any run of characters, `?` exactly one.
pub fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// A caller's answer to a `permission` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermissionAnswer {
    /// `once`, `always` or `reject`.
    pub reply: String,
    pub message: Option<String>,
    /// Given when answering on the shared subject.
    pub request_id: Option<String>,
}

#[derive(Deserialize)]
struct RawPermission {
    #[serde(default)]
    reply: Option<String>,
    /// An agent-protocol query reply (`{"prompt": "yes"}`).
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    request_id: Option<String>,
}

/// Parses `{"reply": "once"|"always"|"reject", "message"?, "request_id"?}`
/// or the bare word.
pub fn parse_permission_answer(payload: &[u8]) -> Result<PermissionAnswer, String> {
    let text = std::str::from_utf8(payload).map_err(|_| "answer is not UTF-8".to_string())?;
    let t = text.trim();
    let a = if t.starts_with('{') {
        let r: RawPermission =
            serde_json::from_str(t).map_err(|e| format!("answer is not valid JSON: {e}"))?;
        let reply = r
            .reply
            .or(r.prompt)
            .ok_or("answer needs `reply` (or `prompt`)")?;
        PermissionAnswer {
            reply: word(&reply),
            message: r.message.filter(|m| !m.is_empty()),
            request_id: r.request_id,
        }
    } else {
        PermissionAnswer {
            reply: word(t),
            message: None,
            request_id: None,
        }
    };
    match a.reply.as_str() {
        "once" | "always" | "reject" => Ok(a),
        other => Err(format!(
            "`reply` must be \"once\", \"always\" or \"reject\", got {other:?}"
        )),
    }
}

/// An answer word, lowercase; the agent protocol's `yes`/`no` (and
/// `allow`/`deny`) read as `once`/`reject`.
fn word(w: &str) -> String {
    let w = w.trim().to_ascii_lowercase();
    match w.as_str() {
        "yes" | "y" | "allow" => "once".into(),
        "no" | "n" | "deny" => "reject".into(),
        _ => w,
    }
}

/// A caller's answer to a `question` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuestionAnswer {
    /// One list of chosen labels per question.
    Answers {
        answers: Vec<Vec<String>>,
        request_id: Option<String>,
    },
    Reject {
        request_id: Option<String>,
    },
}

impl QuestionAnswer {
    pub fn request_id(&self) -> Option<&str> {
        match self {
            QuestionAnswer::Answers { request_id, .. } | QuestionAnswer::Reject { request_id } => {
                request_id.as_deref()
            }
        }
    }
}

impl PermissionAnswer {
    pub fn request_id(&self) -> Option<&str> {
        self.request_id.as_deref()
    }
}

/// Parses `{"answers": [["label", ...], ...]}` or `{"reject": true}`; an
/// agent-protocol query reply (plain text, or `{"prompt": "..."}`) is the
/// one label of the first question.
pub fn parse_question_answer(payload: &[u8]) -> Result<QuestionAnswer, String> {
    let text = std::str::from_utf8(payload).map_err(|_| "answer is not UTF-8".to_string())?;
    if !text.trim_start().starts_with('{') {
        return Ok(QuestionAnswer::Answers {
            answers: vec![vec![text.trim().to_string()]],
            request_id: None,
        });
    }
    let v: Value =
        serde_json::from_slice(payload).map_err(|e| format!("answer is not valid JSON: {e}"))?;
    let request_id = v
        .get("request_id")
        .and_then(Value::as_str)
        .map(str::to_string);
    if v.get("reject").and_then(Value::as_bool) == Some(true) {
        return Ok(QuestionAnswer::Reject { request_id });
    }
    if let (None, Some(p)) = (v.get("answers"), v.get("prompt").and_then(Value::as_str)) {
        return Ok(QuestionAnswer::Answers {
            answers: vec![vec![p.trim().to_string()]],
            request_id,
        });
    }
    let answers = v
        .get("answers")
        .and_then(Value::as_array)
        .ok_or("answer needs `answers` (a list of label lists) or `reject: true`")?;
    let mut out = Vec::new();
    for a in answers {
        let labels = a
            .as_array()
            .ok_or("each answer is a list of labels")?
            .iter()
            .map(|l| l.as_str().map(str::to_string).ok_or("labels are strings"))
            .collect::<Result<Vec<_>, _>>()?;
        out.push(labels);
    }
    Ok(QuestionAnswer::Answers {
        answers: out,
        request_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(p: &str, pat: &str, a: Action) -> Rule {
        Rule {
            tenant: None,
            permission: p.into(),
            pattern: pat.into(),
            action: a,
        }
    }

    #[test]
    fn globbing() {
        assert!(glob("*", "anything at all"));
        assert!(glob("echo *", "echo hi"));
        assert!(!glob("echo *", "rm -rf /"));
        assert!(glob("a?c", "abc"));
        assert!(!glob("a?c", "abbc"));
        assert!(glob("*.rs", "src/main.rs"));
        assert!(glob("", ""));
        assert!(!glob("", "x"));
    }

    #[test]
    fn first_match_wins_and_the_default_is_deny() {
        let rules = vec![
            rule("bash", "echo *", Action::Allow),
            rule("bash", "*", Action::Ask),
            rule("read", "*", Action::Allow),
        ];
        let p = |s: &str| vec![s.to_string()];
        assert_eq!(decide(&rules, None, "bash", &p("echo hi")), Action::Allow);
        assert_eq!(decide(&rules, None, "bash", &p("rm x")), Action::Ask);
        // Every pattern must match.
        assert_eq!(
            decide(&rules, None, "bash", &["echo a".into(), "rm b".into()]),
            Action::Ask
        );
        assert_eq!(
            decide(&rules, None, "read", &p("/etc/passwd")),
            Action::Allow
        );
        assert_eq!(decide(&rules, None, "edit", &p("x")), Action::Deny);
        assert_eq!(decide(&[], None, "bash", &p("echo hi")), Action::Deny);
    }

    #[test]
    fn the_built_in_policy_reads_but_never_runs() {
        let p = |s: &str| vec![s.to_string()];
        for ro in READ_ONLY {
            assert_eq!(
                decide(&[], Some("chat"), ro, &p("x")),
                Action::Allow,
                "{ro}"
            );
        }
        for w in [
            "bash",
            "edit",
            "write",
            "webfetch",
            "websearch",
            "external_directory",
            "task",
            "doom_loop",
        ] {
            assert_eq!(decide(&[], None, w, &p("x")), Action::Deny, "{w}");
        }
        // A configured rule comes first, even against the built-in allow.
        let no_read = vec![rule("read", "*", Action::Deny)];
        assert_eq!(decide(&no_read, None, "read", &p("x")), Action::Deny);
    }

    #[test]
    fn secrets_are_not_read_by_default() {
        let p = |s: &str| vec![s.to_string()];
        assert_eq!(decide(&[], None, "read", &p(".env")), Action::Deny);
        assert_eq!(
            decide(&[], None, "read", &p("app/.env.local")),
            Action::Deny
        );
        assert_eq!(decide(&[], None, "read", &p("src/env.rs")), Action::Allow);
    }

    #[test]
    fn no_tenant_reads_the_saved_tool_outputs() {
        let f = |s: &str| vec![s.to_string()];
        let saved = "/home/u/.local/share/opencode/tool-output/tool_1";
        for perm in ["read", "list", "glob", "grep", "external_directory"] {
            assert_eq!(
                decide(&[], Some("discord"), perm, &f(saved)),
                Action::Deny,
                "{perm}"
            );
        }
        assert_eq!(
            decide(
                &[],
                Some("discord"),
                "list",
                &f("/home/u/.local/share/opencode/tool-output")
            ),
            Action::Deny
        );
        // The operator is not a tenant; a tenant's own files are read.
        assert_eq!(decide(&[], None, "read", &f(saved)), Action::Allow);
        assert_eq!(
            decide(&[], Some("discord"), "read", &f("/w/src/a.rs")),
            Action::Allow
        );
        let stock = vec![
            oc("*", "*", "ask"),
            oc("external_directory", "/d/opencode/tool-output/*", "allow"),
        ];
        assert!(reads_saved_outputs(&stock));
        let denied = vec![
            oc("*", "*", "ask"),
            oc("external_directory", "*", "ask"),
            oc("external_directory", "/d/opencode/tool-output/*", "deny"),
        ];
        assert!(!reads_saved_outputs(&denied));
        assert!(!reads_saved_outputs(&[oc("*", "*", "ask")]));
    }

    fn oc(p: &str, pat: &str, a: &str) -> OpenCodeRule {
        OpenCodeRule {
            permission: p.into(),
            pattern: pat.into(),
            action: a.into(),
        }
    }

    #[test]
    fn opencode_rules_that_skip_the_policy_are_found() {
        // OpenCode 1.18's stock build agent: allow everything.
        let stock = vec![oc("*", "*", "allow"), oc("doom_loop", "*", "ask")];
        let found = bypasses(&[], &stock);
        assert!(found.iter().any(|f| f.contains("`bash`")), "{found:?}");
        assert!(found.iter().any(|f| f.contains("`edit`")), "{found:?}");
        assert!(
            !found.iter().any(|f| f.contains("`doom_loop`")),
            "{found:?}"
        );
        assert!(
            !found.iter().any(|f| f.contains("`read`")),
            "read-only is allowed by the policy too: {found:?}"
        );
        // With "*": "ask" last, nothing is skipped (OpenCode's own output
        // folder, which it always appends, is no bypass).
        let asked = vec![
            oc("*", "*", "allow"),
            oc("bash", "*", "allow"),
            oc("*", "*", "ask"),
            oc(
                "external_directory",
                "/home/u/.local/share/opencode/tool-output/*",
                "allow",
            ),
        ];
        assert_eq!(bypasses(&[], &asked), Vec::<String>::new());
        // A narrow allow after the catch-all still skips the policy.
        let narrow = vec![oc("*", "*", "ask"), oc("bash", "git status*", "allow")];
        assert_eq!(
            bypasses(&[], &narrow),
            vec!["`bash` (pattern \"git status*\")".to_string()]
        );
        // A permission the policy allows for every caller is no finding.
        let allow_bash = vec![rule("bash", "*", Action::Allow)];
        assert!(!bypasses(&allow_bash, &narrow)
            .iter()
            .any(|f| f.contains("bash")));
        // ... but one allowed for a tenant only is.
        let ops_bash = vec![Rule {
            tenant: Some("ops".into()),
            ..rule("bash", "*", Action::Allow)
        }];
        assert!(bypasses(&ops_bash, &narrow)
            .iter()
            .any(|f| f.contains("bash")));
    }

    #[test]
    fn tenant_rules_bind_their_tenant_only() {
        let p = |s: &str| vec![s.to_string()];
        let rules = vec![Rule {
            tenant: Some("ops".into()),
            ..rule("bash", "*", Action::Allow)
        }];
        assert_eq!(decide(&rules, Some("ops"), "bash", &p("ls")), Action::Allow);
        assert_eq!(
            decide(&rules, Some("public"), "bash", &p("ls")),
            Action::Deny
        );
        assert_eq!(decide(&rules, Some("opsx"), "bash", &p("ls")), Action::Deny);
        // The operator is no tenant: a tenant's rule does not apply to it.
        assert_eq!(decide(&rules, None, "bash", &p("ls")), Action::Deny);
    }

    #[test]
    fn permission_answers() {
        assert_eq!(parse_permission_answer(b" once\n").unwrap().reply, "once");
        assert_eq!(parse_permission_answer(b"REJECT").unwrap().reply, "reject");
        let a =
            parse_permission_answer(br#"{"reply":"always","message":"ok","request_id":"per_1"}"#)
                .unwrap();
        assert_eq!(a.reply, "always");
        assert_eq!(a.message.as_deref(), Some("ok"));
        assert_eq!(a.request_id(), Some("per_1"));
        assert!(parse_permission_answer(b"maybe").is_err());
        assert!(parse_permission_answer(b"{").is_err());
        assert!(parse_permission_answer(b"\xff").is_err());
    }

    #[test]
    fn question_answers() {
        assert_eq!(
            parse_question_answer(br#"{"answers":[["a","b"],["c"]]}"#).unwrap(),
            QuestionAnswer::Answers {
                answers: vec![vec!["a".into(), "b".into()], vec!["c".into()]],
                request_id: None
            }
        );
        assert_eq!(
            parse_question_answer(br#"{"reject":true,"request_id":"que_1"}"#).unwrap(),
            QuestionAnswer::Reject {
                request_id: Some("que_1".into())
            }
        );
        assert!(parse_question_answer(br#"{"answers":"a"}"#).is_err());
        assert!(parse_question_answer(b"{}").is_err());
    }
}
