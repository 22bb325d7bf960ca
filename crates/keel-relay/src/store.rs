//! The relay's store: the embedded SQLite store (the default) or the
//! PostgreSQL store of cluster mode, behind keel-session's store API.

use keel_session::{Either, Store, StoreError, WriterStats};
use keel_session_pg::PgStore;

/// One of the two backends (keel-store's [`Either`]): `Left` is
/// keel-session's SQLite store in the data directory, `Right` is
/// keel-session-pg's PostgreSQL store (cluster mode). Every store
/// operation goes to the one it holds.
pub type RelayStore = Either<Store, PgStore>;

/// What the relay asks of its store beyond the store contract.
pub trait RelayStoreExt {
    /// The SQLite store, if that is the backend.
    fn sqlite(&self) -> Option<&Store>;
    /// The PostgreSQL store, if that is the backend.
    fn postgres(&self) -> Option<&PgStore>;
    /// The backend's name, as `[store] backend` spells it.
    fn backend(&self) -> &'static str;
    /// Group-commit counters (the SQLite writer's; zero on PostgreSQL).
    fn writer_stats(&self) -> WriterStats;
    /// Whether the store answers now: always for SQLite (a local file),
    /// one round trip for PostgreSQL.
    fn ping(&self) -> impl std::future::Future<Output = Result<(), StoreError>> + Send;
}

impl RelayStoreExt for RelayStore {
    fn sqlite(&self) -> Option<&Store> {
        match self {
            Either::Left(s) => Some(s),
            Either::Right(_) => None,
        }
    }

    fn postgres(&self) -> Option<&PgStore> {
        match self {
            Either::Right(s) => Some(s),
            Either::Left(_) => None,
        }
    }

    fn backend(&self) -> &'static str {
        match self {
            Either::Left(_) => "sqlite",
            Either::Right(_) => "postgres",
        }
    }

    fn writer_stats(&self) -> WriterStats {
        match self {
            Either::Left(s) => s.writer_stats(),
            Either::Right(_) => WriterStats::default(),
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Either::Left(_) => Ok(()),
            Either::Right(s) => s.ping().await,
        }
    }
}
