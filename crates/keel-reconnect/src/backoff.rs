//! Reconnect delays: exponential from backon, full jitter from a seeded RNG.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use rand::Rng;
use rand::rngs::SmallRng;

/// Reconnect backoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// First delay. Default 1 s.
    pub base: Duration,
    /// Longest delay. Default 60 s.
    pub cap: Duration,
    /// Full jitter (uniform in `[0, delay]`) from the seeded RNG. Default on.
    pub jitter: bool,
    /// Seed of the jitter RNG. Default 0.
    pub seed: u64,
    /// A link that stayed up this long resets the attempt count. Default 10 s.
    pub stable_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(60),
            jitter: true,
            seed: 0,
            stable_after: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// The delay before attempt `attempt` (1 for the first retry).
    pub fn delay(&self, attempt: u32, rng: &mut SmallRng) -> Duration {
        let exponential = ExponentialBuilder::default()
            .with_min_delay(self.base)
            .with_max_delay(self.cap)
            .with_factor(2.0)
            .without_max_times()
            .build()
            .nth(attempt.saturating_sub(1) as usize)
            .unwrap_or(self.cap);
        // backon multiplies in floating point; whole microseconds keep the
        // delays exact (50 ms doubles to 100 ms, not 100.000001 ms).
        let exponential =
            Duration::from_micros((exponential.as_nanos() as f64 / 1e3).round() as u64);
        if !self.jitter {
            return exponential;
        }
        let nanos = u64::try_from(exponential.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(0..=nanos))
    }
}
