//! Data-driven mapper tests: recorded OpenCode 1.18.34 streams in
//! (`tests/fixtures/opencode-1.18.34/<name>.sse` + the message list read at
//! the end), expected replies out (`<name>.replies.json`, regenerated with
//! `BLESS=1 cargo test`), plus the invariants every turn must keep.

use std::collections::HashMap;
use std::path::PathBuf;

use serde_json::{json, Value};

use super::*;
use crate::opencode::events::{parse_event, Event, MessageWithParts};
use crate::opencode::sse::{SseDecoder, SseItem};
use crate::protocol::reply::FinalReply;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/opencode-1.18.34")
}

fn manifest(name: &str) -> Value {
    let m: Value =
        serde_json::from_slice(&std::fs::read(dir().join("manifest.json")).unwrap()).unwrap();
    m["scenarios"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no scenario {name}"))
        .clone()
}

fn events(name: &str) -> Vec<Event> {
    let bytes = std::fs::read(dir().join(format!("{name}.sse"))).unwrap();
    let mut dec = SseDecoder::new(1 << 20);
    let mut items = Vec::new();
    dec.feed(&bytes, &mut items);
    items
        .into_iter()
        .map(|i| match i {
            SseItem::Event(e) => parse_event(&e.data).expect("fixture events parse"),
            SseItem::Error(e) => panic!("fixture does not decode: {e}"),
        })
        .collect()
}

fn messages(name: &str) -> Vec<MessageWithParts> {
    serde_json::from_slice(&std::fs::read(dir().join(format!("{name}.messages.json"))).unwrap())
        .unwrap()
}

/// One simulated turn's output.
#[derive(Debug)]
struct Turn {
    replies: Vec<ReplyBody>,
    conclusion: Conclusion,
}

/// Feeds a recorded stream through turns of one session, as the driver
/// does: events into the mapper; on idle, conclude from the message list
/// (`None` = not this turn's end yet); on conclusion, reconcile at the end.
/// `gap_at`: simulate lost events by skipping events with these indexes and
/// marking a gap after them.
fn simulate(name: &str, turns: usize, skip: &[usize]) -> Vec<Turn> {
    let m = manifest(name);
    let session = m["sessionID"].as_str().unwrap().to_string();
    let evs = events(name);
    let msgs = messages(name);
    let mut out = Vec::new();
    let mut i = 0;
    for k in 0..turns {
        let user = m["messageIDs"][k].as_str().unwrap().to_string();
        let mut mapper = TurnMapper::new(&session, &user);
        let mut replies = Vec::new();
        let conclusion = loop {
            let Some(ev) = evs.get(i) else {
                panic!("{name}: stream ended before the turn concluded: {replies:?}");
            };
            i += 1;
            if skip.contains(&(i - 1)) {
                mapper.mark_gap();
                continue;
            }
            let signal = mapper.on_event(ev, &mut replies);
            if signal == Signal::Idle {
                // The message list as it was at this idle: only messages up
                // to this turn (later turns' messages are not there yet).
                let Some(pos) = msgs.iter().position(|m| m.info.id == user) else {
                    continue;
                };
                let mut end = pos + 1;
                while end < msgs.len() && msgs[end].info.role != Role::User {
                    end += 1;
                }
                let upto = msgs[..end].to_vec();
                if let Some(c) = mapper.conclude(&upto) {
                    mapper.reconcile(&upto, true, &mut replies);
                    break c;
                }
            }
        };
        out.push(Turn {
            replies,
            conclusion,
        });
    }
    out
}

fn deltas(t: &Turn) -> String {
    t.replies
        .iter()
        .filter_map(|r| match r {
            ReplyBody::Delta { content, .. } => Some(content.as_str()),
            _ => None,
        })
        .collect()
}

fn final_of(t: &Turn) -> &FinalReply {
    match &t.conclusion {
        Conclusion::Final(f) => f,
        other => panic!("expected a final, got {other:?}"),
    }
}

/// Compares with (or, with BLESS=1, writes) the golden replies file.
fn golden(name: &str, turns: &[Turn]) {
    let actual: Vec<Value> = turns
        .iter()
        .map(|t| {
            let end = match &t.conclusion {
                Conclusion::Final(f) => {
                    serde_json::to_value(ReplyBody::Final(Box::new(f.clone()))).unwrap()
                }
                Conclusion::Failed {
                    code,
                    error,
                    retryable,
                } => serde_json::to_value(ReplyBody::Error {
                    error: error.clone(),
                    code: *code,
                    retryable: *retryable,
                    reason: None,
                })
                .unwrap(),
            };
            let mut all: Vec<Value> = t
                .replies
                .iter()
                .map(|r| serde_json::to_value(r).unwrap())
                .collect();
            all.push(end);
            Value::Array(all)
        })
        .collect();
    let path = dir().join(format!("{name}.replies.json"));
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(&path, serde_json::to_string_pretty(&actual).unwrap() + "\n").unwrap();
        return;
    }
    let expected: Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap_or_else(|_| {
            panic!("{} missing: run BLESS=1 cargo test mapper", path.display())
        }))
        .unwrap();
    assert_eq!(
        Value::Array(actual),
        expected,
        "{name}: replies differ from {}",
        path.display()
    );
}

fn check_invariants(name: &str, t: &Turn) {
    // Exactly one tool_call and one tool_result per call id, result after call.
    let mut calls: HashMap<&str, (usize, usize)> = HashMap::new();
    for (i, r) in t.replies.iter().enumerate() {
        match r {
            ReplyBody::ToolCall { call_id, .. } => {
                let e = calls.entry(call_id).or_insert((usize::MAX, usize::MAX));
                assert_eq!(e.0, usize::MAX, "{name}: two tool_call for {call_id}");
                e.0 = i;
            }
            ReplyBody::ToolResult { call_id, .. } => {
                let e = calls.entry(call_id).or_insert((usize::MAX, usize::MAX));
                assert_eq!(e.1, usize::MAX, "{name}: two tool_result for {call_id}");
                e.1 = i;
            }
            ReplyBody::Final(_) | ReplyBody::Error { .. } => {
                panic!("{name}: the mapper emitted a terminal reply")
            }
            _ => {}
        }
    }
    for (id, (c, r)) in calls {
        assert!(c < r && r != usize::MAX, "{name}: {id} call {c} result {r}");
    }
    if let Conclusion::Final(f) = &t.conclusion {
        assert_eq!(
            deltas(t),
            f.content,
            "{name}: deltas do not add up to final"
        );
    }
}

#[test]
fn text_turn() {
    let turns = simulate("text", 1, &[]);
    let f = final_of(&turns[0]);
    assert_eq!(
        f.content,
        manifest("text")["expectedText"].as_str().unwrap()
    );
    assert_eq!(f.model.as_deref(), Some("fake/m1"));
    assert_eq!(f.finish.as_deref(), Some("stop"));
    assert!(f.usage.input > 0 && f.usage.output > 0, "{:?}", f.usage);
    assert!(
        turns[0]
            .replies
            .iter()
            .filter(|r| matches!(r, ReplyBody::Delta { .. }))
            .count()
            > 1
    );
    check_invariants("text", &turns[0]);
    golden("text", &turns);
}

#[test]
fn reasoning_is_not_answer_text() {
    let turns = simulate("reasoning", 1, &[]);
    let t = &turns[0];
    let reasoning: String = t
        .replies
        .iter()
        .filter_map(|r| match r {
            ReplyBody::Reasoning { content, .. } => Some(content.as_str()),
            _ => None,
        })
        .collect();
    assert!(
        !reasoning.is_empty(),
        "no reasoning replies: {:?}",
        t.replies
    );
    let f = final_of(t);
    assert_eq!(
        f.content,
        manifest("reasoning")["expectedText"].as_str().unwrap()
    );
    assert!(!f.content.contains(&reasoning));
    check_invariants("reasoning", t);
    golden("reasoning", &turns);
}

#[test]
fn tool_call_and_result() {
    let turns = simulate("tool", 1, &[]);
    let t = &turns[0];
    let call = t
        .replies
        .iter()
        .find_map(|r| match r {
            ReplyBody::ToolCall { tool, args, .. } => Some((tool.clone(), args.clone())),
            _ => None,
        })
        .expect("a tool_call");
    assert_eq!(call.0, "bash");
    assert_eq!(call.1["command"], "echo fixture-tool-ok");
    let result = t
        .replies
        .iter()
        .find_map(|r| match r {
            ReplyBody::ToolResult {
                success, result, ..
            } => Some((*success, result.clone())),
            _ => None,
        })
        .expect("a tool_result");
    assert!(result.0);
    assert!(result.1.contains("fixture-tool-ok"), "{result:?}");
    assert_eq!(
        final_of(t).content,
        manifest("tool")["expectedText"].as_str().unwrap()
    );
    check_invariants("tool", t);
    golden("tool", &turns);
}

#[test]
fn provider_auth_error_is_not_retryable() {
    let turns = simulate("error401", 1, &[]);
    match &turns[0].conclusion {
        Conclusion::Failed {
            code,
            retryable,
            error,
        } => {
            assert_eq!(*code, ErrorCode::ProviderError);
            assert!(!retryable);
            assert!(error.contains("Incorrect API key"), "{error}");
        }
        other => panic!("{other:?}"),
    }
    check_invariants("error401", &turns[0]);
    golden("error401", &turns);
}

#[test]
fn aborted_turn() {
    let turns = simulate("abort", 1, &[]);
    match &turns[0].conclusion {
        Conclusion::Failed { code, .. } => assert_eq!(*code, ErrorCode::Aborted),
        other => panic!("{other:?}"),
    }
    check_invariants("abort", &turns[0]);
    golden("abort", &turns);
}

#[test]
fn two_turns_in_one_session_do_not_mix() {
    let turns = simulate("two_turns", 2, &[]);
    let expected = manifest("two_turns")["expectedText"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(final_of(&turns[1]).content, expected);
    assert_ne!(final_of(&turns[0]).content, final_of(&turns[1]).content);
    for t in &turns {
        check_invariants("two_turns", t);
    }
    golden("two_turns", &turns);
}

#[test]
fn lost_events_are_reconciled_without_duplicates() {
    // Drop every single event of the text turn in turn (except the idle
    // that ends it): the deltas must still add up to the final text.
    let evs = events("text");
    let session = manifest("text")["sessionID"].as_str().unwrap().to_string();
    let last_idle = evs
        .iter()
        .rposition(|e| matches!(e, Event::SessionIdle{session_id} if *session_id == session))
        .unwrap();
    for skip in 0..last_idle {
        let turns = simulate("text", 1, &[skip]);
        check_invariants(&format!("text without event {skip}"), &turns[0]);
    }
    // And a burst of losses in the middle.
    let tool_session = manifest("tool")["sessionID"].as_str().unwrap().to_string();
    let tool_idle = events("tool")
        .iter()
        .rposition(|e| matches!(e, Event::SessionIdle{session_id} if *session_id == tool_session))
        .unwrap();
    let burst: Vec<usize> = (tool_idle / 4..tool_idle * 3 / 4).collect();
    let turns = simulate("tool", 1, &burst);
    check_invariants("tool with a burst lost", &turns[0]);
}

#[test]
fn user_text_and_other_sessions_never_leak() {
    let turns = simulate("text", 1, &[]);
    let prompt = manifest("text")["prompts"][0].as_str().unwrap().to_string();
    for r in &turns[0].replies {
        if let ReplyBody::Delta { content, .. } = r {
            assert_ne!(content, &prompt);
        }
    }
    // A mapper for another session sees nothing.
    let mut other = TurnMapper::new("ses_other", "msg_x");
    let mut out = Vec::new();
    for ev in events("text") {
        assert!(matches!(other.on_event(&ev, &mut out), Signal::Nothing));
    }
    assert!(out.is_empty());
}

#[test]
fn a_late_idle_does_not_end_the_next_turn() {
    // Turn 2 of two_turns: an idle arriving before its answer is complete
    // must not conclude it.
    let msgs = messages("two_turns");
    let session = manifest("two_turns")["sessionID"]
        .as_str()
        .unwrap()
        .to_string();
    let first_user = msgs.iter().position(|m| m.info.role == Role::User).unwrap();
    let second_user = msgs
        .iter()
        .skip(first_user + 1)
        .position(|m| m.info.role == Role::User)
        .unwrap()
        + first_user
        + 1;
    let mut mapper = TurnMapper::new(&session, msgs[second_user].info.id.clone());
    // At the moment of the stale idle, the list holds the new user message
    // and an assistant message still running.
    let mut upto = msgs[..=second_user + 1].to_vec();
    upto[second_user + 1].info.time.completed = None;
    upto[second_user + 1].info.finish = None;
    assert_eq!(mapper.conclude(&upto), None);
    // Only the first turn's messages: not this turn's end either.
    assert_eq!(mapper.conclude(&msgs[..second_user]), None);
}

#[test]
fn synthetic_snapshot_reconciliation() {
    // A finished part whose deltas were partly lost is completed once.
    let mut m = TurnMapper::new("ses_1", "msg_2");
    let mut out = Vec::new();
    let ev = |v: Value| parse_event(&v.to_string()).unwrap();
    m.on_event(&ev(json!({"type":"message.updated","properties":{"info":{"id":"msg_2","sessionID":"ses_1","role":"user","time":{"created":1}}}})), &mut out);
    m.on_event(&ev(json!({"type":"message.updated","properties":{"info":{"id":"msg_3","sessionID":"ses_1","role":"assistant","parentID":"msg_2","time":{"created":1}}}})), &mut out);
    m.on_event(&ev(json!({"type":"message.part.updated","properties":{"part":{"id":"prt_1","sessionID":"ses_1","messageID":"msg_3","type":"text","text":""}}})), &mut out);
    m.on_event(&ev(json!({"type":"message.part.delta","properties":{"sessionID":"ses_1","messageID":"msg_3","partID":"prt_1","field":"text","delta":"Hel"}})), &mut out);
    m.on_event(&ev(json!({"type":"message.part.updated","properties":{"part":{"id":"prt_1","sessionID":"ses_1","messageID":"msg_3","type":"text","text":"Hello","time":{"start":1,"end":2}}}})), &mut out);
    // A delta replayed after the snapshot must not duplicate text... it is
    // appended exactly as received (never deduplicated), so OpenCode's
    // order is trusted: deltas precede the finishing snapshot.
    let text: String = out
        .iter()
        .filter_map(|r| match r {
            ReplyBody::Delta { content, .. } => Some(content.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(text, "Hello");
    // Deltas of the user's own message are dropped.
    let mut out2 = Vec::new();
    m.on_event(&ev(json!({"type":"message.part.updated","properties":{"part":{"id":"prt_u","sessionID":"ses_1","messageID":"msg_2","type":"text","text":"question"}}})), &mut out2);
    m.on_event(&ev(json!({"type":"message.part.delta","properties":{"sessionID":"ses_1","messageID":"msg_2","partID":"prt_u","field":"text","delta":"question"}})), &mut out2);
    assert!(out2.is_empty(), "{out2:?}");
}

mod fuzz {
    //! Property tests standing in for a fuzzer in CI: arbitrary event data
    //! and arbitrary mixes of real events never panic the parser or the
    //! mapper, and the mapper's output keeps its invariants.

    use super::*;
    use proptest::prelude::*;

    fn real_events() -> Vec<String> {
        let mut out = Vec::new();
        for name in [
            "text",
            "reasoning",
            "tool",
            "error401",
            "abort",
            "two_turns",
        ] {
            let bytes = std::fs::read(dir().join(format!("{name}.sse"))).unwrap();
            let mut dec = SseDecoder::new(1 << 20);
            let mut items = Vec::new();
            dec.feed(&bytes, &mut items);
            for i in items {
                if let SseItem::Event(e) = i {
                    out.push(e.data);
                }
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn parse_event_never_panics(data in ".*") {
            let _ = parse_event(&data);
        }

        #[test]
        fn mutated_real_events_never_panic(idx in 0usize..2000, cut in 0usize..400, junk in "[{}\\[\\]\":,a-z0-9]{0,8}") {
            let evs = real_events();
            let e = &evs[idx % evs.len()];
            let cut = floor_char_boundary(e, cut);
            let mutated = format!("{}{}{}", &e[..cut], junk, &e[cut..]);
            let _ = parse_event(&mutated);
        }

        #[test]
        fn any_mix_of_real_events_never_panics(picks in proptest::collection::vec(0usize..2000, 0..300)) {
            // Arbitrary order and repetition: no panic, no terminal reply,
            // at most one tool_call and one tool_result per call id.
            let evs: Vec<Event> = real_events().iter().filter_map(|d| parse_event(d).ok()).collect();
            let m = manifest("tool");
            let mut mapper = TurnMapper::new(m["sessionID"].as_str().unwrap(), m["messageIDs"][0].as_str().unwrap());
            let mut out = Vec::new();
            for p in picks {
                if p % 17 == 0 { mapper.mark_gap(); }
                mapper.on_event(&evs[p % evs.len()], &mut out);
            }
            let msgs = messages("tool");
            mapper.reconcile(&msgs, false, &mut out);
            let concluded = mapper.conclude(&msgs);
            mapper.reconcile(&msgs, true, &mut out);
            prop_assert!(concluded.is_some());
            let turn = Turn { replies: out, conclusion: Conclusion::Failed { code: ErrorCode::Internal, error: String::new(), retryable: false } };
            check_invariants("mix", &turn);
        }

        #[test]
        fn owned_and_borrowed_feeding_agree(picks in proptest::collection::vec(0usize..2000, 0..300)) {
            // `on_event_owned` (the driver's) moves a delta's strings; it
            // must produce exactly what `on_event` produces, for any mix.
            let evs: Vec<Event> = real_events().iter().filter_map(|d| parse_event(d).ok()).collect();
            let m = manifest("reasoning");
            let (sid, uid) = (m["sessionID"].as_str().unwrap(), m["messageIDs"][0].as_str().unwrap());
            let (mut by_ref, mut by_val) = (TurnMapper::new(sid, uid), TurnMapper::new(sid, uid));
            let (mut out_ref, mut out_val) = (Vec::new(), Vec::new());
            for p in picks {
                if p % 23 == 0 { by_ref.mark_gap(); by_val.mark_gap(); }
                let e = &evs[p % evs.len()];
                let a = by_ref.on_event(e, &mut out_ref);
                let b = by_val.on_event_owned(e.clone(), &mut out_val);
                prop_assert_eq!(a, b);
            }
            prop_assert_eq!(out_ref, out_val);
        }

        #[test]
        fn any_losses_in_order_keep_the_text_exact(name_idx in 0usize..3, drops in proptest::collection::btree_set(0usize..120, 0..40)) {
            // The real order with any events lost (each loss flagged as a
            // gap, as the router does): deltas still add up to the final.
            let name = ["text", "reasoning", "tool"][name_idx];
            let m = manifest(name);
            let session = m["sessionID"].as_str().unwrap().to_string();
            let evs = events(name);
            let last_idle = evs.iter().rposition(|e| matches!(e, Event::SessionIdle{session_id} if *session_id == session)).unwrap();
            let skip: Vec<usize> = drops.into_iter().filter(|d| *d < last_idle).collect();
            let turns = simulate(name, 1, &skip);
            check_invariants(name, &turns[0]);
        }
    }
}

#[test]
fn long_tool_results_are_cut_on_a_char_boundary() {
    let m = manifest("tool");
    let session = m["sessionID"].as_str().unwrap();
    let user = m["messageIDs"][0].as_str().unwrap();
    let mut mapper = TurnMapper::new(session, user).with_tool_result_limit(10);
    let mut out = Vec::new();
    for ev in events("tool") {
        mapper.on_event(&ev, &mut out);
    }
    let (result, truncated) = out
        .iter()
        .find_map(|r| match r {
            ReplyBody::ToolResult {
                result, truncated, ..
            } => Some((result.clone(), *truncated)),
            _ => None,
        })
        .expect("a tool_result");
    // "fixture-tool-ok\n" is 16 bytes: cut to 10.
    assert_eq!(result, "fixture-to");
    assert!(truncated);
    // Multi-byte text is never split inside a character.
    let mut t: Part = serde_json::from_value(json!({"id":"prt_t","sessionID":session,"messageID":"msg_z","type":"tool","callID":"c9","tool":"bash",
        "state":{"status":"completed","input":{},"output":"ééééé"}})).unwrap();
    let mut tools = HashMap::new();
    let mut out = Vec::new();
    tool_replies(&t, &mut tools, 3, None, &mut out);
    match &out[1] {
        ReplyBody::ToolResult {
            result, truncated, ..
        } => {
            assert_eq!(result, "é");
            assert!(truncated);
        }
        other => panic!("{other:?}"),
    }
    t.call_id = Some("c10".into());
    let mut out = Vec::new();
    tool_replies(&t, &mut tools, 100, Some("parent"), &mut out);
    assert!(
        matches!(&out[1], ReplyBody::ToolResult { truncated: false, parent_call_id: Some(p), .. } if p == "parent")
    );
}

#[test]
fn a_tool_call_too_large_to_publish_is_cut_not_lost() {
    let big = "é".repeat(800_000); // 1.6 MB, two bytes a char
    let mut args = serde_json::json!({"filePath": "/tmp/x", "content": big});
    assert!(super::shrink_args(&mut args, 64 * 1024));
    let size = serde_json::to_vec(&args).unwrap().len();
    assert!(size <= 64 * 1024, "{size}");
    assert_eq!(
        args["filePath"], "/tmp/x",
        "the short argument is kept whole"
    );
    let content = args["content"].as_str().unwrap();
    assert!(!content.is_empty() && big.starts_with(content));
    // Small arguments are left alone.
    let mut small = serde_json::json!({"command": "ls"});
    assert!(!super::shrink_args(&mut small, 64 * 1024));
    assert_eq!(small, serde_json::json!({"command": "ls"}));
}
