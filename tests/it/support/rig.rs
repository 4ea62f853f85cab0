//! The one rig of the fake-OpenCode tests: a real nats-server, the fake
//! OpenCode scripted by the test, the bridge in-process with
//! `test_config` adjusted by the test, and a client.

use async_nats::Client;
use opencode_nats_bridge::config::Config;

use super::bridge::{assert_well_formed, request, test_config, Bridge};
use super::fake_opencode::{FakeOpenCode, FakeOptions, TurnInput, TurnScript};
use super::nats::{client, NatsServer, Reply};

/// The password of the fake OpenCode in [`Rig::start`].
pub const PASSWORD: &str = "fake-secret";

/// Bound on one turn's replies in [`Rig::ask`].
pub const TURN: std::time::Duration = std::time::Duration::from_secs(10);

pub struct Rig {
    pub nats: NatsServer,
    pub fake: FakeOpenCode,
    pub bridge: Option<Bridge>,
    pub client: Client,
}

impl Rig {
    /// NATS + the fake (password [`PASSWORD`]) scripted by `script` + the
    /// bridge with `test_config`, adjusted by `tweak`.
    pub async fn start(
        script: impl Fn(&TurnInput) -> TurnScript + Send + Sync + 'static,
        tweak: impl FnOnce(&mut Config),
    ) -> Rig {
        Self::start_with(None, Some(PASSWORD), script, tweak).await
    }

    /// As [`start`](Self::start) with no password and NATS started with
    /// `nats_conf` (a nats-server config file), if any.
    pub async fn start_plain(
        nats_conf: Option<&str>,
        script: impl Fn(&TurnInput) -> TurnScript + Send + Sync + 'static,
        tweak: impl FnOnce(&mut Config),
    ) -> Rig {
        Self::start_with(nats_conf, None, script, tweak).await
    }

    pub async fn start_with(
        nats_conf: Option<&str>,
        password: Option<&str>,
        script: impl Fn(&TurnInput) -> TurnScript + Send + Sync + 'static,
        tweak: impl FnOnce(&mut Config),
    ) -> Rig {
        let nats = match nats_conf {
            Some(conf) => NatsServer::start_with_config(conf),
            None => NatsServer::start(),
        };
        let fake = FakeOpenCode::start_with(FakeOptions {
            password: password.map(str::to_string),
            ..FakeOptions::default()
        })
        .await;
        fake.set_script(script);
        let mut cfg = test_config(&nats.url(), &fake.url(), password);
        tweak(&mut cfg);
        cfg.validate().expect("tweaked config is valid");
        let bridge = Bridge::start(cfg).await;
        let client = client(&nats.url()).await;
        Rig {
            nats,
            fake,
            bridge: Some(bridge),
            client,
        }
    }

    /// A request-style prompt; its replies, checked well formed.
    pub async fn ask(&self, subject: &str, payload: &str) -> Vec<Reply> {
        let r = request(&self.client, subject, payload, TURN).await;
        assert_well_formed(&r);
        r
    }

    /// Stops the bridge cleanly; every call it made carried the
    /// credentials.
    pub async fn stop(mut self) {
        if let Some(b) = self.bridge.take() {
            b.stop().await.expect("the bridge stops cleanly");
        }
        assert_eq!(
            self.fake.unauthorized(),
            0,
            "every call carried the credentials"
        );
    }
}

/// The stack of the end-to-end tests: a real nats-server, the fake LLM, the
/// real OpenCode (pinned) configured with `opencode_config`, and the bridge
/// in front of it with `test_config` adjusted by `tweak`.
pub struct RealStack {
    pub nats: NatsServer,
    pub llm: super::fake_llm::FakeLlm,
    pub opencode: super::real_opencode::RealOpenCode,
    pub bridge: Bridge,
    pub client: Client,
}

impl RealStack {
    /// `opencode_config` gets the fake LLM's URL
    /// ([`default_config`](super::real_opencode::default_config)) and may
    /// change it.
    pub async fn start(
        opencode_config: impl FnOnce(&mut serde_json::Value),
        tweak: impl FnOnce(&mut Config),
    ) -> RealStack {
        let nats = NatsServer::start();
        let llm = super::fake_llm::FakeLlm::start().await;
        let mut oc = super::real_opencode::default_config(&llm.base_url());
        opencode_config(&mut oc);
        let opencode = super::real_opencode::RealOpenCode::start_with_config(oc).await;
        let mut cfg = test_config(&nats.url(), opencode.base_url(), Some(opencode.password()));
        cfg.opencode.directory = Some(opencode.directory().to_path_buf());
        tweak(&mut cfg);
        let bridge = Bridge::start(cfg).await;
        let client = client(&nats.url()).await;
        RealStack {
            nats,
            llm,
            opencode,
            bridge,
            client,
        }
    }
}
