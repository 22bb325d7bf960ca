//! Time from process start to "recovery done" with 100,000 sessions, 30% ACTIVE,
//! after an unclean shutdown (target: 500 ms).
//!
//! Each run copies one prepared database into a fresh directory and spawns
//! this binary as a child that runs `keel_recovery::start` and says when it is
//! done; the parent times from spawn to that line. The baseline is the same
//! child on the same database after a clean shutdown, where recovery has
//! nothing to do: the difference is what crash recovery costs.
//!
//! A second comparison holds the sessions fixed (1,000, 30% ACTIVE) and
//! varies the message log: none against 1,000,000 messages in 1,000
//! channels. Crash recovery must cost the same with both: its work depends
//! on sessions and claims, never on the size of the logs.
//!
//! `cargo bench -p keel-recovery --bench startup`

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_free::join_limited;
use keel_recovery::{DB_FILE, StartOptions, start};
use keel_session::{Config, NewSession, SessionId, SessionState, Store};

const SESSIONS: usize = 100_000;
const SMALL_SESSIONS: usize = 1_000;
const LOGGED_MESSAGES: usize = 1_000_000;
const ACTIVE_PERCENT: usize = 30;
const RUNS: usize = 5;
const CHILD: &str = "KEEL_STARTUP_CHILD";

fn main() {
    if let Ok(dir) = std::env::var(CHILD) {
        child(Path::new(&dir));
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let crashed = work.path().join("crashed");
    let clean = work.path().join("clean");
    let empty_log = work.path().join("empty-log");
    let big_log = work.path().join("big-log");
    let t = Instant::now();
    prepare(&crashed, SESSIONS, false);
    prepare(&clean, SESSIONS, true);
    prepare(&empty_log, SMALL_SESSIONS, false);
    prepare(&big_log, SMALL_SESSIONS, false);
    fill_log(&big_log, LOGGED_MESSAGES);
    println!(
        "prepared {SESSIONS} sessions ({ACTIVE_PERCENT}% ACTIVE), and {SMALL_SESSIONS} sessions \
         with an empty log and with {LOGGED_MESSAGES} logged messages, in {:.1?}",
        t.elapsed()
    );

    let mut rows = Vec::new();
    for (label, template) in [
        ("after a crash", &crashed),
        ("after a clean shutdown", &clean),
        ("crash, empty log", &empty_log),
        ("crash, 1 M messages", &big_log),
    ] {
        let (total, inner, said) = measure(work.path(), label, template);
        rows.push((label, total, inner, said));
    }

    println!(
        "\nstartup recovery, {SESSIONS} sessions, {ACTIVE_PERCENT}% ACTIVE, median of {RUNS} runs"
    );
    println!(
        "{:<24} {:>22} {:>20}",
        "database", "process start -> done", "start() itself"
    );
    for (label, total, inner, _) in &rows {
        println!("{label:<24} {total:>19.1} ms {inner:>17.1} ms");
    }
    println!("last child said (after a crash): {}", rows[0].3);
    let (empty, big) = (&rows[2], &rows[3]);
    println!(
        "\nrecovery against the size of the message log, {SMALL_SESSIONS} sessions, \
         {ACTIVE_PERCENT}% ACTIVE, median of {RUNS} runs"
    );
    println!(
        "{:<24} {:>22} {:>20}",
        "log", "process start -> done", "start() itself"
    );
    for (label, total, inner, _) in [empty, big] {
        println!("{label:<24} {total:>19.1} ms {inner:>17.1} ms");
    }
    println!("last child said (empty log): {}", empty.3);
    println!("last child said (1 M messages): {}", big.3);
    // The same within noise: a 1 ms floor keeps tiny figures from turning
    // scheduler jitter into a large ratio.
    let ratio = big.2.max(1.0) / empty.2.max(1.0);
    println!(
        "target: recovery with {LOGGED_MESSAGES} logged messages = recovery with none (ratio <= 1.5): {} (ratio {ratio:.2})",
        if ratio <= 1.5 { "MET" } else { "NOT MET" }
    );
    println!(
        "figure | crash recovery with 1 M logged messages | {:.1} | ms | same with an empty log | {:.1} | <= 1.5x | {}",
        big.2,
        empty.2,
        if ratio <= 1.5 { "MET" } else { "NOT MET" }
    );
    let target = 500.0;
    println!(
        "target: process start -> recovery done <= {target} ms after a crash: {} ({:.1} ms; recovery adds {:.1} ms over the clean start)",
        if rows[0].1 <= target {
            "MET"
        } else {
            "NOT MET"
        },
        rows[0].1,
        rows[0].1 - rows[1].1
    );
    println!(
        "figure | process start to recovery done, {SESSIONS} sessions after a crash | {:.1} | ms | after a clean shutdown | {:.1} | <= {target} ms | {}",
        rows[0].1,
        rows[1].1,
        if rows[0].1 <= target {
            "MET"
        } else {
            "NOT MET"
        }
    );
}

/// Fills `dir` with the database: `clean` closes it cleanly, otherwise it is
/// closed without the clean-shutdown flag, exactly as a `kill -9` leaves it
/// (minus the WAL, which is checkpointed so that copies are cheap).
/// Runs the child `RUNS` times on copies of `template`; returns the medians
/// of the end-to-end and in-process times and the last line it printed.
fn measure(work: &Path, label: &str, template: &Path) -> (f64, f64, String) {
    let mut end_to_end = Vec::new();
    let mut in_process = Vec::new();
    let mut said = String::new();
    for run in 0..RUNS {
        let dir = work.join(format!("run-{}-{run}", label.replace(' ', "-")));
        copy_dir(template, &dir);
        let (total, line) = spawn_child(&dir);
        let inner: f64 = field(&line, "recovery_ms=").parse().unwrap();
        end_to_end.push(total.as_secs_f64() * 1000.0);
        in_process.push(inner);
        said = line;
        std::fs::remove_dir_all(&dir).unwrap();
    }
    (median(&mut end_to_end), median(&mut in_process), said)
}

/// Appends `n` messages of 100 bytes to 1,000 channels, behind the store's
/// back (one transaction; the store would take longer and the result is the
/// same file).
fn fill_log(dir: &Path, n: usize) {
    let conn = rusqlite::Connection::open(dir.join(DB_FILE)).unwrap();
    conn.execute_batch(&format!(
        "BEGIN;
         WITH RECURSIVE i(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM i WHERE n + 1 < {n})
         INSERT INTO messages(channel, offset, publisher, msg_id, at, payload)
           SELECT 'room:' || (n % 1000), n / 1000 + 1, '', printf('m%09d', n), 0, randomblob(100) FROM i;
         COMMIT;"
    ))
    .unwrap();
}

fn prepare(dir: &Path, sessions: usize, clean: bool) {
    std::fs::create_dir_all(dir).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = Store::open(&dir.join(DB_FILE), Config::default())
            .await
            .unwrap();
        let jobs = (0..sessions).map(|i| {
            let store = store.clone();
            async move {
                let id = SessionId(format!("s{i:07}"));
                store
                    .create_session(NewSession {
                        id: Some(id.clone()),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                // 30% ACTIVE (i % 10 in 0..3), 10% PAUSED, the rest CREATED.
                if i % 10 < 3 {
                    store.transition(&id, SessionState::Active).await.unwrap();
                } else if i % 10 == 3 {
                    store.transition(&id, SessionState::Active).await.unwrap();
                    store.transition(&id, SessionState::Paused).await.unwrap();
                }
            }
        });
        join_limited(jobs, 256).await;
        let counts = store.count_by_state().await.unwrap();
        assert!(
            counts
                .iter()
                .any(|(s, n)| s == "ACTIVE" && *n as usize == sessions * ACTIVE_PERCENT / 100),
            "{counts:?}"
        );
        if clean {
            store.close().await.unwrap();
        } else {
            store.close_unclean().await.unwrap();
        }
    });
}

fn child(dir: &Path) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let started = start(StartOptions::new(dir)).await.unwrap();
        let r = &started.report;
        println!(
            "done recovery_ms={:.1} clean={} crashed={} notices={} released={} steps: {}",
            r.duration.as_secs_f64() * 1000.0,
            r.previous_clean_shutdown,
            r.crashed.len(),
            r.notices,
            r.released_claims,
            r.steps
                .iter()
                .map(|(s, d)| format!("{s} {:.1} ms", d.as_secs_f64() * 1000.0))
                .collect::<Vec<_>>()
                .join(", ")
        );
    });
}

fn spawn_child(dir: &Path) -> (Duration, String) {
    let t = Instant::now();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(CHILD, dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let took = t.elapsed();
    assert!(child.wait().unwrap().success());
    (took, line.trim().to_owned())
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let at = line.find(key).unwrap_or_else(|| panic!("{key} in {line}")) + key.len();
    line[at..].split_whitespace().next().unwrap()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn copy_dir(from: &Path, to: &PathBuf) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

mod futures_free {
    //! Runs futures with at most `limit` in flight, without another dependency.
    use std::future::Future;

    pub(crate) async fn join_limited<F>(jobs: impl Iterator<Item = F>, limit: usize)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let mut set = tokio::task::JoinSet::new();
        for job in jobs {
            if set.len() >= limit {
                set.join_next().await.unwrap().unwrap();
            }
            set.spawn(job);
        }
        while let Some(r) = set.join_next().await {
            r.unwrap();
        }
    }
}
