//! SQLite's errors mapped onto the store contract's error types, and what
//! the writer needs to know of an operation's error.

use rusqlite::ErrorCode;

pub(crate) use keel_store::{OpenError, OutboxError, SessionError, StoreError};

/// The backend name keel-session's errors carry in [`StoreError::Backend`].
pub(crate) const BACKEND: &str = "sqlite";

/// Maps a rusqlite error onto [`StoreError`]:
///
/// | SQLite | variant |
/// |---|---|
/// | `SQLITE_FULL`, an I/O error reporting `ENOSPC` | [`StoreError::DiskFull`] |
/// | `SQLITE_CORRUPT`, `SQLITE_NOTADB` | [`StoreError::Corrupt`] |
/// | any other `SQLITE_IOERR` | [`StoreError::Io`] |
/// | anything else | [`StoreError::Backend`] with `backend = "sqlite"` and the extended result code (`-1` when the error did not come from SQLite) |
pub(crate) fn sqlite(err: rusqlite::Error) -> StoreError {
    match &err {
        rusqlite::Error::SqliteFailure(ffi, msg) => {
            let detail = msg.clone().unwrap_or_else(|| ffi.to_string());
            match ffi.code {
                ErrorCode::DiskFull => StoreError::DiskFull { detail },
                ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => {
                    StoreError::Corrupt { detail }
                }
                ErrorCode::SystemIoFailure => {
                    // SQLITE_IOERR_WRITE and friends carry ENOSPC as a plain I/O
                    // error on some paths; the message tells them apart.
                    if detail.contains("No space left") || detail.contains("disk is full") {
                        StoreError::DiskFull { detail }
                    } else {
                        StoreError::Io { detail }
                    }
                }
                _ => backend(ffi.extended_code, detail),
            }
        }
        _ => backend(-1, err.to_string()),
    }
}

/// [`StoreError::Backend`] for SQLite's extended result `code`.
pub(crate) fn backend(code: i32, message: impl Into<String>) -> StoreError {
    StoreError::Backend {
        backend: BACKEND,
        code: code.to_string(),
        message: message.into(),
    }
}

/// `.db()?` on a rusqlite result: its error as a [`StoreError`] (the
/// contract's error types live in keel-store, so rusqlite's error cannot
/// convert into them with `?` alone).
pub(crate) trait Db<T> {
    fn db(self) -> Result<T, StoreError>;
}

impl<T> Db<T> for rusqlite::Result<T> {
    fn db(self) -> Result<T, StoreError> {
        self.map_err(sqlite)
    }
}

/// Errors an operation run by the writer can return: they must be able to carry
/// a [`StoreError`] and say whether it poisons the batch.
pub(crate) trait OpError: From<StoreError> + Send + 'static {
    fn fatal(&self) -> Option<&StoreError>;
}

impl OpError for StoreError {
    fn fatal(&self) -> Option<&StoreError> {
        self.is_fatal().then_some(self)
    }
}

impl OpError for SessionError {
    fn fatal(&self) -> Option<&StoreError> {
        match self {
            SessionError::Store(e) if e.is_fatal() => Some(e),
            _ => None,
        }
    }
}

impl OpError for OutboxError {
    fn fatal(&self) -> Option<&StoreError> {
        match self {
            OutboxError::Store(e) if e.is_fatal() => Some(e),
            _ => None,
        }
    }
}
