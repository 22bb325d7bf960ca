//! Running this test binary again as a child process in a named role.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

/// The environment variable naming a child's role (see `roles.rs`).
pub(crate) const ROLE: &str = "KEEL_RECOVERY_ROLE";
/// The data directory a role works in.
pub(crate) const DATA: &str = "KEEL_RECOVERY_DATA";
/// Lines a role prints for its parent start with this.
pub(crate) const PREFIX: &str = "KEEL ";

/// A child process running this test binary in `role`.
pub(crate) struct RoleChild {
    pub(crate) child: Child,
    out: tokio::io::Lines<BufReader<ChildStdout>>,
}

impl RoleChild {
    pub(crate) fn spawn(role: &str, data: &Path) -> RoleChild {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "roles::child_role",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ROLE, role)
            .env(DATA, data)
            .env("KEEL_EXEC", env!("CARGO_BIN_EXE_keel-exec"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap()).lines();
        RoleChild { child, out }
    }

    /// The next line the role printed for us, without the prefix.
    pub(crate) async fn expect_line(&mut self) -> String {
        let read = async {
            while let Some(line) = self.out.next_line().await.unwrap() {
                // The harness may have printed "test ... " on the same line.
                if let Some(at) = line.find(PREFIX) {
                    return line[at + PREFIX.len()..].to_owned();
                }
            }
            panic!("role child ended without the expected line");
        };
        tokio::time::timeout(Duration::from_secs(30), read)
            .await
            .expect("role child said nothing within 30 s")
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id().unwrap()
    }

    /// SIGKILLs the child and reaps it.
    pub(crate) async fn kill9(mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let status = self.child.wait().await.unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9));
    }

    /// Waits for the child to exit by itself and returns its code.
    pub(crate) async fn exit_code(mut self) -> Option<i32> {
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("role child did not exit")
            .unwrap()
            .code()
    }
}

/// Polls `check` every millisecond until it returns `Some`, for at most `limit`.
pub(crate) async fn eventually<T, F, Fut>(limit: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The `to` state of the newest ten health log entries, oldest first.
pub(crate) async fn health_states(store: &keel_session::Store) -> Vec<String> {
    store
        .health_transitions(10)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.to)
        .collect()
}
