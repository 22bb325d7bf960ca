//! Queue configuration.

use std::time::Duration;

use governor::Quota;

/// What `submit` does when a bound is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Refuse the new message, handing it back in the error.
    RejectNewest,
    /// Make room by dropping the oldest queued message (of the same key when
    /// the key's bound is hit, of any key when the total bound is hit). The
    /// dropped message goes to the dead letters, a warning is logged with the
    /// key and the running count, and `Metrics::dropped` counts it.
    DropOldest,
    /// Wait for room, up to `timeout`; submitters are admitted in FIFO order.
    Wait {
        /// How long `submit` may wait.
        timeout: Duration,
    },
}

/// Backoff for retryable failures that are not rate limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay. Default 1 s.
    pub base: Duration,
    /// The longest delay. Default 60 s.
    pub cap: Duration,
    /// Full jitter: each delay is uniform in `[0, exponential delay]`, drawn
    /// from the queue's seeded RNG. Default on.
    pub jitter: bool,
    /// Attempts (the first send included) before a message becomes a dead
    /// letter. Default 10.
    pub max_attempts: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(60),
            jitter: true,
            max_attempts: 10,
        }
    }
}

/// Options for [`SendQueue::new`](crate::SendQueue::new).
#[derive(Debug, Clone)]
pub struct Config {
    /// Quotas every send must pass (for example 30/s for the whole client).
    pub global: Vec<Quota>,
    /// Quotas each key must pass (for example 1/s and 20/min per recipient).
    pub per_key: Vec<Quota>,
    /// Most messages queued for one key. Default 1,000.
    pub max_per_key: usize,
    /// Most messages queued in all. Default 100,000.
    pub max_total: usize,
    /// What to do when a bound is reached. Default [`Overflow::RejectNewest`].
    pub overflow: Overflow,
    /// Most sends in flight at once (each key has at most one). Default 64.
    pub max_in_flight: usize,
    /// Backoff for retryable failures.
    pub backoff: Backoff,
    /// Rate-limit answers one message may get before it becomes a dead letter;
    /// `None` (the default) retries for as long as the server keeps asking.
    pub max_rate_limited: Option<u32>,
    /// How long after its first try a message may keep failing for want of
    /// a link or an answer ([`SendOutcome::Unavailable`](crate::SendOutcome)
    /// and retryable failures): a try that fails once this has passed makes
    /// it a dead letter ([`DeadReason::TimedOut`](crate::DeadReason)). It
    /// bounds what `max_attempts` cannot: tries that are not counted, such
    /// as a message whose every try loses the link (a frame the server
    /// drops the connection over). Rate-limit answers are bounded by
    /// `max_rate_limited` instead, and time queued before the first try
    /// does not count. `None` (the default) never gives up on time.
    pub give_up_after: Option<Duration>,
    /// Seed of the jitter RNG. Default 0; the same seed gives the same delays.
    pub seed: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            global: Vec::new(),
            per_key: Vec::new(),
            max_per_key: 1_000,
            max_total: 100_000,
            overflow: Overflow::RejectNewest,
            max_in_flight: 64,
            backoff: Backoff::default(),
            max_rate_limited: None,
            give_up_after: None,
            seed: 0,
        }
    }
}
