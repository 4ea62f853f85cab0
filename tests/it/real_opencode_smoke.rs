//! The harness works end to end: fake LLM + real OpenCode, one text turn.

use std::time::Duration;

use crate::support::fake_llm::{self, FakeLlm};
use crate::support::real_opencode::{message_text, new_message_id, turn_assistants, RealOpenCode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_opencode_answers_a_text_turn_from_the_fake_llm() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let llm = FakeLlm::start().await;
        let oc = RealOpenCode::start(&llm.base_url()).await;
        let sid = oc.create_session("nats:smoke").await;
        let prompt = "hello smoke test";
        let mid = new_message_id();
        oc.prompt_async(&sid, prompt, &mid).await;
        let msgs = oc.wait_turn_done(&sid, &mid, Duration::from_secs(30)).await;

        let assistants = turn_assistants(&msgs, &mid);
        let last = assistants.last().expect("an assistant message");
        assert_eq!(message_text(last), fake_llm::text_reply(prompt));
        assert_eq!(last["info"]["finish"], "stop");
        assert_eq!(last["info"]["parentID"], mid.as_str());
        assert!(llm
            .chat_requests()
            .iter()
            .any(|r| r["messages"].to_string().contains(prompt)));
    })
    .await
    .expect("smoke test timed out");
}
