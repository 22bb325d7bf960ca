//! The spool directory: bursts handled exactly once, stale claims re-queued,
//! malformed jobs set aside.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::*;

fn count(dir: &Path, suffix: &str) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(suffix)
        })
        .count()
}

async fn wait_results(dir: &Path, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while count(dir, ".result.json") < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn spooling_relay(data: &Path, spool: &Path) -> RelayProcess {
    RelayProcess::start(
        data,
        Opts {
            spool: Some(spool.to_path_buf()),
            ..Default::default()
        },
    )
    .await
}

fn write_job(dir: &Path, name: &str, job: serde_json::Value) {
    // Written under another name and renamed, as a producer should.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, job.to_string()).unwrap();
    std::fs::rename(&tmp, dir.join(format!("{name}.job.json"))).unwrap();
}

#[tokio::test]
async fn spool_burst_50_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let relay = RelayProcess::start(
        &dir.path().join("data"),
        Opts {
            spool: Some(spool.clone()),
            ..Default::default()
        },
    )
    .await;
    let mut reader = client(&relay.url()).await;
    reader.subscribe("jobs", Some(1)).await.unwrap();

    let started = Instant::now();
    let mut written_at = Vec::new();
    for i in 0..50 {
        written_at.push(std::time::SystemTime::now());
        write_job(
            &spool,
            &format!("job-{i:02}"),
            json!({"type": "publish", "job_id": format!("job-{i:02}"), "channel": "jobs", "payload": {"n": i}}),
        );
    }
    wait_results(&spool, 50).await;
    let took = started.elapsed();
    let mut latencies: Vec<Duration> = (0..50)
        .map(|i| {
            let done = std::fs::metadata(spool.join(format!("job-{i:02}.result.json")))
                .and_then(|m| m.modified())
                .unwrap();
            done.duration_since(written_at[i]).unwrap_or_default()
        })
        .collect();
    latencies.sort();
    println!(
        "50 spool jobs answered in {took:?}; job latency p50 {:?}, p95 {:?} (seed threshold: p95 < 500 ms)",
        latencies[25], latencies[47]
    );
    assert_eq!(count(&spool, ".result.json"), 50);
    assert_eq!(count(&spool, ".claimed"), 0, "no stale claims");
    assert_eq!(count(&spool, ".job.json"), 0);
    for i in 0..50 {
        let r: serde_json::Value = serde_json::from_slice(
            &std::fs::read(spool.join(format!("job-{i:02}.result.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(r["status"], "ok", "{r}");
        assert_eq!(r["duplicate"], false);
    }
    let got = collect(&mut reader, "jobs", 50, Duration::from_secs(10)).await;
    assert_complete_in_order(&got, 50);
    let mut ids: Vec<String> = got.into_iter().map(|(_, id)| id).collect();
    ids.sort();
    let expected: Vec<String> = (0..50).map(|i| format!("spool-job-{i:02}")).collect();
    assert_eq!(ids, expected, "each job once");
}

#[tokio::test]
async fn spool_stale_claim_requeued() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let data = dir.path().join("data");

    // A first run handles a job, then "crashes" with the same job claimed
    // again (as if killed between its append and its result) and another
    // claimed before it started.
    let relay = spooling_relay(&data, &spool).await;
    write_job(
        &spool,
        "done-once",
        json!({"type": "publish", "channel": "j", "payload": 1}),
    );
    wait_results(&spool, 1).await;
    relay.kill9().await;
    std::fs::remove_file(spool.join("done-once.result.json")).unwrap();
    std::fs::write(
        spool.join("done-once.claimed"),
        json!({"type": "publish", "channel": "j", "payload": 1}).to_string(),
    )
    .unwrap();
    std::fs::write(
        spool.join("never-started.claimed"),
        json!({"type": "publish", "channel": "j", "payload": 2}).to_string(),
    )
    .unwrap();
    write_job(&spool, "broken", json!("not a job"));
    std::fs::write(spool.join("garbage.job.json"), b"{{{").unwrap();

    let relay = spooling_relay(&data, &spool).await;
    wait_results(&spool, 2).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        count(&spool, ".claimed"),
        0,
        "stale claims re-queued and handled"
    );
    let redone: serde_json::Value =
        serde_json::from_slice(&std::fs::read(spool.join("done-once.result.json")).unwrap())
            .unwrap();
    assert_eq!(
        redone["duplicate"], true,
        "handled before the crash: not appended twice"
    );
    assert_eq!(redone["offset"], 1);
    let fresh: serde_json::Value =
        serde_json::from_slice(&std::fs::read(spool.join("never-started.result.json")).unwrap())
            .unwrap();
    assert_eq!(
        (fresh["duplicate"].as_bool(), fresh["offset"].as_u64()),
        (Some(false), Some(2))
    );
    // Malformed jobs are set aside with a reason.
    let failed = spool.join("failed");
    for name in ["broken", "garbage"] {
        assert!(
            failed.join(format!("{name}.job.json")).exists(),
            "{name} moved"
        );
        let reason = std::fs::read_to_string(failed.join(format!("{name}.reason.txt"))).unwrap();
        assert!(reason.contains("not a valid job"), "{reason}");
    }
    let mut reader = client(&relay.url()).await;
    reader.subscribe("j", Some(1)).await.unwrap();
    let got = collect(&mut reader, "j", 3, Duration::from_secs(2)).await;
    assert_eq!(got.len(), 2, "two jobs, two messages: {got:?}");
}

/// Whoever can write to the spool cannot make the relay write through a
/// symlink, stall on a FIFO, or take a job larger than a client could send;
/// ordinary jobs keep flowing meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_symlink_fifo_and_size_refused() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let failed = spool.join("failed");
    std::fs::create_dir_all(&failed).unwrap();
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let victim = |name: &str| {
        let p = outside.join(name);
        std::fs::write(&p, "untouched").unwrap();
        p
    };
    // A job that is a symlink to a file elsewhere (readable, valid JSON).
    let target = outside.join("target.json");
    std::fs::write(
        &target,
        json!({"type": "publish", "channel": "room", "payload": 1}).to_string(),
    )
    .unwrap();
    symlink(&target, spool.join("linked.job.json")).unwrap();
    // Links planted where the relay writes its own files.
    let (v1, v2) = (victim("v1"), victim("v2"));
    symlink(&v1, spool.join(".ok.result.tmp")).unwrap();
    symlink(&v2, failed.join("big.reason.txt")).unwrap();
    // A FIFO job, and one larger than a client's frame.
    nix::unistd::mkfifo(&spool.join("pipe.job.json"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let big = json!({"type": "publish", "channel": "room", "payload": "x".repeat(2 << 20)});
    write_job(&spool, "big", big);

    let relay = spooling_relay(&dir.path().join("data"), &spool).await;
    write_job(
        &spool,
        "ok",
        json!({"type": "publish", "channel": "room", "payload": {"n": 1}}),
    );
    wait_results(&spool, 1).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&failed, ".reason.txt") < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reason =
        |stem: &str| std::fs::read_to_string(failed.join(format!("{stem}.reason.txt"))).unwrap();
    assert!(
        reason("linked").contains("symlinks are not followed"),
        "{}",
        reason("linked")
    );
    assert!(
        reason("pipe").contains("not a regular file"),
        "{}",
        reason("pipe")
    );
    assert!(reason("big").contains("too large"), "{}", reason("big"));
    assert!(
        spool.join("ok.result.json").exists(),
        "the ordinary job was answered"
    );
    for v in [&v1, &v2] {
        assert_eq!(
            std::fs::read_to_string(v).unwrap(),
            "untouched",
            "{}",
            v.display()
        );
    }
    assert!(
        !std::fs::symlink_metadata(failed.join("big.reason.txt"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    // The relay still answers.
    let health = http_get(&format!("http://{}/healthz", relay.addr)).await;
    assert!(health.contains("200 OK"), "{health}");
}
