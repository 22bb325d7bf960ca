//! Wall-clock time for stored timestamps, injectable so tests control it.

use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, as stored in every timestamp column.
pub type UnixMillis = i64;

/// The source of "now" for timestamps, leases, retention by age and retry times.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time in milliseconds since the Unix epoch.
    fn now_millis(&self) -> UnixMillis;
}

/// The system's wall clock as it reads, steps included (NTP setting the
/// time, a VM resumed or migrated, an operator's `date -s`): a step forward
/// makes every stored time look older at once. [`SteadyClock`] is the
/// backends' default.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl SystemClock {
    /// The wall clock now, in microseconds since the Unix epoch.
    pub fn now_micros() -> i64 {
        wall_micros()
    }
}

impl Clock for SystemClock {
    fn now_millis(&self) -> UnixMillis {
        wall_micros() / 1_000
    }
}

/// Microseconds since the Unix epoch by the system's wall clock (0 before it).
fn wall_micros() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    i64::try_from(since.as_micros()).unwrap_or(i64::MAX)
}

/// The wall clock with its steps taken out: it advances as the monotonic
/// clock does (which NTP may slew but never steps) and, while it differs
/// from the wall clock, moves toward it at most `slew` faster or slower
/// than real time (1% by default), never backwards.
///
/// What a step of the wall clock does to a store on this clock, within one
/// run of the process: every duration the store judges (a session's time
/// without a connection, a message's age for retention, an outbox lease, a
/// retry's wait) is off by at most `slew` of the time since the step, and
/// stored times never go backwards; the store's times then differ from the
/// wall clock by up to the step, converging at `slew` (a one-hour step
/// forward is made up in 100 hours at 1%). Across a restart the new process
/// starts from the wall clock, so a step taken while it was down, or not yet
/// made up, counts in full. Without a step it reads the wall clock exactly.
pub struct SteadyClock {
    slew_ppm: i64,
    wall: Box<dyn Fn() -> i64 + Send + Sync>,
    mono: Box<dyn Fn() -> Duration + Send + Sync>,
    state: Mutex<Steady>,
}

/// Where a [`SteadyClock`] stood when it was last read.
#[derive(Debug, Clone, Copy)]
struct Steady {
    /// The monotonic reading then.
    mono: Duration,
    /// Its time then, in microseconds since the epoch.
    now: i64,
}

impl fmt::Debug for SteadyClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SteadyClock")
            .field("slew_ppm", &self.slew_ppm)
            .field(
                "state",
                &*self.state.lock().unwrap_or_else(|e| e.into_inner()),
            )
            .finish()
    }
}

impl Default for SteadyClock {
    fn default() -> Self {
        Self::new()
    }
}

impl SteadyClock {
    /// The default slew: 10,000 parts per million, 1%.
    pub const DEFAULT_SLEW_PPM: u32 = 10_000;

    /// The system's clocks, slewing at [`SteadyClock::DEFAULT_SLEW_PPM`].
    pub fn new() -> Self {
        Self::with_slew(Self::DEFAULT_SLEW_PPM)
    }

    /// The system's clocks, slewing at `slew_ppm` parts per million (at
    /// most 1,000,000: then a step is made up as fast as time passes).
    pub fn with_slew(slew_ppm: u32) -> Self {
        let origin = Instant::now();
        Self::with_sources(slew_ppm, wall_micros, move || origin.elapsed())
    }

    /// A clock on the system's monotonic clock and another wall clock
    /// (microseconds since the epoch), e.g. a server's time read through
    /// an offset from this machine's: it starts at `wall`'s reading.
    pub fn with_wall(slew_ppm: u32, wall: impl Fn() -> i64 + Send + Sync + 'static) -> Self {
        let origin = Instant::now();
        Self::with_sources(slew_ppm, wall, move || origin.elapsed())
    }

    /// A clock on given sources, for tests: `wall` in microseconds since the
    /// epoch, `mono` a monotonic reading (only its differences count).
    pub fn with_sources(
        slew_ppm: u32,
        wall: impl Fn() -> i64 + Send + Sync + 'static,
        mono: impl Fn() -> Duration + Send + Sync + 'static,
    ) -> Self {
        let start = Steady {
            mono: mono(),
            now: wall(),
        };
        Self {
            slew_ppm: i64::from(slew_ppm.min(1_000_000)),
            wall: Box::new(wall),
            mono: Box::new(mono),
            state: Mutex::new(start),
        }
    }

    /// How far this clock is behind the wall clock now, in milliseconds
    /// (negative: ahead); 0 when no step is being made up.
    pub fn behind_wall_millis(&self) -> i64 {
        let now = self.now_micros();
        ((self.wall)() - now) / 1_000
    }

    fn now_micros(&self) -> i64 {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mono = (self.mono)();
        let elapsed =
            i64::try_from(mono.saturating_sub(state.mono).as_micros()).unwrap_or(i64::MAX);
        let wall = (self.wall)();
        let base = state.now.saturating_add(elapsed);
        let most = elapsed.saturating_mul(self.slew_ppm) / 1_000_000;
        let diff = wall.saturating_sub(base);
        // At or within one slew of the wall clock: read it (this never goes
        // back, as `most` is less than `elapsed`); else move toward it.
        let next = if diff.abs() <= most {
            wall
        } else {
            base + most * diff.signum()
        };
        *state = Steady {
            mono,
            now: next.max(state.now),
        };
        state.now
    }
}

impl Clock for SteadyClock {
    fn now_millis(&self) -> UnixMillis {
        self.now_micros() / 1_000
    }
}

/// A clock that only moves when told to, for exact tests of leases and retention.
#[derive(Debug)]
pub struct ManualClock {
    now: AtomicI64,
}

impl ManualClock {
    /// A clock that reads `start` until advanced.
    pub fn new(start: UnixMillis) -> Self {
        Self {
            now: AtomicI64::new(start),
        }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.now.fetch_add(millis(by), Ordering::SeqCst);
    }

    /// Sets the clock to `to`.
    pub fn set(&self, to: UnixMillis) {
        self.now.store(to, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_millis(&self) -> UnixMillis {
        self.now.load(Ordering::SeqCst)
    }
}

/// A duration in whole milliseconds, saturating.
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::time::Duration;

    use super::{Clock, SteadyClock};

    const HOUR_US: i64 = 3_600_000_000;
    const T: i64 = 1_700_000_000_000_000;

    /// A steady clock on a wall and a monotonic clock the test moves.
    fn clock(slew_ppm: u32) -> (SteadyClock, Arc<AtomicI64>, Arc<AtomicI64>) {
        let wall = Arc::new(AtomicI64::new(T));
        let mono = Arc::new(AtomicI64::new(0));
        let (w, m) = (wall.clone(), mono.clone());
        let c = SteadyClock::with_sources(
            slew_ppm,
            move || w.load(Ordering::SeqCst),
            move || Duration::from_micros(m.load(Ordering::SeqCst) as u64),
        );
        (c, wall, mono)
    }

    /// Real time passes: both clocks move by `us`.
    fn pass(wall: &AtomicI64, mono: &AtomicI64, us: i64) {
        wall.fetch_add(us, Ordering::SeqCst);
        mono.fetch_add(us, Ordering::SeqCst);
    }

    #[test]
    fn without_a_step_it_reads_the_wall_clock() {
        let (c, wall, mono) = clock(10_000);
        for _ in 0..100 {
            pass(&wall, &mono, 12_345);
            assert_eq!(c.now_millis(), wall.load(Ordering::SeqCst) / 1_000);
        }
    }

    #[test]
    fn a_step_forward_is_made_up_at_the_slew() {
        let (c, wall, mono) = clock(10_000);
        wall.fetch_add(HOUR_US, Ordering::SeqCst);
        // Right after the step: nothing has passed, nothing moved.
        assert_eq!(c.now_millis(), T / 1_000);
        // A minute later the store has seen 1% more than a minute, no hour.
        pass(&wall, &mono, 60_000_000);
        assert_eq!(c.now_millis(), (T + 60_600_000) / 1_000);
        assert_eq!(c.behind_wall_millis(), (HOUR_US - 600_000) / 1_000);
        // 100 hours of real time make up the hour, then it tracks the wall.
        for _ in 0..100 {
            pass(&wall, &mono, HOUR_US);
            c.now_millis();
        }
        pass(&wall, &mono, 1_000_000);
        assert_eq!(c.now_millis(), wall.load(Ordering::SeqCst) / 1_000);
    }

    #[test]
    fn a_step_back_never_moves_it_back() {
        let (c, wall, mono) = clock(10_000);
        pass(&wall, &mono, 1_000_000);
        let before = c.now_millis();
        wall.fetch_sub(HOUR_US, Ordering::SeqCst);
        assert_eq!(c.now_millis(), before, "no time passed: no move");
        pass(&wall, &mono, 10_000_000);
        // Ten seconds pass at 99%: 9.9 s on, never back.
        assert_eq!(c.now_millis(), before + 9_900);
        assert_eq!(c.behind_wall_millis(), -(HOUR_US - 100_000) / 1_000);
    }

    #[test]
    fn durations_through_a_step_are_off_by_the_slew_at_most() {
        let (c, wall, mono) = clock(10_000);
        let start = c.now_millis();
        for (i, step) in [HOUR_US, -2 * HOUR_US, 5 * HOUR_US, -30_000_000]
            .iter()
            .enumerate()
        {
            wall.fetch_add(*step, Ordering::SeqCst);
            pass(&wall, &mono, 30_000_000);
            let real = 30_000 * (i as i64 + 1);
            let seen = c.now_millis() - start;
            assert!(
                (seen - real).abs() <= real / 100 + 1,
                "after {} steps: {seen} ms seen, {real} ms real",
                i + 1
            );
        }
    }

    #[test]
    fn a_full_slew_follows_a_step_as_fast_as_time_passes() {
        let (c, wall, mono) = clock(1_000_000);
        wall.fetch_add(HOUR_US, Ordering::SeqCst);
        pass(&wall, &mono, HOUR_US / 2);
        assert_eq!(c.now_millis(), (T + HOUR_US) / 1_000);
        pass(&wall, &mono, HOUR_US / 2);
        assert_eq!(c.now_millis(), wall.load(Ordering::SeqCst) / 1_000);
    }
}
