//! The open-file limit: a service holding one descriptor per connection
//! raises its soft limit to the hard limit at start, as nginx's
//! `worker_rlimit_nofile` and systemd's `LimitNOFILE` would, instead of
//! refusing connections at the distribution's default of 1,024.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// The open-file limit before and after [`raise_open_files`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileLimit {
    /// The soft limit found at start.
    pub before: u64,
    /// The soft limit now in force.
    pub now: u64,
    /// The hard limit (the ceiling an unprivileged process may raise to).
    pub hard: u64,
}

impl FileLimit {
    /// Connections this limit leaves room for, keeping `reserve`
    /// descriptors for the database, logs, listeners and children.
    pub fn connections(&self, reserve: u64) -> u64 {
        self.now.saturating_sub(reserve)
    }
}

/// Raises this process's soft open-file limit to its hard limit (capped
/// at 2^20: an "unlimited" hard limit would make descriptor tables huge)
/// and says what it found and what is now in force. Lowers nothing.
pub fn raise_open_files() -> std::io::Result<FileLimit> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let target = hard.min(1 << 20);
    if target > soft {
        setrlimit(Resource::RLIMIT_NOFILE, target, hard)?;
    }
    let (now, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    Ok(FileLimit {
        before: soft,
        now,
        hard,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The soft limit is first lowered by one below the hard limit (not
    /// more: the tests beside this one share the process), so the raise
    /// has something to do on any machine.
    #[test]
    fn the_soft_limit_rises_to_the_hard_limit() {
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let top = hard.min(1 << 20);
        setrlimit(Resource::RLIMIT_NOFILE, top - 1, hard).unwrap();
        let got = raise_open_files().unwrap();
        assert_eq!(got.before, top - 1);
        assert_eq!(got.now, top);
        assert_eq!(got.hard, hard);
        assert_eq!(got.connections(512), top - 512);
        assert_eq!(got.connections(top + 1), 0);
    }
}
