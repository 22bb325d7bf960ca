//! The newest deliveries of channels with subscribers, kept as the frames
//! the hub handed out, so that a connection replaying what it missed (a
//! slow consumer closed with 1013 and back, a reconnect storm) writes the
//! frames every other subscriber already holds instead of reading its own
//! copy of each payload from the store and formatting it again. A hundred
//! subscribers resuming the same 500 KB messages hold them once.
//!
//! Pages a replay had to read from the store go into the cache as well,
//! and store pages are read a few at a time relay-wide ([`Tail::turn`],
//! what the store's readers do at once anyway), each connection checking
//! the cache again once its turn comes: a hundred readers behind the same
//! burst hold a page each only in turn, and those after the first find
//! the page in the cache instead of reading a copy of it.
//!
//! Bounded by `limits.replay_cache_bytes` over every channel, oldest first
//! out, whether the channel has subscribers at the time or not (readers
//! closed together as slow consumers come back together for what was
//! published while they were away). Only frames the hub was handed after
//! their commit are kept, so a
//! cached frame is what the log holds at its offset; retention forgets a
//! channel's frames when it cuts the channel, and a purge of sessions
//! forgets everything, so that a replay never hands out what the log no
//! longer holds. In cluster mode there is no cache (retention runs on
//! whichever node is due, and the others would not hear of its cuts).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::{Semaphore, SemaphorePermit};

use crate::upgrade::Utf8Bytes;

/// Frames of the cache, by channel, in offset order.
#[derive(Default)]
struct Inner {
    channels: HashMap<Arc<str>, VecDeque<(u64, Utf8Bytes)>>,
    /// Every kept frame in the order it came (channel, offset, bytes):
    /// what goes first when the cache is full. Entries of frames already
    /// forgotten stay until they reach the front or are swept.
    order: VecDeque<(Arc<str>, u64, usize)>,
    /// Bytes of the frames in `channels`.
    bytes: usize,
    /// Frames in `channels`.
    frames: usize,
    /// Forgets and clears so far: a page read from the store before one
    /// of them is not kept (it may hold what retention cut).
    epoch: u64,
}

/// Store pages read for replays at once, relay-wide (the store's readers).
const PAGES_AT_ONCE: usize = 4;

/// See the module documentation.
pub(crate) struct Tail {
    max_bytes: usize,
    inner: Mutex<Inner>,
    /// Bytes of store pages being read and formatted for replays.
    turns: Semaphore,
    page_bytes: usize,
}

impl Tail {
    /// A cache of at most `max_bytes` of frames (0 keeps nothing), for
    /// replays reading store pages of `page_bytes`.
    pub(crate) fn new(max_bytes: usize, page_bytes: usize) -> Tail {
        let page_bytes = page_bytes.clamp(1, u32::MAX as usize);
        Tail {
            max_bytes,
            inner: Mutex::default(),
            turns: Semaphore::new(PAGES_AT_ONCE * page_bytes),
            page_bytes,
        }
    }

    /// A replay's turn to read a store page and format it: at most
    /// [`PAGES_AT_ONCE`] pages are held this way relay-wide. Held until
    /// the page's frames are made (and kept, see [`Tail::keep_read`]).
    pub(crate) async fn turn(&self) -> Option<SemaphorePermit<'_>> {
        self.turns.acquire_many(self.page_bytes as u32).await.ok()
    }

    /// Where forgets stand now: given back to [`Tail::keep_read`].
    pub(crate) fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// Keeps frames a replay read from the store, unless a forget came
    /// since `epoch` (the page may hold what retention cut).
    pub(crate) fn keep_read(&self, channel: &str, frames: &[(u64, Utf8Bytes)], epoch: u64) {
        if self.epoch() == epoch {
            self.keep(channel, frames);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps a committed batch of `channel`'s frames. Batches of one
    /// channel may reach the hub out of offset order (publishes committed
    /// together fan out from their own tasks): a frame goes to its place.
    /// One already kept is skipped, and so is one larger than a quarter of
    /// the cache.
    pub(crate) fn keep(&self, channel: &str, batch: &[(u64, Utf8Bytes)]) {
        if self.max_bytes == 0 || batch.is_empty() {
            return;
        }
        let mut guard = self.lock();
        let inner = &mut *guard;
        let name: Arc<str> = match inner.channels.get_key_value(channel) {
            Some((name, _)) => name.clone(),
            None => Arc::from(channel),
        };
        let queue = inner.channels.entry(name.clone()).or_default();
        for (offset, frame) in batch {
            if frame.len() > self.max_bytes / 4 {
                continue;
            }
            if queue.back().is_none_or(|(o, _)| o < offset) {
                queue.push_back((*offset, frame.clone()));
            } else {
                match queue.binary_search_by_key(offset, |(o, _)| *o) {
                    Ok(_) => continue,
                    Err(at) => queue.insert(at, (*offset, frame.clone())),
                }
            }
            inner.order.push_back((name.clone(), *offset, frame.len()));
            inner.bytes += frame.len();
            inner.frames += 1;
        }
        if queue.is_empty() {
            inner.channels.remove(&name);
        }
        while inner.bytes > self.max_bytes {
            let Some((name, offset, len)) = inner.order.pop_front() else {
                break;
            };
            if let Some(queue) = inner.channels.get_mut(&name)
                && let Ok(at) = queue.binary_search_by_key(&offset, |(o, _)| *o)
            {
                queue.remove(at);
                inner.bytes -= len;
                inner.frames -= 1;
                if queue.is_empty() {
                    inner.channels.remove(&name);
                }
            }
        }
        // Entries of forgotten frames are swept once they outnumber the
        // kept ones, so the order is bounded by twice the frames kept.
        if inner.order.len() > 2 * inner.frames + 1024 {
            let channels = &inner.channels;
            inner.order.retain(|(name, offset, _)| {
                channels
                    .get(name)
                    .is_some_and(|q| q.binary_search_by_key(offset, |(o, _)| *o).is_ok())
            });
        }
        metrics::gauge!("keel_replay_cache_bytes").set(inner.bytes as f64);
    }

    /// The kept frames of `channel` from `from` on, consecutive offsets
    /// only, before `until` when given: at most `max_items` of them, and
    /// frames up to `max_bytes` (at least one). Empty when `from` is not
    /// kept.
    pub(crate) fn read(
        &self,
        channel: &str,
        from: u64,
        until: Option<u64>,
        max_items: usize,
        max_bytes: usize,
    ) -> Vec<(u64, Utf8Bytes)> {
        let inner = self.lock();
        let Some(queue) = inner.channels.get(channel) else {
            return Vec::new();
        };
        let Ok(start) = queue.binary_search_by_key(&from, |(o, _)| *o) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut bytes = 0;
        for (offset, frame) in queue.range(start..) {
            let expected = from + out.len() as u64;
            if *offset != expected
                || until.is_some_and(|u| *offset >= u)
                || out.len() == max_items
                || (!out.is_empty() && bytes + frame.len() > max_bytes)
            {
                break;
            }
            bytes += frame.len();
            out.push((*offset, frame.clone()));
        }
        out
    }

    /// Forgets `channel`'s frames (retention cut it).
    pub(crate) fn forget(&self, channel: &str) {
        let mut inner = self.lock();
        inner.epoch += 1;
        if let Some(queue) = inner.channels.remove(channel) {
            inner.bytes -= queue.iter().map(|(_, f)| f.len()).sum::<usize>();
            inner.frames -= queue.len();
            metrics::gauge!("keel_replay_cache_bytes").set(inner.bytes as f64);
        }
    }

    /// Forgets every frame (sessions, and their private channels, were
    /// purged).
    pub(crate) fn clear(&self) {
        let mut inner = self.lock();
        let epoch = inner.epoch + 1;
        *inner = Inner {
            epoch,
            ..Inner::default()
        };
        metrics::gauge!("keel_replay_cache_bytes").set(0.0);
    }

    /// Bytes of frames kept.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(from: u64, n: u64, len: usize) -> Vec<(u64, Utf8Bytes)> {
        (from..from + n)
            .map(|o| (o, Utf8Bytes::from("x".repeat(len))))
            .collect()
    }

    fn offsets(v: &[(u64, Utf8Bytes)]) -> Vec<u64> {
        v.iter().map(|(o, _)| *o).collect()
    }

    #[test]
    fn reads_consecutive_frames_from_a_kept_offset() {
        let tail = Tail::new(1 << 20, 1 << 20);
        let ch: Arc<str> = Arc::from("a");
        tail.keep(&ch, &frames(1, 5, 10));
        // A gap: 8 comes after 5.
        tail.keep(&ch, &frames(8, 2, 10));
        assert_eq!(
            offsets(&tail.read("a", 2, None, 100, 1 << 20)),
            vec![2, 3, 4, 5]
        );
        assert_eq!(offsets(&tail.read("a", 8, None, 100, 1 << 20)), vec![8, 9]);
        assert!(tail.read("a", 6, None, 100, 1 << 20).is_empty());
        assert!(tail.read("b", 1, None, 100, 1 << 20).is_empty());
        // Bounded by `until`, by count and by bytes (at least one frame).
        assert_eq!(
            offsets(&tail.read("a", 1, Some(3), 100, 1 << 20)),
            vec![1, 2]
        );
        assert_eq!(offsets(&tail.read("a", 1, None, 2, 1 << 20)), vec![1, 2]);
        assert_eq!(offsets(&tail.read("a", 1, None, 100, 25)), vec![1, 2]);
        assert_eq!(offsets(&tail.read("a", 1, None, 100, 1)), vec![1]);
    }

    #[test]
    fn frames_out_of_order_go_to_their_place_and_repeats_are_skipped() {
        let tail = Tail::new(1 << 20, 1 << 20);
        let ch: Arc<str> = Arc::from("a");
        tail.keep(&ch, &frames(5, 2, 10));
        tail.keep(&ch, &frames(3, 1, 10));
        assert_eq!(offsets(&tail.read("a", 3, None, 100, 1 << 20)), vec![3]);
        tail.keep(&ch, &frames(4, 3, 10)); // 4 is new, 5 and 6 repeats
        assert_eq!(
            offsets(&tail.read("a", 3, None, 100, 1 << 20)),
            vec![3, 4, 5, 6]
        );
        assert_eq!(tail.bytes(), 40);
        // Eviction goes by arrival: 5 and 6 came first.
        let small = Tail::new(40, 1 << 20);
        small.keep(&ch, &frames(5, 2, 10));
        small.keep(&ch, &frames(3, 2, 10));
        small.keep(&ch, &frames(7, 1, 10));
        assert_eq!(offsets(&small.read("a", 3, None, 100, 1 << 20)), vec![3, 4]);
        assert_eq!(offsets(&small.read("a", 6, None, 100, 1 << 20)), vec![6, 7]);
        assert_eq!(small.bytes(), 40);
    }

    #[test]
    fn the_oldest_frames_go_first_over_every_channel() {
        let tail = Tail::new(100, 1 << 20);
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        tail.keep(&a, &frames(1, 5, 10));
        tail.keep(&b, &frames(1, 5, 10));
        tail.keep(&a, &frames(6, 2, 10)); // 120 bytes: a's 1 and 2 go
        assert_eq!(tail.bytes(), 100);
        assert!(tail.read("a", 2, None, 100, 1 << 20).is_empty());
        assert_eq!(
            offsets(&tail.read("a", 3, None, 100, 1 << 20)),
            vec![3, 4, 5, 6, 7]
        );
        assert_eq!(offsets(&tail.read("b", 1, None, 100, 1 << 20)).len(), 5);
        // Larger than a quarter of the cache: not kept, nothing evicted.
        tail.keep(&a, &frames(8, 1, 26));
        assert!(tail.read("a", 8, None, 100, 1 << 20).is_empty());
        assert_eq!(tail.bytes(), 100);
    }

    #[test]
    fn forgotten_frames_are_not_read_and_their_entries_are_swept() {
        let tail = Tail::new(1 << 20, 1 << 20);
        let a: Arc<str> = Arc::from("a");
        for round in 0..100u64 {
            tail.keep(&a, &frames(round * 100 + 1, 100, 1));
            tail.forget("a");
        }
        assert!(tail.read("a", 9_901, None, 100, 1 << 20).is_empty());
        assert_eq!(tail.bytes(), 0);
        assert!(
            tail.lock().order.len() <= 1024 + 100,
            "{}",
            tail.lock().order.len()
        );
        tail.keep(&a, &frames(20_000, 3, 1));
        tail.clear();
        assert!(tail.read("a", 20_000, None, 100, 1 << 20).is_empty());
        // Kept again after a clear, and the sizes add up.
        tail.keep(&a, &frames(30_000, 3, 7));
        assert_eq!(tail.bytes(), 21);
    }

    #[test]
    fn a_page_read_before_a_forget_is_not_kept() {
        let tail = Tail::new(1 << 20, 1 << 20);
        let epoch = tail.epoch();
        tail.keep_read("a", &frames(1, 2, 1), epoch);
        assert_eq!(offsets(&tail.read("a", 1, None, 100, 1 << 20)), vec![1, 2]);
        let epoch = tail.epoch();
        tail.forget("b");
        tail.keep_read("a", &frames(3, 2, 1), epoch);
        assert!(tail.read("a", 3, None, 100, 1 << 20).is_empty());
        let epoch = tail.epoch();
        tail.clear();
        tail.keep_read("a", &frames(5, 1, 1), epoch);
        assert!(tail.read("a", 5, None, 100, 1 << 20).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn store_pages_are_read_a_few_at_a_time() {
        let tail = Tail::new(1 << 20, 1000);
        let turns: Vec<_> =
            futures::future::join_all((0..PAGES_AT_ONCE).map(|_| tail.turn())).await;
        assert!(turns.iter().all(Option::is_some));
        let next = tail.turn();
        tokio::pin!(next);
        assert!(
            tokio::time::timeout(std::time::Duration::from_secs(60), &mut next)
                .await
                .is_err(),
            "a fifth page waits"
        );
        drop(turns);
        assert!(next.await.is_some());
    }

    #[test]
    fn a_cache_of_nothing_keeps_nothing() {
        let tail = Tail::new(0, 1 << 20);
        tail.keep(&Arc::from("a"), &frames(1, 3, 1));
        assert!(tail.read("a", 1, None, 100, 1 << 20).is_empty());
    }
}
