//! Turn scripts that read like OpenCode 1.18.34: the builder and the stock turns.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};

use super::*;

/// Writes one turn's realistic event sequence (see the module docs).
pub struct TurnBuilder {
    pub sid: String,
    pub user: String,
    pub text: String,
    pub model: (String, String),
    /// The cost of each finished step.
    pub cost: f64,
    /// Sleep after each delta.
    pub gap: Duration,
    user_created: u64,
    steps: Vec<Step>,
    created: HashMap<String, u64>,
    parts: HashMap<String, (String, u64)>,
}

impl TurnBuilder {
    pub fn new(input: &TurnInput) -> Self {
        TurnBuilder {
            sid: input.session_id.clone(),
            user: input.user_id.clone(),
            text: input.text.clone(),
            model: input.model(),
            cost: 0.0012,
            gap: Duration::ZERO,
            user_created: now_ms(),
            steps: Vec::new(),
            created: HashMap::new(),
            parts: HashMap::new(),
        }
    }

    pub fn gap_ms(&mut self, ms: u64) -> &mut Self {
        self.gap = Duration::from_millis(ms);
        self
    }

    pub fn push(&mut self, step: Step) -> &mut Self {
        self.steps.push(step);
        self
    }

    pub fn emit(&mut self, event: Value) -> &mut Self {
        self.push(Step::Emit(event))
    }

    pub fn sleep_ms(&mut self, ms: u64) -> &mut Self {
        self.push(Step::Sleep(Duration::from_millis(ms)))
    }

    /// The user message and its text part, noise, `session.status busy`.
    pub fn begin(&mut self) -> &mut Self {
        let (sid, user) = (self.sid.clone(), self.user.clone());
        self.emit(ev::user_message(
            &sid,
            &user,
            self.user_created,
            &self.model,
        ));
        self.emit(ev::user_text(
            &sid,
            &user,
            &next_id("prt"),
            &self.text.clone(),
        ));
        for n in ev::noise(&sid) {
            self.emit(n);
        }
        self.emit(ev::status(&sid, "busy"))
    }

    /// A new assistant message answering the user message (no parts yet).
    pub fn assistant_bare(&mut self) -> String {
        let asst = next_id("msg");
        let created = now_ms();
        self.created.insert(asst.clone(), created);
        let info = ev::assistant_info(
            &self.sid,
            &asst,
            &self.user,
            &self.model,
            created,
            None,
            None,
            self.cost,
        );
        self.emit(ev::message_updated(&self.sid.clone(), info));
        asst
    }

    /// A new assistant message, the user message re-sent, busy, step-start.
    pub fn assistant(&mut self) -> String {
        let asst = self.assistant_bare();
        let sid = self.sid.clone();
        self.emit(ev::user_summary(
            &sid,
            &self.user.clone(),
            self.user_created,
            &self.model,
        ));
        self.emit(ev::status(&sid, "busy"));
        self.emit(ev::step_start(&sid, &asst));
        asst
    }

    /// Opens an empty part of `kind` (`text` / `reasoning`); returns its id.
    pub fn part_start(&mut self, asst: &str, kind: &str) -> String {
        let id = next_id("prt");
        let start = now_ms();
        self.parts.insert(id.clone(), (kind.to_string(), start));
        self.emit(ev::text_part(
            &self.sid.clone(),
            asst,
            &id,
            kind,
            "",
            start,
            None,
        ));
        id
    }

    /// One delta of a part opened by [`part_start`](Self::part_start).
    pub fn delta(&mut self, asst: &str, part_id: &str, delta: &str) -> &mut Self {
        self.emit(ev::delta(&self.sid.clone(), asst, part_id, delta));
        if !self.gap.is_zero() {
            let g = self.gap;
            self.push(Step::Sleep(g));
        }
        self
    }

    /// Finishes a part with its full text (`time.end`).
    pub fn part_end(&mut self, asst: &str, part_id: &str, full: &str) -> &mut Self {
        let (kind, start) = self
            .parts
            .get(part_id)
            .cloned()
            .unwrap_or_else(|| ("text".into(), now_ms()));
        self.emit(ev::text_part(
            &self.sid.clone(),
            asst,
            part_id,
            &kind,
            full,
            start,
            Some(now_ms()),
        ))
    }

    /// A whole text part: empty, the deltas, the full text.
    pub fn text(&mut self, asst: &str, deltas: &[&str]) -> String {
        self.streamed_part(asst, "text", deltas)
    }

    /// A whole reasoning part (its deltas say `field: "text"` too).
    pub fn reasoning(&mut self, asst: &str, deltas: &[&str]) -> String {
        self.streamed_part(asst, "reasoning", deltas)
    }

    fn streamed_part(&mut self, asst: &str, kind: &str, deltas: &[&str]) -> String {
        let p = self.part_start(asst, kind);
        for d in deltas {
            self.delta(asst, &p, d);
        }
        self.part_end(asst, &p, &deltas.concat());
        p
    }

    /// A tool part going `pending` -> `running` (twice, as OpenCode does);
    /// returns the part id. Finish it with [`tool_end`](Self::tool_end).
    pub fn tool_start(&mut self, asst: &str, call_id: &str, tool: &str, args: &Value) -> String {
        let id = next_id("prt");
        let sid = self.sid.clone();
        let start = now_ms();
        self.parts.insert(id.clone(), ("tool".into(), start));
        for status in ["pending", "running", "running"] {
            self.emit(ev::tool_part(
                &sid, asst, &id, call_id, tool, status, args, None, start,
            ));
        }
        id
    }

    /// Completes (`Ok(output)`) or fails (`Err(error)`) a tool part.
    #[allow(clippy::too_many_arguments)]
    pub fn tool_end(
        &mut self,
        asst: &str,
        part_id: &str,
        call_id: &str,
        tool: &str,
        args: &Value,
        outcome: Result<&str, &str>,
    ) -> &mut Self {
        let start = self.parts.get(part_id).map(|p| p.1).unwrap_or_else(now_ms);
        let (status, text) = match outcome {
            Ok(o) => ("completed", o),
            Err(e) => ("error", e),
        };
        self.emit(ev::tool_part(
            &self.sid.clone(),
            asst,
            part_id,
            call_id,
            tool,
            status,
            args,
            Some(text),
            start,
        ))
    }

    /// A whole tool call.
    pub fn tool(
        &mut self,
        asst: &str,
        call_id: &str,
        tool: &str,
        args: &Value,
        outcome: Result<&str, &str>,
    ) -> String {
        let p = self.tool_start(asst, call_id, tool, args);
        self.tool_end(asst, &p, call_id, tool, args, outcome);
        p
    }

    /// `step-finish`, then the completed assistant message (twice, as
    /// OpenCode sends it) with `finish` (`stop`, `tool-calls`...).
    pub fn finish(&mut self, asst: &str, finish: &str) -> &mut Self {
        let sid = self.sid.clone();
        let reason = if finish == "tool-calls" {
            "tool-calls"
        } else {
            "stop"
        };
        self.emit(ev::step_finish(&sid, asst, reason, self.cost));
        let info = self.completed_info(asst, finish);
        self.emit(ev::message_updated(&sid, info.clone()));
        self.emit(ev::message_updated(&sid, info))
    }

    /// The completed info of an assistant message of this turn.
    pub fn completed_info(&self, asst: &str, finish: &str) -> Value {
        ev::assistant_info(
            &self.sid,
            asst,
            &self.user,
            &self.model,
            self.created.get(asst).copied().unwrap_or_else(now_ms),
            Some(now_ms()),
            Some(finish),
            self.cost,
        )
    }

    /// A provider error as OpenCode 1.18.34 reports it: `session.error`,
    /// idle, then the assistant message completed with `error`, idle again.
    pub fn fail(&mut self, asst: &str, error: Value) -> &mut Self {
        let sid = self.sid.clone();
        self.emit(ev::session_error(&sid, error.clone()));
        for e in ev::idle(&sid) {
            self.emit(e);
        }
        let mut info = ev::assistant_info(
            &sid,
            asst,
            &self.user,
            &self.model,
            self.created.get(asst).copied().unwrap_or_else(now_ms),
            Some(now_ms()),
            None,
            self.cost,
        );
        info["tokens"] = ev::zero_tokens();
        info["cost"] = json!(0);
        info["error"] = error;
        self.emit(ev::message_updated(&sid, info));
        for e in ev::idle(&sid) {
            self.emit(e);
        }
        self
    }

    /// `busy`, `session.status idle`, `session.idle` (the end of a turn).
    pub fn end(&mut self) -> &mut Self {
        let sid = self.sid.clone();
        self.emit(ev::status(&sid, "busy"));
        for e in ev::idle(&sid) {
            self.emit(e);
        }
        self
    }

    pub fn build(self) -> TurnScript {
        TurnScript { steps: self.steps }
    }
}

/// A plain text answer streamed as `deltas`.
pub fn text_turn(input: &TurnInput, deltas: &[&str]) -> TurnScript {
    paced_text_turn(input, deltas, 0)
}

/// A text answer of `deltas`, `gap_ms` apart (every event of the turn is).
pub fn paced_text_turn<S: AsRef<str>>(input: &TurnInput, deltas: &[S], gap_ms: u64) -> TurnScript {
    let deltas: Vec<&str> = deltas.iter().map(AsRef::as_ref).collect();
    let mut t = TurnBuilder::new(input);
    t.gap_ms(gap_ms);
    t.begin();
    let a = t.assistant();
    t.text(&a, &deltas);
    t.finish(&a, "stop");
    t.end();
    t.build()
}

/// Reasoning, then a text answer.
pub fn reasoning_turn(input: &TurnInput, reasoning: &[&str], text: &[&str]) -> TurnScript {
    let mut t = TurnBuilder::new(input);
    t.begin();
    let a = t.assistant();
    t.reasoning(&a, reasoning);
    t.text(&a, text);
    t.finish(&a, "stop");
    t.end();
    t.build()
}

/// One assistant message calling `calls` (`(call id, tool, args, output)`),
/// finishing with `tool-calls`, then a second one answering with `text`.
pub fn tool_turn(
    input: &TurnInput,
    calls: &[(&str, &str, Value, &str)],
    text: &[&str],
) -> TurnScript {
    let mut t = TurnBuilder::new(input);
    t.begin();
    let a1 = t.assistant();
    for (call, tool, args, out) in calls {
        t.tool(&a1, call, tool, args, Ok(out));
    }
    t.finish(&a1, "tool-calls");
    let a2 = t.assistant();
    t.text(&a2, text);
    t.finish(&a2, "stop");
    t.end();
    t.build()
}

/// The provider fails (`error`, e.g. [`api_error`]) before any output.
pub fn error_turn(input: &TurnInput, error: Value) -> TurnScript {
    let mut t = TurnBuilder::new(input);
    t.begin();
    let a = t.assistant_bare();
    let sid = t.sid.clone();
    let user = t.user.clone();
    let model = t.model.clone();
    t.emit(ev::user_summary(&sid, &user, now_ms(), &model));
    t.emit(ev::status(&sid, "busy"));
    t.fail(&a, error);
    t.build()
}

/// Splits `text` into word-sized deltas (spaces kept).
pub fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in text.chars() {
        cur.push(c);
        if c == ' ' {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The answer of [`default_script`] to a plain prompt.
pub fn echo_reply(prompt: &str) -> String {
    format!("Fake OpenCode heard: {prompt}")
}

/// The script used unless a test sets one, chosen by a marker in the text:
///
/// | marker | turn |
/// |---|---|
/// | none | text [`echo_reply`]`(text)`, a word per delta |
/// | `[reasoning]` | reasoning `"Thinking it over."`, then text `"The answer is 42."` |
/// | `[tool]` | a `bash` call (`echo tool-ok`, output `tool-ok\n`), then text `"The tool said tool-ok"` |
/// | `[error401]` | `APIError` 401 (not retryable) |
/// | `[error503]` | `APIError` 503 (retryable) |
/// | `[slow]` | 20 deltas `"slow-N "` 100 ms apart |
/// | `[hang]` | the turn starts, then only heartbeats (200 ms) for 60 s |
pub fn default_script(input: &TurnInput) -> TurnScript {
    let text = input.text.as_str();
    if text.contains("[reasoning]") {
        reasoning_turn(
            input,
            &["Thinking ", "it ", "over."],
            &["The answer ", "is 42."],
        )
    } else if text.contains("[tool]") {
        tool_turn(
            input,
            &[(
                "call_fake_1",
                "bash",
                json!({"command": "echo tool-ok", "description": "echo"}),
                "tool-ok\n",
            )],
            &["The tool ", "said tool-ok"],
        )
    } else if text.contains("[error401]") {
        error_turn(input, api_error(401, "Incorrect API key provided", false))
    } else if text.contains("[error503]") {
        error_turn(input, api_error(503, "Service overloaded", true))
    } else if text.contains("[slow]") {
        let deltas: Vec<String> = (1..=20).map(|i| format!("slow-{i} ")).collect();
        paced_text_turn(input, &deltas, 100)
    } else if text.contains("[hang]") {
        hang_turn(input, Duration::from_millis(200), Duration::from_secs(60))
    } else {
        let w = words(&echo_reply(text));
        let refs: Vec<&str> = w.iter().map(String::as_str).collect();
        text_turn(input, &refs)
    }
}

/// The turn starts (user message, assistant message, a first delta), then
/// only `server.heartbeat` every `every` for `total`.
pub fn hang_turn(input: &TurnInput, every: Duration, total: Duration) -> TurnScript {
    let mut t = TurnBuilder::new(input);
    t.begin();
    let a = t.assistant();
    let p = t.part_start(&a, "text");
    t.delta(&a, &p, "Starting... ");
    t.push(Step::Heartbeats { every, total });
    t.build()
}
