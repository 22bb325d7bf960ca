//! Reconnect delays: exponential, full jitter from a seeded RNG (keel-backoff).

use std::time::Duration;

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
    /// The delay before attempt `attempt` (1 for the first retry):
    /// keel-backoff's, the one keel-ratelimit uses too.
    pub fn delay(&self, attempt: u32, rng: &mut SmallRng) -> Duration {
        keel_backoff::delay(self.base, self.cap, attempt, self.jitter, rng)
    }
}
