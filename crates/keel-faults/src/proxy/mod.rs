//! A TCP chaos proxy: forwards bytes between a client and a server exactly,
//! unless told to break them.
//!
//! Each accepted connection gets its own connection to the upstream and two
//! pumps (upstream: client to server; downstream: server to client). Toxics,
//! partitions and cuts are read live, so a change applies to connections
//! already open as well as new ones.
//!
//! A proxy created with [`Protocol::WebSocket`] parses each link's HTTP
//! handshake and RFC 6455 frames (`ws.rs`), so that frame toxics can drop,
//! duplicate, reorder, corrupt or delay single messages, or answer a
//! client's close as a terminating intermediary would; each such tampering
//! is recorded ([`Tampering`]) as ground truth for the checker of a test.

mod frame;
mod link;
mod tamper;
mod toxic;
mod ws;

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

pub use self::tamper::{TamperAction, Tampering};
pub use self::toxic::{FrameFilter, Stream, Toxic, ToxicKind};

/// What a proxy knows of the protocol it forwards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// Bytes only (JSON `"tcp"`, the default).
    #[default]
    Tcp,
    /// HTTP/1.1 upgrade, then WebSocket frames (JSON `"websocket"`): frame
    /// (`ws_*`) toxics apply, byte toxics apply to the bytes that result.
    #[serde(rename = "websocket")]
    WebSocket,
}

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
    /// Seed of the RNG for toxicity, jitter, slices and frame toxics.
    #[serde(default)]
    pub seed: u64,
    /// What it forwards: `tcp` (default) or `websocket`, which frame
    /// (`ws_*`) toxics need.
    #[serde(default)]
    pub protocol: Protocol,
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
    /// WebSocket frames parsed, both directions.
    pub frames_seen: u64,
    /// WebSocket frames of text messages checked against frame toxics.
    pub frames_inspected: u64,
    /// WebSocket data frames never inspected: binary, compressed (RSV1),
    /// reserved opcodes, or messages above 16 MiB.
    pub frames_opaque: u64,
}

/// The frame counters of [`ProxyStats`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum FrameCount {
    Seen = 0,
    Inspected = 1,
    Opaque = 2,
}

pub(crate) struct Shared {
    pub(crate) name: String,
    pub(crate) upstream: SocketAddr,
    pub(crate) seed: u64,
    pub(crate) protocol: Protocol,
    started: Instant,
    pub(crate) toxics: watch::Sender<Arc<Vec<Toxic>>>,
    pub(crate) partition: watch::Sender<Option<Partition>>,
    enabled: watch::Sender<bool>,
    conns: Mutex<HashMap<u64, Arc<Notify>>>,
    next_conn: AtomicU64,
    accepted: AtomicU64,
    pub(crate) bytes: [AtomicU64; 2],
    frames: [AtomicU64; 3],
    tamperings: Mutex<tamper::TamperLog>,
    /// Tamperings so far of each frame toxic with a limit, by name.
    budgets: Mutex<HashMap<String, u64>>,
}

impl Shared {
    fn new(config: ProxyConfig) -> Shared {
        Shared {
            name: config.name,
            upstream: config.upstream,
            seed: config.seed,
            protocol: config.protocol,
            started: Instant::now(),
            toxics: watch::Sender::new(Arc::new(Vec::new())),
            partition: watch::Sender::new(None),
            enabled: watch::Sender::new(true),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            bytes: [AtomicU64::new(0), AtomicU64::new(0)],
            frames: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
            tamperings: Mutex::new(tamper::TamperLog::default()),
            budgets: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn count_frames(&self, counter: FrameCount, n: u64) {
        self.frames[counter as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// Appends a tampering, stamped with the time since the proxy started.
    pub(crate) fn record(&self, mut t: Tampering) {
        t.at_ms = Instant::now().duration_since(self.started).as_millis() as u64;
        tracing::debug!(proxy = %self.name, toxic = %t.toxic, action = ?t.action,
            effective = t.effective, fields = %serde_json::Value::Object(t.fields.clone()),
            "{}", t.detail);
        lock(&self.tamperings).push(t);
    }

    /// Takes one tampering from the toxic's limit; false if it is used up.
    pub(crate) fn take_budget(&self, toxic: &str, limit: Option<u64>) -> bool {
        let Some(limit) = limit else {
            return true;
        };
        let mut budgets = lock(&self.budgets);
        let used = budgets.entry(toxic.to_owned()).or_insert(0);
        if *used >= limit {
            return false;
        }
        *used += 1;
        true
    }

    /// The toxic was added, replaced or removed: its limit counts from 0.
    fn forget_budget(&self, toxic: &str) {
        lock(&self.budgets).remove(toxic);
    }
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
        let shared = Arc::new(Shared::new(config));
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

    /// What it forwards.
    pub fn protocol(&self) -> Protocol {
        self.shared.protocol
    }

    /// Adds a toxic; it applies to open connections at once. Frame (`ws_*`)
    /// toxics need a [`Protocol::WebSocket`] proxy.
    pub fn add_toxic(&self, toxic: Toxic) -> Result<(), ProxyError> {
        self.validate(&toxic)?;
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
        if result.is_ok() {
            self.shared.forget_budget(&toxic.name);
        }
        result
    }

    /// Replaces the toxic with the same name (a frame toxic's limit counts
    /// from 0 again).
    pub fn update_toxic(&self, toxic: Toxic) -> Result<(), ProxyError> {
        self.validate(&toxic)?;
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
            self.shared.forget_budget(&toxic.name);
            Ok(())
        } else {
            Err(ProxyError::ToxicNotFound(toxic.name))
        }
    }

    /// Removes a toxic; held data (and messages held by a `ws_reorder`)
    /// flows again.
    pub fn remove_toxic(&self, name: &str) -> Result<(), ProxyError> {
        let mut found = false;
        self.shared.toxics.send_modify(|list| {
            let next: Vec<Toxic> = list.iter().filter(|t| t.name != name).cloned().collect();
            found = next.len() != list.len();
            *list = Arc::new(next);
        });
        if found {
            self.shared.forget_budget(name);
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

    /// Removes every toxic, heals any partition and enables the proxy. The
    /// tampering record is kept.
    pub fn reset(&self) {
        self.shared.toxics.send_replace(Arc::new(Vec::new()));
        lock(&self.shared.budgets).clear();
        self.shared.partition.send_replace(None);
        self.shared.enabled.send_replace(true);
    }

    /// Every message tampered with by a frame toxic so far, in order (the
    /// first 100,000 since the last [`Proxy::clear_tamperings`]).
    pub fn tamperings(&self) -> Vec<Tampering> {
        lock(&self.shared.tamperings).records.clone()
    }

    /// Tamperings not kept because the record was full.
    pub fn tamperings_dropped(&self) -> u64 {
        lock(&self.shared.tamperings).dropped
    }

    /// Empties the tampering record (sequence numbers keep counting).
    pub fn clear_tamperings(&self) {
        let mut log = lock(&self.shared.tamperings);
        log.records = Vec::new();
        log.dropped = 0;
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
            frames_seen: self.shared.frames[0].load(Ordering::Relaxed),
            frames_inspected: self.shared.frames[1].load(Ordering::Relaxed),
            frames_opaque: self.shared.frames[2].load(Ordering::Relaxed),
        }
    }

    fn validate(&self, toxic: &Toxic) -> Result<(), ProxyError> {
        validate(toxic)?;
        if toxic.kind.frame_filter().is_some() && self.shared.protocol != Protocol::WebSocket {
            return Err(ProxyError::InvalidToxic(format!(
                "{} is a WebSocket frame toxic: the proxy must be created with \"protocol\":\"websocket\"",
                toxic.kind.type_name()
            )));
        }
        Ok(())
    }
}

/// Locks, ignoring poisoning: every critical section leaves its data whole.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
    if toxic.kind.frame_filter().is_some_and(|f| f.every == 0) {
        return Err(ProxyError::InvalidToxic(format!(
            "{} every must be >= 1",
            toxic.kind.type_name()
        )));
    }
    match &toxic.kind {
        ToxicKind::Bandwidth { rate: 0 } => Err(ProxyError::InvalidToxic(
            "bandwidth rate must be > 0".into(),
        )),
        ToxicKind::WsCorrupt { field, .. } if field.is_empty() => Err(ProxyError::InvalidToxic(
            "ws_corrupt field must not be empty".into(),
        )),
        ToxicKind::WsEarlyClose { .. } if toxic.stream != Stream::Upstream => {
            Err(ProxyError::InvalidToxic(
                "ws_early_close acts on the client's close frame: give it \"stream\":\"upstream\""
                    .into(),
            ))
        }
        ToxicKind::WsEarlyClose { filter, .. } if !filter.matching.is_empty() => {
            Err(ProxyError::InvalidToxic(
                "ws_early_close takes no match (close frames are not JSON): use every and limit"
                    .into(),
            ))
        }
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
