//! PostgreSQL errors mapped onto keel-session's typed errors, by `SQLSTATE`.

use keel_store::{OutboxError, SessionError, StoreError};

/// Maps a driver error onto [`StoreError`]:
///
/// | SQLSTATE | meaning | variant |
/// |---|---|---|
/// | `53100` | disk full | [`StoreError::DiskFull`] |
/// | `XX001`, `XX002` | data or index corrupted | [`StoreError::Corrupt`] |
/// | `08***`, `57P01`–`57P03`, `53300`, `53200` | connection lost or refused, server shutting down or starting, too many connections, out of memory | [`StoreError::Unavailable`] |
/// | `58***` | system (I/O) error | [`StoreError::Io`] |
/// | anything else | | [`StoreError::Backend`] with `backend = "postgres"` and the code |
///
/// An error with no SQLSTATE is [`StoreError::Unavailable`] when the
/// connection is closed or its socket failed, and otherwise (a value that
/// cannot be encoded, an unexpected message) [`StoreError::Backend`] with
/// the code `client`.
/// The backend name keel-session-pg's errors carry in [`StoreError::Backend`].
pub(crate) const BACKEND: &str = "postgres";

pub(crate) fn pg(err: tokio_postgres::Error) -> StoreError {
    let Some(code) = err.code() else {
        let io = std::error::Error::source(&err).is_some_and(|s| s.is::<std::io::Error>());
        if err.is_closed() || io {
            return StoreError::Unavailable {
                detail: err.to_string(),
            };
        }
        return StoreError::Backend {
            backend: BACKEND,
            code: "client".into(),
            message: match std::error::Error::source(&err) {
                Some(cause) => format!("{err}: {cause}"),
                None => err.to_string(),
            },
        };
    };
    let sqlstate = code.code();
    let detail = err
        .as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_else(|| err.to_string());
    match sqlstate {
        "53100" => StoreError::DiskFull { detail },
        "XX001" | "XX002" => StoreError::Corrupt { detail },
        s if s.starts_with("08") => StoreError::Unavailable { detail },
        "57P01" | "57P02" | "57P03" | "53300" | "53200" => StoreError::Unavailable { detail },
        s if s.starts_with("58") => StoreError::Io { detail },
        _ => StoreError::Backend {
            backend: BACKEND,
            code: sqlstate.to_owned(),
            message: detail,
        },
    }
}

/// A pool failure: no connection within the wait bound, or one that could
/// not be made.
pub(crate) fn pool(err: deadpool_postgres::PoolError) -> StoreError {
    match err {
        deadpool_postgres::PoolError::Backend(e) => pg(e),
        deadpool_postgres::PoolError::Closed => StoreError::Closed,
        other => StoreError::Unavailable {
            detail: format!("no database connection: {other}"),
        },
    }
}

/// The store error inside an operation's error, if it is one.
pub(crate) trait AsStore {
    fn as_store(&self) -> Option<&StoreError>;
}

impl AsStore for StoreError {
    fn as_store(&self) -> Option<&StoreError> {
        Some(self)
    }
}

impl AsStore for SessionError {
    fn as_store(&self) -> Option<&StoreError> {
        match self {
            SessionError::Store(e) => Some(e),
            _ => None,
        }
    }
}

impl AsStore for OutboxError {
    fn as_store(&self) -> Option<&StoreError> {
        match self {
            OutboxError::Store(e) => Some(e),
            _ => None,
        }
    }
}

/// Whether a failed transaction may simply be run again: a serialization
/// failure (`40001`), a deadlock (`40P01`), or a unique violation (`23505`)
/// from a concurrent writer of the same key, whose row the next attempt
/// will find.
pub(crate) fn retryable<E: AsStore>(err: &E) -> bool {
    err.as_store()
        .and_then(sqlstate)
        .is_some_and(|code| matches!(code, "40001" | "40P01" | "23505"))
}

/// [`StoreError::Backend`] of this backend with the SQLSTATE `code`
/// (`client` for an error of the driver or of this crate).
pub(crate) fn backend(code: &str, message: impl Into<String>) -> StoreError {
    StoreError::Backend {
        backend: BACKEND,
        code: code.to_owned(),
        message: message.into(),
    }
}

/// The SQLSTATE of an error this backend reported as [`StoreError::Backend`].
pub(crate) fn sqlstate(err: &StoreError) -> Option<&str> {
    match err {
        StoreError::Backend { backend, code, .. } if *backend == BACKEND => Some(code),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transient_conflicts_are_retried() {
        let pgerr = |s: &str| backend(s, "");
        assert!(retryable(&pgerr("40001")));
        assert!(retryable(&pgerr("40P01")));
        assert!(retryable(&SessionError::Store(pgerr("23505"))));
        assert!(!retryable(&pgerr("23503")));
        // The same code from another backend is not a PostgreSQL conflict.
        assert!(!retryable(&StoreError::Backend {
            backend: "sqlite",
            code: "40001".into(),
            message: String::new(),
        }));
        assert!(!retryable(&StoreError::DiskFull {
            detail: String::new()
        }));
        assert!(!retryable(&SessionError::NotFound("x".into())));
    }
}
