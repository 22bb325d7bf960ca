//! A durable session store on SQLite (WAL) with group-committed writes.
//!
//! keel-session keeps what a session-oriented service must not lose across a
//! `kill -9`: sessions and their state machine, a bounded activity log per
//! session, append-only per-channel message logs with idempotent appends,
//! subscription cursors, an outbox of sends with leased claims and dead
//! letters, and a health transition log.
//!
//! All writes go through one writer thread that owns the write connection and
//! commits whatever is queued in one transaction (group commit); each caller's
//! future resolves only after the transaction holding its write committed.
//! Reads run on a pool of read-only connections. Callers never see
//! `SQLITE_BUSY`; a full disk and a corrupt file surface as
//! [`StoreError::DiskFull`] and [`StoreError::Corrupt`].
//!
//! # Example
//!
//! ```
//! use keel_session::{Config, NewSession, SessionState, Store};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let store = Store::open(&dir.path().join("keel.db"), Config::default()).await?;
//!
//! let session = store.create_session(NewSession::default()).await?;
//! store.transition(&session.id, SessionState::Active).await?;
//!
//! // Appends are idempotent by message id.
//! let first = store.append("room:1", "msg-1", b"hello").await?;
//! let again = store.append("room:1", "msg-1", b"hello").await?;
//! assert_eq!(first.offset, again.offset);
//! assert!(again.duplicate);
//!
//! // Invalid transitions are errors and write nothing.
//! let err = store.transition(&session.id, SessionState::Created).await;
//! assert!(err.is_err());
//!
//! store.close().await?; // records a clean shutdown
//! # Ok(())
//! # }
//! ```

mod api;
mod clock;
mod config;
mod error;
mod health;
mod messages;
mod outbox;
mod schema;
mod sessions;
mod store;
mod writer;

/// The store contract's conformance suite (feature `testkit`), re-exported
/// from keel-store.
#[cfg(feature = "testkit")]
pub use keel_store::{conformance_suite, testkit};

/// Weighted fair order of queued writes by lane (keel-store's).
pub use keel_store::fair;
// The store contract (keel-store), re-exported so that a user of the
// SQLite store needs only this crate.
pub use keel_store::{
    Activity, Appended, ChannelBounds, ChannelStats, Clock, Committing, CrashMarked, CrashNotice,
    CrashedSession, Either, Enqueued, HealthTransition, ManualClock, Message, NewSend, NewSession,
    Offset, OpenError, OutboxCounts, OutboxError, OutboxId, OutboxItem, OutboxState, Retention,
    Retry, SHARED_SCOPE, SYSTEM_SCOPE, Session, SessionError, SessionId, SessionState,
    SessionStore, StartupInfo, SteadyClock, StoreError, Subscription, SystemClock, UnixMillis,
};

pub use crate::config::{Config, Durability};
pub use crate::store::{Store, WriterStats};

/// The schema version this build of keel-session writes.
pub const SCHEMA_VERSION: u32 = schema::LATEST;

/// The README's examples, compiled and run as doctests so that they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
