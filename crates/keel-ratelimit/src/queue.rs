//! The send queue: bounded per-key FIFO queues served round-robin, gated by
//! token buckets, with rate-limit freezes, backoff and dead letters.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backoff;
use crate::bucket::{Bucket, pin_now, preview_all, take_all};
use crate::config::{Config, Overflow};
use crate::sink::{Scope, SendOutcome, Sink};

/// Why a message ended without being sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadReason {
    /// Dropped by [`Overflow::DropOldest`] to make room.
    Overflow,
    /// Retryable failures used up the attempt budget.
    Exhausted {
        /// Attempts made.
        attempts: u32,
        /// The last error.
        last_error: String,
    },
    /// The sink answered with a non-retryable failure.
    Rejected {
        /// The error.
        error: String,
    },
    /// Still failing for want of a link or an answer when
    /// `Config::give_up_after` had passed since its first try.
    TimedOut {
        /// Calls to the sink made (unavailable tries included).
        attempts: u32,
        /// Time from the first try to the end of the last.
        elapsed: Duration,
        /// The last error (or why the last try could not be made).
        last_error: String,
    },
    /// Rate-limited more often than `Config::max_rate_limited` allows.
    RateLimited {
        /// Rate-limit answers received.
        times: u32,
    },
    /// The queue was dropped before the message was sent.
    Shutdown,
}

/// A message the queue gave up on, with why. Nothing is dropped silently:
/// every message ends sent or here.
#[derive(Debug)]
pub struct DeadLetter<K, M> {
    /// The key it was queued for.
    pub key: K,
    /// The message.
    pub msg: M,
    /// Why it was not sent.
    pub reason: DeadReason,
}

/// The receiving end of the dead letters.
pub type DeadLetters<K, M> = mpsc::UnboundedReceiver<DeadLetter<K, M>>;

/// How a message ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Sent, after this many calls to the sink (429s and unavailable tries
    /// included).
    Sent {
        /// Attempts, including the successful one (rate-limited ones too).
        attempts: u32,
    },
    /// Not sent; the message itself went to the dead letters.
    Dead(DeadReason),
}

/// Resolves when the message is sent or dead. Dropping it changes nothing:
/// the message stays queued.
#[derive(Debug)]
pub struct Receipt {
    rx: oneshot::Receiver<Delivery>,
}

impl Future for Receipt {
    type Output = Delivery;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Delivery> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or(Delivery::Dead(DeadReason::Shutdown)))
    }
}

/// Which bound refused a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// `Config::max_per_key`.
    Key,
    /// `Config::max_total`.
    Total,
}

/// Why `submit` did not queue a message; the message is handed back.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError<M> {
    /// A bound is reached and the policy is [`Overflow::RejectNewest`].
    #[error("send queue full ({bound:?} bound); retry later or raise the bound")]
    Full {
        /// The message.
        msg: M,
        /// Which bound.
        bound: Bound,
    },
    /// [`Overflow::Wait`] timed out.
    #[error("send queue stayed full for the whole wait timeout")]
    Timeout {
        /// The message.
        msg: M,
    },
    /// The queue is closing or closed.
    #[error("send queue is closed")]
    Closed {
        /// The message.
        msg: M,
    },
}

/// Counters and gauges of a queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metrics {
    /// Messages queued now (not counting those in flight).
    pub queued: usize,
    /// Sends in flight now.
    pub in_flight: usize,
    /// Keys the queue holds state for (idle keys are evicted).
    pub keys: usize,
    /// Messages sent.
    pub sent: u64,
    /// Messages dropped by [`Overflow::DropOldest`].
    pub dropped: u64,
    /// Rate-limit answers received.
    pub rate_limited: u64,
    /// Tries the sink could not make (its link down), not counted as attempts.
    pub unavailable: u64,
    /// Failed attempts (retryable or not).
    pub failed: u64,
    /// Messages that became dead letters (dropped ones included).
    pub dead: u64,
    /// The longest backoff any key is in now.
    pub max_backoff: Option<Duration>,
}

/// A fair, exact rate-limited send queue in front of a [`Sink`].
///
/// Keys (recipients) have their own FIFO queue and quotas; keys with work are
/// served round-robin (a key that becomes active is served next); a message is
/// sent only when every quota of its decision has a token, at the instant the
/// last one does. Needs a tokio runtime; all timing uses tokio time.
pub struct SendQueue<K, M> {
    shared: Arc<Shared<K, M>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl<K, M> Debug for SendQueue<K, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendQueue").finish_non_exhaustive()
    }
}

struct Shared<K, M> {
    state: Mutex<State<K, M>>,
    wake: Notify,
    total: Arc<Semaphore>,
    config: Config,
}

struct Entry<M> {
    msg: M,
    seq: u64,
    attempts: u32,
    rate_limited: u32,
    unavailable: u32,
    /// When its first try started.
    first_try: Option<Instant>,
    receipt: Option<oneshot::Sender<Delivery>>,
    _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Nothing queued, nothing in flight.
    Idle,
    /// Queued work, eligible as far as its own quotas and freezes go: in `ready`.
    Ready,
    /// Queued work, waiting for its quotas, a Retry-After or a backoff: in `sleeping`.
    Sleeping,
    /// One message in flight.
    InFlight,
}

struct KeyState<M> {
    queue: VecDeque<Entry<M>>,
    buckets: Vec<Bucket>,
    slot: Slot,
    frozen_until: Option<Instant>,
    backoff: Option<Duration>,
    permits: Arc<Semaphore>,
    /// An entry for this key is in `evictions` (at most one at a time).
    eviction_pending: bool,
}

struct State<K, M> {
    keys: HashMap<K, KeyState<M>>,
    ready: VecDeque<K>,
    sleeping: BTreeMap<(Instant, u64), K>,
    evictions: BTreeMap<(Instant, u64), K>,
    global: Vec<Bucket>,
    global_frozen_until: Option<Instant>,
    queued: usize,
    in_flight: usize,
    seq: u64,
    closed: bool,
    /// The dispatcher is (about to be) parked and wants a wake-up on new work.
    parked: bool,
    rng: StdRng,
    metrics: Metrics,
    dead: mpsc::UnboundedSender<DeadLetter<K, M>>,
}

impl<K, M> SendQueue<K, M>
where
    K: Clone + Eq + Hash + Debug + Send + Sync + 'static,
    M: Send + 'static,
{
    /// Starts a queue sending through `sink`; returns it and its dead letters.
    pub fn new<S: Sink<K, M>>(sink: S, config: Config) -> (Self, DeadLetters<K, M>) {
        let (dead_tx, dead_rx) = mpsc::unbounded_channel();
        let state = State {
            keys: HashMap::new(),
            ready: VecDeque::new(),
            sleeping: BTreeMap::new(),
            evictions: BTreeMap::new(),
            global: config.global.iter().map(|q| Bucket::new(*q)).collect(),
            global_frozen_until: None,
            queued: 0,
            in_flight: 0,
            seq: 0,
            closed: false,
            parked: false,
            rng: StdRng::seed_from_u64(config.seed),
            metrics: Metrics::default(),
            dead: dead_tx,
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            wake: Notify::new(),
            total: Arc::new(Semaphore::new(config.max_total.max(1))),
            config,
        });
        let task = tokio::spawn(dispatch(shared.clone(), Arc::new(sink)));
        let queue = SendQueue {
            shared,
            task: Mutex::new(Some(task)),
        };
        (queue, dead_rx)
    }

    /// Queues `msg` for `key`. Returns a [`Receipt`] that resolves when it is
    /// sent or dead. Waits only under [`Overflow::Wait`]; dropping that wait
    /// takes nobody's place and spends no token.
    pub async fn submit(&self, key: K, msg: M) -> Result<Receipt, SubmitError<M>> {
        let config = &self.shared.config;
        // Only the Wait policy awaits room, outside the lock; the other
        // policies do everything under one lock.
        let waited = match config.overflow {
            Overflow::Wait { timeout } => {
                let key_permits = {
                    let mut state = self.shared.lock();
                    if state.closed {
                        return Err(SubmitError::Closed { msg });
                    }
                    state.key_permits(&key, config)
                };
                let total = self.shared.total.clone();
                let both = async {
                    let t = total.acquire_owned().await?;
                    let k = key_permits.acquire_owned().await?;
                    Ok::<_, tokio::sync::AcquireError>((t, k))
                };
                match tokio::time::timeout(timeout, both).await {
                    Ok(Ok(p)) => Some(p),
                    Ok(Err(_)) => return Err(SubmitError::Closed { msg }),
                    Err(_) => return Err(SubmitError::Timeout { msg }),
                }
            }
            _ => None,
        };
        let (tx, rx) = oneshot::channel();
        let wake = {
            let mut state = self.shared.lock();
            if state.closed {
                return Err(SubmitError::Closed { msg });
            }
            let permits = match waited {
                Some(p) => p,
                None => match state.admit(&key, config, &self.shared.total) {
                    Ok(p) => p,
                    Err(bound) => return Err(SubmitError::Full { msg, bound }),
                },
            };
            state.seq += 1;
            let entry = Entry {
                msg,
                seq: state.seq,
                attempts: 0,
                rate_limited: 0,
                unavailable: 0,
                first_try: None,
                receipt: Some(tx),
                _permits: permits,
            };
            state.push(key, entry);
            // Wake the dispatcher only if it is parked: a busy dispatcher
            // picks the message up on its next pass, and skipping the wake-up
            // spares a thread hand-off per message.
            std::mem::take(&mut state.parked)
        };
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(Receipt { rx })
    }

    /// Messages queued for `key` (not counting one in flight).
    pub fn depth(&self, key: &K) -> usize {
        self.shared
            .lock()
            .keys
            .get(key)
            .map_or(0, |k| k.queue.len())
    }

    /// The backoff `key` is in now, if any.
    pub fn backoff(&self, key: &K) -> Option<Duration> {
        self.shared.lock().keys.get(key).and_then(|k| k.backoff)
    }

    /// A snapshot of the counters and gauges.
    pub fn metrics(&self) -> Metrics {
        let state = self.shared.lock();
        let mut m = state.metrics.clone();
        m.queued = state.queued;
        m.in_flight = state.in_flight;
        m.keys = state.keys.len();
        m.max_backoff = state.keys.values().filter_map(|k| k.backoff).max();
        m
    }

    /// Resets the counters (sent, dropped, rate-limited, failed, dead) to zero.
    /// Queues, token buckets, freezes and backoffs are untouched: resetting a
    /// bucket could send before the server allows.
    pub fn reset(&self) {
        self.shared.lock().metrics = Metrics::default();
    }

    /// Stops accepting messages and waits until every queued message is sent
    /// or dead.
    pub async fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.total.close();
        self.shared.wake.notify_one();
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl<K, M> Drop for SendQueue<K, M> {
    fn drop(&mut self) {
        if let Ok(mut task) = self.task.lock()
            && let Some(task) = task.take()
        {
            task.abort();
        }
    }
}

impl<K, M> Shared<K, M> {
    fn lock(&self) -> MutexGuard<'_, State<K, M>> {
        // A panic while holding the lock leaves consistent data (every
        // critical section is a few field updates), so poison is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn earliest(a: Option<Instant>, b: Instant) -> Option<Instant> {
    Some(a.map_or(b, |a| a.min(b)))
}

impl<K, M> State<K, M>
where
    K: Clone + Eq + Hash + Debug,
{
    /// The key's capacity semaphore, creating the key's state if needed.
    fn key_permits(&mut self, key: &K, config: &Config) -> Arc<Semaphore> {
        self.keys
            .entry(key.clone())
            .or_insert_with(|| KeyState {
                queue: VecDeque::new(),
                buckets: config.per_key.iter().map(|q| Bucket::new(*q)).collect(),
                slot: Slot::Idle,
                frozen_until: None,
                backoff: None,
                permits: Arc::new(Semaphore::new(config.max_per_key.max(1))),
                eviction_pending: false,
            })
            .permits
            .clone()
    }

    /// Takes room for one message under `RejectNewest` or `DropOldest`.
    fn admit(
        &mut self,
        key: &K,
        config: &Config,
        total: &Arc<Semaphore>,
    ) -> Result<(OwnedSemaphorePermit, OwnedSemaphorePermit), Bound> {
        let key_permits = self.key_permits(key, config);
        let drop_oldest = config.overflow == Overflow::DropOldest;
        let k = loop {
            if let Ok(k) = key_permits.clone().try_acquire_owned() {
                break k;
            }
            if !drop_oldest || !self.drop_oldest(Some(key)) {
                return Err(Bound::Key);
            }
        };
        let t = loop {
            if let Ok(t) = total.clone().try_acquire_owned() {
                break t;
            }
            if !drop_oldest || !self.drop_oldest(None) {
                return Err(Bound::Total);
            }
        };
        Ok((t, k))
    }

    fn push(&mut self, key: K, entry: Entry<M>) {
        self.queued += 1;
        let ks = self
            .keys
            .get_mut(&key)
            .expect("key state exists while permits are held");
        ks.queue.push_back(entry);
        if ks.slot == Slot::Idle {
            // A key that becomes active is served next: one hot key with a
            // long queue cannot make a new key wait for a full rotation.
            ks.slot = Slot::Ready;
            self.ready.push_front(key);
        }
    }

    /// Drops the oldest queued message of `key`, or of any key; false if none.
    fn drop_oldest(&mut self, key: Option<&K>) -> bool {
        let victim = match key {
            Some(k) => self
                .keys
                .get(k)
                .filter(|ks| !ks.queue.is_empty())
                .map(|_| k.clone()),
            None => self
                .keys
                .iter()
                .filter_map(|(k, ks)| ks.queue.front().map(|e| (e.seq, k)))
                .min_by_key(|(seq, _)| *seq)
                .map(|(_, k)| k.clone()),
        };
        let Some(victim) = victim else { return false };
        let Some(entry) = self
            .keys
            .get_mut(&victim)
            .and_then(|ks| ks.queue.pop_front())
        else {
            return false;
        };
        self.queued -= 1;
        self.metrics.dropped += 1;
        tracing::warn!(key = ?victim, dropped = self.metrics.dropped, "send queue full: dropped the oldest message");
        self.kill(victim.clone(), entry, DeadReason::Overflow);
        // The key's own bookkeeping catches up when it is next served.
        true
    }

    fn kill(&mut self, key: K, mut entry: Entry<M>, reason: DeadReason) {
        self.metrics.dead += 1;
        if let Some(receipt) = entry.receipt.take() {
            let _ = receipt.send(Delivery::Dead(reason.clone()));
        }
        if !matches!(reason, DeadReason::Overflow) {
            tracing::warn!(key = ?key, ?reason, "message dead-lettered");
        }
        let _ = self.dead.send(DeadLetter {
            key,
            msg: entry.msg,
            reason,
        });
    }

    /// Moves every message that may be sent now into `out`; returns when to
    /// look again.
    fn pick(
        &mut self,
        now: Instant,
        max_in_flight: usize,
        out: &mut Vec<(K, Entry<M>)>,
    ) -> Option<Instant> {
        while let Some(entry) = self.sleeping.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let key = entry.remove();
            if let Some(ks) = self.keys.get_mut(&key) {
                ks.slot = Slot::Ready;
                ks.frozen_until = None;
                self.ready.push_back(key);
            }
        }
        self.evict_idle(now);

        let mut wake = None;
        match self.global_frozen_until {
            Some(until) if until > now => wake = Some(until),
            _ => {
                self.global_frozen_until = None;
                self.pick_ready(now, max_in_flight, out, &mut wake);
            }
        }
        if let Some((&(at, _), _)) = self.sleeping.first_key_value() {
            wake = earliest(wake, at);
        }
        if let Some((&(at, _), _)) = self.evictions.first_key_value() {
            wake = earliest(wake, at);
        }
        wake
    }

    fn pick_ready(
        &mut self,
        now: Instant,
        max_in_flight: usize,
        out: &mut Vec<(K, Entry<M>)>,
        wake: &mut Option<Instant>,
    ) {
        while self.in_flight < max_in_flight {
            let Some(key) = self.ready.pop_front() else {
                break;
            };
            let Some(ks) = self.keys.get_mut(&key) else {
                continue;
            };
            if ks.queue.is_empty() {
                // Emptied by DropOldest while it waited.
                ks.slot = Slot::Idle;
                self.schedule_eviction(key, now);
                continue;
            }
            if let Err(at) = preview_all(ks.buckets.iter()) {
                ks.slot = Slot::Sleeping;
                self.seq += 1;
                self.sleeping.insert((at, self.seq), key);
                continue;
            }
            // The key's own quotas allow it; now all quotas together.
            if let Err(at) = take_all(ks.buckets.iter().chain(self.global.iter())) {
                // A global quota refuses: nobody can send before `at`.
                self.ready.push_front(key);
                *wake = earliest(*wake, at);
                return;
            }
            let mut entry = ks.queue.pop_front().expect("checked non-empty");
            entry.first_try.get_or_insert(now);
            ks.slot = Slot::InFlight;
            self.queued -= 1;
            self.in_flight += 1;
            out.push((key, entry));
        }
    }

    /// Records the outcome of a send and files the key where it belongs.
    fn complete(
        &mut self,
        key: K,
        mut entry: Entry<M>,
        outcome: SendOutcome,
        config: &Config,
        now: Instant,
    ) {
        self.in_flight -= 1;
        entry.attempts += 1;
        let Some(ks) = self.keys.get_mut(&key) else {
            return;
        };
        let mut requeue = false;
        let mut dead = None;
        // Past its time budget, a try that failed for want of a link or an
        // answer is its last.
        let timed_out = |entry: &Entry<M>, last_error: String| {
            let elapsed = now - entry.first_try.unwrap_or(now);
            let budget = config.give_up_after?;
            (elapsed >= budget).then_some(DeadReason::TimedOut {
                attempts: entry.attempts,
                elapsed,
                last_error,
            })
        };
        match outcome {
            SendOutcome::Sent => {
                self.metrics.sent += 1;
                ks.backoff = None;
                if let Some(receipt) = entry.receipt.take() {
                    let _ = receipt.send(Delivery::Sent {
                        attempts: entry.attempts,
                    });
                }
            }
            SendOutcome::RateLimited { retry_after, scope } => {
                self.metrics.rate_limited += 1;
                entry.rate_limited += 1;
                let until = now + retry_after;
                match scope {
                    Scope::Key => {
                        ks.frozen_until = Some(ks.frozen_until.map_or(until, |f| f.max(until)))
                    }
                    Scope::Global => {
                        self.global_frozen_until =
                            Some(self.global_frozen_until.map_or(until, |f| f.max(until)));
                    }
                }
                match config.max_rate_limited {
                    Some(max) if entry.rate_limited > max => {
                        dead = Some(DeadReason::RateLimited {
                            times: entry.rate_limited,
                        });
                    }
                    _ => requeue = true,
                }
            }
            SendOutcome::Unavailable { retry_after } => {
                self.metrics.unavailable += 1;
                entry.unavailable += 1;
                dead = timed_out(&entry, "unavailable: no link to send on".to_owned());
                if dead.is_none() {
                    let until = now + retry_after;
                    ks.frozen_until = Some(ks.frozen_until.map_or(until, |f| f.max(until)));
                    requeue = true;
                }
            }
            SendOutcome::Failed { retryable, error } => {
                self.metrics.failed += 1;
                let failures = entry.attempts - entry.rate_limited - entry.unavailable;
                if !retryable {
                    dead = Some(DeadReason::Rejected { error });
                } else if failures >= config.backoff.max_attempts {
                    dead = Some(DeadReason::Exhausted {
                        attempts: entry.attempts,
                        last_error: error,
                    });
                } else if let Some(reason) = timed_out(&entry, error) {
                    dead = Some(reason);
                } else {
                    let delay = backoff::delay(&config.backoff, failures, &mut self.rng);
                    ks.backoff = Some(delay);
                    ks.frozen_until = Some(now + delay);
                    requeue = true;
                }
            }
        }
        if requeue {
            ks.queue.push_front(entry);
            self.queued += 1;
        } else if let Some(reason) = dead {
            self.kill(key.clone(), entry, reason);
        }
        self.file(key, now);
    }

    /// Puts a key that is no longer in flight where it belongs.
    fn file(&mut self, key: K, now: Instant) {
        let Some(ks) = self.keys.get_mut(&key) else {
            return;
        };
        match ks.frozen_until {
            Some(until) if until > now && !ks.queue.is_empty() => {
                ks.slot = Slot::Sleeping;
                self.seq += 1;
                self.sleeping.insert((until, self.seq), key);
            }
            _ if !ks.queue.is_empty() => {
                ks.frozen_until = None;
                ks.slot = Slot::Ready;
                self.ready.push_back(key);
            }
            _ => {
                ks.slot = Slot::Idle;
                self.schedule_eviction(key, now);
            }
        }
    }

    /// An idle key is forgotten once its buckets are full again and no freeze
    /// is pending: then a fresh key state would behave the same.
    fn schedule_eviction(&mut self, key: K, now: Instant) {
        let Some(ks) = self.keys.get_mut(&key) else {
            return;
        };
        if ks.eviction_pending {
            // The pending check re-reads the buckets when it comes due.
            return;
        }
        ks.eviction_pending = true;
        let mut at = ks.frozen_until.unwrap_or(now);
        for bucket in &ks.buckets {
            at = at.max(bucket.full_at());
        }
        self.seq += 1;
        self.evictions.insert((at, self.seq), key);
    }

    fn evict_idle(&mut self, now: Instant) {
        while let Some(entry) = self.evictions.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let key = entry.remove();
            let Some(ks) = self.keys.get_mut(&key) else {
                continue;
            };
            ks.eviction_pending = false;
            let idle =
                ks.slot == Slot::Idle && ks.queue.is_empty() && Arc::strong_count(&ks.permits) == 1;
            if !idle {
                // Busy again; it is rescheduled when it next goes idle.
                continue;
            }
            let full_at = ks.buckets.iter().map(Bucket::full_at).max();
            match full_at {
                Some(at) if at > now => {
                    ks.eviction_pending = true;
                    self.seq += 1;
                    self.evictions.insert((at, self.seq), key);
                }
                _ => {
                    self.keys.remove(&key);
                }
            }
        }
    }

    fn done(&self) -> bool {
        self.closed && self.queued == 0 && self.in_flight == 0
    }
}

async fn send_one<K, M, S: Sink<K, M>>(
    sink: Arc<S>,
    key: K,
    entry: Entry<M>,
) -> (K, Entry<M>, SendOutcome) {
    let outcome = sink.send(&key, &entry.msg).await;
    (key, entry, outcome)
}

async fn dispatch<K, M, S>(shared: Arc<Shared<K, M>>, sink: Arc<S>)
where
    K: Clone + Eq + Hash + Debug + Send + Sync + 'static,
    M: Send + 'static,
    S: Sink<K, M>,
{
    let mut running = FuturesUnordered::new();
    let mut picked = Vec::new();
    let mut finished = Vec::new();
    let max_in_flight = shared.config.max_in_flight.max(1);
    loop {
        let wake = {
            let mut state = shared.lock();
            if state.done() {
                return;
            }
            let now = Instant::now();
            let _pinned = pin_now(now);
            let wake = state.pick(now, max_in_flight, &mut picked);
            // Parked until a send finishes, the next due instant, or a submit.
            state.parked = true;
            wake
        };
        for (key, entry) in picked.drain(..) {
            running.push(send_one(sink.clone(), key, entry));
        }
        let sleep = async {
            match wake {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(first) = running.next(), if !running.is_empty() => {
                // Take every other finished send too, then record them under one lock.
                finished.push(first);
                while let Some(Some(next)) = futures::FutureExt::now_or_never(running.next()) {
                    finished.push(next);
                }
                let mut state = shared.lock();
                let now = Instant::now();
                let _pinned = pin_now(now);
                for (key, entry, outcome) in finished.drain(..) {
                    state.complete(key, entry, outcome, &shared.config, now);
                }
            }
            _ = shared.wake.notified() => {}
            _ = sleep => {}
        }
    }
}
