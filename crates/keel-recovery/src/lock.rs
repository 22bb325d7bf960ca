//! An exclusive lock on a data directory, naming the process that holds it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
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
        std::fs::create_dir_all(dir).map_err(io)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(LOCK_FILE))
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
