//! The scenario catalogue (docs/failure-modes.md) and what scenarios share.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Semaphore;

use crate::Error;
use crate::client::{Welcome, Ws, open_session};
use crate::fixture::Resources;
use crate::scenario::Scenario;

mod abuse;
mod clock;
mod cluster;
mod connections;
mod exec;
mod fanout;
mod flood;
mod herd;
mod memory;
mod mixed;
mod network;
mod outage;
mod process;
mod sessions;
mod spool;
mod storage;
mod sync;
mod upstream;

/// Every scenario, load suite first, in the order a full run takes them.
pub fn catalogue() -> Vec<Scenario> {
    vec![
        sessions::CONCURRENT_SESSIONS,
        sessions::SESSION_ISOLATION,
        sessions::DATABASE_CONTENTION,
        upstream::BURST_HANDLING,
        upstream::SUSTAINED_LOAD,
        upstream::QUEUE_OVERFLOW,
        connections::CONNECTIONS_10K,
        connections::CONNECTIONS_MAX,
        connections::SUBSCRIPTIONS_50K,
        fanout::FANOUT_BACKPRESSURE,
        fanout::LARGE_PAYLOADS,
        fanout::SOAK,
        spool::BURN_IN,
        abuse::ABUSE_MEMORY,
        // The chaos suite.
        process::DAEMON_CRASH_RECOVERY,
        process::PAUSE_RESUME,
        exec::PROCESS_KILL_DURING_COMMAND,
        exec::NO_ORPHANS,
        process::PARTITION_HEAL,
        network::HALF_OPEN_LINKS,
        network::WEBSOCKET_DROP_RECONNECT,
        network::LATENCY_1000MS,
        network::JITTER_50_500MS,
        sync::BUFFER_DURING_DISCONNECT,
        sync::SESSION_SYNC_AFTER_RECONNECT,
        herd::THUNDERING_HERD,
        herd::CASCADING_FAILURES,
        herd::RANDOM_CONNECTION_DROPS,
        outage::UPSTREAM_OUTAGE,
        outage::INVALID_UPSTREAM_RESPONSES,
        outage::TIMEOUTS,
        outage::RATE_LIMIT_STORM,
        storage::SQLITE_CORRUPTION,
        storage::CORRUPT_STATE_RECOVERY,
        storage::DISK_FULL_SCENARIO,
        flood::SLOWLORIS_SCENARIO,
        flood::SESSION_FLOOD,
        memory::MEMORY_PRESSURE,
        mixed::CONCURRENT_TRANSITIONS,
        mixed::COMBINED_STRESSORS,
        clock::CLOCK_STEPS,
        mixed::CHAOS_MONKEY,
        // The cluster suite.
        cluster::NODE_KILL_SCENARIO,
        cluster::PG_RESTART_SCENARIO,
        cluster::NATS_RESTART_SCENARIO,
        cluster::NODE_PARTITION_SCENARIO,
        cluster::LEADER_KILL_SCENARIO,
        cluster::CLUSTER_CRASH_RECOVERY,
        cluster::CLUSTER_CHAOS_MONKEY,
        cluster::CLUSTER_THUNDERING_HERD,
    ]
}

/// Boxes a scenario body into a [`crate::scenario::RunFn`].
macro_rules! body {
    ($f:path) => {
        |ctx, plan| Box::pin($f(ctx, plan))
    };
}
pub(crate) use body;

/// Opens `n` sessions, at most `in_flight` handshakes at a time, each from
/// [`crate::client::source_ip`]; returns the open ones (by index), the
/// failures (index, error), and how long it took.
pub(crate) async fn open_many(
    url: &str,
    n: usize,
    in_flight: usize,
) -> (Vec<(usize, Ws, Welcome)>, Vec<(usize, String)>, Duration) {
    let started = tokio::time::Instant::now();
    let permits = Arc::new(Semaphore::new(in_flight.max(1)));
    let mut tasks = futures::stream::FuturesUnordered::new();
    for i in 0..n {
        let (url, permits) = (url.to_owned(), permits.clone());
        tasks.push(tokio::spawn(async move {
            let _p = permits.acquire_owned().await;
            (i, open_session(&url, crate::client::source_ip(i)).await)
        }));
    }
    let (mut ok, mut failed) = (Vec::with_capacity(n), Vec::new());
    while let Some(joined) = tasks.next().await {
        match joined {
            Ok((i, Ok((ws, w)))) => ok.push((i, ws, w)),
            Ok((i, Err(e))) => failed.push((i, e.to_string())),
            Err(e) => failed.push((usize::MAX, e.to_string())),
        }
    }
    (ok, failed, started.elapsed())
}

/// A mock upstream whose own rate limit is far above any scenario's load
/// (for scenarios about something else than rate limits).
pub(crate) async fn unlimited_upstream() -> Result<keel_faults::MockUpstream, Error> {
    keel_faults::MockUpstream::start(keel_faults::UpstreamConfig {
        global_rate: 10_000.0,
        global_burst: 10_000.0,
        ..Default::default()
    })
    .await
    .map_err(|e| setup("mock upstream", e))
}

/// The relay's RSS now, MiB (from the scenario's resource samples, or /proc).
pub(crate) fn rss_mib(pid: u32) -> f64 {
    keel_faults::sample(pid, Duration::ZERO).map_or(0.0, |s| s.rss_bytes as f64 / (1024.0 * 1024.0))
}

/// The largest RSS sampled between `from` and `to` seconds (run time), MiB.
pub(crate) fn peak_rss_mib(resources: &Resources, from: f64, to: f64) -> f64 {
    resources
        .samples()
        .iter()
        .filter(|(t, _)| *t >= from && *t <= to)
        .map(|(_, s)| s.rss_bytes as f64 / (1024.0 * 1024.0))
        .fold(0.0, f64::max)
}

/// Waits until `probe` returns true, checking every `every`, for at most `limit`.
pub(crate) async fn wait_until<F, Fut>(limit: Duration, every: Duration, mut probe: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if probe().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}

/// Per-second rates from a sorted list of event times (seconds).
pub(crate) fn rate_series(times: &[f64]) -> Vec<(f64, f64)> {
    let mut buckets: BTreeMap<u64, u64> = BTreeMap::new();
    for t in times {
        *buckets.entry(*t as u64).or_default() += 1;
    }
    buckets
        .into_iter()
        .map(|(s, n)| (s as f64, n as f64))
        .collect()
}

/// The `q` quantile of sorted durations, in ms (0 when there are none).
pub(crate) fn quantile_ms(sorted: &[Duration], q: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 * q).ceil() as usize).saturating_sub(1))
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// Acknowledged publishes per second over a run, from its history.
pub(crate) fn ack_rate(r: &crate::history::Recorder) -> Vec<(f64, f64)> {
    let mut acks: Vec<f64> = r
        .snapshot()
        .publishes
        .iter()
        .filter(|p| matches!(p.outcome, crate::history::Outcome::Ok { .. }))
        .map(|p| p.done as f64 / 1e6)
        .collect();
    acks.sort_by(f64::total_cmp);
    rate_series(&acks)
}

/// `params` for a plan, from (name, number) pairs.
pub(crate) fn params(pairs: &[(&'static str, f64)]) -> Vec<(&'static str, serde_json::Value)> {
    pairs
        .iter()
        .map(|(k, v)| (*k, serde_json::json!(v)))
        .collect()
}

/// Fails a scenario whose setup went wrong.
pub(crate) fn setup(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Client(format!("{what}: {e}"))
}
