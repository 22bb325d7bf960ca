//! Exponential backoff delays with full jitter from a seeded RNG (keel-backoff).

use std::time::Duration;

use rand::rngs::StdRng;

use crate::config::Backoff;

/// The delay before retry number `attempt` (1 for the first retry):
/// keel-backoff's, the one keel-reconnect uses too.
pub(crate) fn delay(policy: &Backoff, attempt: u32, rng: &mut StdRng) -> Duration {
    keel_backoff::delay(policy.base, policy.cap, attempt, policy.jitter, rng)
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
