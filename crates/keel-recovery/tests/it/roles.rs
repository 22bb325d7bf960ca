//! The roles a child process of this test binary can play. The entry point is
//! an ordinary test that does nothing unless `KEEL_RECOVERY_ROLE` is set.

use std::path::PathBuf;
use std::time::Duration;

use keel_recovery::{CommandSpec, StartOptions, Supervisor, SupervisorConfig, start};
use keel_session::{NewSession, SessionId, SessionState};

use crate::support::{DATA, PREFIX, ROLE};

#[test]
fn child_role() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let data = PathBuf::from(std::env::var(DATA).expect("data dir"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        match role.as_str() {
            "daemon" => daemon(data, false).await,
            "clean" => daemon(data, true).await,
            "supervisor" => supervisor(data).await,
            other => panic!("unknown role {other}"),
        }
    });
    std::process::exit(0);
}

fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{PREFIX}{line}").unwrap();
    out.flush().unwrap();
}

/// Starts, creates three ACTIVE sessions `live-0..2`, says `ready`, then
/// either shuts down gracefully (`clean`) or waits to be killed.
async fn daemon(data: PathBuf, clean: bool) {
    let started = match start(StartOptions::new(&data)).await {
        Ok(s) => s,
        Err(e) => {
            say(&format!("refused {e}"));
            return;
        }
    };
    started.health.ready("role daemon serving").await.unwrap();
    for i in 0..3 {
        let id = SessionId(format!("live-{i}"));
        started
            .store
            .create_session(NewSession {
                id: Some(id.clone()),
                ..Default::default()
            })
            .await
            .unwrap();
        started
            .store
            .transition(&id, SessionState::Active)
            .await
            .unwrap();
    }
    say("ready");
    if clean {
        let intake = keel_recovery::Shutdown::new();
        let report = keel_recovery::graceful_shutdown(
            "role done",
            &started.health,
            &intake,
            async {},
            Duration::from_secs(5),
            None,
            &started.store,
        )
        .await
        .unwrap();
        assert!(report.clean);
        say("stopped");
    } else {
        std::future::pending::<()>().await;
    }
}

/// Supervises `sh` that starts two grandchildren, says `pgid N`, then waits
/// to be killed.
async fn supervisor(data: PathBuf) {
    let options = StartOptions::new(&data);
    let supervisor = Supervisor::new(SupervisorConfig {
        exec_helper: Some(std::env::var("KEEL_EXEC").unwrap().into()),
        registry: Some(options.registry_dir()),
        ..Default::default()
    })
    .unwrap();
    let mut child = supervisor
        .spawn(CommandSpec::new(
            "sh",
            ["-c", "sleep 300 & sleep 300 & echo started; wait"],
        ))
        .await
        .unwrap();
    let line = child.next_line().await.unwrap();
    assert_eq!(line.text, "started");
    say(&format!("pgid {}", child.pid()));
    std::future::pending::<()>().await;
}
