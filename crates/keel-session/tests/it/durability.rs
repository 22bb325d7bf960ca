//! Opening, reopening, shutdown flags, schema versions, bad files, full disks, the WAL.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::future::join_all;
use keel_session::{
    Config, Durability, NewSession, OpenError, SCHEMA_VERSION, SessionError, SessionId, Store,
    StoreError, WriterStats,
};

use crate::support;

#[tokio::test]
async fn clean_shutdown_flag_tracks_close_and_crash() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.db");

    let store = Store::open(&path, Config::default()).await.unwrap();
    assert!(store.startup().created);
    assert_eq!(store.startup().run, 1);
    assert!(
        store.startup().previous_clean_shutdown,
        "a new database needs no recovery"
    );
    assert!(
        !store.clean_shutdown().await.unwrap(),
        "marked running while open"
    );
    let id = store
        .create_session(NewSession::default())
        .await
        .unwrap()
        .id;
    let instance = store.startup().instance_id.clone();
    store.close().await.unwrap();
    assert_eq!(
        store.create_session(NewSession::default()).await,
        Err(SessionError::Store(StoreError::Closed))
    );

    let store = Store::open(&path, Config::default()).await.unwrap();
    assert!(!store.startup().created);
    assert!(store.startup().previous_clean_shutdown);
    assert_eq!(store.startup().instance_id, instance);
    assert_eq!(store.startup().run, 2, "each open is a new run");
    store.session(&id).await.unwrap();
    // Dropped without close: the next open must see an unclean shutdown.
    drop(store);

    let store = Store::open(&path, Config::default()).await.unwrap();
    assert!(!store.startup().previous_clean_shutdown);
    assert_eq!(store.startup().run, 3);
    store
        .session(&id)
        .await
        .expect("acknowledged writes survive");
    // Closed on purpose without the flag: still a crash to the next open.
    store.close_unclean().await.unwrap();

    let store = Store::open(&path, Config::default()).await.unwrap();
    assert!(!store.startup().previous_clean_shutdown);
    store.close().await.unwrap();
}

#[tokio::test]
async fn newer_schema_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.db");
    Store::open(&path, Config::default())
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 7)
            .unwrap();
    }
    let err = Store::open(&path, Config::default()).await.unwrap_err();
    assert_eq!(
        err,
        OpenError::NewerSchema {
            found: SCHEMA_VERSION + 7,
            supported: SCHEMA_VERSION
        }
    );
    assert!(err.to_string().contains("newer than this build supports"));
}

#[tokio::test]
async fn garbage_file_is_a_corruption_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.db");
    std::fs::write(&path, vec![0xA5u8; 64 * 1024]).unwrap();
    let err = Store::open(&path, Config::default()).await.unwrap_err();
    assert!(matches!(err, OpenError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("corrupt"));
}

#[tokio::test]
async fn full_database_is_a_disk_full_error_and_loses_nothing() {
    let t = support::open_with(Config {
        max_db_bytes: Some(512 * 1024),
        ..Default::default()
    })
    .await;
    let payload = vec![7u8; 8 * 1024];
    let mut acked = Vec::new();
    let err = loop {
        let id = format!("m{}", acked.len());
        match t.store.append("big", &id, &payload).await {
            Ok(a) => acked.push(a.offset),
            Err(e) => break e,
        }
        assert!(acked.len() < 1_000, "the cap never triggered");
    };
    assert!(matches!(err, StoreError::DiskFull { .. }), "{err:?}");
    assert!(!acked.is_empty());

    // Everything acknowledged is still there; reads keep working.
    let log = t.store.read_channel("big", 0, 10_000).await.unwrap();
    assert_eq!(log.iter().map(|m| m.offset).collect::<Vec<_>>(), acked);
    assert!(t.store.integrity_check().await.unwrap().is_empty());

    // Freeing space lets writes succeed again.
    t.store
        .apply_retention(keel_session::Retention {
            max_count: Some(2),
            max_age: None,
        })
        .await
        .unwrap();
    t.store
        .append("big", "after", &payload)
        .await
        .expect("writes resume once space returns");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_write_does_not_fail_its_batch() {
    let t = support::open().await;
    let creates = (0..400).map(|i| {
        let store = t.store.clone();
        tokio::spawn(async move {
            store
                .create_session(NewSession {
                    id: Some(SessionId(format!("s{}", i % 200))),
                    ..Default::default()
                })
                .await
        })
    });
    let results: Vec<_> = join_all(creates)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let dup = results
        .iter()
        .filter(|r| matches!(r, Err(SessionError::AlreadyExists(_))))
        .count();
    assert_eq!((ok, dup), (200, 200));
    assert_eq!(t.store.sessions(None).await.unwrap().len(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_durability_round_trip() {
    let mut t = support::open_with(Config {
        durability: Durability::Full,
        ..Default::default()
    })
    .await;
    let s = t.store.create_session(NewSession::default()).await.unwrap();
    t.store.append("c", "m", b"p").await.unwrap();
    t.reopen().await;
    assert_eq!(t.store.session(&s.id).await.unwrap(), s);
    assert_eq!(
        t.store.read_channel("c", 1, 1).await.unwrap()[0].payload,
        b"p"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_stays_bounded_under_constant_reads() {
    let t = support::open_with(Config {
        wal_checkpoint_bytes: 4 * 1024 * 1024,
        readers: 2,
        ..Default::default()
    })
    .await;
    let wal = {
        let mut p = t.path().into_os_string();
        p.push("-wal");
        std::path::PathBuf::from(p)
    };
    let stop = Arc::new(AtomicBool::new(false));
    let max_wal = Arc::new(AtomicU64::new(0));
    let reads = Arc::new(AtomicU64::new(0));

    // Readers that never stop: there is always a read transaction somewhere.
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (store, stop, reads) = (t.store.clone(), stop.clone(), reads.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    store.read_channel("c", 1, 50).await.unwrap();
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let watcher = {
        let (stop, max_wal, wal) = (stop.clone(), max_wal.clone(), wal.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let size = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
                max_wal.fetch_max(size, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    // 48 MiB of payload through the log.
    let payload = vec![1u8; 16 * 1024];
    for chunk in 0..48 {
        let writes = (0..64).map(|i| {
            let (store, payload) = (t.store.clone(), payload.clone());
            async move {
                store
                    .append("c", &format!("m{chunk}-{i}"), &payload)
                    .await
                    .unwrap()
            }
        });
        join_all(writes).await;
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    watcher.await.unwrap();

    let max = max_wal.load(Ordering::Relaxed);
    let stats = t.store.writer_stats();
    assert!(reads.load(Ordering::Relaxed) > 0);
    assert!(stats.checkpoints > 0, "{stats:?}");
    assert!(
        max < 16 * 1024 * 1024,
        "WAL grew to {max} bytes under constant reads"
    );
}

/// One message, then a snapshot held from outside the store (a read
/// transaction on a connection of its own): nothing committed after it can
/// be checkpointed, and the WAL cannot restart, until it is committed.
async fn pin_snapshot(t: &support::TestStore) -> rusqlite::Connection {
    t.store.append("c", "first", b"{}").await.unwrap();
    let pinned = rusqlite::Connection::open(t.path()).unwrap();
    pinned
        .execute_batch("BEGIN; SELECT COUNT(*) FROM messages;")
        .unwrap();
    pinned
}

/// Appends `n` copies of `payload` to channel `c`, one after another, with
/// ids `{prefix}{i}`.
async fn append_all(t: &support::TestStore, prefix: &str, n: usize, payload: &[u8]) {
    for i in 0..n {
        t.store
            .append("c", &format!("{prefix}{i}"), payload)
            .await
            .unwrap();
    }
}

/// Lets the snapshot go, then commits small messages (each asks for a
/// checkpoint while the WAL is owed) until `done` holds, for at most 10 s.
async fn release_until(
    t: &support::TestStore,
    pinned: rusqlite::Connection,
    what: &str,
    done: impl Fn(&WriterStats) -> bool,
) {
    pinned.execute_batch("COMMIT").unwrap();
    drop(pinned);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for tick in 0.. {
        t.store
            .append("c", &format!("tick{tick}"), b"{}")
            .await
            .unwrap();
        let stats = t.store.writer_stats();
        if done(&stats) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not {what} within 10 s: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Admission by disk bandwidth: while the WAL is behind its checkpoints
/// (a reader holds a snapshot, so the checkpoint cannot catch up), large
/// writes are held, each for at most `admit_wait`, and still all commit;
/// small ones are never held. Once the reader lets go, the checkpoint
/// pays the debt back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_writes_wait_while_the_wal_is_behind() {
    let t = support::open_with(Config {
        wal_admit_bytes: 256 * 1024,
        wal_passive_bytes: 64 * 1024,
        // One large write a commit, so that each is admitted on its own.
        max_batch_bytes: 64 * 1024,
        small_write_bytes: 16 * 1024,
        admit_wait: Duration::from_millis(20),
        ..Default::default()
    })
    .await;
    let pinned = pin_snapshot(&t).await;

    let large = vec![7u8; 100 * 1024];
    // Behind first: 400 KiB committed after the snapshot, one at a time.
    append_all(&t, "before", 4, &large).await;
    let mut pending = Vec::new();
    for i in 0..12 {
        pending.push(
            t.store
                .queue_append_in(1, "c", &format!("big{i}"), large.clone())
                .await
                .unwrap(),
        );
    }
    let small = t
        .store
        .queue_append_in(2, "c", "small", b"{}".to_vec())
        .await
        .unwrap();
    small.await.unwrap();
    for p in pending {
        p.await.unwrap();
    }
    let held = t.store.writer_stats();
    assert!(held.admission_waits >= 1, "{held:?}");
    assert!(held.wal_behind_bytes > 256 * 1024, "{held:?}");

    release_until(&t, pinned, "the checkpoint caught up", |stats| {
        stats.wal_behind_bytes <= 256 * 1024
    })
    .await;
}

/// A WAL that restarts from its beginning keeps its file (up to
/// `wal_checkpoint_bytes`): the next round overwrites pages the kernel
/// already holds instead of allocating new ones, which it zeroes before the
/// WAL's unaligned frames partly cover them. The writer sees the restart
/// through SQLite's WAL hook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_restarts_in_place() {
    let t = support::open_with(Config {
        wal_passive_bytes: 512 * 1024,
        ..Default::default()
    })
    .await;
    let wal = std::path::PathBuf::from(format!("{}-wal", t.path().display()));
    // The snapshot keeps the WAL from restarting while it grows past
    // SQLite's usual 4 MiB limit.
    let pinned = pin_snapshot(&t).await;
    append_all(&t, "m", 100, &[b'x'; 60 * 1024]).await;
    let grown = std::fs::metadata(&wal).unwrap().len();
    let held = t.store.writer_stats();
    assert!(grown > 5 << 20, "the WAL grew to {grown} bytes");
    assert!(held.wal_bytes > 5 << 20, "{held:?}");
    // Once a checkpoint has copied everything, the next commit restarts it.
    release_until(&t, pinned, "the WAL restarted", |stats| {
        stats.wal_bytes < 1 << 20
    })
    .await;
    let kept = std::fs::metadata(&wal).unwrap().len();
    assert!(
        kept >= grown,
        "the WAL file was cut from {grown} to {kept} bytes"
    );
}

/// Large writes alone are held only until the checkpoint has caught up,
/// not for `admit_wait`: the WAL's size since its last restart counts only
/// while the checkpoint is behind, because the restart happens at the next
/// commit, which a longer hold would keep from happening (a flood of large
/// writes alone would then pause for `admit_wait` each time the WAL grew
/// past `wal_admit_bytes`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_writes_alone_go_on_once_the_checkpoint_caught_up() {
    let t = support::open_with(Config {
        wal_admit_bytes: 256 * 1024,
        wal_passive_bytes: 64 * 1024,
        max_batch_bytes: 64 * 1024,
        small_write_bytes: 16 * 1024,
        admit_wait: Duration::from_secs(120),
        ..Default::default()
    })
    .await;
    let pinned = pin_snapshot(&t).await;
    // Small writes (never held) put the WAL past `wal_admit_bytes`, and
    // the snapshot keeps the checkpoint from copying them.
    append_all(&t, "small", 30, &[b's'; 15 * 1024]).await;
    let large = vec![b'L'; 100 * 1024];
    let mut pending = Vec::new();
    for i in 0..8 {
        pending.push(
            t.store
                .queue_append_in(1, "c", &format!("big{i}"), large.clone())
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let held = t.store.writer_stats();
    assert!(held.admission_waits >= 1, "{held:?}");
    // The reader lets go: the checkpoint catches up, and the large writes
    // go on with it, long before `admit_wait`.
    pinned.execute_batch("COMMIT").unwrap();
    drop(pinned);
    tokio::time::timeout(Duration::from_secs(30), async {
        for p in pending {
            p.await.unwrap();
        }
    })
    .await
    .expect("large writes held after the checkpoint caught up");
}

/// The database, its WAL and its shared-memory file are their owner's only
/// (0600) whatever the umask, and a file left readable by others is
/// narrowed when the store opens it.
#[tokio::test]
async fn database_files_are_owner_only_whatever_the_umask() {
    use nix::sys::stat::{Mode, umask};
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.db");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let old = umask(Mode::empty());
    let store = Store::open(&path, Config::default()).await.unwrap();
    store.append("c", "m1", b"private").await.unwrap();
    umask(old);
    let side = |suffix: &str| dir.path().join(format!("keel.db{suffix}"));
    for p in [path.clone(), side("-wal"), side("-shm")] {
        assert_eq!(mode(&p), 0o600, "{}", p.display());
    }
    store.close().await.unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let store = Store::open(&path, Config::default()).await.unwrap();
    assert_eq!(mode(&path), 0o600, "narrowed on open");
    store.close().await.unwrap();
}
