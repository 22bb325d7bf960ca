//! Weighted fair order of queued writes by lane: how a writer keeps a
//! flood of large writes from one caller from delaying another caller's
//! write by more than about one commit. Used by this crate's SQLite writer
//! and by keel-session-pg's.

use std::collections::{BTreeSet, HashMap, VecDeque};

/// What a write costs its lane in the fair order besides its payload bytes,
/// so that writes without a payload still take turns.
const WRITE_COST: u64 = 256;

fn cost(bytes: usize) -> u64 {
    bytes as u64 + WRITE_COST
}

/// Writes waiting, one FIFO per lane, served in weighted fair order (WFQ,
/// equal weights): each lane's next write is tagged with the virtual time
/// at which it would finish (where the lane's last write finished, or the
/// virtual time now if that is later, plus the write's bytes and a fixed
/// cost per write), and the smallest tag goes first. The virtual time
/// advances by each write served divided among the lanes waiting, as if
/// they were all served at once at equal rates. A lane of small writes is
/// thus served next to fifty lanes of 1 MiB writes after about one of
/// them, not after a round of all of them, even when those move in
/// lockstep. Order is kept within a lane, not across lanes.
#[derive(Debug)]
pub struct FairQueue<T> {
    /// Each lane's writes (with their bytes) and the finish tag of its
    /// last write.
    queues: HashMap<u64, (VecDeque<(T, usize)>, u64)>,
    /// (finish tag of its next write, lane) of every non-empty lane.
    order: BTreeSet<(u64, u64)>,
    /// The virtual time.
    now: u64,
    len: usize,
}

impl<T> Default for FairQueue<T> {
    fn default() -> Self {
        FairQueue {
            queues: HashMap::new(),
            order: BTreeSet::new(),
            now: 0,
            len: 0,
        }
    }
}

impl<T> FairQueue<T> {
    /// Queues `item`, which writes `bytes` of payload, at the back of `lane`.
    pub fn push(&mut self, lane: u64, bytes: usize, item: T) {
        let now = self.now;
        let (queue, last) = self
            .queues
            .entry(lane)
            .or_insert_with(|| (VecDeque::new(), now));
        if queue.is_empty() {
            *last = (*last).max(now) + cost(bytes);
            self.order.insert((*last, lane));
        }
        queue.push_back((item, bytes));
        self.len += 1;
    }

    /// The oldest write of the lane with the smallest tag.
    pub fn pop(&mut self) -> Option<T> {
        let first = *self.order.first()?;
        self.take(first)
    }

    /// Like [`Self::pop`], among the lanes whose next write is at most
    /// `max_bytes`: the heaviest lanes wait while the others go on (what a
    /// writer does while the disk is behind). `None` if no lane qualifies.
    pub fn pop_at_most(&mut self, max_bytes: usize) -> Option<T> {
        let found = self.order.iter().copied().find(|(_, lane)| {
            self.queues
                .get(lane)
                .and_then(|(q, _)| q.front())
                .is_some_and(|(_, bytes)| *bytes <= max_bytes)
        })?;
        self.take(found)
    }

    /// Serves the next write of the lane at `(tag, lane)` in the order.
    fn take(&mut self, (tag, lane): (u64, u64)) -> Option<T> {
        self.order.remove(&(tag, lane));
        let waiting = self.order.len() as u64 + 1;
        let (queue, last) = self.queues.get_mut(&lane)?;
        let (item, bytes) = queue.pop_front()?;
        self.now += cost(bytes) / waiting;
        if let Some((_, next)) = queue.front() {
            *last = tag + cost(*next);
            self.order.insert((*last, lane));
        } else if self.order.is_empty() {
            // Nothing waits: virtual time catches up with the last write.
            self.now = self.now.max(tag);
        }
        if self.queues.len() > 2 * self.order.len() + 64 {
            // An idle lane keeps its tag while it is ahead of the virtual
            // time (it had its share; coming back at once must not jump
            // the queue); the others are forgotten.
            let now = self.now;
            self.queues.retain(|_, (q, t)| !q.is_empty() || *t > now);
        }
        self.len -= 1;
        Some(item)
    }

    /// The payload bytes of the write [`Self::pop`] would return.
    pub fn peek_bytes(&self) -> Option<usize> {
        let (_, lane) = self.order.first()?;
        self.queues.get(lane)?.0.front().map(|(_, bytes)| *bytes)
    }

    /// Writes waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::FairQueue;

    /// Items are (lane, bytes): what the tests check.
    fn push(lanes: &mut FairQueue<(u64, usize)>, lane: u64, bytes: usize) {
        lanes.push(lane, bytes, (lane, bytes));
    }

    /// Fair order, not turns: a lane that becomes active while fifty lanes
    /// flood large writes is served next, not after a write of each; a
    /// flooding lane's writes keep their order.
    #[test]
    fn a_new_small_lane_goes_next_among_many_flooding_lanes() {
        let mut lanes = FairQueue::default();
        for i in 0..8 {
            for lane in 1..=50 {
                push(&mut lanes, lane, 1 << 20 | i);
            }
        }
        let mut seen = std::collections::HashMap::new();
        for _ in 0..100 {
            let q = lanes.pop().expect("queued");
            let last = seen.insert(q.0, q.1).unwrap_or(0);
            assert!(q.1 > last, "lane {} in order", q.0);
        }
        push(&mut lanes, 999, 2);
        assert_eq!(lanes.pop().map(|q| q.0), Some(999));
        assert_eq!(lanes.len(), 300);
        let mut left = 0;
        while lanes.pop().is_some() {
            left += 1;
        }
        assert_eq!((left, lanes.len()), (300, 0));
    }

    /// Lanes that empty and refill at once (a pipelining connection with a
    /// write or two queued at a time) keep their place in virtual time:
    /// they cannot starve a lane that arrives between their writes.
    #[test]
    fn refilling_lanes_do_not_starve_a_new_one() {
        let mut lanes = FairQueue::default();
        for lane in 1..=50 {
            push(&mut lanes, lane, 1 << 20);
        }
        for _ in 0..100 {
            let q = lanes.pop().expect("queued");
            push(&mut lanes, q.0, 1 << 20);
        }
        push(&mut lanes, 999, 2);
        assert_eq!(lanes.pop().map(|q| q.0), Some(999));
    }

    /// Fifty lanes of equal 1 MiB writes move in lockstep; a lane of small
    /// writes that queues its next write as soon as one is served waits
    /// for about one large write each time, not for a round of fifty.
    #[test]
    fn a_small_lane_keeps_up_beside_lanes_in_lockstep() {
        let mut lanes = FairQueue::default();
        for _ in 0..20 {
            for lane in 1..=50 {
                push(&mut lanes, lane, 1 << 20);
            }
        }
        push(&mut lanes, 999, 2);
        let (mut since, mut worst, mut small) = (0, 0, 0);
        for _ in 0..300 {
            let q = lanes.pop().expect("queued");
            if q.0 == 999 {
                worst = worst.max(since);
                since = 0;
                small += 1;
                push(&mut lanes, 999, 2);
            } else {
                since += 1;
            }
        }
        assert!(worst <= 1, "{worst} large writes between two small ones");
        assert!(small >= 100, "{small} small writes served of 300");
    }

    /// A hundred pipelining lanes with two 1 MiB writes queued each, each
    /// refilled as soon as one is served (their tags end up equal), and a
    /// lane that queues a small write now and then: it waits for at most
    /// about one large write, not for the hundred.
    #[test]
    fn a_small_write_arriving_mid_round_goes_next() {
        let mut lanes = FairQueue::default();
        for _ in 0..2 {
            for lane in 1..=100 {
                push(&mut lanes, lane, 1 << 20);
            }
        }
        let (mut queued_at, mut worst, mut served) = (None, 0, 0);
        for i in 0..2_000 {
            if queued_at.is_none() && i % 7 == 3 {
                push(&mut lanes, 999, 20);
                queued_at = Some(i);
            }
            let q = lanes.pop().expect("queued");
            if q.0 == 999 {
                worst = worst.max(i - queued_at.take().expect("it was queued"));
                served += 1;
            } else {
                push(&mut lanes, q.0, 1 << 20);
            }
        }
        assert!(served > 200, "{served} small writes served");
        assert!(worst <= 1, "a small write waited for {worst} large ones");
    }

    /// While the disk is behind, only writes up to a size are served, in
    /// their fair order; the large ones keep their places for later.
    #[test]
    fn pop_at_most_passes_over_the_heaviest_lanes() {
        let mut lanes = FairQueue::default();
        push(&mut lanes, 1, 1 << 20);
        push(&mut lanes, 2, 100);
        push(&mut lanes, 3, 1 << 20);
        push(&mut lanes, 2, 200);
        push(&mut lanes, 4, 300);
        let mut small = Vec::new();
        while let Some(q) = lanes.pop_at_most(64 * 1024) {
            small.push(q);
        }
        assert_eq!(small, [(2, 100), (4, 300), (2, 200)]);
        assert_eq!(lanes.len(), 2);
        assert_eq!(lanes.pop_at_most(64 * 1024), None);
        assert_eq!(lanes.pop(), Some((1, 1 << 20)));
        assert_eq!(lanes.pop(), Some((3, 1 << 20)));
        assert!(lanes.is_empty());
    }

    #[test]
    fn peek_bytes_names_the_next_write() {
        let mut lanes = FairQueue::default();
        assert_eq!(lanes.peek_bytes(), None);
        assert!(lanes.is_empty());
        push(&mut lanes, 1, 1 << 20);
        push(&mut lanes, 2, 10);
        assert_eq!(
            lanes.peek_bytes(),
            Some(10),
            "the small lane's tag is earlier"
        );
        assert_eq!(lanes.pop(), Some((2, 10)));
        assert_eq!(lanes.peek_bytes(), Some(1 << 20));
        assert_eq!(lanes.pop(), Some((1, 1 << 20)));
        assert_eq!(lanes.peek_bytes(), None);
    }
}
