//! The open-model load generator: operations start on a schedule of
//! intended times (a constant or ramping arrival rate), whatever the system
//! under test is doing, and latency is measured from the *intended* time
//! (wrk2, k6): a stall shows up as latency instead of hiding as a lower
//! rate (coordinated omission). Operations that cannot start because the
//! in-flight bound is reached are counted as dropped, and those that start
//! later than `late_after` their intended time as late; both are reported,
//! never hidden.

use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;

/// How operations arrive.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Arrival {
    /// `rate` operations per second.
    Constant {
        /// Per second.
        rate: f64,
    },
    /// From `from` to `to` operations per second, linearly over the duration.
    Ramp {
        /// Per second at the start.
        from: f64,
        /// Per second at the end.
        to: f64,
    },
}

/// When operations are meant to start.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Schedule {
    /// How they arrive.
    pub arrival: Arrival,
    /// For how long.
    pub duration: Duration,
}

impl Schedule {
    /// `rate` per second for `duration`.
    pub fn constant(rate: f64, duration: Duration) -> Schedule {
        Schedule {
            arrival: Arrival::Constant { rate },
            duration,
        }
    }

    /// Every intended start time, as offsets from the start, in order.
    pub fn intended(&self) -> Vec<Duration> {
        let total = self.duration.as_secs_f64();
        let mut out = Vec::new();
        match self.arrival {
            Arrival::Constant { rate } if rate > 0.0 => {
                let n = (rate * total).round() as u64;
                out.extend((0..n).map(|i| Duration::from_secs_f64(i as f64 / rate)));
            }
            Arrival::Ramp { from, to } if from >= 0.0 && to >= 0.0 && from + to > 0.0 => {
                // The number of arrivals by time t is the integral of the
                // rate: from*t + (to-from)*t^2/(2*total); invert it for each k.
                let (a, b) = ((to - from) / (2.0 * total), from);
                let n = ((from + to) / 2.0 * total).round() as u64;
                for k in 0..n {
                    let k = k as f64;
                    let t = if a.abs() < 1e-12 {
                        k / b
                    } else {
                        (-b + (b * b + 4.0 * a * k).sqrt()) / (2.0 * a)
                    };
                    out.push(Duration::from_secs_f64(t.clamp(0.0, total)));
                }
            }
            _ => {}
        }
        out
    }
}

/// Latency figures of one kind, in microseconds.
#[derive(Debug, Clone)]
pub struct Latency {
    /// Everything.
    pub all: Histogram<u64>,
    /// Per one-second window of the run (index = second), for charts.
    pub windows: Vec<Histogram<u64>>,
}

fn histogram() -> Histogram<u64> {
    // 1 us to 10 min, 3 significant figures (about 170 KB).
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

fn window() -> Histogram<u64> {
    // Per-second windows only feed charts: 2 significant figures (about
    // 24 KB), so that a long run's hundreds of windows stay small.
    Histogram::new_with_bounds(1, 600_000_000, 2).expect("valid histogram bounds")
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            all: histogram(),
            windows: Vec::new(),
        }
    }
}

impl Latency {
    /// Records `value_us` for something that happened `at` into the run.
    pub fn record(&mut self, at: Duration, value_us: u64) {
        let v = value_us.clamp(1, 600_000_000);
        let _ = self.all.record(v);
        let w = at.as_secs() as usize;
        if self.windows.len() <= w {
            self.windows.resize_with(w + 1, window);
        }
        let _ = self.windows[w].record(v);
    }

    /// Adds `other` in.
    pub fn merge(&mut self, other: &Latency) {
        let _ = self.all.add(&other.all);
        if self.windows.len() < other.windows.len() {
            self.windows.resize_with(other.windows.len(), window);
        }
        for (mine, theirs) in self.windows.iter_mut().zip(&other.windows) {
            let _ = mine.add(theirs);
        }
    }

    /// The `q` quantile (0..=1) in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.all.value_at_quantile(q) as f64 / 1000.0
    }

    /// Per window: (second, p50 ms, p99 ms, count).
    pub fn series(&self) -> Vec<(f64, f64, f64, u64)> {
        self.windows
            .iter()
            .enumerate()
            .filter(|(_, h)| !h.is_empty())
            .map(|(i, h)| {
                (
                    i as f64,
                    h.value_at_quantile(0.5) as f64 / 1000.0,
                    h.value_at_quantile(0.99) as f64 / 1000.0,
                    h.len(),
                )
            })
            .collect()
    }
}

/// A [`Latency`] many tasks record into, in batches (one histogram per
/// client would cost hundreds of MB across thousands of subscribers).
#[derive(Debug, Clone, Default)]
pub struct LatencySink(std::sync::Arc<std::sync::Mutex<Latency>>);

impl LatencySink {
    /// Records a batch of (when, microseconds) and empties it.
    pub fn record_all(&self, batch: &mut Vec<(Duration, u64)>) {
        let mut l = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for (at, v) in batch.drain(..) {
            l.record(at, v);
        }
    }

    /// A copy of what was recorded.
    pub fn snapshot(&self) -> Latency {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What an open-model run measured.
#[derive(Debug, Clone, Default)]
pub struct LoadStats {
    /// Operations scheduled.
    pub scheduled: u64,
    /// Started and finished with success.
    pub ok: u64,
    /// Started and failed.
    pub failed: u64,
    /// Not started: the in-flight bound was reached at their intended time.
    pub dropped: u64,
    /// Started more than `late_after` after their intended time.
    pub late: u64,
    /// From intended start to the end of each operation.
    pub latency: Latency,
    /// From actual start to the end (service time).
    pub service: Latency,
    /// How long the run took, to the last operation's end.
    pub elapsed: Duration,
}

impl LoadStats {
    /// Finished operations per second.
    pub fn throughput(&self) -> f64 {
        (self.ok + self.failed) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs `op(i)` at each intended time of `schedule`, at most `max_in_flight`
/// at once, from `start` (an instant shared with other measurements).
/// `op` returns whether it succeeded.
pub async fn run<F, Fut>(
    schedule: &Schedule,
    start: Instant,
    max_in_flight: usize,
    late_after: Duration,
    mut op: F,
) -> LoadStats
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = bool>,
{
    let times = schedule.intended();
    let mut stats = LoadStats {
        scheduled: times.len() as u64,
        ..Default::default()
    };
    let mut in_flight = FuturesUnordered::new();
    let mut next = 0usize;
    loop {
        let due = times.get(next).map(|t| start + *t);
        tokio::select! {
            biased;
            Some((intended, began, ok)) = in_flight.next(), if !in_flight.is_empty() => {
                let (intended, began): (Instant, Instant) = (intended, began);
                let now = Instant::now();
                let at = intended - start;
                stats.latency.record(at, (now - intended).as_micros() as u64);
                stats.service.record(at, (now - began).as_micros() as u64);
                if ok { stats.ok += 1 } else { stats.failed += 1 }
            }
            _ = async { tokio::time::sleep_until(due.unwrap_or_else(Instant::now)).await }, if due.is_some() => {
                let intended = due.unwrap_or_else(Instant::now);
                next += 1;
                if in_flight.len() >= max_in_flight {
                    stats.dropped += 1;
                    continue;
                }
                let began = Instant::now();
                if began - intended > late_after {
                    stats.late += 1;
                }
                let fut = op(next as u64 - 1);
                in_flight.push(async move { (intended, began, fut.await) });
            }
            else => break,
        }
    }
    stats.elapsed = start.elapsed();
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_and_ramp_schedules() {
        let c = Schedule::constant(100.0, Duration::from_secs(2)).intended();
        assert_eq!(c.len(), 200);
        assert_eq!(c[1], Duration::from_millis(10));
        let r = Schedule {
            arrival: Arrival::Ramp {
                from: 0.0,
                to: 200.0,
            },
            duration: Duration::from_secs(2),
        }
        .intended();
        assert_eq!(r.len(), 200);
        // Half the arrivals come in the last quarter-ish: the rate grows.
        let late = r.iter().filter(|t| **t >= Duration::from_secs(1)).count();
        assert!(late > 140, "{late}");
        assert!(r.windows(2).all(|w| w[0] <= w[1]));
    }

    /// A stalled system shows up as latency from the intended time, and the
    /// sends that could not start are counted as dropped.
    #[tokio::test(start_paused = true)]
    async fn latency_from_intended_time_and_drops_counted() {
        let schedule = Schedule::constant(100.0, Duration::from_secs(1));
        let start = Instant::now();
        let stats = run(
            &schedule,
            start,
            10,
            Duration::from_millis(1),
            |i| async move {
                // The first operation stalls for 500 ms, the rest take 1 ms.
                let d = if i == 0 { 500 } else { 1 };
                tokio::time::sleep(Duration::from_millis(d)).await;
                true
            },
        )
        .await;
        assert_eq!(stats.scheduled, 100);
        assert_eq!(stats.ok + stats.dropped, 100);
        assert_eq!(
            stats.dropped, 0,
            "one slow operation does not fill 10 slots"
        );
        assert!(stats.latency.ms(1.0) >= 500.0);

        // With one slot, the stalled operation blocks everything due in its
        // 500 ms: they are dropped, not silently delayed.
        let stats = run(
            &schedule,
            Instant::now(),
            1,
            Duration::from_millis(1),
            |i| async move {
                let d = if i == 0 { 500 } else { 1 };
                tokio::time::sleep(Duration::from_millis(d)).await;
                true
            },
        )
        .await;
        assert!(stats.dropped >= 49, "{}", stats.dropped);
        assert_eq!(stats.ok + stats.dropped, 100);
    }
}
