//! The outbound buffer: bounded by count and bytes, FIFO, kept until acknowledged.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::{Notify, oneshot};
use tokio_tungstenite::tungstenite::Message;

/// What `send` does when the buffer is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Wait until there is room.
    Backpressure,
    /// Drop the oldest buffered message (its handle reports `Dropped`).
    DropOldest,
    /// Refuse the new message.
    Reject,
}

/// Bounds of the outbound buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferConfig {
    /// Most messages buffered (written or not, until acknowledged). Default 10,000.
    pub max_messages: usize,
    /// Most payload bytes buffered. Default 16 MiB.
    pub max_bytes: usize,
    /// What to do when full. Default [`Overflow::Backpressure`].
    pub overflow: Overflow,
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            max_messages: 10_000,
            max_bytes: 16 << 20,
            overflow: Overflow::Backpressure,
        }
    }
}

/// Why a message was not (or will not be) delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The buffer is full and the policy is `Reject`.
    #[error("outbound buffer full ({messages} messages, {bytes} bytes)")]
    Full {
        /// Messages buffered.
        messages: usize,
        /// Bytes buffered.
        bytes: usize,
    },
    /// One message is larger than the whole byte bound.
    #[error("message of {0} bytes exceeds the buffer's byte bound")]
    TooLarge(usize),
    /// Dropped by `DropOldest` to make room.
    #[error("dropped from a full outbound buffer")]
    Dropped,
    /// The client is closed.
    #[error("client closed: {0}")]
    Closed(String),
    /// Taken back by the sender before it was acknowledged
    /// ([`crate::ReconnectingClient::withdraw`]).
    #[error("withdrawn before it was acknowledged")]
    Withdrawn,
}

/// Reports what happened to one sent message.
#[derive(Debug)]
pub struct SendHandle {
    written: Option<oneshot::Receiver<Result<(), SendError>>>,
    acked: oneshot::Receiver<Result<(), SendError>>,
}

impl SendHandle {
    /// Resolves when the message was written to a live link (the first time).
    pub async fn written(&mut self) -> Result<(), SendError> {
        match self.written.take() {
            Some(rx) => rx
                .await
                .unwrap_or_else(|_| Err(SendError::Closed("client gone".into()))),
            None => Ok(()),
        }
    }

    /// Resolves when the peer acknowledged it (through the protocol hook), or
    /// at the first write for messages sent without an ack key.
    pub async fn acked(self) -> Result<(), SendError> {
        self.acked
            .await
            .unwrap_or_else(|_| Err(SendError::Closed("client gone".into())))
    }
}

/// Links that ended with one buffered message unacknowledged on them
/// ([`crate::ReconnectingClient::lost_links`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LostLinks {
    /// Links that ended with it the oldest unacknowledged message written on
    /// them: the first one the peer read.
    pub first: u32,
    /// Links that ended with it the only unacknowledged message written on
    /// them.
    pub alone: u32,
}

struct Pending {
    seq: u64,
    msg: Message,
    ack_key: Option<String>,
    size: usize,
    /// The link generation it was last written on.
    sent_on: Option<u64>,
    /// Links that ended with it written on them and unacknowledged.
    lost: LostLinks,
    written: Option<oneshot::Sender<Result<(), SendError>>>,
    acked: Option<oneshot::Sender<Result<(), SendError>>>,
}

impl Pending {
    fn fail(mut self, e: SendError) {
        if let Some(w) = self.written.take() {
            let _ = w.send(Err(e.clone()));
        }
        if let Some(a) = self.acked.take() {
            let _ = a.send(Err(e));
        }
    }
}

#[derive(Default)]
struct Inner {
    queue: VecDeque<Pending>,
    bytes: usize,
    seq: u64,
    closed: Option<String>,
}

pub(crate) struct Buffer {
    config: BufferConfig,
    inner: Mutex<Inner>,
    /// New work for the connection task.
    pub(crate) ready: Notify,
    /// Room freed, for backpressured senders.
    room: Notify,
}

pub(crate) fn size_of(msg: &Message) -> usize {
    msg.len()
}

impl Buffer {
    pub(crate) fn new(config: BufferConfig) -> Self {
        Buffer {
            config,
            inner: Mutex::new(Inner::default()),
            ready: Notify::new(),
            room: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) async fn push(
        &self,
        msg: Message,
        ack_key: Option<String>,
    ) -> Result<SendHandle, SendError> {
        let size = size_of(&msg);
        if size > self.config.max_bytes {
            return Err(SendError::TooLarge(size));
        }
        let mut msg = Some(msg);
        let mut ack_key = ack_key;
        loop {
            let room = self.room.notified();
            match self.try_push(&mut msg, &mut ack_key, size)? {
                Some(handle) => return Ok(handle),
                // Full under backpressure: wait for an ack or a write to free room.
                None => room.await,
            }
        }
    }

    /// Pushes if there is room (making room by policy); `None` means wait.
    fn try_push(
        &self,
        msg: &mut Option<Message>,
        ack_key: &mut Option<String>,
        size: usize,
    ) -> Result<Option<SendHandle>, SendError> {
        let mut inner = self.lock();
        if let Some(reason) = &inner.closed {
            return Err(SendError::Closed(reason.clone()));
        }
        let full = |i: &Inner| {
            i.queue.len() >= self.config.max_messages || i.bytes + size > self.config.max_bytes
        };
        if full(&inner) {
            match self.config.overflow {
                Overflow::Reject => {
                    return Err(SendError::Full {
                        messages: inner.queue.len(),
                        bytes: inner.bytes,
                    });
                }
                Overflow::DropOldest => {
                    while full(&inner) {
                        let Some(old) = inner.queue.pop_front() else {
                            break;
                        };
                        inner.bytes -= old.size;
                        old.fail(SendError::Dropped);
                    }
                }
                Overflow::Backpressure => return Ok(None),
            }
        }
        let (wtx, wrx) = oneshot::channel();
        let (atx, arx) = oneshot::channel();
        inner.bytes += size;
        inner.seq += 1;
        let seq = inner.seq;
        inner.queue.push_back(Pending {
            seq,
            msg: msg.take().expect("pushed once"),
            ack_key: ack_key.take(),
            size,
            sent_on: None,
            lost: LostLinks::default(),
            written: Some(wtx),
            acked: Some(atx),
        });
        drop(inner);
        self.ready.notify_one();
        Ok(Some(SendHandle {
            written: Some(wrx),
            acked: arx,
        }))
    }

    /// Up to `max` of the oldest messages not yet written on link
    /// `generation`: (seq, message, whether it is a resend).
    ///
    /// Messages are written in order, so those written on this link are a
    /// prefix of the queue and the rest a suffix.
    pub(crate) fn next_unsent(&self, generation: u64, max: usize) -> Vec<(u64, Message, bool)> {
        let inner = self.lock();
        let start = inner
            .queue
            .partition_point(|p| p.sent_on == Some(generation));
        inner
            .queue
            .range(start..)
            .take(max)
            .map(|p| (p.seq, p.msg.clone(), p.sent_on.is_some()))
            .collect()
    }

    /// Records that these messages were written on `generation`; those without
    /// an ack key are done.
    pub(crate) fn mark_written(&self, seqs: &[u64], generation: u64) {
        let mut done = Vec::new();
        {
            let mut inner = self.lock();
            for seq in seqs {
                let Ok(i) = inner.queue.binary_search_by_key(seq, |p| p.seq) else {
                    continue;
                };
                let p = &mut inner.queue[i];
                p.sent_on = Some(generation);
                if let Some(w) = p.written.take() {
                    let _ = w.send(Ok(()));
                }
                if p.ack_key.is_none()
                    && let Some(p) = inner.queue.remove(i)
                {
                    inner.bytes -= p.size;
                    done.push(p);
                }
            }
        }
        if !done.is_empty() {
            for mut p in done {
                if let Some(a) = p.acked.take() {
                    let _ = a.send(Ok(()));
                }
            }
            self.room.notify_waiters();
        }
    }

    /// Completes the written message with this ack key.
    pub(crate) fn ack(&self, key: &str) -> bool {
        let mut inner = self.lock();
        let Some(i) = inner
            .queue
            .iter()
            .position(|p| p.sent_on.is_some() && p.ack_key.as_deref() == Some(key))
        else {
            return false;
        };
        let mut p = inner.queue.remove(i).expect("index found");
        inner.bytes -= p.size;
        drop(inner);
        if let Some(a) = p.acked.take() {
            let _ = a.send(Ok(()));
        }
        self.room.notify_waiters();
        true
    }

    /// Removes the messages with this ack key, written or not: they are
    /// never written again. Returns how many.
    pub(crate) fn withdraw(&self, key: &str) -> usize {
        let mut inner = self.lock();
        let mut gone = Vec::new();
        let mut i = 0;
        while i < inner.queue.len() {
            if inner.queue[i].ack_key.as_deref() == Some(key) {
                let p = inner.queue.remove(i).expect("index in range");
                inner.bytes -= p.size;
                gone.push(p);
            } else {
                i += 1;
            }
        }
        drop(inner);
        let n = gone.len();
        for p in gone {
            p.fail(SendError::Withdrawn);
        }
        if n > 0 {
            self.room.notify_waiters();
        }
        n
    }

    /// Link `generation` ended (not at the sender's request): the oldest
    /// message written on it and unacknowledged, the first the peer read,
    /// lost one more link; alone, if it was the only one.
    pub(crate) fn link_ended(&self, generation: u64) {
        let mut inner = self.lock();
        let mut written = inner
            .queue
            .iter_mut()
            .filter(|p| p.sent_on == Some(generation));
        if let Some(first) = written.next() {
            first.lost.first = first.lost.first.saturating_add(1);
            if written.next().is_none() {
                first.lost.alone = first.lost.alone.saturating_add(1);
            }
        }
    }

    /// The links lost with the message of this ack key outstanding (`None`:
    /// no such message buffered).
    pub(crate) fn lost_links(&self, key: &str) -> Option<LostLinks> {
        let inner = self.lock();
        inner
            .queue
            .iter()
            .find(|p| p.ack_key.as_deref() == Some(key))
            .map(|p| p.lost)
    }

    /// Messages and bytes buffered.
    pub(crate) fn len(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.queue.len(), inner.bytes)
    }

    /// Fails every buffered message and refuses new ones.
    pub(crate) fn close(&self, reason: &str) {
        let drained: Vec<Pending> = {
            let mut inner = self.lock();
            inner.closed = Some(reason.to_owned());
            inner.bytes = 0;
            inner.queue.drain(..).collect()
        };
        for p in drained {
            p.fail(SendError::Closed(reason.to_owned()));
        }
        self.room.notify_waiters();
    }
}
