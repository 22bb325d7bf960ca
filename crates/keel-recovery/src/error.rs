//! Why startup failed.

use std::path::{Path, PathBuf};

use keel_session::{OpenError, StoreError};

use crate::lock::LockError;

/// Why [`crate::start`] (or one of its steps) failed. Each variant's message
/// says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Another instance holds the data directory.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// The database exists but could not be read for a reason other than
    /// damage (permissions, I/O); nothing was moved.
    #[error("cannot read database {path}: {detail}; check its permissions and the disk")]
    Unreadable {
        /// The database path.
        path: PathBuf,
        /// What SQLite reported.
        detail: String,
    },
    /// Opening or migrating the database failed.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// A recovery write failed (a full disk is [`StoreError::DiskFull`]).
    #[error("crash recovery failed: {0}")]
    Store(#[from] StoreError),
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl StartError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        StartError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
