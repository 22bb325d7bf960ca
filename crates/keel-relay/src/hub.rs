//! In-memory fan-out of committed messages to the connections subscribed to
//! their channel. The log is the source of truth: the hub only saves
//! subscribers a database read for messages that arrive while they listen.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::{Notify, mpsc};

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

/// Set when a connection's queue overflowed: it must close with 1013.
#[derive(Debug, Default)]
pub(crate) struct SlowFlag {
    set: AtomicBool,
    notify: Notify,
}

impl SlowFlag {
    pub(crate) fn raise(&self) {
        if !self.set.swap(true, Ordering::AcqRel) {
            self.notify.notify_waiters();
            self.notify.notify_one();
        }
    }

    pub(crate) fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }

    pub(crate) async fn wait(&self) {
        while !self.is_set() {
            self.notify.notified().await;
        }
    }
}

#[derive(Clone)]
struct Subscriber {
    conn: u64,
    tx: mpsc::Sender<Outbound>,
    slow: Arc<SlowFlag>,
}

/// Channel name -> the connections listening to it.
#[derive(Default)]
pub(crate) struct Hub {
    channels: RwLock<HashMap<Arc<str>, Vec<Subscriber>>>,
    /// Connection-channel pairs registered, over every channel.
    subscriptions: std::sync::atomic::AtomicUsize,
}

impl Hub {
    /// Adds `conn` to `channel`; returns the shared name.
    pub(crate) fn subscribe(
        &self,
        channel: &str,
        conn: u64,
        tx: mpsc::Sender<Outbound>,
        slow: Arc<SlowFlag>,
    ) -> Arc<str> {
        let mut map = self.channels.write().unwrap_or_else(|p| p.into_inner());
        let key: Arc<str> = map
            .get_key_value(channel)
            .map(|(k, _)| k.clone())
            .unwrap_or_else(|| Arc::from(channel));
        let subs = map.entry(key.clone()).or_default();
        if !subs.iter().any(|s| s.conn == conn) {
            subs.push(Subscriber { conn, tx, slow });
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
    /// subscriber without waiting: one queue slot per subscriber for the
    /// whole batch. A subscriber whose queue is full is flagged slow (it will
    /// close with 1013 and resume from the log). Returns how many got it.
    pub(crate) fn publish_batch(&self, channel: &str, batch: Arc<[(u64, Utf8Bytes)]>) -> usize {
        let map = self.channels.read().unwrap_or_else(|p| p.into_inner());
        let Some((name, subs)) = map.get_key_value(channel) else {
            return 0;
        };
        let mut delivered = 0;
        for s in subs {
            if s.slow.is_set() {
                continue;
            }
            match s.tx.try_send(Outbound::Live {
                channel: name.clone(),
                batch: batch.clone(),
            }) {
                Ok(()) => delivered += 1,
                Err(mpsc::error::TrySendError::Full(_)) => s.slow.raise(),
                Err(mpsc::error::TrySendError::Closed(_)) => {}
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
