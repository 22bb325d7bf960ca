//! A governor clock on tokio's time, so that paused-time tests are exact.

use std::ops::Add;
use std::time::Duration;

use governor::clock::{Clock, Reference};
use governor::nanos::Nanos;

/// A [`governor`] clock reading [`tokio::time::Instant::now`].
///
/// governor's default clock ignores tokio's paused time; this one follows it,
/// so `tokio::time::pause()` and `advance()` drive rate limits exactly.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioClock;

/// An instant of [`TokioClock`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TokioInstant(pub tokio::time::Instant);

impl Add<Nanos> for TokioInstant {
    type Output = TokioInstant;

    fn add(self, rhs: Nanos) -> TokioInstant {
        TokioInstant(self.0 + Duration::from(rhs))
    }
}

impl Reference for TokioInstant {
    fn duration_since(&self, earlier: Self) -> Nanos {
        self.0.saturating_duration_since(earlier.0).into()
    }

    fn saturating_sub(&self, duration: Nanos) -> Self {
        TokioInstant(self.0.checked_sub(duration.into()).unwrap_or(self.0))
    }
}

impl Clock for TokioClock {
    type Instant = TokioInstant;

    fn now(&self) -> TokioInstant {
        TokioInstant(tokio::time::Instant::now())
    }
}
