//! keel-store's contract ([`SessionStore`]) on the SQLite [`Store`]: each
//! method is the inherent one of the same name, which the store's modules
//! implement by concern (sessions, messages, outbox, health, store).

use std::future::Future;
use std::time::Duration;

use crate::{
    Appended, ChannelBounds, ChannelStats, Committing, CrashMarked, CrashNotice, Enqueued,
    HealthTransition, Message, NewSend, NewSession, Offset, OutboxCounts, OutboxError, OutboxId,
    OutboxItem, OutboxState, Retention, Retry, Session, SessionError, SessionId, SessionState,
    SessionStore, StartupInfo, Store, StoreError, Subscription, UnixMillis,
};

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
