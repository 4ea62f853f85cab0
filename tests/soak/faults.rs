//! The faults: one at a time, at exponentially distributed pauses (mean
//! `SOAK_FAULT_EVERY`), drawn from a seeded list. Daemon 0 is never
//! killed or restarted: its process lives the whole run, so its resource
//! curve shows a leak; daemon 1 takes the kills and restarts.

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::load::Load;
use crate::stack::{Stack, SERVERS};
use crate::Settings;

/// The faults, as drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// A nats-server of the cluster SIGKILLed, restarted after a pause.
    NatsKill,
    /// Daemon 1 `kill -9`ed, restarted after a pause.
    DaemonKill9,
    /// Daemon 1 stopped (SIGTERM, the drain) and started again.
    DaemonRestart,
    /// A daemon's OpenCode gone (every connection cut, new ones refused)
    /// for a while.
    OpenCodeKill,
    /// Every connection of both daemons to OpenCode cut at once.
    OpenCodeCut,
    /// A daemon's model stalls: its event streams hold everything.
    ModelStall,
    /// Ten times the usual prompts for five seconds.
    Burst,
}

pub const KINDS: [Kind; 7] = [
    Kind::NatsKill,
    Kind::DaemonKill9,
    Kind::DaemonRestart,
    Kind::OpenCodeKill,
    Kind::OpenCodeCut,
    Kind::ModelStall,
    Kind::Burst,
];

/// One fault as injected.
#[derive(Debug, Clone)]
pub struct Fault {
    pub kind: Kind,
    /// Seconds since the run began, when it started and when it was over.
    pub start: f64,
    pub end: f64,
    pub detail: String,
}

pub struct Injector {
    s: Arc<Settings>,
    stack: Arc<Mutex<Stack>>,
    load: Load,
}

impl Injector {
    pub fn new(s: Arc<Settings>, stack: Arc<Mutex<Stack>>, load: Load) -> Injector {
        Injector { s, stack, load }
    }

    /// Injects faults until `run_for` has passed; the list of them.
    pub async fn run(&self, run_for: Duration) -> Vec<Fault> {
        let mut rng = StdRng::seed_from_u64(self.s.seed);
        let end = Instant::now() + run_for;
        let mut done = Vec::new();
        loop {
            let mean = self.s.fault_every.as_secs_f64();
            let pause = (-mean * (1.0 - rng.random::<f64>()).ln()).min(mean * 4.0);
            tokio::time::sleep(Duration::from_secs_f64(pause)).await;
            if Instant::now() >= end {
                return done;
            }
            let kind = KINDS[rng.random_range(0..KINDS.len())];
            let start = crate::now_s();
            let detail = self.inject(kind, &mut rng).await;
            let over = crate::now_s();
            eprintln!(
                "soak: {start:>7.1}s {kind:?} {detail} ({:.1}s)",
                over - start
            );
            done.push(Fault {
                kind,
                start,
                end: over,
                detail,
            });
        }
    }

    async fn inject(&self, kind: Kind, rng: &mut StdRng) -> String {
        let pause = Duration::from_millis(rng.random_range(1000..6000));
        match kind {
            Kind::NatsKill => {
                let node = rng.random_range(0..SERVERS);
                tokio::task::block_in_place(|| {
                    let mut s = self.stack.blocking_lock();
                    s.cluster.kill(node)
                });
                tokio::time::sleep(pause).await;
                tokio::task::block_in_place(|| {
                    let mut s = self.stack.blocking_lock();
                    s.cluster.restart(node)
                });
                format!("node {node} down {pause:?}")
            }
            Kind::DaemonKill9 => {
                self.stack.lock().await.daemons[1].kill9().await;
                tokio::time::sleep(pause).await;
                let mut s = self.stack.lock().await;
                let Stack { cluster, daemons } = &mut *s;
                daemons[1].spawn(cluster).await;
                format!("daemon 1 dead {pause:?}")
            }
            Kind::DaemonRestart => {
                let mut s = self.stack.lock().await;
                let Stack { cluster, daemons } = &mut *s;
                daemons[1].terminate().await;
                daemons[1].spawn(cluster).await;
                "daemon 1 drained and started".into()
            }
            Kind::OpenCodeKill => {
                let d = rng.random_range(0..2);
                self.stack.lock().await.daemons[d].proxy.set_down(true);
                tokio::time::sleep(pause).await;
                self.stack.lock().await.daemons[d].proxy.set_down(false);
                format!("OpenCode of daemon {d} down {pause:?}")
            }
            Kind::OpenCodeCut => {
                let s = self.stack.lock().await;
                let cut: usize = s.daemons.iter().map(|d| d.proxy.sever_all()).sum();
                format!("{cut} connections cut")
            }
            Kind::ModelStall => {
                let d = rng.random_range(0..2);
                self.stack.lock().await.daemons[d].fake.stall(true).await;
                tokio::time::sleep(pause).await;
                self.stack.lock().await.daemons[d].fake.stall(false).await;
                format!("model of daemon {d} stalled {pause:?}")
            }
            Kind::Burst => {
                let n = self.load.burst_size(5.0);
                let me = self.load.clone();
                let per = Duration::from_secs_f64(5.0 / n.max(1) as f64);
                for i in 0..n {
                    me.burst(i).await;
                    tokio::time::sleep(per).await;
                }
                format!("{n} prompts in 5s")
            }
        }
    }
}
