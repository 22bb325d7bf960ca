//! The relay's store: the embedded SQLite store (the default) or the
//! PostgreSQL store of cluster mode, behind keel-session's store API.

use std::future::Future;
use std::time::Duration;

use keel_session::{
    Activity, Appended, ChannelBounds, ChannelStats, Committing, CrashMarked, CrashNotice,
    Enqueued, HealthTransition, Message, NewSend, NewSession, Offset, OutboxCounts, OutboxError,
    OutboxId, OutboxItem, OutboxState, Retention, Retry, Session, SessionError, SessionId,
    SessionState, SessionStore, StartupInfo, Store, StoreError, Subscription, UnixMillis,
    WriterStats,
};
use keel_session_pg::PgStore;

/// One of the two backends; every operation goes to the one it holds.
#[derive(Clone, Debug)]
pub enum RelayStore {
    /// keel-session's SQLite store in the data directory.
    Sqlite(Store),
    /// keel-session-pg's PostgreSQL store (cluster mode).
    Postgres(PgStore),
}

impl RelayStore {
    /// The SQLite store, if that is the backend.
    pub fn sqlite(&self) -> Option<&Store> {
        match self {
            RelayStore::Sqlite(s) => Some(s),
            RelayStore::Postgres(_) => None,
        }
    }

    /// The PostgreSQL store, if that is the backend.
    pub fn postgres(&self) -> Option<&PgStore> {
        match self {
            RelayStore::Postgres(s) => Some(s),
            RelayStore::Sqlite(_) => None,
        }
    }

    /// The backend's name, as `[store] backend` spells it.
    pub fn backend(&self) -> &'static str {
        match self {
            RelayStore::Sqlite(_) => "sqlite",
            RelayStore::Postgres(_) => "postgres",
        }
    }

    /// Group-commit counters (the SQLite writer's; zero on PostgreSQL).
    pub fn writer_stats(&self) -> WriterStats {
        match self {
            RelayStore::Sqlite(s) => s.writer_stats(),
            RelayStore::Postgres(_) => WriterStats::default(),
        }
    }

    /// Whether the store answers now: always for SQLite (a local file),
    /// one round trip for PostgreSQL.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            RelayStore::Sqlite(_) => Ok(()),
            RelayStore::Postgres(s) => s.ping().await,
        }
    }
}

/// `fn $name(&self, args) -> impl Future<Output = $out> + Send`, sent to
/// whichever store this is.
macro_rules! dispatch {
    ($( fn $name:ident(&self $(, $arg:ident: $ty:ty)*) -> $out:ty; )*) => {
        $(
            fn $name(&self $(, $arg: $ty)*) -> impl Future<Output = $out> + Send {
                async move {
                    match self {
                        RelayStore::Sqlite(s) => SessionStore::$name(s $(, $arg)*).await,
                        RelayStore::Postgres(s) => SessionStore::$name(s $(, $arg)*).await,
                    }
                }
            }
        )*
    };
}

impl SessionStore for RelayStore {
    fn startup(&self) -> &StartupInfo {
        match self {
            RelayStore::Sqlite(s) => SessionStore::startup(s),
            RelayStore::Postgres(s) => SessionStore::startup(s),
        }
    }

    fn now(&self) -> UnixMillis {
        match self {
            RelayStore::Sqlite(s) => SessionStore::now(s),
            RelayStore::Postgres(s) => SessionStore::now(s),
        }
    }

    async fn queue_append_scoped<P>(
        &self,
        lane: u64,
        scope: &str,
        channel: &str,
        msg_id: &str,
        payload: P,
    ) -> Result<Committing<Appended>, StoreError>
    where
        P: AsRef<[u8]> + Send + 'static,
    {
        match self {
            RelayStore::Sqlite(s) => {
                s.queue_append_scoped(lane, scope, channel, msg_id, payload)
                    .await
            }
            RelayStore::Postgres(s) => {
                SessionStore::queue_append_scoped(s, lane, scope, channel, msg_id, payload).await
            }
        }
    }

    dispatch! {
        fn close(&self) -> Result<(), StoreError>;
        fn close_unclean(&self) -> Result<(), StoreError>;
        fn meta(&self, key: &str) -> Result<Option<String>, StoreError>;
        fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError>;
        fn create_session(&self, new: NewSession) -> Result<Session, SessionError>;
        fn session(&self, id: &SessionId) -> Result<Session, SessionError>;
        fn sessions(&self, state: Option<SessionState>) -> Result<Vec<Session>, StoreError>;
        fn count_by_state(&self) -> Result<Vec<(String, u64)>, StoreError>;
        fn transition(&self, id: &SessionId, to: SessionState) -> Result<Session, SessionError>;
        fn touch(&self, id: &SessionId) -> Result<(), SessionError>;
        fn set_session_meta(&self, id: &SessionId, meta: &str) -> Result<(), SessionError>;
        fn mark_crashed(&self) -> Result<CrashMarked, StoreError>;
        fn mark_crashed_and_notify(&self, notice: CrashNotice) -> Result<CrashMarked, StoreError>;
        fn purge_idle_sessions(&self, idle_for: Duration, limit: usize) -> Result<Vec<SessionId>, StoreError>;
        fn record_activity(&self, id: &SessionId, kind: &str, detail: &str) -> Result<(), SessionError>;
        fn activity(&self, id: &SessionId) -> Result<Vec<Activity>, SessionError>;
        fn append_scoped(&self, scope: &str, channel: &str, msg_id: &str, payload: &[u8]) -> Result<Appended, StoreError>;
        fn read_channel_bounded(&self, channel: &str, from: Offset, limit: usize, max_bytes: usize) -> Result<Vec<Message>, StoreError>;
        fn read_channel(&self, channel: &str, from: Offset, limit: usize) -> Result<Vec<Message>, StoreError>;
        fn channels_after(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, StoreError>;
        fn retention_due(&self, channels: Vec<(String, Retention)>) -> Result<Vec<String>, StoreError>;
        fn apply_retention_to(&self, channel: &str, policy: Retention, max_delete: u64) -> Result<u64, StoreError>;
        fn apply_retention(&self, policy: Retention) -> Result<u64, StoreError>;
        fn channel_stats(&self, limit: usize) -> Result<(u64, Vec<ChannelStats>), StoreError>;
        fn channel_bounds(&self, channel: &str) -> Result<ChannelBounds, StoreError>;
        fn subscribe(&self, session: &SessionId, channel: &str, cursor: Offset) -> Result<Subscription, SessionError>;
        fn ack(&self, session: &SessionId, channel: &str, offset: Offset) -> Result<Offset, SessionError>;
        fn unsubscribe(&self, session: &SessionId, channel: &str) -> Result<bool, StoreError>;
        fn subscriptions(&self, session: &SessionId) -> Result<Vec<Subscription>, StoreError>;
        fn enqueue_within(&self, send: NewSend, max_pending: Option<u64>) -> Result<Enqueued, OutboxError>;
        fn claim(&self, worker: &str, lease: Duration, limit: usize) -> Result<Vec<OutboxItem>, OutboxError>;
        fn complete(&self, id: OutboxId, worker: &str) -> Result<OutboxItem, OutboxError>;
        fn fail(&self, id: OutboxId, worker: &str, error: &str, retry: Retry) -> Result<OutboxItem, OutboxError>;
        fn dead_letter(&self, id: OutboxId, reason: &str) -> Result<OutboxItem, OutboxError>;
        fn redrive(&self, id: OutboxId) -> Result<OutboxItem, OutboxError>;
        fn redrive_all(&self) -> Result<u64, StoreError>;
        fn release_expired_claims(&self) -> Result<u64, StoreError>;
        fn outbox_item(&self, id: OutboxId) -> Result<OutboxItem, OutboxError>;
        fn outbox_items(&self, state: OutboxState, limit: usize) -> Result<Vec<OutboxItem>, StoreError>;
        fn outbox_counts(&self) -> Result<OutboxCounts, StoreError>;
        fn record_health_transition(&self, from: &str, to: &str, reason: &str) -> Result<HealthTransition, StoreError>;
        fn health_transitions(&self, limit: usize) -> Result<Vec<HealthTransition>, StoreError>;
    }
}
