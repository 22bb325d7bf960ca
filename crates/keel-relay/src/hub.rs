//! In-memory fan-out of committed messages to the connections subscribed to
//! their channel, and each connection's outbound queue, bounded in bytes.
//! The log is the source of truth: the hub only saves subscribers a
//! database read for messages that arrive while they listen, and a
//! subscriber that cannot keep up is closed (1013) and resumes from the log.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::upgrade::Utf8Bytes;
use tokio::sync::{Notify, mpsc};

use crate::limits::{Buffered, hit};
use crate::tail::Tail;

/// What a connection's writer receives.
#[derive(Debug)]
pub(crate) enum Outbound {
    /// A frame to write as it is.
    Frame(Utf8Bytes),
    /// Committed messages of a subscribed channel, in offset order; the
    /// batch (and each frame in it) is shared by every subscriber.
    Live {
        channel: Arc<str>,
        batch: Arc<[(u64, Utf8Bytes)]>,
    },
    /// Start delivering `channel` from `from`: replay the log, then live.
    /// `fresh`: the channel is known to hold nothing at `from` yet (a new
    /// session's private channel), so there is nothing to read.
    Start {
        channel: Arc<str>,
        from: u64,
        fresh: bool,
    },
    /// Stop delivering `channel`.
    Stop { channel: Arc<str> },
    /// Close with this code and reason, then end.
    Close { code: u16, reason: String },
}

/// Why a connection is ending while its reader still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// Its queue passed a bound: close with 1013, it resumes from the log.
    Slow,
    /// A write made no progress for the write deadline: the peer is gone or
    /// not reading; nothing more can be written.
    Stuck,
    /// The writer ended (the link broke).
    Gone,
    /// The store could not be read for a replay: close 1011, the client
    /// resumes from its last offset (a writer that stopped without closing
    /// would leave the subscriber waiting on a live socket forever).
    Unreadable,
    /// The client closed (or its stream ended) and the session is detached:
    /// nothing more is written but the answer to its close.
    Closed,
}

/// Set once when a connection must end; the reader and writer both watch it.
#[derive(Debug, Default)]
pub(crate) struct EndFlag {
    state: AtomicU8,
    notify: Notify,
}

impl EndFlag {
    /// Sets the reason, unless one is set already.
    pub(crate) fn raise(&self, why: Ending) {
        let code = match why {
            Ending::Slow => 1,
            Ending::Stuck => 2,
            Ending::Gone => 3,
            Ending::Unreadable => 4,
            Ending::Closed => 5,
        };
        if self
            .state
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.notify.notify_waiters();
            self.notify.notify_one();
        }
    }

    pub(crate) fn get(&self) -> Option<Ending> {
        match self.state.load(Ordering::Acquire) {
            1 => Some(Ending::Slow),
            2 => Some(Ending::Stuck),
            3 => Some(Ending::Gone),
            4 => Some(Ending::Unreadable),
            5 => Some(Ending::Closed),
            _ => None,
        }
    }

    pub(crate) async fn wait(&self) -> Ending {
        loop {
            let notified = self.notify.notified();
            if let Some(e) = self.get() {
                return e;
            }
            notified.await;
        }
    }
}

/// The relay's outbound byte budget (half of `global_buffer_bytes`): what
/// every connection's queue and writer hold. It never makes a delivery
/// wait; when it is overdrawn, the connections holding the most are closed
/// as slow consumers (1013, they resume from the log) until what remains
/// fits, so a well-behaved reader holding little is never the one to go
/// because others stopped reading.
#[derive(Clone)]
pub(crate) struct OutBudget(Arc<OutInner>);

struct OutInner {
    limit: usize,
    held: AtomicUsize,
    registry: Mutex<Registry>,
    next: AtomicU64,
}

/// The open accounts, by id, and those closed for the budget whose bytes
/// are not freed yet. It holds [`Stats`], never an [`Account`], so that
/// nothing dropped under its lock can come back to take it.
#[derive(Default)]
struct Registry {
    open: HashMap<u64, Arc<Stats>>,
    evicted: HashMap<u64, Arc<Stats>>,
}

/// What one connection holds.
#[derive(Debug)]
struct Stats {
    /// Bytes its queue and its writer hold now.
    bytes: AtomicUsize,
    /// Of those, its own bytes counted in the relay's budget (replay
    /// pages).
    global: AtomicUsize,
    /// Bytes of the live batches it queues, whole: what it keeps alive
    /// (a reader far behind the others keeps its batches alone).
    shared: AtomicUsize,
    evicted: AtomicBool,
    end: Arc<EndFlag>,
}

impl OutBudget {
    pub(crate) fn new(limit: usize) -> OutBudget {
        OutBudget(Arc::new(OutInner {
            limit: limit.max(1),
            held: AtomicUsize::new(0),
            registry: Mutex::default(),
            next: AtomicU64::new(1),
        }))
    }

    /// Bytes held now.
    pub(crate) fn held(&self) -> usize {
        self.0.held.load(Ordering::Acquire)
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.0.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection's account.
    pub(crate) fn open(&self, end: Arc<EndFlag>) -> Arc<Account> {
        let id = self.0.next.fetch_add(1, Ordering::Relaxed);
        let stats = Arc::new(Stats {
            bytes: AtomicUsize::new(0),
            global: AtomicUsize::new(0),
            shared: AtomicUsize::new(0),
            evicted: AtomicBool::new(false),
            end,
        });
        self.registry().open.insert(id, stats.clone());
        Arc::new(Account {
            id,
            stats,
            budget: self.clone(),
        })
    }

    /// While more is held than the limit, not counting what connections
    /// already closed for it still hold (they are freeing it), closes the
    /// connection holding the most.
    fn evict(&self) {
        if self.held() <= self.0.limit {
            return;
        }
        let mut registry = self.registry();
        loop {
            // What closing them frees: their own bytes and the whole of
            // the batches they queue (more than it frees when others hold
            // the same batches too; the next overdraft, once their queues
            // are gone, judges again, instead of closing readers that hold
            // nothing on an estimate that came short).
            let freeing: usize = registry.evicted.values().map(|s| s.holds()).sum();
            if self.held().saturating_sub(freeing) <= self.0.limit {
                return;
            }
            let largest = registry
                .open
                .iter()
                .map(|(id, s)| (*id, s.holds()))
                .filter(|(_, holds)| *holds > 0)
                .max_by_key(|(_, holds)| *holds)
                .map(|(id, _)| id);
            let Some(id) = largest else { return };
            let Some(stats) = registry.open.remove(&id) else {
                return;
            };
            stats.evicted.store(true, Ordering::Release);
            hit("global_bytes");
            stats.end.raise(Ending::Slow);
            registry.evicted.insert(id, stats);
        }
    }
}

impl Stats {
    /// What it keeps alive in the budget: its own bytes there and the
    /// whole of the live batches it queues.
    fn holds(&self) -> usize {
        self.global.load(Ordering::Acquire) + self.shared.load(Ordering::Acquire)
    }
}

/// A live batch's bytes in the relay's budget: counted once, however many
/// subscribers queue the batch (they share its frames), until the last
/// lets go. Counting it once per subscriber made a hundred readers of the
/// same 500 KB messages look like 50 MB each, and the budget closed
/// readers that were keeping up.
pub(crate) struct SharedHold {
    budget: OutBudget,
    bytes: usize,
    _total: Buffered,
}

impl OutBudget {
    /// Counts a live batch of `bytes` once; overdrawing the budget closes
    /// the largest holders.
    pub(crate) fn share(&self, bytes: usize) -> Arc<SharedHold> {
        self.0.held.fetch_add(bytes, Ordering::AcqRel);
        self.evict();
        Arc::new(SharedHold {
            budget: self.clone(),
            bytes,
            _total: Buffered::outbound(bytes),
        })
    }
}

impl std::fmt::Debug for SharedHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedHold")
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl Drop for SharedHold {
    fn drop(&mut self) {
        self.budget.0.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// One connection's standing with the outbound budget.
pub(crate) struct Account {
    id: u64,
    stats: Arc<Stats>,
    budget: OutBudget,
}

impl Account {
    /// Counts `bytes` held by this connection (in the relay's budget too
    /// when `global`), until the returned [`Held`] is dropped. Overdrawing
    /// the budget closes the largest holders, perhaps this one.
    pub(crate) fn hold(self: &Arc<Self>, bytes: usize, global: bool) -> Held {
        self.stats.bytes.fetch_add(bytes, Ordering::AcqRel);
        if global {
            self.stats.global.fetch_add(bytes, Ordering::AcqRel);
            self.budget.0.held.fetch_add(bytes, Ordering::AcqRel);
            self.budget.evict();
        }
        Held {
            account: self.clone(),
            bytes,
            charge: if global {
                Charge::Budget
            } else {
                Charge::Local
            },
            _total: Some(Buffered::outbound(bytes)),
        }
    }

    /// Counts a live batch of `bytes` queued by this connection, whose
    /// budget bytes `shared` holds for all its subscribers.
    pub(crate) fn hold_shared(self: &Arc<Self>, bytes: usize, shared: Arc<SharedHold>) -> Held {
        self.stats.bytes.fetch_add(bytes, Ordering::AcqRel);
        self.stats.shared.fetch_add(bytes, Ordering::AcqRel);
        Held {
            account: self.clone(),
            bytes,
            charge: Charge::Shared(shared),
            // Counted once, by the batch.
            _total: None,
        }
    }

    /// The budget this account is in.
    pub(crate) fn budget(&self) -> &OutBudget {
        &self.budget
    }

    /// Bytes held now.
    pub(crate) fn bytes(&self) -> usize {
        self.stats.bytes.load(Ordering::Acquire)
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        // Every `Held` keeps its account alive: nothing is held any more.
        let mut registry = self.budget.registry();
        registry.open.remove(&self.id);
        registry.evicted.remove(&self.id);
    }
}

/// Bytes one queued item (or a replay page) holds, counted against its
/// connection's outbound bytes (and, for deliveries and pages, the relay's
/// outbound budget) until the writer has flushed it.
#[derive(Debug)]
pub(crate) struct Held {
    account: Arc<Account>,
    bytes: usize,
    charge: Charge,
    _total: Option<Buffered>,
}

/// How a [`Held`] counts in the relay's budget.
#[derive(Debug)]
enum Charge {
    /// Not at all (replies, errors).
    Local,
    /// With its own bytes (a replay page).
    Budget,
    /// Through a batch counted once for all its subscribers (held for
    /// its drop).
    Shared(#[allow(dead_code)] Arc<SharedHold>),
}

impl std::fmt::Debug for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Account")
            .field("id", &self.id)
            .field("bytes", &self.bytes())
            .finish()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let stats = &self.account.stats;
        stats.bytes.fetch_sub(self.bytes, Ordering::AcqRel);
        match &self.charge {
            Charge::Local => {}
            Charge::Budget => {
                stats.global.fetch_sub(self.bytes, Ordering::AcqRel);
                self.account
                    .budget
                    .0
                    .held
                    .fetch_sub(self.bytes, Ordering::AcqRel);
            }
            Charge::Shared(_) => {
                stats.shared.fetch_sub(self.bytes, Ordering::AcqRel);
            }
        }
    }
}

/// An item and the bytes it holds.
#[derive(Debug)]
pub(crate) struct Queued {
    pub(crate) item: Outbound,
    pub(crate) held: Held,
}

/// A connection's outbound queue as producers see it.
#[derive(Debug, Clone)]
pub(crate) struct OutQueue {
    tx: mpsc::Sender<Queued>,
    account: Arc<Account>,
    max_bytes: usize,
    end: Arc<EndFlag>,
}

impl OutQueue {
    /// A queue of at most `max_items` items and `max_bytes` bytes, with its
    /// account in `budget`.
    pub(crate) fn new(
        max_items: usize,
        max_bytes: usize,
        budget: &OutBudget,
        end: Arc<EndFlag>,
    ) -> (OutQueue, mpsc::Receiver<Queued>) {
        let (tx, rx) = mpsc::channel(max_items.max(1));
        (
            OutQueue {
                tx,
                account: budget.open(end.clone()),
                max_bytes,
                end,
            },
            rx,
        )
    }

    /// The connection's account (its writer charges replay pages to it).
    pub(crate) fn account(&self) -> Arc<Account> {
        self.account.clone()
    }

    /// Queues the connection's own frame (a reply, an error), waiting for
    /// room: the reader then stops reading the socket until its client
    /// reads what it was sent (TCP backpressure on both sides).
    pub(crate) async fn send(&self, item: Outbound) -> bool {
        let bytes = match &item {
            Outbound::Frame(f) => f.len(),
            _ => 64,
        };
        let held = self.account.hold(bytes, false);
        self.tx.send(Queued { item, held }).await.is_ok()
    }

    /// Queues a delivery batch without waiting: a connection over its byte
    /// budget, or whose queue is full, is flagged slow instead (closed with
    /// 1013; it resumes from the log), as are the largest holders when the
    /// relay's outbound budget is overdrawn. Returns whether it was queued.
    /// The batch's bytes count once in the relay's budget, through
    /// `shared`, for all its subscribers.
    pub(crate) fn offer(&self, item: Outbound, bytes: usize, shared: &Arc<SharedHold>) -> bool {
        if self.end.get().is_some() {
            return false;
        }
        if self.account.bytes() + bytes > self.max_bytes {
            hit("outbound_bytes");
            self.end.raise(Ending::Slow);
            return false;
        }
        let held = self.account.hold_shared(bytes, shared.clone());
        if self.end.get().is_some() {
            return false; // it was the largest holder
        }
        match self.tx.try_send(Queued { item, held }) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                hit("outbound_bytes");
                self.end.raise(Ending::Slow);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

#[derive(Clone)]
struct Subscriber {
    conn: u64,
    queue: OutQueue,
}

/// A channel's listeners, and the newest offset handed to them live.
struct Entry {
    subs: Vec<Subscriber>,
    last: AtomicU64,
}

/// Channel name -> the connections listening to it.
pub(crate) struct Hub {
    channels: RwLock<HashMap<Arc<str>, Entry>>,
    /// Connection-channel pairs registered, over every channel.
    subscriptions: AtomicUsize,
    /// The newest frames handed out, for replays (see [`Tail`]).
    pub(crate) tail: Tail,
}

impl Hub {
    /// A hub whose replay cache keeps up to `replay_cache_bytes` of frames,
    /// for replays reading store pages of `replay_page_bytes`.
    pub(crate) fn new(replay_cache_bytes: usize, replay_page_bytes: usize) -> Hub {
        Hub {
            channels: RwLock::default(),
            subscriptions: AtomicUsize::new(0),
            tail: Tail::new(replay_cache_bytes, replay_page_bytes),
        }
    }

    /// Adds `conn` to `channel`, which it reads from offset `from` on;
    /// returns the shared name.
    pub(crate) fn subscribe(
        &self,
        channel: &str,
        conn: u64,
        queue: OutQueue,
        from: u64,
    ) -> Arc<str> {
        let mut map = self.channels.write().unwrap_or_else(|p| p.into_inner());
        let key: Arc<str> = map
            .get_key_value(channel)
            .map(|(k, _)| k.clone())
            .unwrap_or_else(|| Arc::from(channel));
        let entry = map.entry(key.clone()).or_insert_with(|| Entry {
            subs: Vec::new(),
            // Its replay covers what is before `from`.
            last: AtomicU64::new(from.saturating_sub(1)),
        });
        let subs = &mut entry.subs;
        if !subs.iter().any(|s| s.conn == conn) {
            subs.push(Subscriber { conn, queue });
            self.subscriptions.fetch_add(1, Ordering::Relaxed);
        }
        key
    }

    /// Removes `conn` from `channel`.
    pub(crate) fn unsubscribe(&self, channel: &str, conn: u64) {
        let mut map = self.channels.write().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = map.get_mut(channel) {
            let subs = &mut entry.subs;
            let before = subs.len();
            subs.retain(|s| s.conn != conn);
            self.subscriptions
                .fetch_sub(before - subs.len(), Ordering::Relaxed);
            if subs.is_empty() {
                map.remove(channel);
            }
        }
    }

    /// Hands committed messages of one channel, in offset order, to every
    /// subscriber without waiting: one queue item per subscriber for the
    /// whole batch, counted at the batch's bytes against each subscriber's
    /// budgets (see [`OutQueue::offer`]), and keeps the frames for replays.
    /// Returns how many got it.
    pub(crate) fn publish_batch(&self, channel: &str, batch: Arc<[(u64, Utf8Bytes)]>) -> usize {
        // Kept whether anyone listens now or not: subscribers closed as
        // slow consumers all at once (a hundred readers behind the same
        // burst) are all away while the burst goes on, and come back for it.
        self.tail.keep(channel, &batch);
        let map = self.channels.read().unwrap_or_else(|p| p.into_inner());
        let Some((name, entry)) = map.get_key_value(channel) else {
            return 0;
        };
        if let Some((newest, _)) = batch.last() {
            entry.last.fetch_max(*newest, Ordering::AcqRel);
        }
        let subs = &entry.subs;
        let bytes: usize = batch.iter().map(|(_, f)| f.len()).sum();
        let Some(first) = subs.first() else {
            return 0;
        };
        let shared = first.queue.account.budget().share(bytes);
        let mut delivered = 0;
        for s in subs {
            let item = Outbound::Live {
                channel: name.clone(),
                batch: batch.clone(),
            };
            if s.queue.offer(item, bytes, &shared) {
                delivered += 1;
            }
        }
        delivered
    }

    /// Live subscriptions: connections registered to a channel, summed over
    /// channels.
    pub(crate) fn subscription_count(&self) -> usize {
        self.subscriptions.load(Ordering::Relaxed)
    }

    /// Each channel with subscribers, with the newest offset handed to them
    /// (or the one before where they started reading): what the cluster's
    /// catch-up compares with the store.
    pub(crate) fn heads(&self) -> Vec<(Arc<str>, u64)> {
        self.channels
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, e)| (k.clone(), e.last.load(Ordering::Acquire)))
            .collect()
    }

    /// Channels with at least one subscriber.
    pub(crate) fn channel_count(&self) -> usize {
        self.channels
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Overdrawing the outbound budget closes the largest holder, not the
    /// connection that happened to ask last; what it held is taken off as
    /// it is freed.
    #[test]
    fn overdraft_evicts_the_largest_holder() {
        let budget = OutBudget::new(100);
        let (big_end, small_end) = (Arc::new(EndFlag::default()), Arc::new(EndFlag::default()));
        let (big, small) = (budget.open(big_end.clone()), budget.open(small_end.clone()));
        let big_held = big.hold(80, true);
        let small_held = small.hold(10, true);
        assert_eq!(big_end.get(), None);
        let more = small.hold(20, true);
        assert_eq!(big_end.get(), Some(Ending::Slow), "the largest holder goes");
        assert_eq!(small_end.get(), None, "the small reader stays");
        assert_eq!(budget.held(), 110);
        // Still over the limit until the evicted queue is freed, but no one
        // else is closed for it.
        let again = small.hold(5, true);
        assert_eq!(small_end.get(), None);
        drop(big_held);
        assert_eq!(budget.held(), 35);
        drop((small_held, more, again));
        assert_eq!(budget.held(), 0);
        // Replies (not global) never count against the relay's budget.
        let reply = small.hold(1_000, false);
        assert_eq!(budget.held(), 0);
        assert_eq!(small.bytes(), 1_000);
        drop(reply);
        drop(big);
        let registry = budget.registry();
        assert_eq!(registry.open.len(), 1, "a dropped account unregisters");
        assert!(registry.evicted.is_empty(), "an evicted one too");
    }
    /// A live batch queued by many subscribers counts once in the budget;
    /// each still counts all of it against its own bound. When the budget
    /// is overdrawn, the reader keeping batches alone (the others wrote
    /// them) is the one closed.
    #[test]
    fn a_shared_batch_counts_once() {
        let budget = OutBudget::new(100);
        let ends: Vec<Arc<EndFlag>> = (0..10).map(|_| Arc::new(EndFlag::default())).collect();
        let accounts: Vec<Arc<Account>> = ends.iter().map(|e| budget.open(e.clone())).collect();
        let first = budget.share(60);
        let mut held: Vec<Held> = accounts
            .iter()
            .map(|a| a.hold_shared(60, first.clone()))
            .collect();
        drop(first);
        assert_eq!(budget.held(), 60, "once, not ten times");
        assert!(ends.iter().all(|e| e.get().is_none()));
        assert_eq!(accounts[3].bytes(), 60);
        // Nine readers wrote it; the first keeps it alone.
        held.truncate(1);
        assert_eq!(budget.held(), 60);
        // The next batch overdraws the budget: the lagging reader goes.
        let second = budget.share(60);
        assert_eq!(ends[0].get(), Some(Ending::Slow));
        assert!(ends[1..].iter().all(|e| e.get().is_none()));
        drop(held);
        assert_eq!(budget.held(), 60);
        drop(second);
        assert_eq!(budget.held(), 0);
    }

    /// What evicted connections still hold is known exactly: their replies
    /// (outside the budget) are not mistaken for budget bytes being freed,
    /// and a page charged after the eviction is counted as freeing too; once
    /// it is all freed, the next overdraft evicts again.
    #[test]
    fn evictions_count_exactly_what_is_being_freed() {
        let budget = OutBudget::new(100);
        let ends: Vec<Arc<EndFlag>> = (0..3).map(|_| Arc::new(EndFlag::default())).collect();
        let (a, b, c) = (
            budget.open(ends[0].clone()),
            budget.open(ends[1].clone()),
            budget.open(ends[2].clone()),
        );
        let a_reply = a.hold(500, false);
        let a_held = a.hold(90, true);
        let b_held = b.hold(20, true);
        assert_eq!(
            ends[0].get(),
            Some(Ending::Slow),
            "the largest in the budget"
        );
        assert_eq!(ends[1].get(), None);
        let a_late = a.hold(50, true);
        assert_eq!(ends[1].get(), None, "a's late page is a's, being freed");
        // Its budget bytes are freed; a reply is still queued.
        drop((a_held, a_late));
        assert_eq!(budget.held(), 20);
        let c_held = c.hold(85, true);
        assert_eq!(
            ends[2].get(),
            Some(Ending::Slow),
            "over again: the largest goes"
        );
        assert_eq!(ends[1].get(), None);
        drop((b_held, c_held, a_reply));
        assert_eq!(budget.held(), 0);
    }
}
