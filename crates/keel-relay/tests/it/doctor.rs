//! `keel-relay doctor` and `redrive` on a real data directory.

use keel_faults::{MockUpstream, UpstreamConfig, UpstreamMode};
use serde_json::json;

use crate::support::*;

/// Runs `keel-relay ARGS`: its exit code and its output (stdout, stderr).
pub(crate) fn run_code(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keel-relay"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().expect("exited, not signalled"), text)
}

fn run(args: &[&str]) -> (bool, String) {
    let (code, text) = run_code(args);
    (code == 0, text)
}

/// Exit 2 when there is nothing to inspect: no directory, or a directory
/// no relay has run on; never 0 with "does not exist yet".
#[test]
fn doctor_exits_2_when_it_cannot_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nonexistent");
    let (code, text) = run_code(&["doctor", "--data", missing.to_str().unwrap()]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("cannot inspect") && text.contains("not a directory"),
        "{text}"
    );
    let (code, text) = run_code(&["doctor", "--data", dir.path().to_str().unwrap()]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("keel.db does not exist"), "{text}");
    let (code, text) = run_code(&["doctor", "--postgres", "postgres://nobody@127.0.0.1:1/none"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("cannot open the PostgreSQL store"), "{text}");
}

#[tokio::test]
async fn doctor_lists_dead_sends_and_redrive_requeues_them() {
    let up = MockUpstream::start(UpstreamConfig::default())
        .await
        .unwrap();
    up.set_mode(UpstreamMode::Garbage);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let relay = RelayProcess::start(
        &data,
        Opts {
            upstream: Some(up.url()),
            config: Some("[sending]\nmax_attempts = 1\nanswer_timeout_ms = 300\n".into()),
            ..Default::default()
        },
    )
    .await;
    let mut c = client(&relay.url()).await;
    c.send("doomed-1", "bob", &json!("hello")).await.unwrap();
    assert_eq!(send_result(&mut c).await, "DEAD");
    let data_arg = data.to_str().unwrap();
    let (code, text) = run_code(&["doctor", "--data", data_arg]);
    assert_eq!(
        code, 2,
        "refused while the relay holds the directory: {text}"
    );
    assert!(text.contains(&format!("pid {}", relay.pid())), "{text}");
    c.close().await;
    relay.terminate().await;

    // Files left readable by others are named, and narrowed.
    {
        use std::os::unix::fs::PermissionsExt;
        let loose = std::fs::Permissions::from_mode(0o644);
        std::fs::set_permissions(data.join("keel.db"), loose).unwrap();
    }
    let (code, text) = run_code(&["doctor", "--data", data_arg]);
    assert_eq!(code, 1, "findings: {text}");
    assert!(
        text.contains("permissions: WARNING") && text.contains("keel.db (644)"),
        "{text}"
    );
    assert!(text.contains("findings: files others could read"), "{text}");
    let (code, text) = run_code(&["doctor", "--data", data_arg]);
    assert_eq!(code, 1, "the DEAD send is still a finding: {text}");
    assert!(text.contains("findings: 1 DEAD sends"), "{text}");
    assert!(text.contains("permissions: owner only"), "{text}");
    assert!(text.contains("quick_check: ok"), "{text}");
    assert!(text.contains("previous shutdown: clean"), "{text}");
    assert!(text.contains("dead 1"), "{text}");
    assert!(text.contains("key=doomed-1"), "{text}");
    assert!(text.contains("quarantined files: none"), "{text}");
    // The session's private channel holds the send result: sizes are listed.
    assert!(text.contains("channels with messages: 1"), "{text}");
    assert!(
        text.contains("1 messages, oldest offset 1, newest 1"),
        "{text}"
    );
    assert!(
        text.contains("health log:") && text.contains("chain valid"),
        "{text}"
    );

    let (ok, text) = run(&["redrive", "--data", data_arg]);
    assert!(ok && text.contains("re-queued 1"), "{text}");
    let (code, text) = run_code(&["doctor", "--data", data_arg]);
    assert_eq!(code, 0, "healthy once re-queued: {text}");
    assert!(!text.contains("findings:"), "{text}");
    assert!(
        text.contains("pending 1") && text.contains("dead 0"),
        "{text}"
    );
    assert!(
        text.contains("previous shutdown: clean"),
        "doctor left the flag alone: {text}"
    );
}
