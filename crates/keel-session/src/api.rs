//! The store API as a trait, so that a service can run on the embedded SQLite
//! [`Store`] or on another backend (keel-session-pg's PostgreSQL store) and
//! one conformance suite ([`testkit`](crate::testkit), feature `testkit`)
//! holds both to the same behaviour.
//!
//! Every method means exactly what the [`Store`] method of the same name
//! documents; that documentation is the contract. The futures are `Send`, so
//! a generic service can spawn them; the trait is used through generics, not
//! `dyn` (it has generic methods and returns `impl Future`).

use std::future::Future;
use std::time::Duration;

use crate::clock::UnixMillis;
use crate::error::{OutboxError, SessionError, StoreError};
use crate::health::HealthTransition;
use crate::messages::{
    Appended, ChannelBounds, ChannelStats, Message, Offset, Retention, SHARED_SCOPE, Subscription,
};
use crate::outbox::{Enqueued, NewSend, OutboxCounts, OutboxId, OutboxItem, OutboxState, Retry};
use crate::sessions::{CrashMarked, CrashNotice, NewSession, Session, SessionId, SessionState};
use crate::store::{Committing, StartupInfo, Store};

/// The operations a session-oriented service needs from its durable store.
///
/// See the [`Store`] method of the same name for each one's contract;
/// methods with a body are defined by the others for every backend.
pub trait SessionStore: Clone + Send + Sync + 'static {
    // ---- lifecycle and meta ----

    /// What the store found when it opened ([`Store::startup`]).
    fn startup(&self) -> &StartupInfo;

    /// The current time by the store's clock ([`Store::now`]).
    fn now(&self) -> UnixMillis;

    /// Finishes queued writes, records a clean shutdown and stops writing
    /// ([`Store::close`]).
    fn close(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// [`SessionStore::close`] without recording a clean shutdown
    /// ([`Store::close_unclean`]).
    fn close_unclean(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Reads a meta value ([`Store::meta`]).
    fn meta(&self, key: &str) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;

    /// Writes a meta value ([`Store::set_meta`]).
    fn set_meta(
        &self,
        key: &str,
        value: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Whether the store is marked cleanly shut down ([`Store::clean_shutdown`]).
    fn clean_shutdown(&self) -> impl Future<Output = Result<bool, StoreError>> + Send {
        async move { Ok(self.meta("clean_shutdown").await?.as_deref() == Some("1")) }
    }

    /// Sets the clean-shutdown flag ([`Store::set_clean_shutdown`]).
    fn set_clean_shutdown(
        &self,
        clean: bool,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.set_meta("clean_shutdown", if clean { "1" } else { "0" })
    }

    // ---- sessions ----

    /// Creates a session ([`Store::create_session`]).
    fn create_session(
        &self,
        new: NewSession,
    ) -> impl Future<Output = Result<Session, SessionError>> + Send;

    /// Reads one session ([`Store::session`]).
    fn session(&self, id: &SessionId)
    -> impl Future<Output = Result<Session, SessionError>> + Send;

    /// Lists sessions ([`Store::sessions`]).
    fn sessions(
        &self,
        state: Option<SessionState>,
    ) -> impl Future<Output = Result<Vec<Session>, StoreError>> + Send;

    /// Counts sessions per stored state ([`Store::count_by_state`]).
    fn count_by_state(&self)
    -> impl Future<Output = Result<Vec<(String, u64)>, StoreError>> + Send;

    /// Moves a session along the state machine ([`Store::transition`]).
    fn transition(
        &self,
        id: &SessionId,
        to: SessionState,
    ) -> impl Future<Output = Result<Session, SessionError>> + Send;

    /// Records that a session's client was seen ([`Store::touch`]).
    fn touch(&self, id: &SessionId) -> impl Future<Output = Result<(), SessionError>> + Send;

    /// Replaces a session's meta text ([`Store::set_session_meta`]).
    fn set_session_meta(
        &self,
        id: &SessionId,
        meta: &str,
    ) -> impl Future<Output = Result<(), SessionError>> + Send;

    /// Crash recovery's scan without notices ([`Store::mark_crashed`]).
    fn mark_crashed(&self) -> impl Future<Output = Result<CrashMarked, StoreError>> + Send;

    /// Crash recovery's scan with notices ([`Store::mark_crashed_and_notify`]).
    fn mark_crashed_and_notify(
        &self,
        notice: CrashNotice,
    ) -> impl Future<Output = Result<CrashMarked, StoreError>> + Send;

    /// Deletes long-idle sessions ([`Store::purge_idle_sessions`]).
    fn purge_idle_sessions(
        &self,
        idle_for: Duration,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<SessionId>, StoreError>> + Send;

    /// Appends to a session's bounded activity log ([`Store::record_activity`]).
    fn record_activity(
        &self,
        id: &SessionId,
        kind: &str,
        detail: &str,
    ) -> impl Future<Output = Result<(), SessionError>> + Send;

    /// A session's activity log ([`Store::activity`]).
    fn activity(
        &self,
        id: &SessionId,
    ) -> impl Future<Output = Result<Vec<crate::sessions::Activity>, SessionError>> + Send;

    // ---- channel logs and subscriptions ----

    /// Queues an append with ids scoped to `scope` in `lane`
    /// ([`Store::queue_append_scoped`]): appends queued one after another
    /// in a lane get offsets in that order.
    fn queue_append_scoped<P>(
        &self,
        lane: u64,
        scope: &str,
        channel: &str,
        msg_id: &str,
        payload: P,
    ) -> impl Future<Output = Result<Committing<Appended>, StoreError>> + Send
    where
        P: AsRef<[u8]> + Send + 'static;

    /// Queues an append in the shared scope in `lane` ([`Store::queue_append_in`]).
    fn queue_append_in<P>(
        &self,
        lane: u64,
        channel: &str,
        msg_id: &str,
        payload: P,
    ) -> impl Future<Output = Result<Committing<Appended>, StoreError>> + Send
    where
        P: AsRef<[u8]> + Send + 'static,
    {
        self.queue_append_scoped(lane, SHARED_SCOPE, channel, msg_id, payload)
    }

    /// Queues an append in the shared scope in lane 0 ([`Store::queue_append`]).
    fn queue_append<P>(
        &self,
        channel: &str,
        msg_id: &str,
        payload: P,
    ) -> impl Future<Output = Result<Committing<Appended>, StoreError>> + Send
    where
        P: AsRef<[u8]> + Send + 'static,
    {
        self.queue_append_scoped(0, SHARED_SCOPE, channel, msg_id, payload)
    }

    /// Appends with ids scoped to `scope` and waits for the commit
    /// ([`Store::append_scoped`]).
    fn append_scoped(
        &self,
        scope: &str,
        channel: &str,
        msg_id: &str,
        payload: &[u8],
    ) -> impl Future<Output = Result<Appended, StoreError>> + Send {
        let queued = self.queue_append_scoped(0, scope, channel, msg_id, payload.to_vec());
        async move { queued.await?.await }
    }

    /// Appends in the shared scope and waits for the commit ([`Store::append`]).
    fn append(
        &self,
        channel: &str,
        msg_id: &str,
        payload: &[u8],
    ) -> impl Future<Output = Result<Appended, StoreError>> + Send {
        self.append_scoped(SHARED_SCOPE, channel, msg_id, payload)
    }

    /// Reads a page of a channel bounded in bytes ([`Store::read_channel_bounded`]).
    fn read_channel_bounded(
        &self,
        channel: &str,
        from: Offset,
        limit: usize,
        max_bytes: usize,
    ) -> impl Future<Output = Result<Vec<Message>, StoreError>> + Send;

    /// Reads a page of a channel ([`Store::read_channel`]).
    fn read_channel(
        &self,
        channel: &str,
        from: Offset,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Message>, StoreError>> + Send {
        self.read_channel_bounded(channel, from, limit, usize::MAX)
    }

    /// Channel names holding messages, in pages ([`Store::channels_after`]).
    fn channels_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// Which channels retention would cut now ([`Store::retention_due`]).
    fn retention_due(
        &self,
        channels: Vec<(String, Retention)>,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// Applies retention to one channel ([`Store::apply_retention_to`]).
    fn apply_retention_to(
        &self,
        channel: &str,
        policy: Retention,
        max_delete: u64,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Applies retention to every channel ([`Store::apply_retention`]).
    fn apply_retention(
        &self,
        policy: Retention,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// The largest channels ([`Store::channel_stats`]).
    fn channel_stats(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<(u64, Vec<ChannelStats>), StoreError>> + Send;

    /// A channel's retained range and next offset ([`Store::channel_bounds`]).
    fn channel_bounds(
        &self,
        channel: &str,
    ) -> impl Future<Output = Result<ChannelBounds, StoreError>> + Send;

    /// Subscribes a session ([`Store::subscribe`]).
    fn subscribe(
        &self,
        session: &SessionId,
        channel: &str,
        cursor: Offset,
    ) -> impl Future<Output = Result<Subscription, SessionError>> + Send;

    /// Moves a cursor forward ([`Store::ack`]).
    fn ack(
        &self,
        session: &SessionId,
        channel: &str,
        offset: Offset,
    ) -> impl Future<Output = Result<Offset, SessionError>> + Send;

    /// Removes a subscription ([`Store::unsubscribe`]).
    fn unsubscribe(
        &self,
        session: &SessionId,
        channel: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// A session's subscriptions ([`Store::subscriptions`]).
    fn subscriptions(
        &self,
        session: &SessionId,
    ) -> impl Future<Output = Result<Vec<Subscription>, StoreError>> + Send;

    // ---- outbox ----

    /// Enqueues a send under a per-session quota ([`Store::enqueue_within`]).
    fn enqueue_within(
        &self,
        send: NewSend,
        max_pending: Option<u64>,
    ) -> impl Future<Output = Result<Enqueued, OutboxError>> + Send;

    /// Enqueues a send ([`Store::enqueue`]).
    fn enqueue(&self, send: NewSend) -> impl Future<Output = Result<Enqueued, OutboxError>> + Send {
        self.enqueue_within(send, None)
    }

    /// Claims due items under a lease ([`Store::claim`]).
    fn claim(
        &self,
        worker: &str,
        lease: Duration,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<OutboxItem>, OutboxError>> + Send;

    /// Marks a claimed item SENT ([`Store::complete`]).
    fn complete(
        &self,
        id: OutboxId,
        worker: &str,
    ) -> impl Future<Output = Result<OutboxItem, OutboxError>> + Send;

    /// Records a failed attempt ([`Store::fail`]).
    fn fail(
        &self,
        id: OutboxId,
        worker: &str,
        error: &str,
        retry: Retry,
    ) -> impl Future<Output = Result<OutboxItem, OutboxError>> + Send;

    /// Moves an item to DEAD ([`Store::dead_letter`]).
    fn dead_letter(
        &self,
        id: OutboxId,
        reason: &str,
    ) -> impl Future<Output = Result<OutboxItem, OutboxError>> + Send;

    /// Re-queues a DEAD item ([`Store::redrive`]).
    fn redrive(&self, id: OutboxId)
    -> impl Future<Output = Result<OutboxItem, OutboxError>> + Send;

    /// Re-queues every DEAD item ([`Store::redrive_all`]).
    fn redrive_all(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Returns lapsed claims to PENDING ([`Store::release_expired_claims`]).
    fn release_expired_claims(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Reads one item ([`Store::outbox_item`]).
    fn outbox_item(
        &self,
        id: OutboxId,
    ) -> impl Future<Output = Result<OutboxItem, OutboxError>> + Send;

    /// Lists items in a state ([`Store::outbox_items`]).
    fn outbox_items(
        &self,
        state: OutboxState,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<OutboxItem>, StoreError>> + Send;

    /// Items per state ([`Store::outbox_counts`]).
    fn outbox_counts(&self) -> impl Future<Output = Result<OutboxCounts, StoreError>> + Send;

    // ---- health log ----

    /// Appends a health transition ([`Store::record_health_transition`]).
    fn record_health_transition(
        &self,
        from: &str,
        to: &str,
        reason: &str,
    ) -> impl Future<Output = Result<HealthTransition, StoreError>> + Send;

    /// The newest health transitions ([`Store::health_transitions`]).
    fn health_transitions(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<HealthTransition>, StoreError>> + Send;
}

/// The SQLite store: every method is the inherent one of the same name.
impl SessionStore for Store {
    fn startup(&self) -> &StartupInfo {
        Store::startup(self)
    }
    fn now(&self) -> UnixMillis {
        Store::now(self)
    }
    fn close(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        Store::close(self)
    }
    fn close_unclean(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        Store::close_unclean(self)
    }
    fn meta(&self, key: &str) -> impl Future<Output = Result<Option<String>, StoreError>> + Send {
        Store::meta(self, key)
    }
    fn set_meta(
        &self,
        key: &str,
        value: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        Store::set_meta(self, key, value)
    }
    fn create_session(
        &self,
        new: NewSession,
    ) -> impl Future<Output = Result<Session, SessionError>> + Send {
        Store::create_session(self, new)
    }
    fn session(
        &self,
        id: &SessionId,
    ) -> impl Future<Output = Result<Session, SessionError>> + Send {
        Store::session(self, id)
    }
    fn sessions(
        &self,
        state: Option<SessionState>,
    ) -> impl Future<Output = Result<Vec<Session>, StoreError>> + Send {
        Store::sessions(self, state)
    }
    fn count_by_state(
        &self,
    ) -> impl Future<Output = Result<Vec<(String, u64)>, StoreError>> + Send {
        Store::count_by_state(self)
    }
    fn transition(
        &self,
        id: &SessionId,
        to: SessionState,
    ) -> impl Future<Output = Result<Session, SessionError>> + Send {
        Store::transition(self, id, to)
    }
    fn touch(&self, id: &SessionId) -> impl Future<Output = Result<(), SessionError>> + Send {
        Store::touch(self, id)
    }
    fn set_session_meta(
        &self,
        id: &SessionId,
        meta: &str,
    ) -> impl Future<Output = Result<(), SessionError>> + Send {
        Store::set_session_meta(self, id, meta)
    }
    fn mark_crashed(&self) -> impl Future<Output = Result<CrashMarked, StoreError>> + Send {
        Store::mark_crashed(self)
    }
    fn mark_crashed_and_notify(
        &self,
        notice: CrashNotice,
    ) -> impl Future<Output = Result<CrashMarked, StoreError>> + Send {
        Store::mark_crashed_and_notify(self, notice)
    }
    fn purge_idle_sessions(
        &self,
        idle_for: Duration,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<SessionId>, StoreError>> + Send {
        Store::purge_idle_sessions(self, idle_for, limit)
    }
    fn record_activity(
        &self,
        id: &SessionId,
        kind: &str,
        detail: &str,
    ) -> impl Future<Output = Result<(), SessionError>> + Send {
        Store::record_activity(self, id, kind, detail)
    }
    fn activity(
        &self,
        id: &SessionId,
    ) -> impl Future<Output = Result<Vec<crate::sessions::Activity>, SessionError>> + Send {
        Store::activity(self, id)
    }
    fn queue_append_scoped<P>(
        &self,
        lane: u64,
        scope: &str,
        channel: &str,
        msg_id: &str,
        payload: P,
    ) -> impl Future<Output = Result<Committing<Appended>, StoreError>> + Send
    where
        P: AsRef<[u8]> + Send + 'static,
    {
        Store::queue_append_scoped(self, lane, scope, channel, msg_id, payload)
    }
    fn append_scoped(
        &self,
        scope: &str,
        channel: &str,
        msg_id: &str,
        payload: &[u8],
    ) -> impl Future<Output = Result<Appended, StoreError>> + Send {
        Store::append_scoped(self, scope, channel, msg_id, payload)
    }
    fn read_channel_bounded(
        &self,
        channel: &str,
        from: Offset,
        limit: usize,
        max_bytes: usize,
    ) -> impl Future<Output = Result<Vec<Message>, StoreError>> + Send {
        Store::read_channel_bounded(self, channel, from, limit, max_bytes)
    }
    fn read_channel(
        &self,
        channel: &str,
        from: Offset,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Message>, StoreError>> + Send {
        Store::read_channel(self, channel, from, limit)
    }
    fn channels_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send {
        Store::channels_after(self, after, limit)
    }
    fn retention_due(
        &self,
        channels: Vec<(String, Retention)>,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send {
        Store::retention_due(self, channels)
    }
    fn apply_retention_to(
        &self,
        channel: &str,
        policy: Retention,
        max_delete: u64,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send {
        Store::apply_retention_to(self, channel, policy, max_delete)
    }
    fn apply_retention(
        &self,
        policy: Retention,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send {
        Store::apply_retention(self, policy)
    }
    fn channel_stats(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<(u64, Vec<ChannelStats>), StoreError>> + Send {
        Store::channel_stats(self, limit)
    }
    fn channel_bounds(
        &self,
        channel: &str,
    ) -> impl Future<Output = Result<ChannelBounds, StoreError>> + Send {
        Store::channel_bounds(self, channel)
    }
    fn subscribe(
        &self,
        session: &SessionId,
        channel: &str,
        cursor: Offset,
    ) -> impl Future<Output = Result<Subscription, SessionError>> + Send {
        Store::subscribe(self, session, channel, cursor)
    }
    fn ack(
        &self,
        session: &SessionId,
        channel: &str,
        offset: Offset,
    ) -> impl Future<Output = Result<Offset, SessionError>> + Send {
        Store::ack(self, session, channel, offset)
    }
    fn unsubscribe(
        &self,
        session: &SessionId,
        channel: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        Store::unsubscribe(self, session, channel)
    }
    fn subscriptions(
        &self,
        session: &SessionId,
    ) -> impl Future<Output = Result<Vec<Subscription>, StoreError>> + Send {
        Store::subscriptions(self, session)
    }
    fn enqueue_within(
        &self,
        send: NewSend,
        max_pending: Option<u64>,
    ) -> impl Future<Output = Result<Enqueued, OutboxError>> + Send {
        Store::enqueue_within(self, send, max_pending)
    }
    fn claim(
        &self,
        worker: &str,
        lease: Duration,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<OutboxItem>, OutboxError>> + Send {
        Store::claim(self, worker, lease, limit)
    }
    fn complete(
        &self,
        id: OutboxId,
        worker: &str,
    ) -> impl Future<Output = Result<OutboxItem, OutboxError>> + Send {
        Store::complete(self, id, worker)
    }
    fn fail(
        &self,
        id: OutboxId,
        worker: &str,
        error: &str,
        retry: Retry,
    ) -> impl Future<Output = Result<OutboxItem, OutboxError>> + Send {
        Store::fail(self, id, worker, error, retry)
    }
    fn dead_letter(
        &self,
        id: OutboxId,
        reason: &str,
    ) -> impl Future<Output = Result<OutboxItem, OutboxError>> + Send {
        Store::dead_letter(self, id, reason)
    }
    fn redrive(
        &self,
        id: OutboxId,
    ) -> impl Future<Output = Result<OutboxItem, OutboxError>> + Send {
        Store::redrive(self, id)
    }
    fn redrive_all(&self) -> impl Future<Output = Result<u64, StoreError>> + Send {
        Store::redrive_all(self)
    }
    fn release_expired_claims(&self) -> impl Future<Output = Result<u64, StoreError>> + Send {
        Store::release_expired_claims(self)
    }
    fn outbox_item(
        &self,
        id: OutboxId,
    ) -> impl Future<Output = Result<OutboxItem, OutboxError>> + Send {
        Store::outbox_item(self, id)
    }
    fn outbox_items(
        &self,
        state: OutboxState,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<OutboxItem>, StoreError>> + Send {
        Store::outbox_items(self, state, limit)
    }
    fn outbox_counts(&self) -> impl Future<Output = Result<OutboxCounts, StoreError>> + Send {
        Store::outbox_counts(self)
    }
    fn record_health_transition(
        &self,
        from: &str,
        to: &str,
        reason: &str,
    ) -> impl Future<Output = Result<HealthTransition, StoreError>> + Send {
        Store::record_health_transition(self, from, to, reason)
    }
    fn health_transitions(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<HealthTransition>, StoreError>> + Send {
        Store::health_transitions(self, limit)
    }
}
