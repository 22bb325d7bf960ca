//! Startup recovery after real crashes, clean shutdowns, damaged rows and damaged files.

#![allow(clippy::single_range_in_vec_init)] // corrupt::overwrite takes a list of ranges

use std::sync::{Arc, Mutex};

use keel_recovery::{LockError, StartError, StartOptions, recover, start};
use keel_session::{Session, SessionId, SessionState, Store};

use crate::support::RoleChild;

fn live_ids() -> Vec<SessionId> {
    (0..3).map(|i| SessionId(format!("live-{i}"))).collect()
}

async fn notices(store: &Store, id: &SessionId) -> Vec<serde_json::Value> {
    store
        .read_channel(&id.private_channel(), 1, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .collect()
}

async fn snapshot(store: &Store) -> (Vec<Session>, Vec<u64>, usize) {
    let sessions = store.sessions(None).await.unwrap();
    let mut nexts = Vec::new();
    for s in &sessions {
        nexts.push(
            store
                .channel_bounds(&s.id.private_channel())
                .await
                .unwrap()
                .next,
        );
    }
    let transitions = store.health_transitions(1000).await.unwrap().len();
    (sessions, nexts, transitions)
}

/// A real process holding three ACTIVE sessions is SIGKILLed.
async fn crashed_daemon(dir: &std::path::Path) {
    let mut daemon = RoleChild::spawn("daemon", dir);
    assert_eq!(daemon.expect_line().await, "ready");
    daemon.kill9().await;
}

#[tokio::test]
async fn daemon_crash_recovery() {
    let dir = tempfile::tempdir().unwrap();
    crashed_daemon(dir.path()).await;

    let started = start(StartOptions::new(dir.path())).await.unwrap();
    let report = &started.report;
    println!("recovery: {}", report.summary());
    assert!(!report.previous_clean_shutdown);
    let mut crashed = report.crashed.clone();
    crashed.sort();
    assert_eq!(crashed, live_ids());
    assert_eq!(report.notices, 3);
    for id in live_ids() {
        let s = started.store.session(&id).await.unwrap();
        assert_eq!(s.state, SessionState::Crashed, "{id}");
        assert!(s.recovered_at.is_some(), "{id} has recovered_at");
        assert_eq!(s.crash_count, 1);
        let notes = notices(&started.store, &id).await;
        assert_eq!(notes.len(), 1, "{id} has one notice");
        assert_eq!(notes[0]["type"], "session_crashed");
        assert_eq!(notes[0]["session_id"], id.as_str());
        assert_eq!(notes[0]["previous_state"], "ACTIVE");
        assert_eq!(notes[0]["recovered_at"], s.recovered_at.unwrap());
    }
    let log = started.store.health_transitions(10).await.unwrap();
    let last = log.last().unwrap();
    assert_eq!(last.to, "STARTING");
    assert_eq!(last.from, "OPERATIONAL", "the crashed run was serving");
    assert!(
        last.reason
            .contains("recovered after an unclean shutdown: 3 sessions crashed"),
        "{}",
        last.reason
    );
}

#[tokio::test]
async fn no_false_positive_after_clean_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = RoleChild::spawn("clean", dir.path());
    assert_eq!(daemon.expect_line().await, "ready");
    assert_eq!(daemon.expect_line().await, "stopped");
    assert_eq!(daemon.exit_code().await, Some(0));

    let started = start(StartOptions::new(dir.path())).await.unwrap();
    assert!(started.report.previous_clean_shutdown);
    assert!(!started.report.changed_anything(), "{:?}", started.report);
    for id in live_ids() {
        let s = started.store.session(&id).await.unwrap();
        assert_eq!(
            s.state,
            SessionState::Active,
            "left alone after a clean shutdown"
        );
        assert_eq!(s.crash_count, 0);
        assert!(s.recovered_at.is_none());
        assert!(notices(&started.store, &id).await.is_empty());
    }
    let states = crate::support::health_states(&started.store).await;
    assert_eq!(
        states,
        ["STARTING", "OPERATIONAL", "DRAINING", "STOPPED", "STARTING"]
    );
}

#[tokio::test]
async fn recovery_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    crashed_daemon(dir.path()).await;

    let started = start(StartOptions::new(dir.path())).await.unwrap();
    assert_eq!(started.report.crashed.len(), 3);
    let before = snapshot(&started.store).await;

    // Again in the same run: nothing.
    let again = recover(&started.store).await.unwrap();
    assert!(again.already_recovered);
    assert!(!again.changed_anything(), "{again:?}");
    assert_eq!(snapshot(&started.store).await, before);

    // The recovering run crashes too (dropped without a shutdown); the next
    // start finds nothing left to recover.
    drop(started);
    let restarted = start(StartOptions::new(dir.path())).await.unwrap();
    let report = &restarted.report;
    assert!(!report.previous_clean_shutdown);
    assert!(!report.already_recovered, "a new run");
    assert!(
        report.crashed.is_empty() && report.notices == 0,
        "{report:?}"
    );
    let (sessions, nexts, _) = snapshot(&restarted.store).await;
    assert_eq!((sessions, nexts), (before.0, before.1));
}

/// Collects what tracing logs at error level.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn corrupt_state_recovery() {
    let dir = tempfile::tempdir().unwrap();
    crashed_daemon(dir.path()).await;
    {
        let conn = rusqlite::Connection::open(dir.path().join(keel_recovery::DB_FILE)).unwrap();
        conn.execute(
            "UPDATE sessions SET state = 'INVALID' WHERE id = 'live-1'",
            [],
        )
        .unwrap();
    }

    let captured = Captured::default();
    let sink = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::ERROR)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let started = start(StartOptions::new(dir.path()))
        .await
        .expect("startup completes");
    assert_eq!(
        started.report.unknown_states,
        vec![(SessionId::from("live-1"), "INVALID".to_owned())]
    );
    assert_eq!(started.report.crashed.len(), 2, "the other two were ACTIVE");
    for id in live_ids() {
        let s = started.store.session(&id).await.unwrap();
        assert_eq!(s.state, SessionState::Crashed, "{id}");
        assert_eq!(notices(&started.store, &id).await.len(), 1, "{id}");
    }
    let bad = notices(&started.store, &SessionId::from("live-1")).await;
    assert_eq!(bad[0]["previous_state"], "INVALID");
    let logged = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logged.contains("ERROR") && logged.contains("live-1") && logged.contains("INVALID"),
        "error logged: {logged}"
    );
}

#[tokio::test]
async fn sqlite_corruption_recovery() {
    let dir = tempfile::tempdir().unwrap();
    crashed_daemon(dir.path()).await;
    let db = dir.path().join(keel_recovery::DB_FILE);
    let wal = dir.path().join(format!("{}-wal", keel_recovery::DB_FILE));
    assert!(wal.exists(), "a killed daemon leaves its WAL");
    // A young database may live mostly in its WAL; give the main file room
    // for garbage over at least its header and first pages.
    let len = std::fs::metadata(&db).unwrap().len().max(16 * 1024);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&db)
        .unwrap()
        .set_len(len)
        .unwrap();
    keel_faults::corrupt::overwrite(&db, &[0..len], 7).unwrap();
    // The WAL's header too: with a valid WAL holding page 1, SQLite reads the
    // database from the WAL and nothing is damaged (the next test).
    keel_faults::corrupt::overwrite(&wal, &[0..32], 8).unwrap();
    let garbage = std::fs::read(&db).unwrap();
    let wal_bytes = std::fs::read(&wal).unwrap();

    let started = start(StartOptions::new(dir.path()))
        .await
        .expect("starts fresh");
    let q = started.report.quarantine.clone().expect("quarantined");
    println!("operator message: {}", q.message());
    let moved_names: Vec<String> = q
        .moved
        .iter()
        .map(|(_, to)| to.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(moved_names[0], format!("keel.db.corrupt-{}", q.stamp));
    assert_eq!(moved_names[1], format!("keel.db-wal.corrupt-{}", q.stamp));
    assert_eq!(moved_names[2], format!("keel.db-shm.corrupt-{}", q.stamp));
    // Nothing deleted: the moved files hold exactly what was there.
    assert_eq!(std::fs::read(&q.moved[0].1).unwrap(), garbage);
    assert_eq!(std::fs::read(&q.moved[1].1).unwrap(), wal_bytes);
    // The operator is told what moved where and how to look at it.
    let msg = q.message();
    assert!(msg.contains(&q.moved[0].1.display().to_string()), "{msg}");
    assert!(msg.contains(".recover"), "{msg}");
    // A fresh database that records the event.
    assert!(started.store.sessions(None).await.unwrap().is_empty());
    assert!(
        started
            .store
            .meta(&format!("quarantine.{}", q.stamp))
            .await
            .unwrap()
            .unwrap()
            .contains("corrupt-")
    );
    let log = started.store.health_transitions(10).await.unwrap();
    assert!(log[0].reason.contains("moved aside"), "{}", log[0].reason);
    assert!(started.store.quick_check().await.unwrap().is_empty());
}

/// Never ignore a -wal: a young database lives in its WAL, and garbage over
/// the main file alone loses nothing.
#[tokio::test]
async fn garbage_main_file_with_a_valid_wal_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    crashed_daemon(dir.path()).await;
    let db = dir.path().join(keel_recovery::DB_FILE);
    let len = std::fs::metadata(&db).unwrap().len();
    keel_faults::corrupt::overwrite(&db, &[0..len], 7).unwrap();

    let started = start(StartOptions::new(dir.path())).await.unwrap();
    assert!(started.report.quarantine.is_none());
    assert_eq!(
        started.report.crashed.len(),
        3,
        "every session read back from the WAL"
    );
}

#[tokio::test]
async fn damaged_page_found_by_quick_check_is_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    {
        let started = start(StartOptions::new(dir.path())).await.unwrap();
        for i in 0..200 {
            started
                .store
                .append("room", &format!("m{i}"), &[7u8; 300])
                .await
                .unwrap();
        }
        started.store.close().await.unwrap();
    }
    let db = dir.path().join(keel_recovery::DB_FILE);
    // Keep the 100-byte header readable; wreck the pages after the first.
    keel_faults::corrupt::overwrite(&db, &[4096..4096 * 6], 11).unwrap();
    assert!(matches!(
        keel_recovery::integrity::check(&db).unwrap(),
        keel_recovery::integrity::Check::Damaged(_)
    ));

    let started = start(StartOptions::new(dir.path())).await.unwrap();
    let q = started.report.quarantine.clone().expect("quarantined");
    assert!(q.moved[0].1.exists());
    assert_eq!(started.store.channel_bounds("room").await.unwrap().next, 1);
}

/// Appends `count` messages of `bytes` to "room", closes the store and
/// overwrites eight of the file's newest pages; returns the database path.
async fn log_with_damaged_tail(
    dir: &std::path::Path,
    count: usize,
    bytes: usize,
) -> std::path::PathBuf {
    {
        let started = start(StartOptions::new(dir)).await.unwrap();
        let payload = vec![7u8; bytes];
        for i in 0..count {
            started
                .store
                .append("room", &format!("m{i:05}"), &payload)
                .await
                .unwrap();
        }
        started.store.close().await.unwrap();
    }
    let db = dir.join(keel_recovery::DB_FILE);
    let len = std::fs::metadata(&db).unwrap().len();
    keel_faults::corrupt::overwrite(&db, &[len - 4096 * 9..len - 4096], 13).unwrap();
    db
}

/// Startup checks the state tables only (its time must not grow with the
/// message log); damage in the log is found by the full check that runs
/// once the service serves, which degrades health and makes the next start
/// check everything and quarantine.
#[tokio::test]
async fn damage_in_the_message_log_is_found_after_start_and_quarantined_next_time() {
    use keel_recovery::integrity::{Check, check, check_everything, full_check};
    let dir = tempfile::tempdir().unwrap();
    // The newest pages belong to the message log (its table and index).
    let db = log_with_damaged_tail(dir.path(), 3000, 300).await;
    assert_eq!(
        check(&db).unwrap(),
        Check::Intact,
        "startup's scope excludes the log"
    );
    assert!(matches!(check_everything(&db).unwrap(), Check::Damaged(_)));

    {
        let started = start(StartOptions::new(dir.path())).await.unwrap();
        assert!(started.report.quarantine.is_none());
        started.health.ready("serving").await.unwrap();
        assert!(matches!(
            full_check(&db, &started.store, &started.health).await,
            Check::Damaged(_)
        ));
        assert_eq!(started.health.state(), keel_recovery::HealthState::Degraded);
        let problems = started.health.inputs().await.problems().unwrap();
        assert!(problems.contains("restart"), "{problems}");
        started.store.close().await.unwrap();
    }
    let started = start(StartOptions::new(dir.path())).await.unwrap();
    let q = started
        .report
        .quarantine
        .clone()
        .expect("quarantined on the next start");
    assert!(q.moved[0].1.exists());
    assert_eq!(started.store.channel_bounds("room").await.unwrap().next, 1);
}

/// Large payloads live in their own table (keel-session's schema 4), part
/// of the log as far as startup is concerned: damage there is left to the
/// full check too, and startup's time does not grow with them.
#[tokio::test]
async fn damage_in_large_payloads_is_left_to_the_full_check() {
    use keel_recovery::integrity::{Check, check, check_everything};
    let dir = tempfile::tempdir().unwrap();
    // The newest pages are the newest payloads (two pages and more each).
    let db = log_with_damaged_tail(dir.path(), 300, 6000).await;
    assert_eq!(check(&db).unwrap(), Check::Intact);
    assert!(matches!(check_everything(&db).unwrap(), Check::Damaged(_)));
}

#[tokio::test]
async fn second_instance_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = RoleChild::spawn("daemon", dir.path());
    assert_eq!(first.expect_line().await, "ready");
    let holder = first.pid();

    match start(StartOptions::new(dir.path())).await {
        Err(StartError::Lock(LockError::Held { pid, .. })) => assert_eq!(pid, Some(holder)),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Another real process is refused the same way, with the holder named.
    let mut second = RoleChild::spawn("daemon", dir.path());
    let said = second.expect_line().await;
    assert!(said.starts_with("refused"), "{said}");
    assert!(said.contains(&format!("pid {holder}")), "{said}");
    assert_eq!(second.exit_code().await, Some(0));

    // The kernel drops the lock with its holder: kill -9 leaves nothing stale.
    first.kill9().await;
    let started = start(StartOptions::new(dir.path())).await.unwrap();
    assert_eq!(started.report.crashed.len(), 3);
}
