//! The health state machine: rules, inputs, concurrency, and a real full disk.

use std::collections::HashSet;
use std::time::Duration;

use keel_recovery::{
    DiskStatus, DiskThresholds, Health, HealthError, HealthState, StartOptions, disk_status, start,
};
use keel_session::{Config, Store, StoreError};

async fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("keel.db"), Config::default())
        .await
        .unwrap();
    (dir, store)
}

#[tokio::test]
async fn machine_rules_and_inputs() {
    let (_dir, store) = store().await;
    let health = Health::start(store.clone(), "test").await;
    let mut watch = health.watch();
    assert_eq!(health.state(), HealthState::Starting);
    assert_eq!(
        health
            .request(HealthState::Stopped, "x")
            .await
            .map(|t| t.map(|t| t.to)),
        Ok(Some(HealthState::Stopped)),
        "STARTING may stop directly"
    );
    assert_eq!(
        health.request(HealthState::Operational, "x").await,
        Err(HealthError::Invalid {
            from: HealthState::Stopped,
            to: HealthState::Operational
        })
    );
    watch.changed().await.unwrap();
    assert_eq!(*watch.borrow(), HealthState::Stopped);

    // Inputs decide between OPERATIONAL and DEGRADED.
    let health = Health::start(store.clone(), "again").await;
    health.set_upstream_reachable(false).await;
    let t = health.ready("serving").await.unwrap().unwrap();
    assert_eq!(t.to, HealthState::Degraded);
    assert!(t.reason.contains("upstream unreachable"), "{}", t.reason);
    assert!(
        health
            .request(HealthState::Operational, "wish")
            .await
            .is_err(),
        "not while an input is unhealthy"
    );
    let t = health.set_upstream_reachable(true).await.unwrap();
    assert_eq!(t.to, HealthState::Operational);
    assert!(
        health.set_upstream_reachable(true).await.is_none(),
        "no change, no transition"
    );
    assert_eq!(
        health.set_disk(DiskStatus::Low).await.unwrap().to,
        HealthState::Degraded
    );
    assert!(
        health.set_database_ok(false).await.is_none(),
        "already degraded"
    );
    health.set_disk(DiskStatus::Ok).await;
    assert_eq!(
        health.state(),
        HealthState::Degraded,
        "database still failing"
    );
    assert_eq!(
        health.set_database_ok(true).await.unwrap().to,
        HealthState::Operational
    );
    health.drain("shutdown").await.unwrap();
    assert!(
        health.set_upstream_reachable(false).await.is_none(),
        "inputs ignored while draining"
    );
    assert!(health.ready("late").await.is_err());
    health.stop("done").await.unwrap();

    // Every transition is in the log, chained.
    let log = store.health_transitions(100).await.unwrap();
    for pair in log.windows(2) {
        assert_eq!(pair[0].to, pair[1].from, "{pair:?}");
    }
    assert_eq!(log.last().unwrap().to, "STOPPED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_transitions() {
    let (_dir, store) = store().await;
    let health = Health::start(store.clone(), "test").await;
    health.ready("serving").await.unwrap();
    let logged_before = store.health_transitions(1000).await.unwrap().len();

    // 20 rapid toggles from 20 tasks at once.
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let health = health.clone();
            tokio::spawn(async move {
                if i % 2 == 0 {
                    health.degrade(&format!("toggle {i}")).await
                } else {
                    health.restore().await
                }
            })
        })
        .collect();
    let mut changed = Vec::new();
    for t in tasks {
        changed.extend(t.await.unwrap());
    }
    // The state is the one the last applied request left.
    let last = changed
        .iter()
        .max_by_key(|t| t.seq)
        .expect("the first degrade changes state");
    assert_eq!(health.state(), last.to);
    let inputs = health.inputs().await;
    assert_eq!(
        inputs.forced.is_some(),
        health.state() == HealthState::Degraded,
        "state agrees with inputs"
    );

    // Then 20 sequential toggles from OPERATIONAL, each of which must be a transition.
    changed.extend(health.restore().await);
    for i in 0..20 {
        let t = if i % 2 == 0 {
            health.degrade("sequential").await
        } else {
            health.restore().await
        };
        changed.push(t.expect("a toggle from the other state is a transition"));
    }

    let log = store.health_transitions(1000).await.unwrap();
    let new = &log[logged_before..];
    assert_eq!(new.len(), changed.len(), "every transition logged");
    let ids: HashSet<i64> = new.iter().map(|t| t.id).collect();
    assert_eq!(ids.len(), new.len(), "ids unique");
    let seqs: HashSet<u64> = changed.iter().map(|t| t.seq).collect();
    assert_eq!(seqs.len(), changed.len());
    changed.sort_by_key(|t| t.seq);
    for (logged, t) in new.iter().zip(&changed) {
        assert_eq!(Some(logged.id), t.id);
        assert_eq!(
            (logged.from.as_str(), logged.to.as_str()),
            (t.from.as_str(), t.to.as_str())
        );
    }
    for pair in log.windows(2) {
        assert_eq!(
            pair[0].to, pair[1].from,
            "no torn or interleaved transition"
        );
        assert!(pair[0].id < pair[1].id);
    }
    assert_eq!(
        health.state(),
        HealthState::Operational,
        "the last toggle restored"
    );
    assert_eq!(log.last().unwrap().to, "OPERATIONAL");
    assert!(store.quick_check().await.unwrap().is_empty());
}

#[tokio::test]
async fn disk_full_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mount = match keel_faults::disk::Tmpfs::mount(dir.path(), 4 * 1024 * 1024) {
        keel_faults::disk::TmpfsMount::Mounted(m) => m,
        keel_faults::disk::TmpfsMount::Skipped { why } => {
            println!("SKIPPED disk_full_clear_error: {why}");
            return;
        }
    };
    let data = mount.path().join("data");
    let started = start(StartOptions::new(&data)).await.unwrap();
    let (store, health) = (started.store.clone(), started.health.clone());
    health.ready("serving").await.unwrap();

    let mut committed = Vec::new();
    for i in 0..50 {
        let id = format!("before-{i}");
        let a = store.append("room", &id, &[1u8; 1000]).await.unwrap();
        committed.push((a.offset, id));
    }
    let filler = mount.path().join("filler");
    keel_faults::disk::fill(&filler, None).unwrap();
    let thresholds = DiskThresholds {
        low_bytes: 256 * 1024,
        full_bytes: 64 * 1024,
    };
    assert_eq!(disk_status(&data, thresholds).unwrap(), DiskStatus::Full);

    // Writes fail with the disk-full error (the WAL may still have room for a few).
    let mut error = None;
    for i in 0..10_000 {
        let id = format!("during-{i}");
        match store.append("room", &id, &[2u8; 1000]).await {
            Ok(a) => committed.push((a.offset, id)),
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    let error = error.expect("the disk fills up");
    assert!(matches!(error, StoreError::DiskFull { .. }), "{error:?}");
    assert!(error.to_string().starts_with("disk full"), "{error}");
    let t = health.observe_store_error(&error).await.unwrap();
    assert_eq!(t.to, HealthState::Degraded);
    assert!(t.reason.contains("disk full"));
    assert_eq!(
        t.id, None,
        "a full disk cannot take the health log entry yet"
    );

    // Space returns.
    std::fs::remove_file(&filler).unwrap();
    let status = disk_status(&data, thresholds).unwrap();
    assert_eq!(status, DiskStatus::Ok);
    let t = health.set_disk(status).await.unwrap();
    assert_eq!(t.to, HealthState::Operational);
    assert_eq!(health.flush().await, 0, "the late entries are written");

    let after = store.append("room", "after", b"ok").await.unwrap();
    assert!(!after.duplicate);
    // Nothing acknowledged was lost; nothing that failed was half-written.
    let log = store.read_channel("room", 1, 100_000).await.unwrap();
    let got: Vec<(u64, String)> = log
        .iter()
        .filter(|m| m.msg_id != "after")
        .map(|m| (m.offset, m.msg_id.clone()))
        .collect();
    assert_eq!(got, committed);
    let states = crate::support::health_states(&store).await;
    assert_eq!(states[states.len() - 2..], ["DEGRADED", "OPERATIONAL"]);
    assert!(store.quick_check().await.unwrap().is_empty());
    drop(started);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _ = mount.unmount();
}
