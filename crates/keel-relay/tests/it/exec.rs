//! Supervised exec sessions: stdin from the session, output to it, death notified.

use std::time::{Duration, Instant};

use keel_relay::client::{Client, Event};
use serde_json::{Value, json};

use crate::support::*;

/// The next payload in `channel` whose type is `kind`.
async fn next_of(client: &mut Client, channel: &str, kind: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let e = tokio::time::timeout_at(deadline, client.next_event())
            .await
            .unwrap_or_else(|_| panic!("no {kind} within 10 s"))
            .unwrap();
        if let Event::Deliver {
            channel: c,
            payload,
            ..
        } = e
            && c == channel
            && payload["type"] == kind
        {
            return payload;
        }
    }
}

const CONFIG: &str = r#"
[exec]
enabled = true
[[exec.allow]]
name = "echo"
program = "sh"
args = ["-c", "while read l; do echo \"got $l\"; done"]
"#;

#[tokio::test]
async fn exec_child_kill_notifies() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let relay = RelayProcess::start(
        &data,
        Opts {
            config: Some(CONFIG.into()),
            ..Default::default()
        },
    )
    .await;
    let mut c = client(&relay.url()).await;
    let session = c.session_id().unwrap();
    let private = format!("session:{session}");

    let mut raw_exec = RawWs::connect(&relay.url()).await;
    raw_exec.send(json!({"type": "hello"})).await;
    raw_exec.next_json().await;
    raw_exec
        .send(json!({"type": "exec", "command": "rm -rf /"}))
        .await;
    let e = raw_exec.next_json().await;
    assert_eq!(e["code"], "forbidden", "not in the allow-list: {e}");

    c.exec("echo").await.unwrap();
    let started = next_of(&mut c, &private, "exec_started").await;
    let pid = started["pid"].as_i64().unwrap() as i32;

    // What the session publishes to its own channel reaches the child's stdin.
    c.publish(&private, "cmd-1", &json!({"do": "work"}))
        .await
        .unwrap();
    let out = next_of(&mut c, &private, "exec_output").await;
    assert_eq!(out["line"], r#"got {"do":"work"}"#);
    assert_eq!(out["stream"], "stdout");

    // Killed from outside, mid-command.
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let notice = next_of(&mut c, &private, "child_exited").await;
    println!("kill to notice at the client: {:?}", killed.elapsed());
    assert_eq!(notice["signal"], 9);
    assert_eq!(notice["crash_count"], 1);
    c.close().await;

    // The session was marked CRASHED (then DETACHED when its client left).
    let (code, _) = relay.terminate().await;
    assert_eq!(code, Some(0));
    let store = keel_session::Store::open(&data.join("keel.db"), Default::default())
        .await
        .unwrap();
    let s = store
        .session(&keel_session::SessionId::from(session.as_str()))
        .await
        .unwrap();
    assert_eq!(s.crash_count, 1);
    store.close().await.unwrap();
}
