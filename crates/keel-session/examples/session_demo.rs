//! A tour of keel-session against a real database file:
//! `cargo run --release -p keel-session --example session_demo [DIR]`.
//!
//! Creates sessions concurrently, publishes from 64 writers through group
//! commit, runs an outbox item through claim/fail/complete, then reopens the
//! database the way a restarted process would (once cleanly, once after
//! dropping the store without closing it) and shows what the store reports.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::future::join_all;
use keel_session::{Config, NewSend, NewSession, Retry, SessionState, Store};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tmp = tempfile::tempdir()?;
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("keel.db");
    println!("database: {}", path.display());

    let store = Store::open(&path, Config::default()).await?;
    println!(
        "opened: created={} previous_clean_shutdown={} schema=v{}",
        store.startup().created,
        store.startup().previous_clean_shutdown,
        store.startup().schema_version
    );

    // 1,000 sessions created concurrently; each becomes ACTIVE.
    let started = Instant::now();
    let sessions = join_all((0..1_000).map(|i| {
        let store = store.clone();
        async move {
            let s = store
                .create_session(NewSession {
                    meta: format!("user-{i}"),
                    ..Default::default()
                })
                .await?;
            store.transition(&s.id, SessionState::Active).await
        }
    }))
    .await
    .into_iter()
    .collect::<Result<Vec<_>, _>>()?;
    println!(
        "1,000 sessions created and activated concurrently in {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );

    // 64 writers publish 20,000 messages to one channel, with time-ordered
    // ids (a shared sequence here; ULIDs in a real client), which keep the
    // uniqueness index appending at its end.
    let before = store.writer_stats();
    let started = Instant::now();
    let sequence = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    join_all((0..64).map(|w| {
        let (store, sequence) = (store.clone(), sequence.clone());
        tokio::spawn(async move {
            for _ in 0..(20_000 / 64) {
                let n = sequence.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                store
                    .append("room:lobby", &format!("{n:016x}-w{w}"), b"hello, keel")
                    .await
                    .expect("append");
            }
        })
    }))
    .await;
    let took = started.elapsed();
    let after = store.writer_stats();
    let writes = after.writes - before.writes;
    println!(
        "{writes} acknowledged appends from 64 writers in {:.0} ms: {:.0}/s, {} commits (avg batch {:.1})",
        took.as_secs_f64() * 1e3,
        writes as f64 / took.as_secs_f64(),
        after.batches - before.batches,
        writes as f64 / (after.batches - before.batches) as f64
    );
    let first = store.read_channel("room:lobby", 1, 1).await?.remove(0);
    let again = store
        .append("room:lobby", &first.msg_id, b"hello, keel")
        .await?;
    println!(
        "re-publishing the first message returns offset {} (duplicate={})",
        again.offset, again.duplicate
    );

    // The outbox: claim with a lease, fail once, retry, complete.
    let id = store
        .enqueue(NewSend {
            session_id: Some(sessions[0].id.clone()),
            idem_key: "send-1".into(),
            payload: b"to upstream".to_vec(),
            ..Default::default()
        })
        .await?
        .id;
    store.claim("worker-a", Duration::from_secs(30), 10).await?;
    let failed = store
        .fail(id, "worker-a", "upstream 503", Retry::After(Duration::ZERO))
        .await?;
    store.claim("worker-b", Duration::from_secs(30), 10).await?;
    let sent = store.complete(id, "worker-b").await?;
    println!(
        "outbox item {id}: failed once ({}), then {} after {} attempt(s)",
        failed.last_error.unwrap_or_default(),
        sent.state,
        sent.attempts + 1
    );

    // A clean close, then a "crash": drop without close.
    store.close().await?;
    let store = Store::open(&path, Config::default()).await?;
    println!(
        "reopened after close: previous_clean_shutdown={}",
        store.startup().previous_clean_shutdown
    );
    drop(store);
    let store = Store::open(&path, Config::default()).await?;
    println!(
        "reopened after a drop without close: previous_clean_shutdown={}",
        store.startup().previous_clean_shutdown
    );
    let started = Instant::now();
    let marked = store.mark_crashed().await?;
    println!(
        "crash scan: {} ACTIVE sessions marked CRASHED in {:.1} ms",
        marked.crashed.len(),
        started.elapsed().as_secs_f64() * 1e3
    );
    for (state, n) in store.count_by_state().await? {
        println!("  {state:<8} {n}");
    }
    let problems = store.integrity_check().await?;
    println!(
        "integrity_check: {}",
        if problems.is_empty() { "ok" } else { "FAILED" }
    );
    store.close().await?;
    Ok(())
}
