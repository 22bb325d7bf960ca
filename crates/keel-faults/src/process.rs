//! Process faults: SIGKILL, SIGSTOP/SIGCONT, SIGTERM with a grace period, now
//! or at a chosen or seeded-random moment.

use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Why a process fault could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProcessError {
    /// No such process (it already exited).
    #[error("process {0} does not exist")]
    Gone(u32),
    /// The signal could not be sent.
    #[error("cannot signal process {pid}: {errno}")]
    Signal {
        /// The process.
        pid: u32,
        /// The OS error.
        errno: Errno,
    },
}

fn signal(pid: u32, sig: Signal) -> Result<(), ProcessError> {
    let raw = i32::try_from(pid).map_err(|_| ProcessError::Gone(pid))?;
    match kill(Pid::from_raw(raw), sig) {
        Ok(()) => Ok(()),
        Err(Errno::ESRCH) => Err(ProcessError::Gone(pid)),
        Err(errno) => Err(ProcessError::Signal { pid, errno }),
    }
}

/// Whether `pid` exists (zombies included).
pub fn is_alive(pid: u32) -> bool {
    i32::try_from(pid).is_ok_and(|raw| kill(Pid::from_raw(raw), None).is_ok())
}

/// SIGKILL: the process dies at once, with no chance to clean up.
pub fn kill9(pid: u32) -> Result<(), ProcessError> {
    signal(pid, Signal::SIGKILL)
}

/// SIGSTOP: the process is frozen (its sockets stay open but nothing answers).
pub fn pause(pid: u32) -> Result<(), ProcessError> {
    signal(pid, Signal::SIGSTOP)
}

/// SIGCONT: a paused process runs again.
pub fn resume(pid: u32) -> Result<(), ProcessError> {
    signal(pid, Signal::SIGCONT)
}

/// How [`terminate`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Terminated {
    /// It exited within the grace period after SIGTERM.
    Gracefully,
    /// It was still there after the grace period and got SIGKILL.
    Killed,
}

/// SIGTERM, then SIGKILL if it is still alive after `grace`. `exited` is
/// polled to learn whether it ended (pass a check on a `Child` you own; for a
/// process you do not own, [`is_alive`]).
pub async fn terminate(
    pid: u32,
    grace: Duration,
    mut exited: impl FnMut() -> bool,
) -> Result<Terminated, ProcessError> {
    signal(pid, Signal::SIGTERM)?;
    let deadline = tokio::time::Instant::now() + grace;
    while tokio::time::Instant::now() < deadline {
        if exited() {
            return Ok(Terminated::Gracefully);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if exited() {
        return Ok(Terminated::Gracefully);
    }
    match kill9(pid) {
        Ok(()) | Err(ProcessError::Gone(_)) => Ok(Terminated::Killed),
        Err(e) => Err(e),
    }
}

/// Process faults to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL.
    Kill,
    /// SIGSTOP, then SIGCONT after the given time.
    Pause(Duration),
}

/// A seeded schedule of moments within a window: the same seed gives the same
/// moments, so a chaos run can be replayed.
#[derive(Debug)]
pub struct Schedule {
    rng: StdRng,
}

impl Schedule {
    /// A schedule drawing from an RNG seeded with `seed`.
    pub fn seeded(seed: u64) -> Self {
        Schedule {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// The next moment, uniform in `[min, max]`.
    pub fn next_delay(&mut self, min: Duration, max: Duration) -> Duration {
        let (lo, hi) = (
            min.as_millis() as u64,
            max.as_millis().max(min.as_millis()) as u64,
        );
        Duration::from_millis(self.rng.random_range(lo..=hi))
    }
}

/// Waits `after`, then applies `fault` to `pid`.
pub async fn apply_after(pid: u32, after: Duration, fault: Fault) -> Result<(), ProcessError> {
    tokio::time::sleep(after).await;
    match fault {
        Fault::Kill => kill9(pid),
        Fault::Pause(for_) => {
            pause(pid)?;
            tokio::time::sleep(for_).await;
            resume(pid)
        }
    }
}
