//! One of two backends behind one [`SessionStore`]: a service that can run
//! on either store (keel-relay: SQLite alone, PostgreSQL in a cluster)
//! picks at start-up and is generic over neither.

use std::future::Future;
use std::time::Duration;

use crate::api::SessionStore;
use crate::clock::UnixMillis;
use crate::commit::{Committing, StartupInfo};
use crate::error::{OutboxError, SessionError, StoreError};
use crate::health::HealthTransition;
use crate::messages::{
    Appended, ChannelBounds, ChannelStats, Message, Offset, Retention, Subscription,
};
use crate::outbox::{Enqueued, NewSend, OutboxCounts, OutboxId, OutboxItem, OutboxState, Retry};
use crate::sessions::{
    Activity, CrashMarked, CrashNotice, NewSession, Session, SessionId, SessionState,
};

/// A store that is one of two backends; every operation, those with a
/// default body included, goes to the one it holds.
///
/// ```
/// # use keel_store::{Either, SessionStore};
/// fn backend<A: SessionStore, B: SessionStore>(store: &Either<A, B>) -> &'static str {
///     match store {
///         Either::Left(_) => "left",
///         Either::Right(_) => "right",
///     }
/// }
/// ```
#[derive(Clone, Debug)]
pub enum Either<A, B> {
    /// The first backend.
    Left(A),
    /// The second backend.
    Right(B),
}

impl<A, B> Either<A, B> {
    /// The first backend, if that is the one held.
    pub fn left(&self) -> Option<&A> {
        match self {
            Either::Left(a) => Some(a),
            Either::Right(_) => None,
        }
    }

    /// The second backend, if that is the one held.
    pub fn right(&self) -> Option<&B> {
        match self {
            Either::Right(b) => Some(b),
            Either::Left(_) => None,
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
                        Either::Left(s) => SessionStore::$name(s $(, $arg)*).await,
                        Either::Right(s) => SessionStore::$name(s $(, $arg)*).await,
                    }
                }
            }
        )*
    };
}

/// `fn $name<P>(&self, args, payload: P)`, the queued appends, sent to
/// whichever store this is.
macro_rules! dispatch_queued {
    ($( fn $name:ident(&self $(, $arg:ident: $ty:ty)*); )*) => {
        $(
            fn $name<P>(
                &self $(, $arg: $ty)*,
                payload: P,
            ) -> impl Future<Output = Result<Committing<Appended>, StoreError>> + Send
            where
                P: AsRef<[u8]> + Send + 'static,
            {
                async move {
                    match self {
                        Either::Left(s) => SessionStore::$name(s $(, $arg)*, payload).await,
                        Either::Right(s) => SessionStore::$name(s $(, $arg)*, payload).await,
                    }
                }
            }
        )*
    };
}

impl<A: SessionStore, B: SessionStore> SessionStore for Either<A, B> {
    fn startup(&self) -> &StartupInfo {
        match self {
            Either::Left(s) => s.startup(),
            Either::Right(s) => s.startup(),
        }
    }

    fn now(&self) -> UnixMillis {
        match self {
            Either::Left(s) => s.now(),
            Either::Right(s) => s.now(),
        }
    }

    dispatch_queued! {
        fn queue_append_scoped(&self, lane: u64, scope: &str, channel: &str, msg_id: &str);
        fn queue_append_in(&self, lane: u64, channel: &str, msg_id: &str);
        fn queue_append(&self, channel: &str, msg_id: &str);
    }

    dispatch! {
        fn close(&self) -> Result<(), StoreError>;
        fn close_unclean(&self) -> Result<(), StoreError>;
        fn meta(&self, key: &str) -> Result<Option<String>, StoreError>;
        fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError>;
        fn clean_shutdown(&self) -> Result<bool, StoreError>;
        fn set_clean_shutdown(&self, clean: bool) -> Result<(), StoreError>;
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
        fn append(&self, channel: &str, msg_id: &str, payload: &[u8]) -> Result<Appended, StoreError>;
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
        fn enqueue(&self, send: NewSend) -> Result<Enqueued, OutboxError>;
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
