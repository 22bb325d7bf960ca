//! Exponential backoff delays from backon, with full jitter from a seeded RNG.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use rand::Rng;
use rand::rngs::StdRng;

use crate::config::Backoff;

/// The delay before retry number `attempt` (1 for the first retry).
///
/// backon gives the exponential sequence (base, doubling, capped); its own
/// jitter adds up to one delay on top and cannot be drawn from our RNG, so
/// full jitter (uniform in `[0, delay]`) is applied here.
pub(crate) fn delay(policy: &Backoff, attempt: u32, rng: &mut StdRng) -> Duration {
    let exponential = ExponentialBuilder::default()
        .with_min_delay(policy.base)
        .with_max_delay(policy.cap)
        .with_factor(2.0)
        .without_max_times()
        .build()
        .nth(attempt.saturating_sub(1) as usize)
        .unwrap_or(policy.cap);
    if !policy.jitter {
        return exponential;
    }
    let nanos = u64::try_from(exponential.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.random_range(0..=nanos))
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn doubles_from_one_second_to_the_cap() {
        let policy = Backoff {
            jitter: false,
            ..Backoff::default()
        };
        let mut rng = StdRng::seed_from_u64(1);
        let delays: Vec<u64> = (1..=9)
            .map(|n| delay(&policy, n, &mut rng).as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }

    #[test]
    fn full_jitter_is_bounded_and_seeded() {
        let policy = Backoff::default();
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (1..=12)
                .map(|n| delay(&policy, n, &mut rng))
                .collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7), "same seed, same delays");
        assert_ne!(a, draw(8));
        for (n, d) in a.iter().enumerate() {
            let ceiling = Duration::from_secs((1u64 << n).min(60));
            assert!(*d <= ceiling, "retry {} waited {d:?} > {ceiling:?}", n + 1);
        }
    }
}
