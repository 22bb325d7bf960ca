//! The newest deliveries of every channel, kept as the frames the hub
//! handed out, so that a connection replaying what it missed (a slow
//! consumer closed with 1013 and back, a reconnect storm) writes the
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
//! published while they were away). Frames evicted while a replay is
//! writing them stay alive until it has (at most a page per replaying
//! connection). Only frames the hub was handed after their commit, or a
//! replay read from the log, are kept, so a cached frame is what the log
//! holds at its offset. Retention drops a channel's frames below the first
//! offset it keeps when it cuts the channel, and a purge drops the purged
//! sessions' private channels; a page read from the store before either
//! is not kept. One window is left: a batch committed before a cut and
//! handed to the hub after it (microseconds) is kept, and a replay from
//! its offset would then get it instead of a `truncated` notice until it
//! is evicted. In cluster mode there is no cache (retention runs on
//! whichever node is due, and the others would not hear of its cuts).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::{Semaphore, SemaphorePermit};

use crate::upgrade::Utf8Bytes;

/// One kept frame: its offset, the number it was kept under (so that an
/// entry of `order` matches only the frame it was made for, not one kept
/// again at the same offset after a forget), the frame.
type Kept = (u64, u64, Utf8Bytes);

/// What keeping a frame costs besides the frame: its entry in its
/// channel's queue and in `order` (the frame's bytes are shared).
const ENTRY_BYTES: usize =
    std::mem::size_of::<Kept>() + std::mem::size_of::<(Arc<str>, u64, u64, usize)>();

/// What a kept frame counts against the bound: its bytes and its entries
/// (a cache of 60-byte frames would otherwise hold twice its bound).
fn cost(frame: &Utf8Bytes) -> usize {
    frame.len() + ENTRY_BYTES
}

/// Frames of the cache, by channel, in offset order.
#[derive(Default)]
struct Inner {
    channels: HashMap<Arc<str>, VecDeque<Kept>>,
    /// Every kept frame in the order it came (channel, offset, number,
    /// cost): what goes first when the cache is full. Entries of frames
    /// already forgotten stay until they reach the front or are swept.
    order: VecDeque<(Arc<str>, u64, u64, usize)>,
    /// What the frames in `channels` cost (see [`cost`]).
    bytes: usize,
    /// Frames in `channels`.
    frames: usize,
    /// Numbers given to kept frames so far.
    kept: u64,
    /// Forgets so far: a page read from the store before one of them is
    /// not kept (it may hold what retention cut).
    epoch: u64,
}

impl Inner {
    /// Whether `order`'s entry (channel, offset, number) is a frame kept now.
    fn holds(&self, name: &str, offset: u64, number: u64) -> Option<usize> {
        let queue = self.channels.get(name)?;
        // Frames go oldest first: the one asked for is usually the front.
        let at = match queue.front() {
            Some((o, _, _)) if *o == offset => 0,
            _ => queue.binary_search_by_key(&offset, |(o, _, _)| *o).ok()?,
        };
        (queue[at].1 == number).then_some(at)
    }

    /// Removes frames of `name` for which `gone` holds.
    fn drop_where(&mut self, name: &str, gone: impl Fn(u64) -> bool) {
        if let Some(queue) = self.channels.get_mut(name) {
            let before = (
                queue.len(),
                queue.iter().map(|(_, _, f)| cost(f)).sum::<usize>(),
            );
            queue.retain(|(o, _, _)| !gone(*o));
            let after = queue.iter().map(|(_, _, f)| cost(f)).sum::<usize>();
            self.frames -= before.0 - queue.len();
            self.bytes -= before.1 - after;
            if queue.is_empty() {
                self.channels.remove(name);
            }
        }
    }
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
    /// the page's frames are made (and kept, see [`Tail::keep_read`]),
    /// never across a write to a socket.
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
        self.keep_if(channel, frames, Some(epoch));
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
        self.keep_if(channel, batch, None);
    }

    fn keep_if(&self, channel: &str, batch: &[(u64, Utf8Bytes)], epoch: Option<u64>) {
        if self.max_bytes == 0 || batch.is_empty() {
            return;
        }
        let mut guard = self.lock();
        let inner = &mut *guard;
        if epoch.is_some_and(|e| e != inner.epoch) {
            return;
        }
        let name: Arc<str> = match inner.channels.get_key_value(channel) {
            Some((name, _)) => name.clone(),
            None => Arc::from(channel),
        };
        let queue = inner.channels.entry(name.clone()).or_default();
        for (offset, frame) in batch {
            if frame.len() > self.max_bytes / 4 {
                continue;
            }
            let number = inner.kept;
            if queue.back().is_none_or(|(o, _, _)| o < offset) {
                queue.push_back((*offset, number, frame.clone()));
            } else {
                match queue.binary_search_by_key(offset, |(o, _, _)| *o) {
                    Ok(_) => continue,
                    Err(at) => queue.insert(at, (*offset, number, frame.clone())),
                }
            }
            inner.kept += 1;
            inner
                .order
                .push_back((name.clone(), *offset, number, cost(frame)));
            inner.bytes += cost(frame);
            inner.frames += 1;
        }
        if queue.is_empty() {
            inner.channels.remove(&name);
        }
        while inner.bytes > self.max_bytes {
            let Some((name, offset, number, len)) = inner.order.pop_front() else {
                break;
            };
            if let Some(at) = inner.holds(&name, offset, number)
                && let Some(queue) = inner.channels.get_mut(&name)
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
        // kept ones: every entry names one frame, so the order is bounded
        // by twice the frames kept, plus 1,024.
        if inner.order.len() > 2 * inner.frames + 1024 {
            let mut order = std::mem::take(&mut inner.order);
            order.retain(|(name, offset, number, _)| inner.holds(name, *offset, *number).is_some());
            inner.order = order;
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
        let Ok(start) = queue.binary_search_by_key(&from, |(o, _, _)| *o) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut bytes = 0;
        for (offset, _, frame) in queue.range(start..) {
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

    /// Forgets `channel`'s frames before `first`, the first offset its log
    /// still holds (retention cut it; `u64::MAX`: all of them).
    pub(crate) fn forget(&self, channel: &str, first: u64) {
        let mut inner = self.lock();
        inner.epoch += 1;
        inner.drop_where(channel, |o| o < first);
        metrics::gauge!("keel_replay_cache_bytes").set(inner.bytes as f64);
    }

    /// What the frames kept cost (see [`cost`]).
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a frame of `len` bytes counts against the bound.
    const fn costs(len: usize) -> usize {
        len + ENTRY_BYTES
    }

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
        assert_eq!(tail.bytes(), 4 * costs(10));
        // Eviction goes by arrival: 5 and 6 came first.
        let small = Tail::new(4 * costs(10), 1 << 20);
        small.keep(&ch, &frames(5, 2, 10));
        small.keep(&ch, &frames(3, 2, 10));
        small.keep(&ch, &frames(7, 1, 10));
        assert_eq!(offsets(&small.read("a", 3, None, 100, 1 << 20)), vec![3, 4]);
        assert_eq!(offsets(&small.read("a", 6, None, 100, 1 << 20)), vec![6, 7]);
        assert_eq!(small.bytes(), 4 * costs(10));
    }

    #[test]
    fn the_oldest_frames_go_first_over_every_channel() {
        let tail = Tail::new(10 * costs(10), 1 << 20);
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        tail.keep(&a, &frames(1, 5, 10));
        tail.keep(&b, &frames(1, 5, 10));
        tail.keep(&a, &frames(6, 2, 10)); // 12 frames: a's 1 and 2 go
        assert_eq!(tail.bytes(), 10 * costs(10));
        assert!(tail.read("a", 2, None, 100, 1 << 20).is_empty());
        assert_eq!(
            offsets(&tail.read("a", 3, None, 100, 1 << 20)),
            vec![3, 4, 5, 6, 7]
        );
        assert_eq!(offsets(&tail.read("b", 1, None, 100, 1 << 20)).len(), 5);
        // Larger than a quarter of the cache: not kept, nothing evicted.
        tail.keep(&a, &frames(8, 1, 10 * costs(10) / 4 + 1));
        assert!(tail.read("a", 8, None, 100, 1 << 20).is_empty());
        assert_eq!(tail.bytes(), 10 * costs(10));
    }

    #[test]
    fn forgotten_frames_are_not_read_and_their_entries_are_swept() {
        let tail = Tail::new(1 << 20, 1 << 20);
        let a: Arc<str> = Arc::from("a");
        for round in 0..100u64 {
            tail.keep(&a, &frames(round * 100 + 1, 100, 1));
            tail.forget("a", u64::MAX);
        }
        assert!(tail.read("a", 9_901, None, 100, 1 << 20).is_empty());
        assert_eq!(tail.bytes(), 0);
        let len = tail.lock().order.len();
        assert!(len <= 1024 + 100, "{len}");
        // Cut below 20,002: what is before goes, the rest stays.
        tail.keep(&a, &frames(20_000, 4, 7));
        tail.forget("a", 20_002);
        assert!(tail.read("a", 20_001, None, 100, 1 << 20).is_empty());
        assert_eq!(
            offsets(&tail.read("a", 20_002, None, 100, 1 << 20)),
            vec![20_002, 20_003]
        );
        assert_eq!(tail.bytes(), 2 * costs(7));
    }

    /// Kept again at the same offsets after a forget, over and over: the
    /// old entries of the order match nothing, so they are swept and
    /// never evict the frames kept since.
    #[test]
    fn a_frame_kept_again_after_a_forget_is_not_its_old_entry() {
        let tail = Tail::new(1 << 20, 1 << 20);
        let a: Arc<str> = Arc::from("a");
        for _ in 0..3_000 {
            tail.keep(&a, &frames(1, 1, 1));
            tail.forget("a", u64::MAX);
        }
        tail.keep(&a, &frames(1, 1, 1));
        let len = tail.lock().order.len();
        assert!(len <= 1024 + 3, "{len}");
        let small = Tail::new(4 * costs(10), 1 << 20);
        small.keep(&a, &frames(1, 1, 10));
        small.forget("a", u64::MAX);
        small.keep(&a, &frames(1, 1, 10)); // kept again: a new entry
        small.keep(&a, &frames(2, 3, 10)); // four frames, nothing evicted
        assert_eq!(
            offsets(&small.read("a", 1, None, 100, 1 << 20)),
            vec![1, 2, 3, 4]
        );
        // Five: the old entry comes first and matches nothing, then
        // offset 1 goes, and only it.
        small.keep(&a, &frames(5, 1, 10));
        assert_eq!(
            offsets(&small.read("a", 2, None, 100, 1 << 20)),
            vec![2, 3, 4, 5]
        );
        assert!(small.read("a", 1, None, 100, 1 << 20).is_empty());
        assert_eq!(small.bytes(), 4 * costs(10));
    }

    #[test]
    fn a_page_read_before_a_forget_is_not_kept() {
        let tail = Tail::new(1 << 20, 1 << 20);
        let epoch = tail.epoch();
        tail.keep_read("a", &frames(1, 2, 1), epoch);
        assert_eq!(offsets(&tail.read("a", 1, None, 100, 1 << 20)), vec![1, 2]);
        let epoch = tail.epoch();
        tail.forget("b", 10);
        tail.keep_read("a", &frames(3, 2, 1), epoch);
        assert!(tail.read("a", 3, None, 100, 1 << 20).is_empty());
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
