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

/// Reads raw frames until one whose payload (in a `deliver`) has `kind`;
/// returns that payload. Error frames are returned as they are.
async fn raw_next_of(ws: &mut RawWs, kind: &str) -> Value {
    loop {
        let f = ws.next_json().await;
        if f["type"] == "error" {
            return f;
        }
        if f["type"] == "deliver" && f["payload"]["type"] == kind {
            return f["payload"].clone();
        }
    }
}

/// A raw session; returns it and its private channel.
async fn raw_session(url: &str) -> (RawWs, String) {
    let mut ws = RawWs::connect(url).await;
    ws.send(json!({"type": "hello"})).await;
    let w = ws.next_json().await;
    let private = format!("session:{}", w["session_id"].as_str().unwrap());
    (ws, private)
}

fn alive(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// A child sees none of the relay's environment but `pass_env`; at most
/// `max_children` run at once; a child whose session left is terminated
/// after the grace, which frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_env_cleared_and_capped() {
    let dir = tempfile::tempdir().unwrap();
    let config = r#"
[exec]
enabled = true
max_children = 2
detach_grace_ms = 300
[[exec.allow]]
name = "env"
program = "sh"
args = ["-c", "env; echo END-OF-ENV"]
[[exec.allow]]
name = "wait"
program = "sh"
args = ["-c", "while read l; do :; done"]
"#;
    let relay = RelayProcess::start(
        &dir.path().join("data"),
        Opts {
            config: Some(config.into()),
            env: vec![("KEEL_TEST_SECRET", "hunter2")],
            ..Default::default()
        },
    )
    .await;
    let url = relay.url();

    let (mut a, _) = raw_session(&url).await;
    a.send(json!({"type": "exec", "command": "env"})).await;
    let mut lines = Vec::new();
    loop {
        let f = a.next_json().await;
        if f["payload"]["type"] == "exec_output" {
            let line = f["payload"]["line"].as_str().unwrap().to_owned();
            if line == "END-OF-ENV" {
                break;
            }
            lines.push(line);
        }
    }
    assert!(lines.iter().any(|l| l.starts_with("PATH=")), "{lines:?}");
    assert!(
        !lines.iter().any(|l| l.contains("KEEL_TEST_SECRET")),
        "the relay's environment leaked: {lines:?}"
    );

    let (mut b, _) = raw_session(&url).await;
    b.send(json!({"type": "exec", "command": "wait"})).await;
    let b_pid = raw_next_of(&mut b, "exec_started").await["pid"]
        .as_i64()
        .unwrap() as i32;
    let (mut c, _) = raw_session(&url).await;
    c.send(json!({"type": "exec", "command": "wait"})).await;
    assert_eq!(
        raw_next_of(&mut c, "exec_started").await["type"],
        "exec_started"
    );
    let (mut d, _) = raw_session(&url).await;
    d.send(json!({"type": "exec", "command": "wait"})).await;
    let refused = raw_next_of(&mut d, "exec_started").await;
    assert_eq!(refused["code"], "limit_exceeded", "{refused}");

    // B leaves: its child ends after the grace, and its place is free.
    drop(b);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while alive(b_pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "child {b_pid} outlived its session"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        d.send(json!({"type": "exec", "command": "wait"})).await;
        let f = raw_next_of(&mut d, "exec_started").await;
        if f["type"] == "exec_started" {
            break;
        }
        assert_eq!(f["code"], "limit_exceeded", "{f}");
        assert!(
            std::time::Instant::now() < deadline,
            "B's place never freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Each payload reaches the child as exactly one line, re-serialised: a
/// payload written over several lines cannot inject a second record.
#[tokio::test]
async fn exec_stdin_one_line_per_payload() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(
        &dir.path().join("data"),
        Opts {
            config: Some(CONFIG.into()),
            ..Default::default()
        },
    )
    .await;
    let (mut ws, private) = raw_session(&relay.url()).await;
    ws.send(json!({"type": "exec", "command": "echo"})).await;
    raw_next_of(&mut ws, "exec_started").await;
    let frame = format!(
        "{{\"type\":\"publish\",\"channel\":\"{private}\",\"id\":\"p1\",\"payload\":{{\n\"cmd\": \"a\",\n\"type\": \"injected\"\n}}}}"
    );
    ws.send_text(frame).await;
    let out = raw_next_of(&mut ws, "exec_output").await;
    assert_eq!(out["line"], r#"got {"cmd":"a","type":"injected"}"#);
    // Nothing else came out of that one payload.
    ws.send(json!({"type": "publish", "channel": private, "id": "p2", "payload": "next"}))
        .await;
    let next = raw_next_of(&mut ws, "exec_output").await;
    assert_eq!(next["line"], r#"got "next""#);
}
