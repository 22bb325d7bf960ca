//! [`SessionStore`] on PostgreSQL, split by concern as keel-session's
//! SQLite store is: [`sessions`], [`channels`], [`outbox`], [`health`]; each
//! operation as one statement where it can be (one round trip, atomic on
//! its own), or one short transaction. This file holds what they share (a
//! transaction with retries, single statements) and the trait's
//! implementation, which hands each method to its concern.

use std::time::Duration;

use keel_store::{
    Activity, Appended, ChannelBounds, ChannelStats, Committing, CrashMarked, CrashNotice,
    Enqueued, HealthTransition, Message, NewSend, NewSession, Offset, OutboxCounts, OutboxError,
    OutboxId, OutboxItem, OutboxState, Retention, Retry, Session, SessionError, SessionId,
    SessionState, SessionStore, StartupInfo, StoreError, Subscription, UnixMillis,
};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use crate::PgStore;
use crate::error::{AsStore, pg, retryable};

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// Runs `$body` in a transaction on a pooled connection, as `$tx` at time
/// `$now`, and commits; `?` in the body rolls back. A transient conflict
/// (see [`retryable`]) runs the whole transaction again, at most four
/// times.
macro_rules! txn {
    ($store:expr, $err:ty, |$tx:ident, $now:ident| $body:block) => {{
        let store: &PgStore = $store;
        let mut tries = 0u32;
        loop {
            tries += 1;
            let out: Result<_, $err> = async {
                store.check_open()?;
                let mut conn = store.conn().await?;
                let $tx = conn.transaction().await.map_err(pg)?;
                let $now: UnixMillis = store.now_millis();
                let value = $body;
                $tx.commit().await.map_err(pg)?;
                Ok(value)
            }
            .await;
            match out {
                Err(e) if tries < 4 && retryable(&e) => continue,
                other => break other,
            }
        }
    }};
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_sql(o: Offset) -> i64 {
    i64::try_from(o).unwrap_or(i64::MAX)
}

mod channels;
mod health;
mod outbox;
mod sessions;

pub(crate) use sessions::{append_notices, crash_sessions};

impl PgStore {
    /// One statement on a pooled connection, in autocommit (atomic on its
    /// own, one round trip), run again on a transient conflict.
    async fn write1<E: From<StoreError> + AsStore>(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Vec<Row>, E> {
        let mut tries = 0u32;
        loop {
            tries += 1;
            let out: Result<Vec<Row>, E> = async {
                self.check_open()?;
                let conn = self.conn().await?;
                let stmt = conn.prepare_cached(sql).await.map_err(pg)?;
                Ok(conn.query(&stmt, params).await.map_err(pg)?)
            }
            .await;
            match out {
                Err(e) if tries < 4 && retryable(&e) => continue,
                other => return other,
            }
        }
    }

    /// One read-only statement (reads keep working after `close`).
    async fn read<E: From<StoreError>>(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Vec<Row>, E> {
        let conn = self.conn().await?;
        let stmt = conn.prepare_cached(sql).await.map_err(pg)?;
        Ok(conn.query(&stmt, params).await.map_err(pg)?)
    }
}

impl SessionStore for PgStore {
    fn startup(&self) -> &StartupInfo {
        self.startup_info()
    }

    fn now(&self) -> UnixMillis {
        self.now_millis()
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.close_inner(true).await
    }

    async fn close_unclean(&self) -> Result<(), StoreError> {
        self.close_inner(false).await
    }

    async fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        let rows = self
            .read::<StoreError>(
                "SELECT value FROM keel_meta WHERE node = $1 AND key = $2",
                &[&self.node_id(), &key],
            )
            .await?;
        Ok(rows.first().map(|r| r.get(0)))
    }

    async fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.write1::<StoreError>(
            "INSERT INTO keel_meta(node, key, value) VALUES ($1, $2, $3)
             ON CONFLICT (node, key) DO UPDATE SET value = excluded.value",
            &[&self.node_id(), &key, &value],
        )
        .await?;
        Ok(())
    }

    async fn create_session(&self, new: NewSession) -> Result<Session, SessionError> {
        sessions::create_session(self, new).await
    }

    async fn session(&self, id: &SessionId) -> Result<Session, SessionError> {
        sessions::session(self, id).await
    }

    async fn sessions(&self, state: Option<SessionState>) -> Result<Vec<Session>, StoreError> {
        sessions::sessions(self, state).await
    }

    async fn count_by_state(&self) -> Result<Vec<(String, u64)>, StoreError> {
        sessions::count_by_state(self).await
    }

    async fn transition(&self, id: &SessionId, to: SessionState) -> Result<Session, SessionError> {
        sessions::transition(self, id, to).await
    }

    async fn touch(&self, id: &SessionId) -> Result<(), SessionError> {
        sessions::touch(self, id).await
    }

    async fn set_session_meta(&self, id: &SessionId, meta: &str) -> Result<(), SessionError> {
        sessions::set_session_meta(self, id, meta).await
    }

    async fn mark_crashed(&self) -> Result<CrashMarked, StoreError> {
        sessions::mark_crashed(self).await
    }

    async fn mark_crashed_and_notify(
        &self,
        notice: CrashNotice,
    ) -> Result<CrashMarked, StoreError> {
        sessions::mark_crashed_and_notify(self, notice).await
    }

    async fn purge_idle_sessions(
        &self,
        idle_for: Duration,
        limit: usize,
    ) -> Result<Vec<SessionId>, StoreError> {
        sessions::purge_idle_sessions(self, idle_for, limit).await
    }

    async fn record_activity(
        &self,
        id: &SessionId,
        kind: &str,
        detail: &str,
    ) -> Result<(), SessionError> {
        sessions::record_activity(self, id, kind, detail).await
    }

    async fn activity(&self, id: &SessionId) -> Result<Vec<Activity>, SessionError> {
        sessions::activity(self, id).await
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
        channels::queue_append_scoped(self, lane, scope, channel, msg_id, payload).await
    }

    async fn read_channel_bounded(
        &self,
        channel: &str,
        from: Offset,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<Message>, StoreError> {
        channels::read_channel_bounded(self, channel, from, limit, max_bytes).await
    }

    async fn channels_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        channels::channels_after(self, after, limit).await
    }

    async fn retention_due(
        &self,
        channels: Vec<(String, Retention)>,
    ) -> Result<Vec<String>, StoreError> {
        channels::retention_due(self, channels).await
    }

    async fn apply_retention_to(
        &self,
        channel: &str,
        policy: Retention,
        max_delete: u64,
    ) -> Result<u64, StoreError> {
        channels::apply_retention_to(self, channel, policy, max_delete).await
    }

    async fn apply_retention(&self, policy: Retention) -> Result<u64, StoreError> {
        channels::apply_retention(self, policy).await
    }

    async fn channel_stats(&self, limit: usize) -> Result<(u64, Vec<ChannelStats>), StoreError> {
        channels::channel_stats(self, limit).await
    }

    async fn channel_bounds(&self, channel: &str) -> Result<ChannelBounds, StoreError> {
        channels::channel_bounds(self, channel).await
    }

    async fn subscribe(
        &self,
        session: &SessionId,
        channel: &str,
        cursor: Offset,
    ) -> Result<Subscription, SessionError> {
        channels::subscribe(self, session, channel, cursor).await
    }

    async fn ack(
        &self,
        session: &SessionId,
        channel: &str,
        offset: Offset,
    ) -> Result<Offset, SessionError> {
        channels::ack(self, session, channel, offset).await
    }

    async fn unsubscribe(&self, session: &SessionId, channel: &str) -> Result<bool, StoreError> {
        channels::unsubscribe(self, session, channel).await
    }

    async fn subscriptions(&self, session: &SessionId) -> Result<Vec<Subscription>, StoreError> {
        channels::subscriptions(self, session).await
    }

    async fn enqueue_within(
        &self,
        send: NewSend,
        max_pending: Option<u64>,
    ) -> Result<Enqueued, OutboxError> {
        outbox::enqueue_within(self, send, max_pending).await
    }

    async fn claim(
        &self,
        worker: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<OutboxItem>, OutboxError> {
        outbox::claim(self, worker, lease, limit).await
    }

    async fn complete(&self, id: OutboxId, worker: &str) -> Result<OutboxItem, OutboxError> {
        outbox::complete(self, id, worker).await
    }

    async fn fail(
        &self,
        id: OutboxId,
        worker: &str,
        error: &str,
        retry: Retry,
    ) -> Result<OutboxItem, OutboxError> {
        outbox::fail(self, id, worker, error, retry).await
    }

    async fn dead_letter(&self, id: OutboxId, reason: &str) -> Result<OutboxItem, OutboxError> {
        outbox::dead_letter(self, id, reason).await
    }

    async fn redrive(&self, id: OutboxId) -> Result<OutboxItem, OutboxError> {
        outbox::redrive(self, id).await
    }

    async fn redrive_all(&self) -> Result<u64, StoreError> {
        outbox::redrive_all(self).await
    }

    async fn release_expired_claims(&self) -> Result<u64, StoreError> {
        outbox::release_expired_claims(self).await
    }

    async fn outbox_item(&self, id: OutboxId) -> Result<OutboxItem, OutboxError> {
        outbox::outbox_item(self, id).await
    }

    async fn outbox_items(
        &self,
        state: OutboxState,
        limit: usize,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        outbox::outbox_items(self, state, limit).await
    }

    async fn outbox_counts(&self) -> Result<OutboxCounts, StoreError> {
        outbox::outbox_counts(self).await
    }

    async fn record_health_transition(
        &self,
        from: &str,
        to: &str,
        reason: &str,
    ) -> Result<HealthTransition, StoreError> {
        health::record_health_transition(self, from, to, reason).await
    }

    async fn health_transitions(&self, limit: usize) -> Result<Vec<HealthTransition>, StoreError> {
        health::health_transitions(self, limit).await
    }
}
