//! What bounds the relay's resources: connection caps checked at accept,
//! the process-wide budget of payload bytes in flight, per-key rate
//! limiters (session creation per client address, sends per session), and
//! the metrics every limit hit counts in.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_ratelimit::{Limiter, Quota};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Limits;

/// Publish payload bytes accepted and not yet answered, over all connections.
static INBOUND: AtomicUsize = AtomicUsize::new(0);
/// Bytes queued for writing, over all connections.
static OUTBOUND: AtomicUsize = AtomicUsize::new(0);

/// (inbound, outbound) bytes held now, for `keel_buffered_bytes`.
pub(crate) fn buffered() -> (usize, usize) {
    (
        INBOUND.load(Ordering::Relaxed),
        OUTBOUND.load(Ordering::Relaxed),
    )
}

/// Counts `bytes` as buffered in one direction until dropped.
#[derive(Debug)]
pub(crate) struct Buffered {
    bytes: usize,
    outbound: bool,
}

impl Buffered {
    pub(crate) fn inbound(bytes: usize) -> Buffered {
        INBOUND.fetch_add(bytes, Ordering::Relaxed);
        Buffered {
            bytes,
            outbound: false,
        }
    }

    pub(crate) fn outbound(bytes: usize) -> Buffered {
        OUTBOUND.fetch_add(bytes, Ordering::Relaxed);
        Buffered {
            bytes,
            outbound: true,
        }
    }
}

impl Drop for Buffered {
    fn drop(&mut self) {
        let total = if self.outbound { &OUTBOUND } else { &INBOUND };
        total.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Counts a limit hit: `keel_limit_hits_total{limit}`.
pub(crate) fn hit(limit: &'static str) {
    metrics::counter!("keel_limit_hits_total", "limit" => limit).increment(1);
}

/// Every limit `keel_limit_hits_total` names, for registering them at zero.
pub(crate) const LIMITS: [&str; 16] = [
    "connections_total",
    "connections_per_ip",
    "inbound_bytes",
    "global_bytes",
    "outbound_bytes",
    "write_deadline",
    "frame_timeout",
    "publish_rate",
    "publish_bytes",
    "send_rate",
    "send_quota",
    "session_rate",
    "subscriptions",
    "frame_size",
    "errors",
    "exec_children",
];

/// The key a client address is counted under: the address itself for
/// IPv4, its /64 for IPv6 (one host usually holds a whole /64).
pub(crate) fn ip_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut seg = v6.segments();
                seg[4..].fill(0);
                IpAddr::V6(seg.into())
            }
        },
    }
}

/// Connection caps, checked when a TCP connection is accepted: a total
/// below the open-file limit, and a number per client address.
pub(crate) struct Caps {
    total: usize,
    per_ip: usize,
    open: AtomicUsize,
    by_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The relay holds its total of connections.
    Total,
    /// This address holds its share.
    PerIp,
}

/// One admitted TCP connection; dropping it frees its place (whether the
/// connection became a WebSocket or not).
pub(crate) struct Slot {
    caps: Arc<Caps>,
    key: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.caps.open.fetch_sub(1, Ordering::AcqRel);
        let mut map = self.caps.by_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

impl Caps {
    pub(crate) fn new(limits: &Limits) -> Arc<Caps> {
        Arc::new(Caps {
            total: limits.connection_cap(),
            per_ip: limits.max_connections_per_ip,
            open: AtomicUsize::new(0),
            by_ip: Mutex::new(HashMap::new()),
        })
    }

    /// Takes a place for a connection from `ip`, or says why not.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refused> {
        let key = ip_key(ip);
        let mut map = self.by_ip.lock().unwrap_or_else(|p| p.into_inner());
        if self.open.load(Ordering::Acquire) >= self.total {
            return Err(Refused::Total);
        }
        let n = map.entry(key).or_default();
        if *n >= self.per_ip {
            return Err(Refused::PerIp);
        }
        *n += 1;
        self.open.fetch_add(1, Ordering::AcqRel);
        Ok(Slot {
            caps: self.clone(),
            key,
        })
    }

    /// TCP connections open now (WebSocket or not yet).
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// The relay's byte budgets, `global_buffer_bytes` split in halves: one for
/// socket reads and publishes accepted and not yet answered (reads wait for
/// room), one for frames queued for writing and replay pages (the largest
/// holders are closed when it is overdrawn). Split so that readers that do
/// not read can never starve publishing, nor a publish flood starve
/// delivery.
#[derive(Clone)]
pub(crate) struct Budgets {
    pub(crate) inbound: Budget,
    pub(crate) outbound: crate::hub::OutBudget,
}

impl Budgets {
    pub(crate) fn new(total: usize) -> Budgets {
        Budgets {
            inbound: Budget::with_reserve(total / 2, total / 2 / 8),
            outbound: crate::hub::OutBudget::new(total - total / 2),
        }
    }

    /// Bytes held now, both halves.
    pub(crate) fn held(&self) -> usize {
        self.inbound.held() + self.outbound.held()
    }
}

/// A process-wide budget of bytes that callers wait for, first come first
/// served: the inbound half (socket reads and publishes). A part of it, the
/// reserve, is kept for light connections (see [`crate::gate`]): a client
/// with a small frame in flight never queues behind the large frames of
/// others.
#[derive(Clone)]
pub(crate) struct Budget {
    bytes: Arc<Semaphore>,
    total: usize,
    reserve: Arc<Semaphore>,
    reserve_total: usize,
}

impl Budget {
    /// A budget of `total` bytes, with no reserve.
    #[cfg(test)]
    pub(crate) fn new(total: usize) -> Budget {
        Budget::with_reserve(total, 0)
    }

    /// A budget of `total` bytes in all, `reserve` of them kept for light
    /// connections.
    pub(crate) fn with_reserve(total: usize, reserve: usize) -> Budget {
        let cap = |n: usize| n.min(Semaphore::MAX_PERMITS);
        let reserve = cap(reserve.min(total / 2));
        let total = cap(total - reserve).max(1);
        Budget {
            bytes: Arc::new(Semaphore::new(total)),
            total,
            reserve: Arc::new(Semaphore::new(reserve)),
            reserve_total: reserve,
        }
    }

    fn permits(n: usize, total: usize) -> u32 {
        n.clamp(1, total.max(1)).min(u32::MAX as usize) as u32
    }

    /// Waits for room for `n` bytes (capped at the whole budget).
    pub(crate) async fn acquire(&self, n: usize) -> Option<OwnedSemaphorePermit> {
        let n = Budget::permits(n, self.total);
        self.bytes.clone().acquire_many_owned(n).await.ok()
    }

    /// Room for `n` bytes now, or `None`.
    pub(crate) fn try_acquire(&self, n: usize) -> Option<OwnedSemaphorePermit> {
        let n = Budget::permits(n, self.total);
        self.bytes.clone().try_acquire_many_owned(n).ok()
    }

    /// Room for `n` bytes from the reserve now, or `None` (also when the
    /// reserve is smaller than `n`).
    pub(crate) fn try_reserve(&self, n: usize) -> Option<OwnedSemaphorePermit> {
        if n > self.reserve_total {
            return None;
        }
        let n = Budget::permits(n, self.reserve_total);
        self.reserve.clone().try_acquire_many_owned(n).ok()
    }

    /// Waits for room for `n` bytes from the reserve or the rest of the
    /// budget, whichever frees first; says which (`true`: the reserve).
    pub(crate) async fn acquire_light(&self, n: usize) -> Option<(OwnedSemaphorePermit, bool)> {
        if n > self.reserve_total {
            return self.acquire(n).await.map(|p| (p, false));
        }
        let light = Budget::permits(n, self.reserve_total);
        tokio::select! {
            p = self.bytes.clone().acquire_many_owned(Budget::permits(n, self.total)) => p.ok().map(|p| (p, false)),
            p = self.reserve.clone().acquire_many_owned(light) => p.ok().map(|p| (p, true)),
        }
    }

    /// Bytes held now, the reserve's included.
    pub(crate) fn held(&self) -> usize {
        self.total - self.bytes.available_permits() + self.reserve_total
            - self.reserve.available_permits()
    }
}

/// A rate limiter per key (client address, session), evicted when idle.
pub(crate) struct Keyed<K> {
    quota: Quota,
    map: Mutex<HashMap<K, (Limiter, tokio::time::Instant)>>,
}

impl<K: std::hash::Hash + Eq + Clone> Keyed<K> {
    pub(crate) fn new(per_second: u32, burst: u32) -> Keyed<K> {
        let nz = |n: u32| NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN);
        Keyed {
            quota: Quota::per_second(nz(per_second)).allow_burst(nz(burst)),
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token of `key`'s bucket, or says how long until one.
    pub(crate) fn check(&self, key: &K) -> Result<(), Duration> {
        let now = tokio::time::Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 4096 {
            // A full bucket idle for a minute is the same as a new one.
            map.retain(|_, (_, used)| now.duration_since(*used) < Duration::from_secs(60));
        }
        let (limiter, used) = map
            .entry(key.clone())
            .or_insert_with(|| (Limiter::new(self.quota), now));
        *used = now;
        limiter.check()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_is_counted_by_its_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(ip_key(a), ip_key(b));
        assert_ne!(ip_key(a), ip_key(c));
        let v4: IpAddr = "127.0.0.7".parse().unwrap();
        assert_eq!(ip_key(v4), v4);
        let mapped: IpAddr = "::ffff:127.0.0.7".parse().unwrap();
        assert_eq!(ip_key(mapped), v4);
    }

    #[test]
    fn caps_count_per_key_and_in_total() {
        let limits = Limits {
            max_connections: 3,
            max_connections_per_ip: 2,
            ..Limits::default()
        };
        let caps = Caps::new(&limits);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        let a = caps.admit(ip).unwrap();
        let _b = caps.admit(ip).unwrap();
        assert_eq!(caps.admit(ip).err(), Some(Refused::PerIp));
        let _c = caps.admit(other).unwrap();
        assert_eq!(caps.admit(other).err(), Some(Refused::Total));
        drop(a);
        assert!(caps.admit(ip).is_ok(), "a dropped slot is free again");
    }

    #[tokio::test]
    async fn budget_waits_and_counts() {
        let b = Budget::new(100);
        let p = b.acquire(60).await.unwrap();
        assert_eq!(b.held(), 60);
        assert!(b.try_acquire(50).is_none());
        drop(p);
        assert!(b.try_acquire(50).is_some());
    }
}
