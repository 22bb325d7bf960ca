//! In-memory fan-out of committed messages to the connections subscribed to
//! their channel, and each connection's outbound queue, bounded in bytes.
//! The log is the source of truth: the hub only saves subscribers a
//! database read for messages that arrive while they listen, and a
//! subscriber that cannot keep up is closed (1013) and resumes from the log.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::{Notify, OwnedSemaphorePermit, mpsc};

use crate::limits::{Budget, Buffered, hit};

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

/// Bytes one queued item holds, counted against its connection's outbound
/// budget (and, for deliveries, the relay's global budget) until the writer
/// has flushed it.
#[derive(Debug)]
pub(crate) struct Held {
    counter: Arc<AtomicUsize>,
    bytes: usize,
    _global: Option<OwnedSemaphorePermit>,
    _total: Buffered,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.bytes, Ordering::AcqRel);
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
    bytes: Arc<AtomicUsize>,
    max_bytes: usize,
    global: Budget,
    end: Arc<EndFlag>,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget")
            .field("held", &self.held())
            .finish()
    }
}

impl OutQueue {
    /// A queue of at most `max_items` items and `max_bytes` bytes.
    pub(crate) fn new(
        max_items: usize,
        max_bytes: usize,
        global: Budget,
        end: Arc<EndFlag>,
    ) -> (OutQueue, mpsc::Receiver<Queued>) {
        let (tx, rx) = mpsc::channel(max_items.max(1));
        (
            OutQueue {
                tx,
                bytes: Arc::default(),
                max_bytes,
                global,
                end,
            },
            rx,
        )
    }

    fn held(&self, bytes: usize, global: Option<OwnedSemaphorePermit>) -> Held {
        self.bytes.fetch_add(bytes, Ordering::AcqRel);
        Held {
            counter: self.bytes.clone(),
            bytes,
            _global: global,
            _total: Buffered::outbound(bytes),
        }
    }

    /// Queues the connection's own frame (a reply, an error), waiting for
    /// room: the reader then stops reading the socket until its client
    /// reads what it was sent (TCP backpressure on both sides).
    pub(crate) async fn send(&self, item: Outbound) -> bool {
        let bytes = match &item {
            Outbound::Frame(f) => f.len(),
            _ => 64,
        };
        let held = self.held(bytes, None);
        self.tx.send(Queued { item, held }).await.is_ok()
    }

    /// Queues a delivery batch without waiting: a connection over its byte
    /// budget, or one the relay's global budget cannot cover, or one whose
    /// queue is full, is flagged slow instead (closed with 1013; it resumes
    /// from the log). Returns whether it was queued.
    pub(crate) fn offer(&self, item: Outbound, bytes: usize) -> bool {
        if self.end.get().is_some() {
            return false;
        }
        if self.bytes.load(Ordering::Acquire) + bytes > self.max_bytes {
            hit("outbound_bytes");
            self.end.raise(Ending::Slow);
            return false;
        }
        let Some(permit) = self.global.try_acquire(bytes) else {
            hit("global_bytes");
            self.end.raise(Ending::Slow);
            return false;
        };
        let held = self.held(bytes, Some(permit));
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

/// Channel name -> the connections listening to it.
#[derive(Default)]
pub(crate) struct Hub {
    channels: RwLock<HashMap<Arc<str>, Vec<Subscriber>>>,
    /// Connection-channel pairs registered, over every channel.
    subscriptions: AtomicUsize,
}

impl Hub {
    /// Adds `conn` to `channel`; returns the shared name.
    pub(crate) fn subscribe(&self, channel: &str, conn: u64, queue: OutQueue) -> Arc<str> {
        let mut map = self.channels.write().unwrap_or_else(|p| p.into_inner());
        let key: Arc<str> = map
            .get_key_value(channel)
            .map(|(k, _)| k.clone())
            .unwrap_or_else(|| Arc::from(channel));
        let subs = map.entry(key.clone()).or_default();
        if !subs.iter().any(|s| s.conn == conn) {
            subs.push(Subscriber { conn, queue });
            self.subscriptions.fetch_add(1, Ordering::Relaxed);
        }
        key
    }

    /// Removes `conn` from `channel`.
    pub(crate) fn unsubscribe(&self, channel: &str, conn: u64) {
        let mut map = self.channels.write().unwrap_or_else(|p| p.into_inner());
        if let Some(subs) = map.get_mut(channel) {
            let before = subs.len();
            subs.retain(|s| s.conn != conn);
            self.subscriptions
                .fetch_sub(before - subs.len(), Ordering::Relaxed);
            if subs.is_empty() {
                map.remove(channel);
            }
        }
    }

    /// Hands one committed message to every subscriber (see [`Hub::publish_batch`]).
    pub(crate) fn publish(&self, channel: &str, offset: u64, frame: Utf8Bytes) -> usize {
        self.publish_batch(channel, Arc::from(vec![(offset, frame)]))
    }

    /// Hands committed messages of one channel, in offset order, to every
    /// subscriber without waiting: one queue item per subscriber for the
    /// whole batch, counted at the batch's bytes against each subscriber's
    /// budgets (see [`OutQueue::offer`]). Returns how many got it.
    pub(crate) fn publish_batch(&self, channel: &str, batch: Arc<[(u64, Utf8Bytes)]>) -> usize {
        let map = self.channels.read().unwrap_or_else(|p| p.into_inner());
        let Some((name, subs)) = map.get_key_value(channel) else {
            return 0;
        };
        let bytes: usize = batch.iter().map(|(_, f)| f.len()).sum();
        let mut delivered = 0;
        for s in subs {
            let item = Outbound::Live {
                channel: name.clone(),
                batch: batch.clone(),
            };
            if s.queue.offer(item, bytes) {
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

    /// Channels with at least one subscriber.
    pub(crate) fn channel_count(&self) -> usize {
        self.channels
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}
