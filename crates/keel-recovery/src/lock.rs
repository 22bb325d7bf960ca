//! An exclusive lock on a data directory, naming the process that holds it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// The lock file's name inside a data directory.
pub const LOCK_FILE: &str = "keel.lock";

/// Why a data directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock.
    #[error(
        "data directory {dir} is in use by another keel process ({holder}); \
         stop that process or choose another data directory"
    )]
    Held {
        /// The data directory.
        dir: PathBuf,
        /// The holder's pid as it wrote it, if the lock file names one.
        pid: Option<u32>,
        /// "pid N", or "pid unknown" when the file is empty or unreadable.
        holder: String,
    },
    /// The directory or lock file could not be created, opened or written.
    #[error("cannot lock data directory {dir}: {source}")]
    Io {
        /// The data directory.
        dir: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// An exclusive `flock` on `<dir>/keel.lock`, held until dropped.
///
/// The kernel releases the lock when the holding process exits for any
/// reason, `kill -9` included, so a crash never leaves a stale lock behind;
/// the pid written into the file is only there to name the holder in
/// [`LockError::Held`].
#[derive(Debug)]
pub struct DirLock {
    _file: Flock<File>,
    dir: PathBuf,
}

impl DirLock {
    /// Creates `dir` if needed and takes its lock without waiting.
    pub fn acquire(dir: &Path) -> Result<DirLock, LockError> {
        let io = |source| LockError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        // The data directory and the lock are its owner's only (0700,
        // 0600), whatever the umask: the database holds private channels
        // and exec output.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(dir.join(LOCK_FILE))
            .map_err(io)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io)?;
        let mut locked = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let mut text = String::new();
                let pid = file
                    .read_to_string(&mut text)
                    .ok()
                    .and_then(|_| text.trim().parse::<u32>().ok());
                let holder = pid.map_or_else(|| "pid unknown".to_owned(), |p| format!("pid {p}"));
                return Err(LockError::Held {
                    dir: dir.to_path_buf(),
                    pid,
                    holder,
                });
            }
            Err((_, errno)) => return Err(io(errno.into())),
        };
        locked.set_len(0).map_err(io)?;
        locked.seek(SeekFrom::Start(0)).map_err(io)?;
        writeln!(locked, "{}", std::process::id()).map_err(io)?;
        locked.sync_data().map_err(io)?;
        Ok(DirLock {
            _file: locked,
            dir: dir.to_path_buf(),
        })
    }

    /// The locked directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::stat::{Mode, umask};

    /// The data directory is its owner's only (0700), and so is the lock
    /// (0600), whatever the umask and whatever the directory was before.
    #[test]
    fn data_dir_and_lock_are_owner_only() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("data");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let old = umask(Mode::empty());
        let lock = DirLock::acquire(&dir).unwrap();
        umask(old);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(LOCK_FILE)), 0o600);
        drop(lock);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let _again = DirLock::acquire(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700, "narrowed at start");
    }
}
