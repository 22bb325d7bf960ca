//! Inbound frames for the user: a bounded queue that allocates nothing until
//! frames arrive (an idle client should cost little).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

pub(crate) struct Queue {
    inner: Mutex<(VecDeque<Message>, bool)>,
    cap: usize,
    readable: Notify,
    space: Notify,
}

impl Queue {
    pub(crate) fn new(cap: usize) -> Self {
        Queue {
            inner: Mutex::new((VecDeque::new(), false)),
            cap: cap.max(1),
            readable: Notify::new(),
            space: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (VecDeque<Message>, bool)> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a frame, waiting while the queue is full (reading pauses).
    pub(crate) async fn push(&self, frame: Message) {
        let mut frame = Some(frame);
        loop {
            let space = self.space.notified();
            {
                let mut inner = self.lock();
                if inner.1 {
                    return;
                }
                if inner.0.len() < self.cap {
                    inner.0.push_back(frame.take().expect("pushed once"));
                    drop(inner);
                    self.readable.notify_one();
                    return;
                }
            }
            space.await;
        }
    }

    /// No more frames will come; `recv` returns `None` once drained.
    pub(crate) fn close(&self) {
        self.lock().1 = true;
        self.readable.notify_one();
        self.space.notify_waiters();
    }
}

/// The inbound data frames of a [`ReconnectingClient`](crate::ReconnectingClient),
/// in arrival order across reconnects.
pub struct Frames {
    pub(crate) queue: Arc<Queue>,
}

impl std::fmt::Debug for Frames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frames").finish_non_exhaustive()
    }
}

impl Frames {
    /// The next frame; `None` once the client is closed and every frame was read.
    pub async fn recv(&mut self) -> Option<Message> {
        loop {
            let readable = self.queue.readable.notified();
            {
                let mut inner = self.queue.lock();
                if let Some(frame) = inner.0.pop_front() {
                    drop(inner);
                    self.queue.space.notify_one();
                    return Some(frame);
                }
                if inner.1 {
                    return None;
                }
            }
            readable.await;
        }
    }
}
