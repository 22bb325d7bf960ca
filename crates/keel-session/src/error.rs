//! Error types, one per family of operations, so callers can match on what they can act on.

use rusqlite::ErrorCode;

use crate::{OutboxId, SessionId, SessionState};

/// A failure of the storage layer itself, shared by every operation.
///
/// [`StoreError::DiskFull`] and [`StoreError::Corrupt`] are distinct so that
/// recovery code can react to them (degrade, quarantine the file) without
/// parsing messages. A busy or locked database is never reported: the single
/// writer and WAL readers make it impossible in normal operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The disk (or the size-limited file system) holding the database is full
    /// (`SQLITE_FULL` or `ENOSPC`). Nothing in the failed batch was committed.
    #[error("disk full: the database could not grow ({detail}); free space and retry")]
    DiskFull {
        /// What SQLite reported.
        detail: String,
    },
    /// The database file is damaged (`SQLITE_CORRUPT` or `SQLITE_NOTADB`).
    #[error(
        "database is corrupt: {detail}; move it aside and inspect it with `sqlite3 FILE .recover`"
    )]
    Corrupt {
        /// What SQLite reported.
        detail: String,
    },
    /// An I/O error other than a full disk.
    #[error("i/o error: {detail}")]
    Io {
        /// What SQLite or the OS reported.
        detail: String,
    },
    /// The database server cannot be reached or refuses work for now (a
    /// networked backend: connection refused or lost, server shutting down
    /// or starting, too many connections). Nothing of the failed operation
    /// was committed; retrying later may succeed.
    #[error("database unavailable: {detail}; retry later")]
    Unavailable {
        /// What the driver or server reported.
        detail: String,
    },
    /// Any other PostgreSQL error (keel-session-pg), with its `SQLSTATE`.
    #[error("postgres error {sqlstate}: {message}")]
    Postgres {
        /// The five-character SQLSTATE code, e.g. `23505`.
        sqlstate: String,
        /// The message the server gave.
        message: String,
    },
    /// The store was closed (or its writer thread stopped) before the operation ran.
    #[error("store is closed")]
    Closed,
    /// Any other SQLite error; `code` is SQLite's extended result code.
    #[error("sqlite error {code}: {message}")]
    Sqlite {
        /// SQLite's extended result code, or -1 when the error did not come from SQLite.
        code: i32,
        /// The message SQLite gave.
        message: String,
    },
}

impl StoreError {
    /// Whether this error invalidates the whole batch transaction it happened in.
    pub(crate) fn is_fatal(&self) -> bool {
        matches!(
            self,
            StoreError::DiskFull { .. } | StoreError::Corrupt { .. } | StoreError::Io { .. }
        )
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(err: rusqlite::Error) -> Self {
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
                    _ => StoreError::Sqlite {
                        code: ffi.extended_code,
                        message: detail,
                    },
                }
            }
            _ => StoreError::Sqlite {
                code: -1,
                message: err.to_string(),
            },
        }
    }
}

/// Why [`Store::open`](crate::Store::open) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The database was written by a newer version of keel-session.
    #[error(
        "database schema version {found} is newer than this build supports ({supported}); \
         upgrade keel or open a copy with a newer build"
    )]
    NewerSchema {
        /// The schema version found in the file.
        found: u32,
        /// The newest schema version this build knows.
        supported: u32,
    },
    /// The file is not a usable SQLite database or fails its header checks.
    #[error("database {path} is corrupt or not a database: {detail}")]
    Corrupt {
        /// The database path.
        path: String,
        /// What SQLite reported.
        detail: String,
    },
    /// The database could not be created or migrated because the disk is full.
    #[error("disk full while opening {path}: {detail}")]
    DiskFull {
        /// The database path.
        path: String,
        /// What SQLite reported.
        detail: String,
    },
    /// Any other failure opening, configuring or migrating the database.
    #[error("cannot open database {path}: {source}")]
    Store {
        /// The database path.
        path: String,
        /// The underlying error.
        source: StoreError,
    },
}

impl OpenError {
    pub(crate) fn from_store(path: &std::path::Path, err: StoreError) -> Self {
        let path = path.display().to_string();
        match err {
            StoreError::Corrupt { detail } => OpenError::Corrupt { path, detail },
            StoreError::DiskFull { detail } => OpenError::DiskFull { path, detail },
            source => OpenError::Store { path, source },
        }
    }
}

/// Why a session operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// No session has this id.
    #[error("session {0} not found")]
    NotFound(SessionId),
    /// A session with this id already exists.
    #[error("session {0} already exists")]
    AlreadyExists(SessionId),
    /// The state machine does not allow this transition; nothing was written.
    #[error("invalid session transition from {from} to {to}")]
    InvalidTransition {
        /// The session's current state.
        from: SessionState,
        /// The requested state.
        to: SessionState,
    },
    /// The stored state is not one this build knows (a damaged or hand-edited row).
    #[error("session {id} has unknown state {state:?}; crash recovery will mark it CRASHED")]
    UnknownState {
        /// The session id.
        id: SessionId,
        /// The raw stored value.
        state: String,
    },
    /// The session is not subscribed to this channel.
    #[error("session {session} is not subscribed to {channel}")]
    NotSubscribed {
        /// The session id.
        session: SessionId,
        /// The channel name.
        channel: String,
    },
    /// An acknowledgement named an offset the channel does not hold yet;
    /// nothing was written.
    #[error("offset {offset} of {channel} is beyond its last offset ({last})")]
    BeyondHead {
        /// The channel name.
        channel: String,
        /// The offset acknowledged.
        offset: u64,
        /// The channel's last offset (0 for an empty channel).
        last: u64,
    },
    /// The storage layer failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<rusqlite::Error> for SessionError {
    fn from(err: rusqlite::Error) -> Self {
        SessionError::Store(err.into())
    }
}

/// Why an outbox operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutboxError {
    /// No outbox item has this id.
    #[error("outbox item {0} not found")]
    NotFound(OutboxId),
    /// The caller no longer holds the claim: it expired and another worker took
    /// the item, or the item was never claimed by this worker.
    #[error("outbox item {id} is not claimed by {worker}")]
    NotClaimed {
        /// The item id.
        id: OutboxId,
        /// The worker that tried to act on it.
        worker: String,
    },
    /// The item is not in a state this operation applies to.
    #[error("outbox item {id} is {state}, expected {expected}")]
    WrongState {
        /// The item id.
        id: OutboxId,
        /// Its current state.
        state: String,
        /// The state the operation needs.
        expected: &'static str,
    },
    /// The session already has its quota of sends waiting; nothing was written.
    #[error("{pending} sends are already waiting for this session (quota {max})")]
    QuotaExceeded {
        /// Sends of the session not yet ended.
        pending: u64,
        /// The quota.
        max: u64,
    },
    /// The storage layer failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<rusqlite::Error> for OutboxError {
    fn from(err: rusqlite::Error) -> Self {
        OutboxError::Store(err.into())
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
