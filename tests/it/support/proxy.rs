//! A TCP proxy for tests of network blips: it listens on a free loopback
//! port, forwards every connection to a target, and severs every open
//! connection on command ([`Proxy::sever_all`]) or at random moments
//! ([`Proxy::sever_randomly`]). A cut is abortive (`SO_LINGER` 0: an RST to
//! both sides, as a dropped NAT entry or a restarted middlebox does), and
//! the proxy keeps accepting: a new connection goes through at once.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

struct Shared {
    target: SocketAddr,
    /// Cancelled to cut every connection opened under it.
    generation: Mutex<CancellationToken>,
    open: AtomicUsize,
    accepted: AtomicU64,
    severed: AtomicU64,
    cuts: AtomicU64,
    /// While set, every connection is cut and new ones are reset at once
    /// (the server behind is "dead": [`Proxy::set_down`]).
    down: AtomicBool,
}

impl Proxy {
    /// Forwards to `target_url` (`http://host:port...`).
    pub async fn start(target_url: &str) -> Proxy {
        let target = target_of(target_url);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            target,
            generation: Mutex::new(CancellationToken::new()),
            open: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            severed: AtomicU64::new(0),
            cuts: AtomicU64::new(0),
            down: AtomicBool::new(false),
        });
        let s = shared.clone();
        let accept = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                s.accepted.fetch_add(1, Ordering::Relaxed);
                let cut = s.generation.lock().unwrap().clone();
                tokio::spawn(pipe(conn, s.clone(), cut));
            }
        });
        Proxy {
            addr,
            shared,
            accept,
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Cuts every open connection; returns how many were open.
    pub fn sever_all(&self) -> usize {
        self.shared.sever_all()
    }

    /// Cuts every open connection at random moments, `min..max` apart,
    /// until the returned task is aborted (or the proxy dropped).
    pub fn sever_randomly(&self, min: Duration, max: Duration) -> Severer {
        let s = self.shared.clone();
        Severer(tokio::spawn(async move {
            loop {
                let pause =
                    rand::random_range(min.as_millis()..max.as_millis().max(min.as_millis() + 1));
                tokio::time::sleep(Duration::from_millis(pause as u64)).await;
                s.sever_all();
            }
        }))
    }

    /// Down (`true`): every open connection is cut and new ones are reset,
    /// as when the server behind died; up again (`false`): they go through.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::Relaxed);
        if down {
            self.shared.sever_all();
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Connections cut so far.
    pub fn severed(&self) -> u64 {
        self.shared.severed.load(Ordering::Relaxed)
    }

    /// Times [`sever_all`](Self::sever_all) ran (by hand or at random).
    pub fn cuts(&self) -> u64 {
        self.shared.cuts.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.shared.sever_all();
    }
}

/// Random cuts; they stop when this is dropped.
pub struct Severer(JoinHandle<()>);

impl Drop for Severer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Shared {
    fn sever_all(&self) -> usize {
        let old = {
            let mut g = self.generation.lock().unwrap();
            std::mem::replace(&mut *g, CancellationToken::new())
        };
        self.cuts.fetch_add(1, Ordering::Relaxed);
        let open = self.open.load(Ordering::Relaxed);
        old.cancel();
        open
    }
}

async fn pipe(client: TcpStream, shared: Arc<Shared>, cut: CancellationToken) {
    if shared.down.load(Ordering::Relaxed) {
        let _ = client.set_zero_linger();
        return;
    }
    let mut server = match TcpStream::connect(shared.target).await {
        Ok(s) => s,
        Err(_) => {
            let _ = client.set_zero_linger();
            return;
        }
    };
    let mut client = client;
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    shared.open.fetch_add(1, Ordering::Relaxed);
    tokio::select! {
        _ = cut.cancelled() => {
            let _ = client.set_zero_linger();
            let _ = server.set_zero_linger();
            shared.severed.fetch_add(1, Ordering::Relaxed);
        }
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
    }
    shared.open.fetch_sub(1, Ordering::Relaxed);
}

/// The socket address of `http://host:port/...`.
fn target_of(url: &str) -> SocketAddr {
    let rest = url
        .strip_prefix("http://")
        .expect("an http:// URL")
        .split('/')
        .next()
        .unwrap();
    rest.parse().expect("host:port of an IP address")
}
