//! What the relay's log looks like where operators keep it: a file.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// Starts `keel-relay serve` with its stderr in a file, stops it with
/// SIGTERM, and returns the file's bytes.
async fn log_of(extra: &[&str]) -> Vec<u8> {
    log_under(&[], extra).await
}

/// [`log_of`] with the relay started through `wrapper` (a command that
/// execs its arguments, e.g. `prlimit --nofile=…`).
async fn log_under(wrapper: &[&str], extra: &[&str]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("relay.log");
    let relay = env!("CARGO_BIN_EXE_keel-relay");
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(relay);
            c
        }
        None => Command::new(relay),
    };
    let mut child = command
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path().join("data"))
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), stdout.next_line())
        .await
        .expect("started within 30 s")
        .unwrap()
        .unwrap();
    assert!(first.starts_with("keel-relay listening on "), "{first}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("stopped within 30 s")
        .unwrap();
    assert!(status.success(), "{status}");
    std::fs::read(&log).unwrap()
}

/// Written to a file with no format asked for, the log is plain text: not
/// one escape byte. With `--log-format human` the colour is asked for.
#[tokio::test]
async fn a_log_in_a_file_has_no_colour_codes() {
    let plain = log_of(&[]).await;
    let text = String::from_utf8_lossy(&plain);
    assert!(text.contains("shutting down"), "{text}");
    assert!(!plain.contains(&0x1b), "escape codes in a file: {text}");
    let human = log_of(&["--log-format", "human"]).await;
    assert!(
        human.contains(&0x1b),
        "the planted check: human format asked for, colour expected"
    );
}

/// `--log-format json`: one JSON object a line, with its level and message.
#[tokio::test]
async fn json_logs_are_one_object_a_line() {
    let log = log_of(&["--log-format", "json"]).await;
    let text = String::from_utf8(log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(!lines.is_empty());
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
    assert!(text.contains("shutting down"), "{text}");
}

/// Started with a soft open-file limit of 1,024 (util-linux's `prlimit`),
/// the relay raises it to
/// the hard limit and logs both; asked for more connections than the
/// limit leaves room for, it says so.
#[tokio::test]
async fn the_open_file_limit_is_raised_and_logged() {
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    // 1,024 as most distributions start a process, or less where the hard
    // limit is that low: always something to raise.
    let low = 1024.min(hard / 2);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    let want = hard.min(1 << 20);
    std::fs::write(
        &config,
        format!("[limits]\nmax_connections = {}\n", want + 1),
    )
    .unwrap();
    let nofile = format!("--nofile={low}:{hard}");
    let log = log_under(
        &["prlimit", &nofile, "--"],
        &["--config", config.to_str().unwrap()],
    )
    .await;
    let text = String::from_utf8_lossy(&log);
    assert!(
        text.contains(&format!("open_files={want} was={low} hard={hard}")),
        "{text}"
    );
    assert!(
        text.contains("max_connections is above what the open-file limit leaves room for"),
        "{text}"
    );
}
