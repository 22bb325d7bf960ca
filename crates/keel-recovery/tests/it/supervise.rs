//! Supervised children: real processes, real signals, real process groups.

use std::time::{Duration, Instant};

use keel_recovery::procfs::group_members;
use keel_recovery::{
    CommandSpec, ExitCause, StartOptions, Stream, Supervisor, SupervisorConfig,
    crash_session_on_exit, start,
};
use keel_session::{Config, NewSession, SessionId, SessionState, Store};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::{RoleChild, eventually};

fn supervisor() -> Supervisor {
    Supervisor::new(SupervisorConfig {
        exec_helper: Some(env!("CARGO_BIN_EXE_keel-exec").into()),
        grace: Duration::from_millis(500),
        ..Default::default()
    })
    .unwrap()
}

fn sh(script: &str) -> CommandSpec {
    CommandSpec::new("sh", ["-c", script])
}

async fn group_gone(pgid: u32) -> bool {
    eventually(Duration::from_secs(5), || async {
        group_members(pgid).is_empty().then_some(())
    })
    .await
    .is_some()
}

#[tokio::test]
async fn process_kill_during_command() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("keel.db"), Config::default())
        .await
        .unwrap();
    let session = store
        .create_session(NewSession::default())
        .await
        .unwrap()
        .id;
    store
        .transition(&session, SessionState::Active)
        .await
        .unwrap();

    let sup = supervisor();
    let mut child = sup
        .spawn(sh(
            "while read cmd; do echo \"working on $cmd\"; sleep 30; done",
        ))
        .await
        .unwrap();
    let watcher = {
        let (store, session, exit) = (store.clone(), session.clone(), child.exit_watch());
        tokio::spawn(async move { crash_session_on_exit(&store, &session, exit).await })
    };
    child.write_line("job-1").await.unwrap();
    assert_eq!(child.next_line().await.unwrap().text, "working on job-1");

    // Mid-command, from outside the supervisor.
    let killed_at = Instant::now();
    kill(Pid::from_raw(child.pid() as i32), Signal::SIGKILL).unwrap();
    let channel = session.private_channel();
    let notice = eventually(Duration::from_secs(5), || async {
        store.read_channel(&channel, 1, 10).await.unwrap().pop()
    })
    .await
    .expect("a notice");
    let took = killed_at.elapsed();
    println!("kill to CRASHED + notice: {took:?}");
    assert!(took < Duration::from_millis(100), "took {took:?}");

    let s = store.session(&session).await.unwrap();
    assert_eq!(s.state, SessionState::Crashed);
    assert_eq!(s.crash_count, 1);
    let body: serde_json::Value = serde_json::from_slice(&notice.payload).unwrap();
    assert_eq!(body["type"], "child_exited");
    assert_eq!(body["signal"], 9);
    assert_eq!(body["cause"], "exited");
    let ended = watcher.await.unwrap().unwrap();
    assert!(ended.crashed);
    assert_eq!(ended.notice, Some(notice.offset));
    assert!(group_gone(child.pid()).await);
}

#[tokio::test]
async fn no_orphans_after_supervisor_kill() {
    let dir = tempfile::tempdir().unwrap();
    let mut role = RoleChild::spawn("supervisor", dir.path());
    let said = role.expect_line().await;
    let pgid: u32 = said.strip_prefix("pgid ").unwrap().parse().unwrap();
    let members = group_members(pgid);
    assert!(members.len() >= 3, "sh and two sleeps: {members:?}");
    let registry = StartOptions::new(dir.path()).registry_dir();
    assert_eq!(
        std::fs::read_dir(&registry).unwrap().count(),
        1,
        "group recorded"
    );

    role.kill9().await;
    // The parent-death signal takes the direct child at once ...
    let leader_gone = eventually(Duration::from_secs(5), || async {
        keel_recovery::procfs::stat(pgid)
            .is_none_or(|s| s.state == 'Z')
            .then_some(())
    })
    .await;
    assert!(leader_gone.is_some(), "the child died with its supervisor");
    let survivors = group_members(pgid).len();
    println!("grandchildren alive after the supervisor's death: {survivors}");

    // ... and the next start kills what it left in the group.
    let started = start(StartOptions::new(dir.path())).await.unwrap();
    if survivors > 0 {
        assert_eq!(started.report.reaped_groups.len(), 1);
        assert_eq!(started.report.reaped_groups[0].pgid, pgid);
        assert_eq!(started.report.reaped_groups[0].program, "sh");
    }
    assert!(
        group_members(pgid).is_empty(),
        "no process of the group is alive"
    );
    assert_eq!(std::fs::read_dir(&registry).unwrap().count(), 0);
}

#[tokio::test]
async fn command_timeout_cancels() {
    let sup = supervisor();
    let child = sup
        .spawn(sh("sleep 30 & sleep 30; echo never").timeout(Duration::from_millis(200)))
        .await
        .unwrap();
    let pgid = child.pid();
    let exit = child.wait().await;
    assert_eq!(exit.cause, ExitCause::TimedOut);
    assert_eq!(exit.signal, Some(Signal::SIGTERM as i32));
    assert!(exit.ran >= Duration::from_millis(200));
    assert!(group_gone(pgid).await, "the background sleep went too");
    assert!(sup.live_groups().is_empty());

    // A child that ignores TERM is killed after the grace period.
    let stubborn = sup
        .spawn(sh("trap '' TERM; echo armed; sleep 30").timeout(Duration::from_millis(100)))
        .await
        .unwrap();
    let exit = stubborn.wait().await;
    assert_eq!(exit.cause, ExitCause::TimedOut);
    assert_eq!(exit.signal, Some(Signal::SIGKILL as i32));
    assert!(exit.ran >= Duration::from_millis(600), "{:?}", exit.ran);
    assert!(group_gone(stubborn.pid()).await);
}

#[tokio::test]
async fn stdin_and_both_output_streams_as_lines() {
    let sup = supervisor();
    let mut child = sup
        .spawn(sh(
            "while read l; do echo \"out:$l\"; echo \"err:$l\" >&2; done; printf 'no newline'",
        ))
        .await
        .unwrap();
    child.write_line("a").await.unwrap();
    let mut got = [
        child.next_line().await.unwrap(),
        child.next_line().await.unwrap(),
    ];
    got.sort_by_key(|l| l.text.clone());
    assert_eq!(
        (got[0].stream, got[0].text.as_str()),
        (Stream::Stderr, "err:a")
    );
    assert_eq!(
        (got[1].stream, got[1].text.as_str()),
        (Stream::Stdout, "out:a")
    );
    drop(child.take_stdin());
    let last = child.next_line().await.unwrap();
    assert_eq!(last.text, "no newline");
    assert!(child.next_line().await.is_none(), "both streams closed");
    assert!(child.wait().await.success());
}

#[tokio::test]
async fn long_lines_are_cut_not_buffered_whole() {
    let sup = Supervisor::new(SupervisorConfig {
        max_line: 1000,
        ..Default::default()
    })
    .unwrap();
    let mut child = sup
        .spawn(sh(
            "head -c 100000 /dev/zero | tr '\\0' x; echo; echo short",
        ))
        .await
        .unwrap();
    let long = child.next_line().await.unwrap();
    assert!(long.truncated);
    assert_eq!(long.text.len(), 1000);
    let short = child.next_line().await.unwrap();
    assert_eq!((short.text.as_str(), short.truncated), ("short", false));
}

#[tokio::test]
async fn terminate_shutdown_and_drop_reach_the_whole_group() {
    let sup = supervisor();
    let a = sup.spawn(sh("sleep 30 & sleep 30 & wait")).await.unwrap();
    let b = sup.spawn(sh("sleep 30 & wait")).await.unwrap();
    let c = sup.spawn(sh("sleep 30 & wait")).await.unwrap();
    let (pa, pb, pc) = (a.pid(), b.pid(), c.pid());
    assert_eq!(sup.live_groups().len(), 3);

    let exit = a.terminate().await;
    assert_eq!(exit.cause, ExitCause::Terminated);
    assert!(group_gone(pa).await);

    let exit_c = c.exit_watch();
    drop(c);
    let exit = keel_recovery::supervise::wait_exit(exit_c).await;
    assert_eq!(exit.cause, ExitCause::Terminated);
    assert!(group_gone(pc).await);

    sup.shutdown().await;
    assert_eq!(b.try_exit().unwrap().cause, ExitCause::Terminated);
    assert!(group_gone(pb).await);
    assert!(sup.live_groups().is_empty());
}

#[tokio::test]
async fn a_program_that_cannot_run_is_an_error_or_exit_127() {
    let plain = Supervisor::new(SupervisorConfig::default()).unwrap();
    let err = plain
        .spawn(CommandSpec::new(
            "/nonexistent/keel-test",
            Vec::<&str>::new(),
        ))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/keel-test"), "{err}");
    // Through the helper the exec fails after the fork: exit code 127.
    let helped = supervisor();
    let child = helped
        .spawn(CommandSpec::new(
            "/nonexistent/keel-test",
            Vec::<&str>::new(),
        ))
        .await
        .unwrap();
    assert_eq!(child.wait().await.code, Some(127));
}

#[tokio::test]
async fn a_clean_child_exit_notifies_without_crashing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("keel.db"), Config::default())
        .await
        .unwrap();
    let session = SessionId::from("s");
    store
        .create_session(NewSession {
            id: Some(session.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    store
        .transition(&session, SessionState::Active)
        .await
        .unwrap();
    let child = supervisor().spawn(sh("exit 0")).await.unwrap();
    let ended = crash_session_on_exit(&store, &session, child.exit_watch())
        .await
        .unwrap();
    assert!(!ended.crashed);
    assert_eq!(
        store.session(&session).await.unwrap().state,
        SessionState::Active
    );
    let log = store
        .read_channel(&session.private_channel(), 1, 10)
        .await
        .unwrap();
    assert_eq!(log.len(), 1);
}
