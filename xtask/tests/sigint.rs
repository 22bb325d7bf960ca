//! Ctrl-C in the middle of `cargo xtask load` leaves nothing behind: the
//! relay process it started is gone and its temporary data directory
//! removed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The debug relay binary, built if needed (a no-op inside `cargo test
/// --workspace`, which has built it already).
fn relay() -> PathBuf {
    let xtask = PathBuf::from(env!("CARGO_BIN_EXE_xtask"));
    let dir = xtask.parent().expect("target dir").to_path_buf();
    let relay = dir.join("keel-relay");
    if !relay.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "keel-relay", "--bin", "keel-relay"])
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap())
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cannot build keel-relay");
    }
    relay
}

/// The children of `pid` (from /proc), with their command lines.
fn children(pid: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // Field 4, after the command in parentheses.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let ppid: u32 = rest
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if ppid == pid {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            out.push((p, String::from_utf8_lossy(&cmd).replace('\0', " ")));
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    // A zombie is dead for our purpose: it holds nothing.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

#[test]
fn sigint_mid_run_leaves_no_process_and_no_data_dir() {
    let relay = relay();
    let report = tempfile::tempdir().unwrap();
    let mut xtask = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args([
            "load",
            "--scenario",
            "sustained_load",
            "--scale",
            "small",
            "--seed",
            "1",
        ])
        .arg("--relay-bin")
        .arg(&relay)
        .arg("--report")
        .arg(report.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = xtask.id();
    // Wait until it runs its relays (sustained_load starts two), mid-run.
    let deadline = Instant::now() + Duration::from_secs(60);
    let relays = loop {
        let found: Vec<(u32, String)> = children(pid)
            .into_iter()
            .filter(|(_, c)| c.contains(" serve "))
            .collect();
        if found.len() >= 2 {
            break found;
        }
        assert!(Instant::now() < deadline, "xtask never started its relays");
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_millis(500));
    let data_dirs: Vec<PathBuf> = relays
        .iter()
        .filter_map(|(_, cmd)| {
            cmd.split_whitespace()
                .skip_while(|a| *a != "--data")
                .nth(1)
                .map(PathBuf::from)
        })
        .collect();
    assert_eq!(data_dirs.len(), 2, "{relays:?}");
    assert!(data_dirs.iter().all(|d| d.exists()));

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = xtask.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "xtask did not stop within 30 s of SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(130), "interrupted runs exit 130");
    for (p, cmd) in &relays {
        assert!(!alive(*p), "relay {p} survived: {cmd}");
    }
    for d in &data_dirs {
        // The data dir lives inside the fixture's temporary directory.
        assert!(
            !d.parent().unwrap().exists(),
            "{} was left behind",
            d.display()
        );
    }
}
