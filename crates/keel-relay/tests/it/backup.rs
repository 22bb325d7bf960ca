//! `keel-relay backup` while publishers run, then `restore` into a fresh
//! directory and a relay started on it: every message acknowledged before
//! the backup began is there, with its payload.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_relay::client::Event;
use serde_json::json;

use crate::doctor::run_code;
use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_publish_load_restores_everything_acknowledged_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let relay = RelayProcess::start(&data, Opts::default()).await;
    // (offset, i) of every acknowledged publish, in the order acks arrived.
    let acked: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(0));
    let mut publishers = Vec::new();
    for _ in 0..4 {
        let (acked, stop, next, url) = (acked.clone(), stop.clone(), next.clone(), relay.url());
        publishers.push(tokio::spawn(async move {
            let c = client(&url).await;
            // Bounded: at most 200,000 publishes, whatever the stop flag says.
            while !stop.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= 200_000 {
                    break;
                }
                let payload = json!({ "i": i, "pad": "x".repeat(300) });
                let offset = c.publish("log", &format!("m{i}"), &payload).await.unwrap();
                acked.lock().unwrap().push((offset, i));
            }
        }));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < 3_000 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "publishers too slow"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let before: Vec<(u64, u64)> = acked.lock().unwrap().clone();
    let backup = dir.path().join("keel.backup");
    let args = [
        "backup".to_owned(),
        "--data".to_owned(),
        data.display().to_string(),
        "--to".to_owned(),
        backup.display().to_string(),
    ];
    let (code, text) = tokio::task::spawn_blocking(move || {
        run_code(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap();
    let after = acked.lock().unwrap().len();
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("integrity_check ok"), "{text}");
    stop.store(true, Ordering::Relaxed);
    for p in publishers {
        p.await.unwrap();
    }
    assert!(
        after > before.len(),
        "publishes went on during the backup ({} then {after}): the test is under load",
        before.len()
    );
    relay.terminate().await;

    let fresh = dir.path().join("fresh");
    let restore = || {
        run_code(&[
            "restore",
            "--from",
            backup.to_str().unwrap(),
            "--data",
            fresh.to_str().unwrap(),
        ])
    };
    let (code, text) = restore();
    assert_eq!(code, 0, "{text}");
    // Taken from a live relay: like a crash at that moment, recovered at
    // the next start. Intact.
    let (code, text) = run_code(&["doctor", "--data", fresh.to_str().unwrap()]);
    assert!(text.contains("quick_check: ok"), "{text}");
    assert!(text.contains("previous shutdown: UNCLEAN"), "{text}");
    assert_eq!(code, 1, "{text}");
    // Restore refuses beside a live relay.
    let restored = RelayProcess::start(&fresh, Opts::default()).await;
    let (code, text) = restore();
    assert_ne!(code, 0, "restore beside a live relay: {text}");
    assert!(text.contains("in use") || text.contains("pid"), "{text}");

    let mut reader = client(&restored.url()).await;
    reader.subscribe("log", Some(1)).await.unwrap();
    let want: HashMap<u64, u64> = before.iter().copied().collect();
    let top = *want.keys().max().unwrap();
    let mut got: HashMap<u64, u64> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while got.len() < top as usize {
        let Ok(Some(event)) = tokio::time::timeout_at(deadline, reader.next_event()).await else {
            break;
        };
        if let Event::Deliver {
            channel,
            offset,
            id,
            payload,
            ..
        } = event
            && channel == "log"
        {
            let i = payload["i"].as_u64().expect("payload i");
            assert_eq!(id, format!("m{i}"), "offset {offset}");
            assert_eq!(payload["pad"].as_str().map(str::len), Some(300));
            got.insert(offset, i);
        }
    }
    let missing: Vec<u64> = want
        .iter()
        .filter(|(o, i)| got.get(o) != Some(i))
        .map(|(o, _)| *o)
        .take(10)
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged before the backup, missing or different after restore, first: {missing:?}",
        want.len()
    );
    reader.close().await;
    restored.terminate().await;
    let (code, text) = run_code(&["doctor", "--data", fresh.to_str().unwrap()]);
    assert_eq!(code, 0, "recovered and shut down cleanly: {text}");
}
