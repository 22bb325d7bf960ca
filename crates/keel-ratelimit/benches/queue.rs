//! keel-ratelimit benchmarks (`cargo bench -p keel-ratelimit`).
//!
//! - `per_message`: submit and dispatch through a `SendQueue` (one global
//!   quota that never binds, 1,000 keys, a sink that returns at once), against
//!   a raw governor `check()` on the same clock, per message.
//! - A summary pass then prints the per-message figures over 1,000,000
//!   messages and the dispatch accuracy under real time: how late each send
//!   happens after the instant its token became available (p50, p99, max).
//!   `KEEL_BENCH_SUMMARY_ONLY=1` runs only the summary.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use criterion::{Criterion, Throughput};
use governor::RateLimiter;
use hdrhistogram::Histogram;
use keel_ratelimit::{Config, Quota, SendOutcome, SendQueue, Sink, TokioClock};
use tokio::runtime::Runtime;
use tokio::time::Instant;

struct Discard;

impl Sink<u32, u32> for Discard {
    async fn send(&self, _key: &u32, _msg: &u32) -> SendOutcome {
        SendOutcome::Sent
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn current_thread() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn unlimited() -> Quota {
    Quota::per_second(NonZeroU32::MAX)
}

/// Pushes `n` messages through a queue; returns the time per message.
fn through_queue(rt: &Runtime, n: u64) -> Duration {
    rt.block_on(async {
        let config = Config {
            global: vec![unlimited()],
            max_total: 1 << 30,
            max_per_key: 1 << 30,
            max_in_flight: 256,
            ..Config::default()
        };
        let (queue, _dead) = SendQueue::new(Discard, config);
        let start = std::time::Instant::now();
        let mut last = None;
        for i in 0..n {
            last = Some(
                queue
                    .submit((i % 1_000) as u32, i as u32)
                    .await
                    .expect("submit"),
            );
        }
        if let Some(last) = last {
            last.await;
        }
        while queue.metrics().sent < n {
            tokio::task::yield_now().await;
        }
        start.elapsed()
    })
}

/// `n` raw governor checks on the same clock.
fn raw_governor(rt: &Runtime, n: u64) -> Duration {
    rt.block_on(async {
        let limiter = RateLimiter::direct_with_clock(unlimited(), TokioClock);
        let start = std::time::Instant::now();
        let mut ok = 0u64;
        for _ in 0..n {
            ok += u64::from(limiter.check().is_ok());
        }
        assert_eq!(ok, n);
        start.elapsed()
    })
}

/// Sends `n` messages through a 500/s quota in real time and records, for
/// each, how long after its token became available it was sent.
fn accuracy(rt: &Runtime, n: usize) -> Histogram<u64> {
    #[derive(Clone)]
    struct Clocked(Arc<Mutex<Vec<Instant>>>);
    impl Sink<u32, u32> for Clocked {
        async fn send(&self, _key: &u32, _msg: &u32) -> SendOutcome {
            self.0.lock().expect("lock").push(Instant::now());
            SendOutcome::Sent
        }
    }
    let interval = Duration::from_millis(2);
    let quota = Quota::with_period(interval).expect("quota");
    let sink = Clocked(Arc::default());
    rt.block_on(async {
        let config = Config {
            global: vec![quota],
            max_per_key: n,
            ..Config::default()
        };
        let (queue, _dead) = SendQueue::new(sink.clone(), config);
        let mut last = None;
        for i in 0..n {
            last = Some(queue.submit(0, i as u32).await.expect("submit"));
        }
        last.expect("messages").await;
    });
    // With a burst of 1, the token for send i is due one interval after send
    // i-1 happened (governor's GCRA: tat = max(tat, now) + interval).
    let at = sink.0.lock().expect("lock").clone();
    let mut hist = Histogram::<u64>::new(3).expect("histogram");
    for w in at.windows(2) {
        let permitted = w[0] + interval;
        let late = w[1].saturating_duration_since(permitted);
        hist.record(late.as_micros() as u64).expect("record");
    }
    hist
}

fn benches(c: &mut Criterion, rt: &Runtime) {
    let mut group = c.benchmark_group("per_message");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("send_queue", |b| {
        b.iter_custom(|iters| through_queue(rt, iters))
    });
    let single = current_thread();
    group.bench_function("send_queue_current_thread", |b| {
        b.iter_custom(|iters| through_queue(&single, iters))
    });
    group.bench_function("raw_governor_check", |b| {
        b.iter_custom(|iters| raw_governor(rt, iters))
    });
    group.finish();
}

fn summary(rt: &Runtime) {
    let n = 1_000_000;
    let best = |f: &dyn Fn() -> Duration| (0..3).map(|_| f()).min().expect("runs");
    let single = current_thread();
    let queue = best(&|| through_queue(rt, n));
    let queue_single = best(&|| through_queue(&single, n));
    let raw = best(&|| raw_governor(rt, n));
    let per = |d: Duration| d.as_nanos() as f64 / n as f64;
    println!("\nkeel-ratelimit summary (best of 3), {n} messages, target <= 1000 ns per message");
    println!(
        "raw governor check:                        {:>6.1} ns",
        per(raw)
    );
    for (name, d) in [
        ("multi-thread runtime (2 workers)", queue),
        ("current-thread runtime", queue_single),
    ] {
        println!(
            "send queue, submit + dispatch, {name:<33} {:>6.0} ns ({:.0}x raw)",
            per(d),
            per(d) / per(raw)
        );
    }
    println!(
        "figure | send queue, submit + dispatch per message | {:.0} | ns | raw governor check | {:.1} | <= 1000 ns | {}",
        per(queue),
        per(raw),
        if per(queue) <= 1000.0 {
            "MET"
        } else {
            "NOT MET"
        }
    );
    let hist = accuracy(rt, 1_500);
    println!(
        "dispatch lateness vs permitted instant, 1,500 sends at 500/s: p50 {} us, p99 {} us, max {} us (target p99 <= 2000 us)",
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.max()
    );
    println!(
        "figure | dispatch lateness p99, 1,500 sends at 500/s | {} | us | - | 0 | <= 2000 us | {}",
        hist.value_at_quantile(0.99),
        if hist.value_at_quantile(0.99) <= 2000 {
            "MET"
        } else {
            "NOT MET"
        }
    );
}

fn main() {
    let rt = runtime();
    if std::env::var_os("KEEL_BENCH_SUMMARY_ONLY").is_none() {
        let mut c = Criterion::default().configure_from_args();
        benches(&mut c, &rt);
        c.final_summary();
    }
    if !std::env::args().any(|a| a == "--list") {
        summary(&rt);
    }
}
