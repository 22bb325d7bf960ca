#![doc = include_str!("../README.md")]

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use rand::Rng;

/// The delay before retry number `attempt` (1 for the first): `base`
/// doubling up to `cap`, in whole microseconds, and with `jitter` drawn
/// uniformly from `[0, that]` with `rng`.
pub fn delay<R: Rng + ?Sized>(
    base: Duration,
    cap: Duration,
    attempt: u32,
    jitter: bool,
    rng: &mut R,
) -> Duration {
    let exponential = ExponentialBuilder::default()
        .with_min_delay(base)
        .with_max_delay(cap)
        .with_factor(2.0)
        .without_max_times()
        .build()
        .nth(attempt.saturating_sub(1) as usize)
        .unwrap_or(cap);
    let exponential = Duration::from_micros((exponential.as_nanos() as f64 / 1e3).round() as u64);
    if !jitter {
        return exponential;
    }
    let nanos = u64::try_from(exponential.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.random_range(0..=nanos))
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    #[test]
    fn doubles_in_whole_microseconds_up_to_the_cap() {
        let mut rng = StdRng::seed_from_u64(1);
        let ms = Duration::from_millis;
        let delays: Vec<Duration> = (1..=7)
            .map(|n| delay(ms(50), ms(2_000), n, false, &mut rng))
            .collect();
        assert_eq!(
            delays,
            [
                ms(50),
                ms(100),
                ms(200),
                ms(400),
                ms(800),
                ms(1_600),
                ms(2_000)
            ]
        );
    }

    #[test]
    fn full_jitter_is_bounded_and_seeded() {
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (1..=12)
                .map(|n| {
                    delay(
                        Duration::from_secs(1),
                        Duration::from_secs(60),
                        n,
                        true,
                        &mut rng,
                    )
                })
                .collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7));
        assert_ne!(a, draw(8));
        for (i, d) in a.iter().enumerate() {
            let top = Duration::from_secs((1u64 << i).min(60));
            assert!(*d <= top, "attempt {}: {d:?} over {top:?}", i + 1);
        }
    }
}
