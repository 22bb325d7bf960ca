//! A TCP chaos proxy: forwards bytes between a client and a server exactly,
//! unless told to break them.
//!
//! Each accepted connection gets its own connection to the upstream and two
//! pumps (upstream: client to server; downstream: server to client). Toxics,
//! partitions and cuts are read live, so a change applies to connections
//! already open as well as new ones.

mod link;
mod toxic;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use self::toxic::{Stream, Toxic, ToxicKind};

/// What a partition does to new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartitionMode {
    /// Accepted, but nothing is forwarded until the partition heals.
    Hang,
    /// Refused: the proxy stops listening until the partition heals.
    Refuse,
}

/// An active partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    /// When it heals.
    pub until: Instant,
    /// What new connections meet.
    pub mode: PartitionMode,
}

/// Why a proxy operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// A toxic with this name already exists on the proxy.
    #[error("toxic {0:?} already exists")]
    ToxicExists(String),
    /// No toxic with this name.
    #[error("toxic {0:?} not found")]
    ToxicNotFound(String),
    /// The toxic's attributes are out of range.
    #[error("invalid toxic: {0}")]
    InvalidToxic(String),
}

/// Where a proxy listens and forwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyConfig {
    /// Unique name.
    pub name: String,
    /// Where to listen (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Where to forward.
    pub upstream: SocketAddr,
    /// Seed of the RNG for toxicity, jitter and slices.
    #[serde(default)]
    pub seed: u64,
}

/// Counters of a proxy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ProxyStats {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections open now.
    pub open: u64,
    /// Bytes forwarded client to server.
    pub bytes_upstream: u64,
    /// Bytes forwarded server to client.
    pub bytes_downstream: u64,
}

pub(crate) struct Shared {
    pub(crate) name: String,
    pub(crate) upstream: SocketAddr,
    pub(crate) seed: u64,
    pub(crate) toxics: watch::Sender<Arc<Vec<Toxic>>>,
    pub(crate) partition: watch::Sender<Option<Partition>>,
    enabled: watch::Sender<bool>,
    conns: Mutex<HashMap<u64, Arc<Notify>>>,
    next_conn: AtomicU64,
    accepted: AtomicU64,
    pub(crate) bytes: [AtomicU64; 2],
}

impl Shared {
    pub(crate) fn count(&self, stream: Stream, n: usize) {
        let i = match stream {
            Stream::Upstream => 0,
            Stream::Downstream => 1,
        };
        self.bytes[i].fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// A running proxy. Dropping it stops the listener and every connection.
#[derive(Debug)]
pub struct Proxy {
    shared: Arc<Shared>,
    listen: SocketAddr,
    listener: JoinHandle<()>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Binds with a listen backlog of 4096 (see shared/baselines.md: the default
/// 128 overflows under a connect burst).
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

impl Proxy {
    /// Starts a proxy from `listen` to `upstream`.
    pub async fn start(config: ProxyConfig) -> Result<Proxy, ProxyError> {
        let listener = bind(config.listen).map_err(|source| ProxyError::Bind {
            addr: config.listen,
            source,
        })?;
        let listen = listener.local_addr().map_err(|source| ProxyError::Bind {
            addr: config.listen,
            source,
        })?;
        let shared = Arc::new(Shared {
            name: config.name,
            upstream: config.upstream,
            seed: config.seed,
            toxics: watch::Sender::new(Arc::new(Vec::new())),
            partition: watch::Sender::new(None),
            enabled: watch::Sender::new(true),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            bytes: [AtomicU64::new(0), AtomicU64::new(0)],
        });
        let listener = tokio::spawn(accept_loop(shared.clone(), listener, listen));
        Ok(Proxy {
            shared,
            listen,
            listener,
        })
    }

    /// The proxy's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The address clients connect to.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// The address it forwards to.
    pub fn upstream_addr(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// Adds a toxic; it applies to open connections at once.
    pub fn add_toxic(&self, toxic: Toxic) -> Result<(), ProxyError> {
        validate(&toxic)?;
        let mut result = Ok(());
        self.shared.toxics.send_modify(|list| {
            if list.iter().any(|t| t.name == toxic.name) {
                result = Err(ProxyError::ToxicExists(toxic.name.clone()));
                return;
            }
            let mut next = (**list).clone();
            next.push(toxic.clone());
            *list = Arc::new(next);
        });
        result
    }

    /// Replaces the toxic with the same name.
    pub fn update_toxic(&self, toxic: Toxic) -> Result<(), ProxyError> {
        validate(&toxic)?;
        let mut found = false;
        self.shared.toxics.send_modify(|list| {
            let mut next = (**list).clone();
            if let Some(t) = next.iter_mut().find(|t| t.name == toxic.name) {
                *t = toxic.clone();
                found = true;
            }
            *list = Arc::new(next);
        });
        if found {
            Ok(())
        } else {
            Err(ProxyError::ToxicNotFound(toxic.name))
        }
    }

    /// Removes a toxic; held data flows again.
    pub fn remove_toxic(&self, name: &str) -> Result<(), ProxyError> {
        let mut found = false;
        self.shared.toxics.send_modify(|list| {
            let next: Vec<Toxic> = list.iter().filter(|t| t.name != name).cloned().collect();
            found = next.len() != list.len();
            *list = Arc::new(next);
        });
        if found {
            Ok(())
        } else {
            Err(ProxyError::ToxicNotFound(name.to_owned()))
        }
    }

    /// The toxics now in force.
    pub fn toxics(&self) -> Vec<Toxic> {
        (**self.shared.toxics.borrow()).clone()
    }

    /// Drops every live connection now. New connections are accepted as usual.
    pub fn cut(&self) -> usize {
        let conns = self.shared.conns.lock().unwrap_or_else(|p| p.into_inner());
        for stop in conns.values() {
            stop.notify_one();
        }
        conns.len()
    }

    /// For `duration`: live traffic is blackholed (held) and new connections
    /// hang or are refused; then it heals by itself.
    pub fn partition(&self, duration: Duration, mode: PartitionMode) {
        let until = Instant::now() + duration;
        self.shared
            .partition
            .send_replace(Some(Partition { until, mode }));
        let shared = self.shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(until).await;
            // Heal, unless a later partition replaced this one.
            shared.partition.send_if_modified(|p| {
                let heal = p.is_some_and(|p| p.until <= Instant::now());
                if heal {
                    *p = None;
                }
                heal
            });
        });
    }

    /// The partition in force, if any.
    pub fn partitioned(&self) -> Option<Partition> {
        *self.shared.partition.borrow()
    }

    /// Disabled: every connection is dropped and the proxy stops listening.
    /// Enabled: it listens again on the same address.
    pub fn set_enabled(&self, enabled: bool) {
        self.shared.enabled.send_replace(enabled);
        if !enabled {
            self.cut();
        }
    }

    /// Whether it is enabled.
    pub fn enabled(&self) -> bool {
        *self.shared.enabled.borrow()
    }

    /// Removes every toxic, heals any partition and enables the proxy.
    pub fn reset(&self) {
        self.shared.toxics.send_replace(Arc::new(Vec::new()));
        self.shared.partition.send_replace(None);
        self.shared.enabled.send_replace(true);
    }

    /// Counters so far.
    pub fn stats(&self) -> ProxyStats {
        ProxyStats {
            accepted: self.shared.accepted.load(Ordering::Relaxed),
            open: self
                .shared
                .conns
                .lock()
                .map(|c| c.len() as u64)
                .unwrap_or(0),
            bytes_upstream: self.shared.bytes[0].load(Ordering::Relaxed),
            bytes_downstream: self.shared.bytes[1].load(Ordering::Relaxed),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.listener.abort();
        self.cut();
    }
}

fn validate(toxic: &Toxic) -> Result<(), ProxyError> {
    if toxic.name.is_empty() {
        return Err(ProxyError::InvalidToxic("a toxic needs a name".into()));
    }
    if !(0.0..=1.0).contains(&toxic.toxicity) {
        return Err(ProxyError::InvalidToxic(format!(
            "toxicity {} is not in [0, 1]",
            toxic.toxicity
        )));
    }
    match toxic.kind {
        ToxicKind::Bandwidth { rate: 0 } => Err(ProxyError::InvalidToxic(
            "bandwidth rate must be > 0".into(),
        )),
        ToxicKind::Slicer {
            average_size: 0, ..
        } => Err(ProxyError::InvalidToxic(
            "slicer average_size must be > 0".into(),
        )),
        _ => Ok(()),
    }
}

/// Whether new connections must be refused now.
fn refusing(shared: &Shared) -> bool {
    let partition = *shared.partition.borrow();
    !*shared.enabled.borrow()
        || partition.is_some_and(|p| p.mode == PartitionMode::Refuse && p.until > Instant::now())
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, addr: SocketAddr) {
    let mut listener = Some(listener);
    let mut enabled = shared.enabled.subscribe();
    let mut partition = shared.partition.subscribe();
    loop {
        if refusing(&shared) {
            // Stop listening, so that connects are refused by the kernel.
            listener = None;
            tokio::select! {
                _ = enabled.changed() => {}
                _ = partition.changed() => {}
            }
            continue;
        }
        let current = match listener.take() {
            Some(l) => l,
            None => match bind(addr) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(proxy = %shared.name, error = %e, "cannot listen again; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        tokio::select! {
            accepted = current.accept() => {
                listener = Some(current);
                let Ok((client, _)) = accepted else { continue };
                let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
                shared.accepted.fetch_add(1, Ordering::Relaxed);
                let stop = Arc::new(Notify::new());
                shared.conns.lock().unwrap_or_else(|p| p.into_inner()).insert(id, stop.clone());
                let shared = shared.clone();
                tokio::spawn(async move {
                    link::run(&shared, id, client, stop).await;
                    shared.conns.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                });
            }
            _ = enabled.changed() => listener = Some(current),
            _ = partition.changed() => listener = Some(current),
        }
    }
}
