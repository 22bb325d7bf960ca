//! A single token bucket for admission decisions that do not queue.

use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::clock::{TokioClock, TokioInstant};

/// One token bucket on tokio time, for refusing rather than queueing: a
/// server's per-connection publish rate, say. Paused-time tests drive it
/// exactly, like the [`SendQueue`](crate::SendQueue).
#[derive(Debug)]
pub struct Limiter {
    inner: RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<TokioInstant>>,
}

impl Limiter {
    /// A bucket that refills at `quota`'s rate up to its burst.
    pub fn new(quota: Quota) -> Self {
        Limiter {
            inner: RateLimiter::direct_with_clock(quota, TokioClock),
        }
    }

    /// Takes one token, or says how long until one is available.
    pub fn check(&self) -> Result<(), Duration> {
        self.inner
            .check()
            .map_err(|not_until| not_until.wait_time_from(TokioClock.now()))
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn refuses_past_the_burst_and_refills_at_the_rate() {
        let limiter = Limiter::new(
            Quota::per_second(NonZeroU32::new(10).unwrap())
                .allow_burst(NonZeroU32::new(3).unwrap()),
        );
        for _ in 0..3 {
            limiter.check().unwrap();
        }
        assert_eq!(limiter.check(), Err(Duration::from_millis(100)));
        tokio::time::advance(Duration::from_millis(100)).await;
        limiter.check().unwrap();
        assert!(limiter.check().is_err());
    }
}
