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

    /// Takes `n` tokens at once (a byte rate: a message's bytes), or says
    /// how long until they are all available; `Err(None)` if `n` is more
    /// than the burst, which it could never be.
    pub fn check_n(&self, n: u32) -> Result<(), Option<Duration>> {
        let Some(n) = std::num::NonZeroU32::new(n) else {
            return Ok(());
        };
        match self.inner.check_n(n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Some(not_until.wait_time_from(TokioClock.now()))),
            Err(_) => Err(None),
        }
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

    /// A byte rate: 1,000 bytes/s, 500 at once; a message of 400 then one
    /// of 300 waits for the 200 bytes it lacks (0.2 s); 600 never fits.
    #[tokio::test(start_paused = true)]
    async fn takes_many_tokens_at_once_or_says_how_long() {
        let limiter = Limiter::new(
            Quota::per_second(NonZeroU32::new(1_000).unwrap())
                .allow_burst(NonZeroU32::new(500).unwrap()),
        );
        limiter.check_n(400).unwrap();
        assert_eq!(limiter.check_n(300), Err(Some(Duration::from_millis(200))));
        tokio::time::advance(Duration::from_millis(200)).await;
        limiter.check_n(300).unwrap();
        assert_eq!(limiter.check_n(600), Err(None));
        assert_eq!(limiter.check_n(0), Ok(()));
    }
}
