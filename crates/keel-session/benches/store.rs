//! keel-session benchmarks (`cargo bench -p keel-session`).
//!
//! - `ack_writes_64`: acknowledged appends per second with 64 concurrent writers
//!   through group commit (Normal and Full), against the same rows written
//!   (a) one transaction per write and (b) as raw batches of 1,000.
//! - `crash_scan`: 100,000 ACTIVE sessions moved to CRASHED by `mark_crashed`.
//!
//! After criterion's own report, a summary pass measures each variant once more
//! and prints writes/s and the ratios, so the figures in the README come from
//! one run on one machine. `KEEL_BENCH_SUMMARY_ONLY=1` runs only that pass.

use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use futures::future::join_all;
use keel_session::{Config, Durability, Store};
use rusqlite::{Connection, params};
use tokio::runtime::Runtime;

const WRITERS: usize = 64;
const PAYLOAD: [u8; 100] = [0x5a; 100];

/// How message ids are spelled. The unique `(channel, msg_id)` index is the
/// one B-tree a write touches at a place chosen by the id: time-ordered ids
/// (ULID-like, what keel's client generates) land at its right edge, random
/// ids (UUIDv4-like) on a different page each.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ids {
    TimeOrdered,
    Random,
}

impl Ids {
    fn name(self) -> &'static str {
        match self {
            Ids::TimeOrdered => "time_ordered_ids",
            Ids::Random => "random_ids",
        }
    }

    /// The id of the `seq`-th message overall, sent by writer `w`.
    fn id(self, seq: u64, w: u64) -> String {
        match self {
            Ids::TimeOrdered => format!("{seq:016x}-{w:02}"),
            Ids::Random => format!("{:016x}-{w:02}", splitmix64(seq)),
        }
    }
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn sync_name(d: Durability) -> &'static str {
    match d {
        Durability::Full => "FULL",
        Durability::Normal => "NORMAL",
    }
}

/// `total` appends spread over 64 concurrent writers; returns elapsed time.
fn group_commit(rt: &Runtime, store: &Store, total: u64, ids: Ids) -> Duration {
    rt.block_on(async {
        let per = total.div_ceil(WRITERS as u64);
        let start = Instant::now();
        let tasks = (0..WRITERS as u64).map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let scope = scope(w);
                for _ in 0..per {
                    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    store
                        .append_scoped(&scope, "bench", &ids.id(seq, w), &PAYLOAD)
                        .await
                        .expect("append");
                }
            })
        });
        join_all(tasks).await;
        start.elapsed()
    })
}

/// [`group_commit`] through the store API trait (`SessionStore`), as a
/// service generic over the backend calls it: the trait must cost nothing.
fn group_commit_via_trait<S: keel_session::SessionStore>(
    rt: &Runtime,
    store: &S,
    total: u64,
    ids: Ids,
) -> Duration {
    rt.block_on(async {
        let per = total.div_ceil(WRITERS as u64);
        let start = Instant::now();
        let tasks = (0..WRITERS as u64).map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let scope = scope(w);
                for _ in 0..per {
                    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    keel_session::SessionStore::queue_append_scoped(
                        &store,
                        0,
                        &scope,
                        "bench",
                        &ids.id(seq, w),
                        PAYLOAD.to_vec(),
                    )
                    .await
                    .expect("queued")
                    .await
                    .expect("append");
                }
            })
        });
        join_all(tasks).await;
        start.elapsed()
    })
}

/// A raw connection on a keel schema, for the baselines.
fn raw_connection(path: &Path, durability: Durability, rt: &Runtime) -> Connection {
    rt.block_on(async {
        Store::open(path, Config::default())
            .await
            .expect("create schema")
            .close()
            .await
            .expect("close")
    });
    let conn = Connection::open(path).expect("open raw");
    conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))
        .expect("wal");
    conn.pragma_update(None, "synchronous", sync_name(durability))
        .expect("sync");
    conn
}

/// Writer `w`'s id scope, as the relay scopes a session's publishes.
fn scope(w: u64) -> String {
    format!("session:{w:032x}")
}

/// Inserts the row that group commit would write for the `offset`-th append:
/// the same channel, payload and message ids (writer `offset % 64`), so the
/// baselines touch the same index pages.
fn raw_insert(conn: &Connection, offset: &mut i64, ids: Ids) {
    *offset += 1;
    let id = ids.id(*offset as u64, *offset as u64 % WRITERS as u64);
    conn.prepare_cached(
        "INSERT INTO messages(channel, offset, publisher, msg_id, at, payload)
         VALUES('bench', ?1, ?2, ?3, 0, ?4)",
    )
    .expect("prepare")
    .execute(params![
        *offset,
        scope(*offset as u64 % WRITERS as u64),
        id,
        &PAYLOAD[..]
    ])
    .expect("insert");
}

/// `total` inserts, one transaction each.
fn one_tx_per_write(conn: &Connection, total: u64, offset: &mut i64, ids: Ids) -> Duration {
    let start = Instant::now();
    for _ in 0..total {
        raw_insert(conn, offset, ids);
    }
    start.elapsed()
}

/// `total` inserts in transactions of 1,000.
fn raw_batched(conn: &Connection, total: u64, offset: &mut i64, ids: Ids) -> Duration {
    let start = Instant::now();
    let mut left = total;
    while left > 0 {
        let n = left.min(1_000);
        conn.execute_batch("BEGIN").expect("begin");
        for _ in 0..n {
            raw_insert(conn, offset, ids);
        }
        conn.execute_batch("COMMIT").expect("commit");
        left -= n;
    }
    start.elapsed()
}

/// Fills a database with `n` ACTIVE sessions (through raw batches: setup only).
fn crash_scan_fixture(path: &Path, n: usize, rt: &Runtime) -> Store {
    let conn = raw_connection(path, Durability::Normal, rt);
    conn.execute_batch("BEGIN").expect("begin");
    {
        let mut stmt = conn
            .prepare(
                "INSERT INTO sessions(id, token_hash, state, created_at, updated_at)
                 VALUES(?1, x'00', 'ACTIVE', 0, 0)",
            )
            .expect("prepare");
        for i in 0..n {
            stmt.execute([format!("{i:032x}")]).expect("insert session");
        }
    }
    conn.execute_batch("COMMIT").expect("commit");
    drop(conn);
    rt.block_on(Store::open(path, Config::default()))
        .expect("open fixture")
}

fn reset_to_active(path: &Path) {
    let conn = Connection::open(path).expect("open");
    conn.busy_timeout(Duration::from_secs(10)).expect("busy");
    conn.execute("UPDATE sessions SET state = 'ACTIVE'", [])
        .expect("reset");
}

fn timed_scan(rt: &Runtime, store: &Store, path: &Path, n: usize) -> Duration {
    reset_to_active(path);
    let start = Instant::now();
    let marked = rt.block_on(store.mark_crashed()).expect("mark_crashed");
    let took = start.elapsed();
    assert_eq!(marked.crashed.len(), n);
    took
}

/// The three writers compared for one id spelling and durability, each on
/// its own database in `dir`.
struct Contenders {
    store: Store,
    one_tx: Connection,
    batched: Connection,
}

fn contenders(dir: &Path, ids: Ids, durability: Durability, rt: &Runtime) -> Contenders {
    let name = sync_name(durability);
    let file = |kind: &str| dir.join(format!("{kind}-{name}-{}.db", ids.name()));
    let config = Config {
        durability,
        ..Config::default()
    };
    Contenders {
        store: rt.block_on(Store::open(&file("gc"), config)).expect("open"),
        one_tx: raw_connection(&file("tx"), durability, rt),
        batched: raw_connection(&file("raw"), durability, rt),
    }
}

fn benches(c: &mut Criterion, rt: &Runtime) {
    let dir = tempfile::tempdir().expect("tempdir");
    for ids in [Ids::TimeOrdered, Ids::Random] {
        let mut group = c.benchmark_group(format!("ack_writes_64/{}", ids.name()));
        group.throughput(Throughput::Elements(1));
        group.sample_size(10);
        group.measurement_time(Duration::from_secs(4));
        group.warm_up_time(Duration::from_secs(1));
        for durability in [Durability::Normal, Durability::Full] {
            let name = sync_name(durability);
            let Contenders {
                store,
                one_tx,
                batched,
            } = contenders(dir.path(), ids, durability, rt);
            group.bench_function(BenchmarkId::new("group_commit", name), |b| {
                b.iter_custom(|iters| group_commit(rt, &store, iters, ids))
            });

            let mut offset = 0;
            group.bench_function(BenchmarkId::new("one_tx_per_write", name), |b| {
                b.iter_custom(|iters| one_tx_per_write(&one_tx, iters, &mut offset, ids))
            });

            let mut offset = 0;
            group.bench_function(BenchmarkId::new("raw_batched_1000", name), |b| {
                b.iter_custom(|iters| raw_batched(&batched, iters, &mut offset, ids))
            });
        }
        group.finish();
    }

    let mut group = c.benchmark_group("crash_scan");
    group.sample_size(10);
    let n = 100_000;
    let path = dir.path().join("scan.db");
    let store = crash_scan_fixture(&path, n, rt);
    group.bench_function("mark_crashed_100k_active", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| timed_scan(rt, &store, &path, n)).sum())
    });
    group.finish();
}

/// Measures every variant once more in one pass and prints the figures and ratios.
fn summary(rt: &Runtime) {
    let dir = tempfile::tempdir().expect("tempdir");
    let total = 60_000;
    let best = |f: &mut dyn FnMut() -> Duration| (0..3).map(|_| f()).min().expect("runs");
    let rate = |d: Duration| total as f64 / d.as_secs_f64();
    println!(
        "\nkeel-session summary: {total} acknowledged 100-byte appends, 64 writers, best of 3"
    );
    println!(
        "{:<17} {:<7} {:>13} {:>13} {:>13} {:>7} {:>7} {:>9}",
        "ids", "sync", "group commit", "1 tx/write", "raw batched", "vs 1tx", "vs raw", "avg batch"
    );
    for ids in [Ids::TimeOrdered, Ids::Random] {
        for durability in [Durability::Normal, Durability::Full] {
            let name = sync_name(durability);
            let Contenders {
                store,
                one_tx,
                batched,
            } = contenders(dir.path(), ids, durability, rt);
            let gc = rate(best(&mut || group_commit(rt, &store, total, ids)));
            let mut offset = 0;
            let tx = rate(best(&mut || {
                one_tx_per_write(&one_tx, total / 4, &mut offset, ids) * 4
            }));
            let mut offset = 0;
            let raw = rate(best(&mut || raw_batched(&batched, total, &mut offset, ids)));
            let stats = store.writer_stats();
            if ids == Ids::TimeOrdered {
                // The machine-readable line `cargo xtask bench` collects.
                let floor = if durability == Durability::Normal {
                    50_000.0
                } else {
                    20_000.0
                };
                println!(
                    "figure | group-commit appends, time-ordered ids, sync={name} | {gc:.0} | /s | raw batched SQLite | {raw:.0} | >= {floor:.0}/s | {}",
                    if gc >= floor { "MET" } else { "NOT MET" }
                );
            }
            println!(
                "{:<17} {name:<7} {gc:>11.0}/s {tx:>11.0}/s {raw:>11.0}/s {:>6.2}x {:>6.2}x {:>9.1}",
                ids.name(),
                gc / tx,
                gc / raw,
                stats.writes as f64 / stats.batches.max(1) as f64
            );
        }
    }
    // The store API trait against the inherent methods, same store, runs
    // interleaved (direct, trait, direct, ...), best of 3 each.
    let Contenders { store, .. } = contenders(dir.path(), Ids::TimeOrdered, Durability::Normal, rt);
    let (mut direct, mut via_trait) = (Duration::MAX, Duration::MAX);
    for _ in 0..3 {
        direct = direct.min(group_commit(rt, &store, total, Ids::TimeOrdered));
        via_trait = via_trait.min(group_commit_via_trait(rt, &store, total, Ids::TimeOrdered));
    }
    let ratio = rate(via_trait) / rate(direct);
    println!(
        "store API trait: {:.0}/s through SessionStore, {:.0}/s direct: {ratio:.2}x",
        rate(via_trait),
        rate(direct)
    );
    println!(
        "figure | group-commit appends through the SessionStore trait | {ratio:.2} | x | direct Store calls, same run | 1 | >= 0.95x | {}",
        if ratio >= 0.95 { "MET" } else { "NOT MET" }
    );
    let n = 100_000;
    let path = dir.path().join("s-scan.db");
    let store = crash_scan_fixture(&path, n, rt);
    let scan = (0..3)
        .map(|_| timed_scan(rt, &store, &path, n))
        .min()
        .expect("runs");
    println!(
        "crash scan: {n} ACTIVE -> CRASHED in {:.1} ms (target <= 300 ms)",
        scan.as_secs_f64() * 1e3
    );
    println!(
        "figure | crash scan, {n} ACTIVE sessions | {:.1} | ms | - | 0 | <= 300 ms | {}",
        scan.as_secs_f64() * 1e3,
        if scan.as_secs_f64() * 1e3 <= 300.0 {
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
