//! A scripted fake of an OpenAI-compatible LLM, for driving the real OpenCode.
//!
//! Serves `POST /v1/chat/completions` on `127.0.0.1:0` (see [`FakeLlm::start`];
//! give OpenCode [`FakeLlm::base_url`], which ends in `/v1`). Every request body
//! is recorded ([`FakeLlm::requests`]).
//!
//! The answer is chosen by a marker in the text of the **last user message**:
//!
//! | marker | answer |
//! |---|---|
//! | none | text [`text_reply`]`(prompt)`, streamed a word at a time |
//! | `[reasoning]` | reasoning [`REASONING_TEXT`] (`delta.reasoning_content`), then text [`REASONING_ANSWER`] |
//! | `[tool:bash <cmd>]` | a `bash` tool call, arguments `{"command": <cmd>, "description": TOOL_DESCRIPTION}` streamed in fragments, `finish_reason: "tool_calls"`; the follow-up request (its last message has `role: "tool"`) gets text [`tool_followup_reply`]`(tool output)` |
//! | `[tool:write <path>\|<content>]` | a `write` tool call, arguments `{"filePath": <path>, "content": <content>}`; the follow-up as for bash |
//! | `[error401]` | HTTP 401 with an OpenAI-style JSON error ([`ERROR_401_MESSAGE`]) |
//! | `[error500]` | HTTP 500 with an OpenAI-style JSON error ([`ERROR_500_MESSAGE`]); OpenCode retries it |
//! | `[slow]` | text [`slow_reply`]`()`: [`SLOW_CHUNKS`] chunks, [`SLOW_CHUNK_DELAY`] apart |
//! | `[many]` | text [`many_reply`]`()`: [`MANY_CHUNKS`] chunks, [`MANY_PAUSE`] after every ten |
//! | `[recall]` | text [`recall_reply`]`(first user message of the conversation)` |
//! | `[call:<tool> <json args>:call]` | a call of any tool with these arguments (the follow-up as for `[tool:bash]`) |
//!
//! Title requests (no tools, and either `stream: false` or a system prompt that
//! mentions "title") get [`TITLE`], as JSON or as a stream as asked. OpenCode
//! 1.18.34 sends one only for a session created without a title: streamed, no
//! `tools`, system prompt "You are a title generator. ...".
//!
//! Every streamed answer ends with a usage chunk ([`USAGE_PROMPT_TOKENS`] ...)
//! and `data: [DONE]`. Chunks look like
//! `data: {"id":"chatcmpl-fake-N","object":"chat.completion.chunk","created":1700000000,"model":"m1","choices":[{"index":0,"delta":{...},"finish_reason":null}]}`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::http::{handler, HttpServer, Request, Response};

/// `usage.prompt_tokens` of every answer.
pub const USAGE_PROMPT_TOKENS: u64 = 120;
/// `usage.completion_tokens` of every answer.
pub const USAGE_COMPLETION_TOKENS: u64 = 30;
/// `usage.total_tokens` of every answer.
pub const USAGE_TOTAL_TOKENS: u64 = 150;
/// `usage.prompt_tokens_details.cached_tokens` of every answer.
pub const USAGE_CACHED_TOKENS: u64 = 20;
/// `usage.completion_tokens_details.reasoning_tokens` of every answer.
pub const USAGE_REASONING_TOKENS: u64 = 8;

/// The title given to every title request.
pub const TITLE: &str = "Fake title";
/// Reasoning text of the `[reasoning]` scenario.
pub const REASONING_TEXT: &str = "Let me think about this step by step. The answer is simple.";
/// Answer text of the `[reasoning]` scenario.
pub const REASONING_ANSWER: &str = "After thinking: the answer is 42.";
/// The `description` argument of the scripted bash call.
pub const TOOL_DESCRIPTION: &str = "Run the command the fake LLM was told to run";
/// The `message` of the `[error401]` error body.
pub const ERROR_401_MESSAGE: &str = "Incorrect API key provided (fake LLM)";
/// The `message` of the `[error500]` error body.
pub const ERROR_500_MESSAGE: &str = "The server had an error (fake LLM)";
/// Chunks of the `[slow]` answer.
pub const SLOW_CHUNKS: usize = 25;
/// Delay before each chunk of the `[slow]` answer (the first one included).
pub const SLOW_CHUNK_DELAY: Duration = Duration::from_millis(200);
/// Model name the fake reports in its chunks.
pub const MODEL: &str = "m1";

/// The answer to a prompt without a marker.
pub fn text_reply(prompt: &str) -> String {
    format!("Hello from the fake LLM. You said: {}", prompt.trim())
}

/// The answer after a tool ran, given the tool output OpenCode sent back.
pub fn tool_followup_reply(tool_output: &str) -> String {
    format!("The tool printed: {}", tool_output.trim())
}

/// The answer of the `[recall]` scenario.
pub fn recall_reply(first_user_message: &str) -> String {
    format!("Your first message was: \"{}\"", first_user_message.trim())
}

/// Chunks of the `[many]` answer.
pub const MANY_CHUNKS: usize = 2000;
/// Pause after every ten chunks of the `[many]` answer (about 2 s in all).
pub const MANY_PAUSE: Duration = Duration::from_millis(10);

/// The full text of the `[many]` answer.
pub fn many_reply() -> String {
    many_chunks().concat()
}

fn many_chunks() -> Vec<String> {
    (1..=MANY_CHUNKS).map(|i| format!("m{i} ")).collect()
}

/// The full text of the `[slow]` answer.
pub fn slow_reply() -> String {
    slow_chunks().concat()
}

fn slow_chunks() -> Vec<String> {
    (1..=SLOW_CHUNKS).map(|i| format!("slow-{i} ")).collect()
}

/// What the fake does for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scenario {
    Title,
    Text,
    Reasoning,
    /// The first request of a tool turn: call bash with this command.
    ToolCall(String),
    /// The request after the tool ran: answer with its output.
    ToolFollowup,
    /// `[tool:write <path>|<content>]`: OpenCode's `write` tool.
    Write(String, String),
    Error401,
    Error500,
    Slow,
    /// `[many]`: [`MANY_CHUNKS`] short text chunks, a few ms apart.
    Many,
    Recall,
    /// Call OpenCode's `question` tool with [`question_args`].
    Question,
    /// `[task:<prompt>:task]`: call OpenCode's `task` tool (a `general`
    /// subagent) with this prompt.
    Task(String),
    /// `[call:<tool> <json args>:call]`: call any tool with these arguments.
    Call(String, String),
}

/// The arguments of the `[question]` scenario's `question` tool call.
pub fn question_args() -> Value {
    json!({"questions": [{
        "question": "Which fruit?",
        "header": "Fruit",
        "options": [
            {"label": "apple", "description": "red"},
            {"label": "pear", "description": "green"}
        ]
    }]})
}

/// A recorded request.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: String,
    pub body: Value,
    pub scenario: Scenario,
}

/// The running fake; dropping it stops the server.
pub struct FakeLlm {
    server: HttpServer,
    recorded: Arc<Mutex<Vec<Recorded>>>,
}

impl FakeLlm {
    pub async fn start() -> FakeLlm {
        let recorded: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let rec = recorded.clone();
        let server = HttpServer::start(handler(move |req: Request| {
            let rec = rec.clone();
            async move { answer(req, &rec) }
        }))
        .await;
        FakeLlm { server, recorded }
    }

    /// `http://127.0.0.1:PORT` (without `/v1`).
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// `http://127.0.0.1:PORT/v1`: the provider `baseURL` for OpenCode.
    pub fn base_url(&self) -> String {
        format!("{}/v1", self.server.url())
    }

    /// Bodies of every chat-completions request so far, title requests included.
    pub fn requests(&self) -> Vec<Value> {
        self.recorded().into_iter().map(|r| r.body).collect()
    }

    /// Every request so far with its path and the scenario it was given.
    pub fn recorded(&self) -> Vec<Recorded> {
        self.recorded.lock().unwrap().clone()
    }

    /// Bodies of the non-title requests so far.
    pub fn chat_requests(&self) -> Vec<Value> {
        self.recorded()
            .into_iter()
            .filter(|r| r.scenario != Scenario::Title)
            .map(|r| r.body)
            .collect()
    }
}

/// The text of a chat message's `content` (a string or an array of parts).
pub fn content_text(message: &Value) -> String {
    match &message["content"] {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

fn messages(body: &Value) -> &[Value] {
    body["messages"].as_array().map_or(&[], Vec::as_slice)
}

fn user_texts(body: &Value) -> Vec<String> {
    messages(body)
        .iter()
        .filter(|m| m["role"] == "user")
        .map(content_text)
        .collect()
}

/// Is this a session-title request?
pub fn is_title_request(body: &Value) -> bool {
    let no_tools = body["tools"].as_array().is_none_or(Vec::is_empty);
    let stream = body["stream"].as_bool().unwrap_or(false);
    let system_mentions_title = messages(body)
        .iter()
        .filter(|m| m["role"] == "system")
        .any(|m| content_text(m).to_ascii_lowercase().contains("title"));
    no_tools && (!stream || system_mentions_title)
}

/// Picks the scenario for a request body.
pub fn scenario_for(body: &Value) -> Scenario {
    if is_title_request(body) {
        return Scenario::Title;
    }
    if messages(body).last().is_some_and(|m| m["role"] == "tool") {
        return Scenario::ToolFollowup;
    }
    let last_user = user_texts(body).pop().unwrap_or_default();
    if let Some(start) = last_user.find("[task:") {
        let rest = &last_user[start + "[task:".len()..];
        let inner = rest.split_once(":task]").map_or(rest, |(c, _)| c);
        return Scenario::Task(inner.to_string());
    }
    if let Some(start) = last_user.find("[call:") {
        let rest = &last_user[start + "[call:".len()..];
        let inner = rest.split_once(":call]").map_or(rest, |(c, _)| c);
        let (tool, args) = inner.split_once(' ').unwrap_or((inner, "{}"));
        return Scenario::Call(tool.to_string(), args.trim().to_string());
    }
    if let Some(start) = last_user.find("[tool:write ") {
        let rest = &last_user[start + "[tool:write ".len()..];
        let inner = rest.split_once(']').map_or(rest, |(c, _)| c);
        let (path, content) = inner.split_once('|').unwrap_or((inner, ""));
        return Scenario::Write(path.trim().to_string(), content.to_string());
    }
    if let Some(start) = last_user.find("[tool:bash ") {
        let rest = &last_user[start + "[tool:bash ".len()..];
        let cmd = rest.split_once(']').map_or(rest, |(c, _)| c);
        return Scenario::ToolCall(cmd.trim().to_string());
    }
    if last_user.contains("[question]") {
        return Scenario::Question;
    }
    if last_user.contains("[error401]") {
        Scenario::Error401
    } else if last_user.contains("[error500]") {
        Scenario::Error500
    } else if last_user.contains("[reasoning]") {
        Scenario::Reasoning
    } else if last_user.contains("[slow]") {
        Scenario::Slow
    } else if last_user.contains("[many]") {
        Scenario::Many
    } else if last_user.contains("[recall]") {
        Scenario::Recall
    } else {
        Scenario::Text
    }
}

fn answer(req: Request, recorded: &Mutex<Vec<Recorded>>) -> Response {
    if req.method != "POST" || !req.path().ends_with("/chat/completions") {
        return Response::json(404, &json!({"error": {"message": "not found"}}));
    }
    let body: Value = match req.json() {
        Ok(v) => v,
        Err(e) => {
            return Response::json(
                400,
                &json!({"error": {"message": format!("bad json: {e}")}}),
            )
        }
    };
    let scenario = scenario_for(&body);
    let n = {
        let mut rec = recorded.lock().unwrap();
        rec.push(Recorded {
            path: req.target.clone(),
            body: body.clone(),
            scenario: scenario.clone(),
        });
        rec.len()
    };
    let stream = body["stream"].as_bool().unwrap_or(false);
    let id = format!("chatcmpl-fake-{n}");

    if scenario == Scenario::Error401 {
        return Response::json(
            401,
            &json!({"error": {"message": ERROR_401_MESSAGE, "type": "invalid_request_error",
                               "param": null, "code": "invalid_api_key"}}),
        );
    }

    if scenario == Scenario::Error500 {
        return Response::json(
            500,
            &json!({"error": {"message": ERROR_500_MESSAGE, "type": "server_error",
                               "param": null, "code": null}}),
        );
    }

    let user = user_texts(&body);
    let last_user = user.last().cloned().unwrap_or_default();
    let mut steps: Vec<Step> = Vec::new();
    let mut finish = "stop";
    let mut full_text = String::new();
    match &scenario {
        Scenario::Title => {
            full_text = TITLE.to_string();
            steps.push(Step::Content(TITLE.to_string()));
        }
        Scenario::Text => {
            full_text = text_reply(&last_user);
            steps.extend(words(&full_text).into_iter().map(Step::Content));
        }
        Scenario::Reasoning => {
            steps.extend(words(REASONING_TEXT).into_iter().map(Step::Reasoning));
            full_text = REASONING_ANSWER.to_string();
            steps.extend(words(REASONING_ANSWER).into_iter().map(Step::Content));
        }
        Scenario::Recall => {
            full_text = recall_reply(user.first().map_or("", String::as_str));
            steps.extend(words(&full_text).into_iter().map(Step::Content));
        }
        Scenario::Slow => {
            full_text = slow_reply();
            for chunk in slow_chunks() {
                steps.push(Step::Sleep(SLOW_CHUNK_DELAY));
                steps.push(Step::Content(chunk));
            }
        }
        Scenario::Many => {
            full_text = many_reply();
            for (i, chunk) in many_chunks().into_iter().enumerate() {
                if i % 10 == 0 {
                    steps.push(Step::Sleep(MANY_PAUSE));
                }
                steps.push(Step::Content(chunk));
            }
        }
        Scenario::ToolFollowup => {
            let output = messages(&body).last().map(content_text).unwrap_or_default();
            full_text = tool_followup_reply(&output);
            steps.extend(words(&full_text).into_iter().map(Step::Content));
        }
        Scenario::ToolCall(cmd) => {
            finish = "tool_calls";
            let call_id = format!("call_fake_{n}");
            steps.push(Step::ToolStart(call_id, "bash".into()));
            let args = json!({"command": cmd, "description": TOOL_DESCRIPTION}).to_string();
            steps.extend(fragments(&args, 12).into_iter().map(Step::ToolArgs));
        }
        Scenario::Write(path, content) => {
            finish = "tool_calls";
            steps.push(Step::ToolStart(format!("call_fake_{n}"), "write".into()));
            let args = json!({"filePath": path, "content": content}).to_string();
            steps.extend(fragments(&args, 12).into_iter().map(Step::ToolArgs));
        }
        Scenario::Task(inner) => {
            finish = "tool_calls";
            steps.push(Step::ToolStart(format!("call_fake_{n}"), "task".into()));
            let args = json!({"description": "delegated work", "prompt": inner,
                              "subagent_type": "general"})
            .to_string();
            steps.extend(fragments(&args, 12).into_iter().map(Step::ToolArgs));
        }
        Scenario::Question => {
            finish = "tool_calls";
            steps.push(Step::ToolStart(format!("call_fake_{n}"), "question".into()));
            let args = question_args().to_string();
            steps.extend(fragments(&args, 12).into_iter().map(Step::ToolArgs));
        }
        Scenario::Call(tool, args) => {
            finish = "tool_calls";
            steps.push(Step::ToolStart(format!("call_fake_{n}"), tool.clone()));
            steps.extend(fragments(args, 12).into_iter().map(Step::ToolArgs));
        }
        Scenario::Error401 | Scenario::Error500 => unreachable!(),
    }

    if !stream {
        return Response::json(
            200,
            &json!({
                "id": id, "object": "chat.completion", "created": 1_700_000_000u64, "model": MODEL,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": full_text},
                             "finish_reason": "stop"}],
                "usage": usage(),
            }),
        );
    }

    let (tx, resp) = Response::sse();
    tokio::spawn(write_stream(tx, id, steps, finish));
    resp
}

enum Step {
    Content(String),
    Reasoning(String),
    ToolStart(String, String),
    ToolArgs(String),
    Sleep(Duration),
}

fn usage() -> Value {
    json!({
        "prompt_tokens": USAGE_PROMPT_TOKENS,
        "completion_tokens": USAGE_COMPLETION_TOKENS,
        "total_tokens": USAGE_TOTAL_TOKENS,
        "prompt_tokens_details": {"cached_tokens": USAGE_CACHED_TOKENS},
        "completion_tokens_details": {"reasoning_tokens": USAGE_REASONING_TOKENS},
    })
}

/// Splits text into words, each keeping its trailing whitespace.
fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_space = false;
    for c in text.chars() {
        if !c.is_whitespace() && in_space {
            out.push(std::mem::take(&mut cur));
            in_space = false;
        }
        if c.is_whitespace() {
            in_space = true;
        }
        cur.push(c);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Splits text into pieces of at most `n` chars.
fn fragments(text: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    chars.chunks(n).map(|c| c.iter().collect()).collect()
}

async fn write_stream(tx: mpsc::Sender<Bytes>, id: String, steps: Vec<Step>, finish: &'static str) {
    let chunk = |delta: Value, finish: Option<&str>| -> Bytes {
        let v = json!({
            "id": id, "object": "chat.completion.chunk", "created": 1_700_000_000u64,
            "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        });
        Bytes::from(format!("data: {v}\n\n"))
    };
    let mut first = true;
    for step in steps {
        let mut delta = match step {
            Step::Sleep(d) => {
                tokio::time::sleep(d).await;
                continue;
            }
            Step::Content(t) => json!({"content": t}),
            Step::Reasoning(t) => json!({"reasoning_content": t}),
            Step::ToolStart(call_id, name) => json!({"tool_calls": [{
                "index": 0, "id": call_id, "type": "function",
                "function": {"name": name, "arguments": ""}}]}),
            Step::ToolArgs(a) => {
                json!({"tool_calls": [{"index": 0, "function": {"arguments": a}}]})
            }
        };
        if first {
            delta["role"] = json!("assistant");
            first = false;
        }
        if tx.send(chunk(delta, None)).await.is_err() {
            return; // the client went away (e.g. an abort)
        }
    }
    let usage_chunk = json!({
        "id": id, "object": "chat.completion.chunk", "created": 1_700_000_000u64,
        "model": MODEL, "choices": [], "usage": usage(),
    });
    for b in [
        chunk(json!({}), Some(finish)),
        Bytes::from(format!("data: {usage_chunk}\n\n")),
        Bytes::from_static(b"data: [DONE]\n\n"),
    ] {
        if tx.send(b).await.is_err() {
            return;
        }
    }
}
