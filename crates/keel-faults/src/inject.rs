//! In-process faults: injected latency and injected failures, both from a seeded RNG.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Adds a delay to an operation: fixed, or uniform between two bounds.
///
/// The sequence of delays depends only on the seed, so a run can be replayed.
#[derive(Debug)]
pub struct LatencySimulator {
    min: Duration,
    max: Duration,
    rng: Mutex<StdRng>,
}

impl LatencySimulator {
    /// Always `delay`.
    pub fn fixed(delay: Duration) -> Self {
        Self::between(delay, delay, 0)
    }

    /// Uniform in `[min, max]`, drawn from an RNG seeded with `seed`.
    pub fn between(min: Duration, max: Duration, seed: u64) -> Self {
        let (min, max) = if min <= max { (min, max) } else { (max, min) };
        LatencySimulator {
            min,
            max,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
        }
    }

    /// The next delay, without sleeping.
    pub fn next_delay(&self) -> Duration {
        if self.min == self.max {
            return self.min;
        }
        let (lo, hi) = (self.min.as_nanos() as u64, self.max.as_nanos() as u64);
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        Duration::from_nanos(rng.random_range(lo..=hi))
    }

    /// Sleeps for the next delay (tokio time, so paused tests are exact).
    pub async fn apply(&self) -> Duration {
        let delay = self.next_delay();
        tokio::time::sleep(delay).await;
        delay
    }
}

/// Decides whether an operation should fail, with a fixed probability, and
/// counts what it decided.
#[derive(Debug)]
pub struct FailureInjector {
    probability: f64,
    rng: Mutex<StdRng>,
    decided: AtomicU64,
    injected: AtomicU64,
}

impl FailureInjector {
    /// Fails with `probability` (clamped to `[0, 1]`), from an RNG seeded with `seed`.
    pub fn new(probability: f64, seed: u64) -> Self {
        FailureInjector {
            probability: probability.clamp(0.0, 1.0),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            decided: AtomicU64::new(0),
            injected: AtomicU64::new(0),
        }
    }

    /// Whether this operation should fail.
    pub fn should_fail(&self) -> bool {
        self.decided.fetch_add(1, Ordering::Relaxed);
        let fail = {
            let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
            rng.random_bool(self.probability)
        };
        if fail {
            self.injected.fetch_add(1, Ordering::Relaxed);
        }
        fail
    }

    /// Decisions made so far.
    pub fn decided(&self) -> u64 {
        self.decided.load(Ordering::Relaxed)
    }

    /// Failures injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_decisions() {
        let run = |seed| {
            let f = FailureInjector::new(0.3, seed);
            (0..1_000).map(|_| f.should_fail()).collect::<Vec<_>>()
        };
        assert_eq!(run(9), run(9));
        assert_ne!(run(9), run(10));
        let f = FailureInjector::new(0.3, 9);
        let fails = (0..10_000).filter(|_| f.should_fail()).count();
        assert_eq!(f.injected(), fails as u64);
        assert_eq!(f.decided(), 10_000);
        assert!((2_700..3_300).contains(&fails), "{fails} failures at p=0.3");
        assert!(!FailureInjector::new(0.0, 1).should_fail());
        assert!(FailureInjector::new(1.0, 1).should_fail());
    }

    #[tokio::test(start_paused = true)]
    async fn latency_is_bounded_seeded_and_slept() {
        let sim =
            LatencySimulator::between(Duration::from_millis(50), Duration::from_millis(500), 3);
        let again =
            LatencySimulator::between(Duration::from_millis(50), Duration::from_millis(500), 3);
        for _ in 0..100 {
            let start = tokio::time::Instant::now();
            let d = sim.apply().await;
            // tokio sleeps to the millisecond tick at or after the deadline.
            let slept = start.elapsed();
            assert!(
                slept >= d && slept - d < Duration::from_millis(1),
                "{slept:?} for {d:?}"
            );
            assert!((Duration::from_millis(50)..=Duration::from_millis(500)).contains(&d));
            assert_eq!(d, again.next_delay());
        }
        assert_eq!(
            LatencySimulator::fixed(Duration::from_secs(1)).next_delay(),
            Duration::from_secs(1)
        );
    }
}
