//! One governor quota whose decision can be previewed without spending a token.
//!
//! A send must pass several quotas at once (per key and global). Calling
//! governor's `check()` on each in turn would spend a token from the first
//! even when a later one refuses. The state store here can run a check "dry":
//! governor computes the decision, and the new state is not stored. The
//! dispatcher previews every quota of a decision and spends tokens only when
//! all of them pass, so no token is ever wasted or double-spent.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use governor::clock::Clock as _;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{NotKeyed, StateStore};
use governor::{Quota, RateLimiter};
use tokio::time::Instant;

use crate::clock::TokioInstant;

const EMPTY: u64 = u64::MAX;

#[derive(Debug)]
struct Cell {
    tat: AtomicU64,
    dry: AtomicBool,
}

/// A governor state store that can evaluate a decision without recording it.
#[derive(Debug, Clone)]
struct PreviewState(Arc<Cell>);

impl StateStore for PreviewState {
    type Key = NotKeyed;

    fn measure_and_replace<T, F, E>(&self, _key: &NotKeyed, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let current = self.0.tat.load(Ordering::Acquire);
        let previous = (current != EMPTY).then(|| Nanos::from(current));
        let (outcome, next) = f(previous)?;
        if !self.0.dry.load(Ordering::Acquire) {
            self.0.tat.store(next.as_u64(), Ordering::Release);
        }
        Ok(outcome)
    }
}

thread_local! {
    static PINNED: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// The clock buckets decide on: tokio time, or the instant pinned by
/// [`pin_now`] so that one pass of the dispatcher reads the clock once and
/// every bucket of a decision sees the same instant.
#[derive(Debug, Clone, Copy, Default)]
struct DecisionClock;

impl governor::clock::Clock for DecisionClock {
    type Instant = TokioInstant;

    fn now(&self) -> TokioInstant {
        TokioInstant(PINNED.with(|p| p.get()).unwrap_or_else(Instant::now))
    }
}

/// Pins "now" for bucket decisions on this thread until the guard drops.
pub(crate) fn pin_now(now: Instant) -> Pinned {
    PINNED.with(|p| p.set(Some(now)));
    Pinned
}

/// Unpins on drop.
pub(crate) struct Pinned;

impl Drop for Pinned {
    fn drop(&mut self) {
        PINNED.with(|p| p.set(None));
    }
}

type Limiter = RateLimiter<NotKeyed, PreviewState, DecisionClock, NoOpMiddleware<TokioInstant>>;

/// A token bucket for one quota. Only the dispatcher uses it, one call at a time.
#[derive(Debug)]
pub(crate) struct Bucket {
    limiter: Limiter,
    cell: Arc<Cell>,
    burst: NonZeroU32,
}

impl Bucket {
    pub(crate) fn new(quota: Quota) -> Self {
        let cell = Arc::new(Cell {
            tat: AtomicU64::new(EMPTY),
            dry: AtomicBool::new(false),
        });
        let limiter = RateLimiter::new(quota, PreviewState(cell.clone()), DecisionClock);
        Bucket {
            limiter,
            cell,
            burst: quota.burst_size(),
        }
    }

    /// `Ok` if a token is available now, else the instant one will be.
    pub(crate) fn preview(&self) -> Result<(), Instant> {
        self.cell.dry.store(true, Ordering::Release);
        let decision = self.limiter.check();
        self.cell.dry.store(false, Ordering::Release);
        decision.map_err(|not_until| not_until.earliest_possible().0)
    }

    /// Spends one token. Call only right after `preview` returned `Ok`: time
    /// only moves forward, so the token is still there.
    pub(crate) fn take(&self) {
        if self.limiter.check().is_err() {
            debug_assert!(false, "a previewed token vanished");
        }
    }

    /// When the bucket will be full again (a fresh bucket would then decide
    /// the same way, so an idle key can be forgotten without sending early).
    pub(crate) fn full_at(&self) -> Instant {
        self.cell.dry.store(true, Ordering::Release);
        let decision = self.limiter.check_n(self.burst);
        self.cell.dry.store(false, Ordering::Release);
        match decision {
            Ok(Err(not_until)) => not_until.earliest_possible().0,
            Ok(Ok(())) | Err(_) => DecisionClock.now().0,
        }
    }
}

/// Previews every bucket without spending; on refusal returns the instant the
/// last refusing bucket will allow.
pub(crate) fn preview_all<'a>(buckets: impl Iterator<Item = &'a Bucket>) -> Result<(), Instant> {
    let mut later: Option<Instant> = None;
    for bucket in buckets {
        if let Err(at) = bucket.preview() {
            later = Some(later.map_or(at, |l| l.max(at)));
        }
    }
    later.map_or(Ok(()), Err)
}

/// Previews every bucket; spends one token from each only if all have one.
pub(crate) fn take_all<'a>(
    buckets: impl Iterator<Item = &'a Bucket> + Clone,
) -> Result<(), Instant> {
    preview_all(buckets.clone())?;
    for bucket in buckets {
        bucket.take();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).expect("non-zero")
    }

    #[tokio::test(start_paused = true)]
    async fn preview_spends_nothing() {
        let bucket = Bucket::new(Quota::per_second(nz(1)));
        for _ in 0..5 {
            assert_eq!(bucket.preview(), Ok(()));
        }
        bucket.take();
        let start = Instant::now();
        assert_eq!(bucket.preview(), Err(start + Duration::from_secs(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn take_all_spends_only_when_every_bucket_allows() {
        let fast = Bucket::new(Quota::per_second(nz(10)));
        let slow = Bucket::new(Quota::per_minute(nz(1)));
        assert_eq!(take_all([&fast, &slow].into_iter()), Ok(()));
        let refused = take_all([&fast, &slow].into_iter());
        assert_eq!(refused, Err(Instant::now() + Duration::from_secs(60)));
        // The refusal cost the fast bucket nothing: 9 of its 10 remain.
        for _ in 0..9 {
            assert_eq!(take_all([&fast].into_iter()), Ok(()));
        }
        assert!(take_all([&fast].into_iter()).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn full_at_tracks_refill() {
        let bucket = Bucket::new(Quota::per_minute(nz(30)).allow_burst(nz(5)));
        let start = Instant::now();
        assert_eq!(bucket.full_at(), start);
        bucket.take();
        bucket.take();
        assert_eq!(bucket.full_at(), start + Duration::from_secs(4));
    }
}
