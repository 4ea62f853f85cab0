//! A NATS cluster of real nats-servers on loopback (docs/CLUSTER.md): each
//! with its own client port, route port, server name and JetStream store
//! (a temp dir kept across restarts), routed to the others. A node can be
//! killed and restarted, or cut off from the others (restarted with a
//! route port nobody dials and no routes) and joined again.

use std::time::{Duration, Instant};

use super::nats::{free_port, NatsServer};

/// The cluster's name in every node's config.
const NAME: &str = "soak";

pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
    route_ports: Vec<u16>,
    /// More lines of every node's `cluster {}` block.
    extra: String,
}

/// Node `i`'s config: its name, its route port, routes to `peers`, and
/// `extra` lines in its `cluster {}` block.
fn node_config(i: usize, route_port: u16, peers: &[u16], extra: &str) -> String {
    let routes: Vec<String> = peers
        .iter()
        .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
        .collect();
    format!(
        "server_name: n{i}\ncluster {{\n  name: {NAME}\n  listen: 127.0.0.1:{route_port}\n  routes: [{}]\n  {extra}\n}}\n",
        routes.join(", ")
    )
}

impl NatsCluster {
    /// `n` nodes routed to each other, JetStream ready (a meta leader
    /// elected) within `ready`.
    pub async fn start(n: usize, ready: Duration) -> NatsCluster {
        Self::start_with(n, ready, "").await
    }

    /// As [`start`](Self::start) with `extra` in every node's `cluster {}`
    /// (`no_advertise: true`: clients learn no other node, so a client
    /// stays on the one it was given, even across its restart).
    pub async fn start_with(n: usize, ready: Duration, extra: &str) -> NatsCluster {
        let route_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let servers = (0..n)
            .map(|i| {
                NatsServer::start_with_config(&node_config(i, route_ports[i], &route_ports, extra))
            })
            .collect();
        let cluster = NatsCluster {
            servers,
            route_ports,
            extra: extra.to_string(),
        };
        cluster.wait_jetstream(ready).await;
        cluster
    }

    /// Every node's client URL, comma-separated (`[nats] url`).
    pub fn urls(&self) -> String {
        self.servers
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn url(&self, i: usize) -> String {
        self.servers[i].url()
    }

    /// Waits until JetStream answers an account request and takes an R3
    /// stream (a meta leader and enough peers), through every node that
    /// is up; panics after `bound`.
    pub async fn wait_jetstream(&self, bound: Duration) {
        let deadline = Instant::now() + bound;
        let probe = format!("probe_{}", rand::random::<u32>());
        for s in &self.servers {
            let client = super::nats::client(&s.url()).await;
            let js = async_nats::jetstream::new(client);
            loop {
                let cfg = async_nats::jetstream::stream::Config {
                    name: probe.clone(),
                    subjects: vec![format!("{probe}.x")],
                    num_replicas: self.servers.len(),
                    ..Default::default()
                };
                match js.get_or_create_stream(cfg).await {
                    Ok(_) => break,
                    Err(e) => assert!(
                        Instant::now() < deadline,
                        "JetStream of the cluster not ready within {bound:?}: {e}"
                    ),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let client = super::nats::client(&self.servers[0].url()).await;
        let _ = async_nats::jetstream::new(client)
            .delete_stream(&probe)
            .await;
    }

    /// SIGKILL node `i` (its store kept).
    pub fn kill(&mut self, i: usize) {
        self.servers[i].kill();
    }

    /// Starts node `i` again, routed as before.
    pub fn restart(&mut self, i: usize) {
        let conf = node_config(i, self.route_ports[i], &self.route_ports, &self.extra);
        self.servers[i].set_config(&conf);
        self.servers[i].restart();
    }

    /// Restarts node `i` cut off from the others: its one route to a port
    /// where nobody listens (clustered JetStream wants one), and listening
    /// for routes on a port nobody dials. Its clients stay on it (same
    /// client port); it has no JetStream quorum.
    pub fn isolate(&mut self, i: usize) {
        let conf = node_config(i, free_port(), &[free_port()], &self.extra);
        self.servers[i].set_config(&conf);
        self.servers[i].restart();
    }

    /// Whether node `i` runs.
    pub fn is_running(&mut self, i: usize) -> bool {
        self.servers[i].is_running()
    }
}
