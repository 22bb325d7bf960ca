//! Process faults on real child processes.

use std::process::{Command, Stdio};
use std::time::Duration;

use keel_faults::process::{self, Fault, Schedule, Terminated};

fn state(pid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit_once(')')
        .unwrap()
        .1
        .trim_start()
        .chars()
        .next()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_and_kill_a_child() {
    let mut child = Command::new("sleep").arg("30").spawn().unwrap();
    let pid = child.id();
    process::pause(pid).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(state(pid), 'T', "stopped");
    process::resume(pid).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(state(pid), 'S', "running (sleeping) again");
    process::apply_after(pid, Duration::from_millis(20), Fault::Kill)
        .await
        .unwrap();
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9));
    assert_eq!(process::kill9(pid), Err(process::ProcessError::Gone(pid)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_is_graceful_or_kills() {
    let mut polite = Command::new("sleep").arg("30").spawn().unwrap();
    let pid = polite.id();
    let how = process::terminate(pid, Duration::from_secs(2), || {
        polite.try_wait().unwrap().is_some()
    })
    .await
    .unwrap();
    assert_eq!(how, Terminated::Gracefully);

    let mut stubborn = Command::new("sh")
        .args(["-c", "trap '' TERM; echo ready; sleep 30 & wait"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(stubborn.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let pid = stubborn.id();
    let how = process::terminate(pid, Duration::from_millis(300), || {
        stubborn.try_wait().unwrap().is_some()
    })
    .await
    .unwrap();
    assert_eq!(how, Terminated::Killed);
    assert!(stubborn.wait().is_ok());
}

#[test]
fn schedules_repeat_with_the_seed() {
    let draw = |seed| {
        let mut s = Schedule::seeded(seed);
        (0..20)
            .map(|_| s.next_delay(Duration::from_millis(10), Duration::from_secs(3)))
            .collect::<Vec<_>>()
    };
    assert_eq!(draw(5), draw(5));
    assert_ne!(draw(5), draw(6));
}
