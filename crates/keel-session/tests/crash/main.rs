//! A real crash test: a child process writes and acknowledges records in a loop
//! and is SIGKILLed at seeded-random moments; after each kill the store is
//! reopened and every acknowledged record must be there, in a database that
//! passes `PRAGMA integrity_check`.
//!
//! This binary is its own child: with `KEEL_CRASH_CHILD` set it runs the writer.
//! `KEEL_CRASH_SEED` and `KEEL_CRASH_ROUNDS` override the defaults.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_session::{Config, Durability, NewSend, Store};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::{Rng, SeedableRng, rngs::StdRng};

const NAME: &str = "crash_kill9_acked_writes_survive";
const CHANNEL: &str = "crash";
/// The child stops by itself after this long even if nobody kills it.
const CHILD_LIMIT: Duration = Duration::from_secs(30);

fn main() {
    if let Ok(db) = std::env::var("KEEL_CRASH_CHILD") {
        child(Path::new(&db));
        return;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("{NAME}: test");
        return;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    if !filters.is_empty() && !filters.iter().any(|f| NAME.contains(f.as_str())) {
        println!("\ntest result: ok. 0 passed; 0 failed; 1 filtered out\n");
        return;
    }
    println!("\nrunning 1 test");
    parent();
    println!("test {NAME} ... ok\n\ntest result: ok. 1 passed; 0 failed\n");
}

/// Writes records with 8 concurrent writers, printing `ack <kind> <n>` once each
/// write's transaction has committed.
fn child(db: &Path) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let durability = match std::env::var("KEEL_CRASH_DURABILITY").as_deref() {
            Ok("full") => Durability::Full,
            _ => Durability::Normal,
        };
        let store = Store::open(
            db,
            Config {
                durability,
                ..Config::default()
            },
        )
        .await
        .expect("child open");
        let start: u64 = std::env::var("KEEL_CRASH_START")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let next = Arc::new(AtomicU64::new(start));
        let out = Arc::new(Mutex::new(std::io::stdout()));
        let deadline = Instant::now() + CHILD_LIMIT;
        let writers = (0..8).map(|w| {
            let (store, next, out) = (store.clone(), next.clone(), out.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    let line = if w % 4 == 0 {
                        store
                            .enqueue(NewSend {
                                session_id: None,
                                idem_key: format!("k{n}"),
                                payload: n.to_le_bytes().to_vec(),
                                ..Default::default()
                            })
                            .await
                            .expect("enqueue");
                        format!("ack send {n}\n")
                    } else {
                        store
                            .append(CHANNEL, &format!("r{n}"), &n.to_le_bytes())
                            .await
                            .expect("append");
                        format!("ack msg {n}\n")
                    };
                    let mut out = out.lock().expect("stdout");
                    out.write_all(line.as_bytes()).expect("write ack");
                    out.flush().expect("flush ack");
                }
            })
        });
        for w in futures::future::join_all(writers).await {
            w.expect("writer task");
        }
    });
}

#[derive(Default)]
struct Acked {
    msgs: HashSet<u64>,
    sends: HashSet<u64>,
    max: u64,
}

fn parent() {
    let seed: u64 = std::env::var("KEEL_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6b65656c);
    let rounds: usize = std::env::var("KEEL_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    println!("crash test: seed {seed}, {rounds} rounds (KEEL_CRASH_SEED / KEEL_CRASH_ROUNDS)");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("keel.db");
    let exe = std::env::current_exe().expect("current exe");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    let mut acked = Acked::default();
    let mut kills_after_acks = 0;
    for round in 0..rounds {
        let durability = if round % 3 == 2 { "full" } else { "normal" };
        let delay = Duration::from_millis(rng.random_range(20..400));
        let before = acked.msgs.len() + acked.sends.len();
        run_child_and_kill(&exe, &db, acked.max + 1, durability, delay, &mut acked);
        let new_acks = acked.msgs.len() + acked.sends.len() - before;
        if new_acks > 0 {
            kills_after_acks += 1;
        }
        let clean_close = round % 2 == 1;
        rt.block_on(verify(&db, &acked, clean_close));
        println!(
            "round {round:>2}: {durability:<6} killed after {:>3} ms, {new_acks:>5} new acks, \
             {} acked in all, all present, integrity ok",
            delay.as_millis(),
            acked.msgs.len() + acked.sends.len()
        );
    }
    assert!(
        kills_after_acks >= rounds / 2,
        "most kills must land while writes are flowing ({kills_after_acks}/{rounds})"
    );
}

fn run_child_and_kill(
    exe: &Path,
    db: &PathBuf,
    start: u64,
    durability: &str,
    delay: Duration,
    acked: &mut Acked,
) {
    let mut child = Command::new(exe)
        .env("KEEL_CRASH_CHILD", db)
        .env("KEEL_CRASH_START", start.to_string())
        .env("KEEL_CRASH_DURABILITY", durability)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            match line {
                Ok(l) => lines.push(l),
                Err(_) => break,
            }
        }
        lines
    });
    std::thread::sleep(delay);
    let pid = Pid::from_raw(child.id() as i32);
    kill(pid, Signal::SIGKILL).expect("SIGKILL the child");
    let status = child.wait().expect("wait child");
    assert!(
        !status.success(),
        "the child must have been killed, not exited: {status}"
    );
    // Every line the child flushed before dying is still in the pipe.
    for line in reader.join().expect("reader thread") {
        let mut parts = line.split(' ');
        let (Some("ack"), Some(kind), Some(n)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        acked.max = acked.max.max(n);
        match kind {
            "msg" => acked.msgs.insert(n),
            _ => acked.sends.insert(n),
        };
    }
}

async fn verify(db: &Path, acked: &Acked, clean_close: bool) {
    let store = Store::open(db, Config::default())
        .await
        .expect("reopen after kill");
    assert!(
        !store.startup().previous_clean_shutdown,
        "a killed writer cannot have shut down cleanly"
    );
    let problems = store.integrity_check().await.expect("integrity check");
    assert!(problems.is_empty(), "integrity_check: {problems:?}");

    let bounds = store.channel_bounds(CHANNEL).await.expect("bounds");
    let log = store
        .read_channel(CHANNEL, 0, usize::MAX >> 1)
        .await
        .expect("read log");
    let offsets: Vec<u64> = log.iter().map(|m| m.offset).collect();
    let dense: Vec<u64> = (1..bounds.next).collect();
    assert_eq!(offsets, dense, "the log has no holes or repeats");
    let stored: HashSet<u64> = log
        .iter()
        .map(|m| m.msg_id[1..].parse().expect("record id"))
        .collect();
    let lost: Vec<_> = acked.msgs.difference(&stored).collect();
    assert!(lost.is_empty(), "acknowledged messages lost: {lost:?}");

    for n in &acked.sends {
        let dup = store
            .enqueue(NewSend {
                session_id: None,
                idem_key: format!("k{n}"),
                payload: Vec::new(),
                ..Default::default()
            })
            .await
            .expect("enqueue probe");
        assert!(dup.duplicate, "acknowledged send k{n} lost");
    }
    // The probes above wrote nothing (all duplicates), so the state is as the child left it.
    if clean_close {
        store.close().await.expect("close");
    }
}
