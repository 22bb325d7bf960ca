//! Error types, one per family of operations, so callers can match on what they can act on.

use crate::outbox::OutboxId;
use crate::sessions::{SessionId, SessionState};

/// A failure of the storage layer itself, shared by every operation.
///
/// [`StoreError::DiskFull`] and [`StoreError::Corrupt`] are distinct so that
/// recovery code can react to them (degrade, quarantine the file) without
/// parsing messages. A busy or locked database is never reported: the single
/// writer and WAL readers make it impossible in normal operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The disk (or the size-limited file system) holding the database is full
    /// (SQLite's `SQLITE_FULL`, `ENOSPC`, PostgreSQL's `53100`). Nothing in
    /// the failed batch was committed.
    #[error("disk full: the database could not grow ({detail}); free space and retry")]
    DiskFull {
        /// What the backend reported.
        detail: String,
    },
    /// The database is damaged (SQLite's `SQLITE_CORRUPT` or
    /// `SQLITE_NOTADB`, PostgreSQL's `XX001` or `XX002`).
    #[error(
        "database is corrupt: {detail}; stop writing to it and inspect a copy \
         (SQLite: `sqlite3 FILE .recover`)"
    )]
    Corrupt {
        /// What the backend reported.
        detail: String,
    },
    /// An I/O error other than a full disk.
    #[error("i/o error: {detail}")]
    Io {
        /// What the backend or the OS reported.
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
    /// The store was closed (or its writer thread stopped) before the operation ran.
    #[error("store is closed")]
    Closed,
    /// Any other error of the backend, as it reported it: which backend
    /// (`"sqlite"`, `"postgres"`), its own code for the error (SQLite's
    /// extended result code, PostgreSQL's `SQLSTATE`; `"client"` when the
    /// error came from the driver, not the database), and its message.
    #[error("{backend} error {code}: {message}")]
    Backend {
        /// The backend's name, e.g. `"sqlite"`.
        backend: &'static str,
        /// The backend's code for the error, e.g. `"2067"` or `"23505"`.
        code: String,
        /// The message the backend gave.
        message: String,
    },
}

impl StoreError {
    /// Whether this error invalidates the whole batch transaction it happened
    /// in (a full disk, corruption, an I/O error): a group-committing backend
    /// rolls the batch back and fails every write in it.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            StoreError::DiskFull { .. } | StoreError::Corrupt { .. } | StoreError::Io { .. }
        )
    }
}

/// Why opening a store failed (keel-session's `Store::open`,
/// keel-session-pg's `PgStore::open`).
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
    /// The database is not usable: not a database, or it fails its checks.
    #[error("database {path} is corrupt or not a database: {detail}")]
    Corrupt {
        /// The database path.
        path: String,
        /// What the backend reported.
        detail: String,
    },
    /// The database could not be created or migrated because the disk is full.
    #[error("disk full while opening {path}: {detail}")]
    DiskFull {
        /// The database path.
        path: String,
        /// What the backend reported.
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
    /// The open error for a store error met while opening the database at
    /// `path`: corruption and a full disk keep their own variants.
    pub fn from_store(path: &std::path::Path, err: StoreError) -> Self {
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
