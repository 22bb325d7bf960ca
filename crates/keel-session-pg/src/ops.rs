//! [`SessionStore`] on PostgreSQL: each operation as one statement where it
//! can be (one round trip, atomic on its own), or one short transaction.

use std::time::Duration;

use keel_session::{
    Activity, Appended, ChannelBounds, ChannelStats, Committing, CrashMarked, CrashNotice,
    CrashedSession, Enqueued, HealthTransition, Message, NewSend, NewSession, Offset, OutboxCounts,
    OutboxError, OutboxId, OutboxItem, OutboxState, Retention, Retry, SYSTEM_SCOPE, Session,
    SessionError, SessionId, SessionState, SessionStore, StartupInfo, StoreError, Subscription,
    UnixMillis,
};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use crate::PgStore;
use crate::error::{AsStore, pg, retryable};
use crate::writer::{Append, Framing, Item, Job, LOCK_CHANNELS, Statements, append_batch};

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

const SESSION_COLUMNS: &str = "id, token_hash, state, created_at, updated_at, last_seen_at, \
                               recovered_at, crash_count, meta";

fn session_from_row(r: &Row) -> Result<Session, SessionError> {
    let id = SessionId(r.get(0));
    let raw: String = r.get(2);
    let Ok(state) = raw.parse() else {
        return Err(SessionError::UnknownState { id, state: raw });
    };
    Ok(Session {
        id,
        token_hash: r.get(1),
        state,
        created_at: r.get(3),
        updated_at: r.get(4),
        last_seen_at: r.get(5),
        recovered_at: r.get(6),
        crash_count: r.get::<_, i32>(7) as u32,
        meta: r.get(8),
    })
}

const ITEM_COLUMNS: &str = "id, session_id, idem_key, payload, state, claimed_by, claim_until, \
                            attempts, next_attempt_at, last_error, created_at, sent_at, scope";

fn outbox_state(s: &str) -> OutboxState {
    match s {
        "PENDING" => OutboxState::Pending,
        "CLAIMED" => OutboxState::Claimed,
        "SENT" => OutboxState::Sent,
        _ => OutboxState::Dead,
    }
}

fn item_from_row(r: &Row) -> OutboxItem {
    OutboxItem {
        id: OutboxId(r.get(0)),
        session_id: r.get::<_, Option<String>>(1).map(SessionId),
        idem_key: r.get(2),
        payload: r.get(3),
        state: outbox_state(r.get(4)),
        claimed_by: r.get(5),
        claim_until: r.get(6),
        attempts: r.get::<_, i32>(7) as u32,
        next_attempt_at: r.get(8),
        last_error: r.get(9),
        created_at: r.get(10),
        sent_at: r.get(11),
        scope: r.get(12),
    }
}

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

    /// The item's state, to tell "not found" from "wrong state".
    async fn outbox_miss(&self, id: OutboxId, expected: &'static str) -> OutboxError {
        match self
            .read::<StoreError>("SELECT state FROM outbox WHERE id = $1", &[&id.0])
            .await
        {
            Ok(rows) => match rows.first() {
                None => OutboxError::NotFound(id),
                Some(r) => OutboxError::WrongState {
                    id,
                    state: r.get(0),
                    expected,
                },
            },
            Err(e) => OutboxError::Store(e),
        }
    }

    async fn claimed_miss(&self, id: OutboxId, worker: &str) -> OutboxError {
        match self.outbox_miss(id, "CLAIMED").await {
            OutboxError::WrongState { .. } => OutboxError::NotClaimed {
                id,
                worker: worker.to_owned(),
            },
            other => other,
        }
    }

    async fn mark_crashed_inner(
        &self,
        notice: Option<CrashNotice>,
    ) -> Result<CrashMarked, StoreError> {
        let node = self.node_id().to_owned();
        txn!(self, StoreError, |tx, now| {
            crash_sessions(&tx, now, &node, true, notice.as_ref()).await?
        })
    }

    /// Where retention cuts `channel` (see keel-session): `Some(cut)` when
    /// the messages at or below offset `cut` must go, at most `max_delete`.
    async fn retention_cut<C: tokio_postgres::GenericClient + Sync>(
        client: &C,
        now: UnixMillis,
        channel: &str,
        policy: Retention,
        max_delete: u64,
    ) -> Result<Option<i64>, StoreError> {
        let row = client
            .query_one(
                "SELECT MIN(seq), MAX(seq) FROM messages WHERE channel = $1",
                &[&channel],
            )
            .await
            .map_err(pg)?;
        let (Some(first), Some(last)): (Option<i64>, Option<i64>) = (row.get(0), row.get(1)) else {
            return Ok(None);
        };
        // The most this call may remove ends here.
        let bound = (first - 1).saturating_add(to_sql(max_delete));
        let mut cut = first - 1;
        if let Some(max) = policy.max_count {
            cut = cut.max(last.saturating_sub(to_sql(max)));
        }
        if let Some(age) = policy.max_age {
            let cutoff = now.saturating_sub(ms(age));
            // Only the first `max_delete` messages are looked at: a log
            // that has aged whole is not read whole.
            let young = client
                .query_opt(
                    "SELECT seq FROM messages WHERE channel = $1 AND seq <= $3 AND at >= $2
                     ORDER BY seq LIMIT 1",
                    &[&channel, &cutoff, &bound],
                )
                .await
                .map_err(pg)?
                .map(|r| r.get::<_, i64>(0));
            cut = cut.max(young.map_or(last.min(bound), |y| y - 1));
        }
        cut = cut.min(bound);
        Ok((cut >= first).then_some(cut))
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
        let id = new.id.clone().unwrap_or_else(|| {
            SessionId(
                (0..16)
                    .map(|_| format!("{:02x}", rand::random::<u8>()))
                    .collect(),
            )
        });
        let (stored, node) = if new.connected {
            (SessionState::Active, Some(self.node_id()))
        } else {
            (SessionState::Created, None)
        };
        let now = self.now_millis();
        let rows = self
            .write1::<SessionError>(
                "INSERT INTO sessions(id, token_hash, state, created_at, updated_at, meta, node)
                 VALUES ($1, $2, $3, $4, $4, $5, $6) ON CONFLICT (id) DO NOTHING RETURNING id",
                &[
                    &id.as_str(),
                    &new.token_hash,
                    &stored.as_str(),
                    &now,
                    &new.meta,
                    &node,
                ],
            )
            .await?;
        if rows.is_empty() {
            return Err(SessionError::AlreadyExists(id));
        }
        Ok(Session {
            id,
            token_hash: new.token_hash,
            state: SessionState::Created,
            created_at: now,
            updated_at: now,
            last_seen_at: None,
            recovered_at: None,
            crash_count: 0,
            meta: new.meta,
        })
    }

    async fn session(&self, id: &SessionId) -> Result<Session, SessionError> {
        let sql = format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = $1");
        let rows = self.read::<SessionError>(&sql, &[&id.as_str()]).await?;
        match rows.first() {
            Some(r) => session_from_row(r),
            None => Err(SessionError::NotFound(id.clone())),
        }
    }

    async fn sessions(&self, state: Option<SessionState>) -> Result<Vec<Session>, StoreError> {
        let rows = match state {
            Some(st) => {
                let sql =
                    format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE state = $1 ORDER BY id");
                self.read::<StoreError>(&sql, &[&st.as_str()]).await?
            }
            None => {
                let sql = format!("SELECT {SESSION_COLUMNS} FROM sessions ORDER BY id");
                self.read::<StoreError>(&sql, &[]).await?
            }
        };
        Ok(rows
            .iter()
            .filter_map(|r| session_from_row(r).ok())
            .collect())
    }

    async fn count_by_state(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let rows = self
            .read::<StoreError>(
                "SELECT state, COUNT(*) FROM sessions GROUP BY state ORDER BY state COLLATE \"C\"",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
            .collect())
    }

    async fn transition(&self, id: &SessionId, to: SessionState) -> Result<Session, SessionError> {
        let node = (to == SessionState::Active).then(|| self.node_id().to_owned());
        txn!(self, SessionError, |tx, now| {
            let sql = format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = $1 FOR UPDATE");
            let Some(row) = tx.query_opt(&sql, &[&id.as_str()]).await.map_err(pg)? else {
                return Err(SessionError::NotFound(id.clone()));
            };
            let mut session = session_from_row(&row)?;
            if !session.state.can_transition_to(to) {
                return Err(SessionError::InvalidTransition {
                    from: session.state,
                    to,
                });
            }
            session.state = to;
            session.updated_at = now;
            match to {
                SessionState::Active => session.last_seen_at = Some(now),
                SessionState::Crashed => {
                    session.recovered_at = Some(now);
                    session.crash_count += 1;
                }
                _ => {}
            }
            tx.execute(
                "UPDATE sessions SET state = $2, updated_at = $3, last_seen_at = $4,
                 recovered_at = $5, crash_count = $6, node = COALESCE($7, node) WHERE id = $1",
                &[
                    &id.as_str(),
                    &to.as_str(),
                    &now,
                    &session.last_seen_at,
                    &session.recovered_at,
                    &(session.crash_count as i32),
                    &node,
                ],
            )
            .await
            .map_err(pg)?;
            session
        })
    }

    async fn touch(&self, id: &SessionId) -> Result<(), SessionError> {
        let now = self.now_millis();
        let rows = self
            .write1::<SessionError>(
                "UPDATE sessions SET last_seen_at = $2 WHERE id = $1 RETURNING id",
                &[&id.as_str(), &now],
            )
            .await?;
        if rows.is_empty() {
            return Err(SessionError::NotFound(id.clone()));
        }
        Ok(())
    }

    async fn set_session_meta(&self, id: &SessionId, meta: &str) -> Result<(), SessionError> {
        let now = self.now_millis();
        let rows = self
            .write1::<SessionError>(
                "UPDATE sessions SET meta = $2, updated_at = $3 WHERE id = $1 RETURNING id",
                &[&id.as_str(), &meta, &now],
            )
            .await?;
        if rows.is_empty() {
            return Err(SessionError::NotFound(id.clone()));
        }
        Ok(())
    }

    async fn mark_crashed(&self) -> Result<CrashMarked, StoreError> {
        self.mark_crashed_inner(None).await
    }

    async fn mark_crashed_and_notify(
        &self,
        notice: CrashNotice,
    ) -> Result<CrashMarked, StoreError> {
        self.mark_crashed_inner(Some(notice)).await
    }

    async fn purge_idle_sessions(
        &self,
        idle_for: Duration,
        limit: usize,
    ) -> Result<Vec<SessionId>, StoreError> {
        txn!(self, StoreError, |tx, now| {
            let cutoff = now.saturating_sub(ms(idle_for));
            let ids: Vec<String> = tx
                .query(
                    "SELECT id FROM sessions WHERE state <> 'ACTIVE' AND updated_at < $1
                     ORDER BY updated_at, id LIMIT $2 FOR UPDATE SKIP LOCKED",
                    &[&cutoff, &count(limit)],
                )
                .await
                .map_err(pg)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let channels: Vec<String> = ids
                .iter()
                .map(|id| SessionId(id.clone()).private_channel())
                .collect();
            // The channel rows first: locking them (in name order, as
            // appends do) waits for appends in flight and keeps later ones
            // out until this commits, so no message outlives its channel's
            // counter.
            tx.execute(LOCK_CHANNELS, &[&channels]).await.map_err(pg)?;
            tx.execute("DELETE FROM channels WHERE name = ANY($1)", &[&channels])
                .await
                .map_err(pg)?;
            tx.execute("DELETE FROM messages WHERE channel = ANY($1)", &[&channels])
                .await
                .map_err(pg)?;
            tx.execute("DELETE FROM sessions WHERE id = ANY($1)", &[&ids])
                .await
                .map_err(pg)?;
            ids.into_iter().map(SessionId).collect()
        })
    }

    async fn record_activity(
        &self,
        id: &SessionId,
        kind: &str,
        detail: &str,
    ) -> Result<(), SessionError> {
        let limit = count(self.config().activity_limit);
        txn!(self, SessionError, |tx, now| {
            let inserted = tx
                .execute(
                    "INSERT INTO activity(session_id, at, kind, detail)
                     SELECT id, $2, $3, $4 FROM sessions WHERE id = $1",
                    &[&id.as_str(), &now, &kind, &detail],
                )
                .await
                .map_err(pg)?;
            if inserted == 0 {
                return Err(SessionError::NotFound(id.clone()));
            }
            tx.execute(
                "DELETE FROM activity WHERE session_id = $1 AND id <= (
                   SELECT id FROM activity WHERE session_id = $1
                   ORDER BY id DESC LIMIT 1 OFFSET $2)",
                &[&id.as_str(), &limit],
            )
            .await
            .map_err(pg)?;
        })
    }

    async fn activity(&self, id: &SessionId) -> Result<Vec<Activity>, SessionError> {
        let rows = self
            .read::<SessionError>(
                "SELECT at, kind, detail FROM activity WHERE session_id = $1 ORDER BY id",
                &[&id.as_str()],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Activity {
                at: r.get(0),
                kind: r.get(1),
                detail: r.get(2),
            })
            .collect())
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
        self.check_open()?;
        let (reply, rx) = tokio::sync::oneshot::channel();
        let job = Job::Append(Append {
            lane,
            scope: scope.to_owned(),
            channel: channel.to_owned(),
            msg_id: msg_id.to_owned(),
            payload: payload.as_ref().to_vec(),
            reply,
        });
        self.writes()
            .send(job)
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(Committing::new(rx))
    }

    async fn read_channel_bounded(
        &self,
        channel: &str,
        from: Offset,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<Message>, StoreError> {
        // A message is in the page when the bytes before it are under the
        // bound: the page ends with the message that reaches it.
        let rows = self
            .read::<StoreError>(
                "SELECT seq, msg_id, at, payload FROM (
                   SELECT seq, msg_id, at, payload,
                          SUM(octet_length(payload)) OVER (ORDER BY seq) - octet_length(payload) AS before
                   FROM messages WHERE channel = $1 AND seq >= $2 ORDER BY seq LIMIT $3
                 ) page WHERE before < GREATEST($4::bigint, 1) ORDER BY seq",
                &[&channel, &to_sql(from), &count(limit), &count(max_bytes)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Message {
                channel: channel.to_owned(),
                offset: r.get::<_, i64>(0) as Offset,
                msg_id: r.get(1),
                at: r.get(2),
                payload: r.get(3),
            })
            .collect())
    }

    async fn channels_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let rows = self
            .read::<StoreError>(
                "SELECT name FROM channels c WHERE name > $1
                 AND EXISTS (SELECT 1 FROM messages m WHERE m.channel = c.name)
                 ORDER BY name LIMIT $2",
                &[&after.unwrap_or(""), &count(limit)],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn retention_due(
        &self,
        channels: Vec<(String, Retention)>,
    ) -> Result<Vec<String>, StoreError> {
        let now = self.now_millis();
        let conn = self.conn().await?;
        let client: &tokio_postgres::Client = &conn;
        let mut due = Vec::new();
        for (channel, policy) in channels {
            if Self::retention_cut(client, now, &channel, policy, 1)
                .await?
                .is_some()
            {
                due.push(channel);
            }
        }
        Ok(due)
    }

    async fn apply_retention_to(
        &self,
        channel: &str,
        policy: Retention,
        max_delete: u64,
    ) -> Result<u64, StoreError> {
        txn!(self, StoreError, |tx, now| {
            let client: &tokio_postgres::Transaction<'_> = &tx;
            match Self::retention_cut(client, now, channel, policy, max_delete).await? {
                None => 0,
                Some(cut) => tx
                    .execute(
                        "DELETE FROM messages WHERE channel = $1 AND seq <= $2",
                        &[&channel, &cut],
                    )
                    .await
                    .map_err(pg)?,
            }
        })
    }

    async fn apply_retention(&self, policy: Retention) -> Result<u64, StoreError> {
        txn!(self, StoreError, |tx, now| {
            let mut removed = 0;
            if let Some(max) = policy.max_count {
                removed += tx
                    .execute(
                        "DELETE FROM messages m USING channels c
                         WHERE c.name = m.channel AND m.seq <= c.next_offset - 1 - $1",
                        &[&to_sql(max)],
                    )
                    .await
                    .map_err(pg)?;
            }
            if let Some(age) = policy.max_age {
                let cutoff = now.saturating_sub(ms(age));
                removed += tx
                    .execute(
                        "WITH cut AS (
                           SELECT channel, MAX(seq) AS upto FROM messages WHERE at < $1 GROUP BY channel)
                         DELETE FROM messages m USING cut
                         WHERE m.channel = cut.channel AND m.seq <= cut.upto",
                        &[&cutoff],
                    )
                    .await
                    .map_err(pg)?;
            }
            removed
        })
    }

    async fn channel_stats(&self, limit: usize) -> Result<(u64, Vec<ChannelStats>), StoreError> {
        let total = self
            .read::<StoreError>("SELECT COUNT(DISTINCT channel) FROM messages", &[])
            .await?;
        let rows = self
            .read::<StoreError>(
                "SELECT channel, COUNT(*), MIN(seq), MAX(seq), SUM(octet_length(payload))::BIGINT
                 FROM messages GROUP BY channel ORDER BY COUNT(*) DESC, channel LIMIT $1",
                &[&count(limit)],
            )
            .await?;
        let total = total.first().map_or(0, |r| r.get::<_, i64>(0) as u64);
        Ok((
            total,
            rows.iter()
                .map(|r| ChannelStats {
                    channel: r.get(0),
                    messages: r.get::<_, i64>(1) as u64,
                    first: r.get::<_, i64>(2) as Offset,
                    last: r.get::<_, i64>(3) as Offset,
                    payload_bytes: r.get::<_, i64>(4) as u64,
                })
                .collect(),
        ))
    }

    async fn channel_bounds(&self, channel: &str) -> Result<ChannelBounds, StoreError> {
        let rows = self
            .read::<StoreError>(
                "SELECT (SELECT MIN(seq) FROM messages WHERE channel = $1),
                        (SELECT next_offset FROM channels WHERE name = $1)",
                &[&channel],
            )
            .await?;
        let (first, next): (Option<i64>, Option<i64>) =
            rows.first().map_or((None, None), |r| (r.get(0), r.get(1)));
        Ok(ChannelBounds {
            first: first.map(|f| f as Offset),
            next: next.unwrap_or(1) as Offset,
        })
    }

    async fn subscribe(
        &self,
        session: &SessionId,
        channel: &str,
        cursor: Offset,
    ) -> Result<Subscription, SessionError> {
        let rows = self
            .write1::<SessionError>(
                "INSERT INTO subscriptions(session_id, channel, cursor)
                 SELECT id, $2, $3 FROM sessions WHERE id = $1
                 ON CONFLICT (session_id, channel)
                 DO UPDATE SET cursor = GREATEST(subscriptions.cursor, excluded.cursor)
                 RETURNING cursor",
                &[&session.as_str(), &channel, &to_sql(cursor)],
            )
            .await?;
        match rows.first() {
            Some(r) => Ok(Subscription {
                channel: channel.to_owned(),
                cursor: r.get::<_, i64>(0) as Offset,
            }),
            None => Err(SessionError::NotFound(session.clone())),
        }
    }

    async fn ack(
        &self,
        session: &SessionId,
        channel: &str,
        offset: Offset,
    ) -> Result<Offset, SessionError> {
        // One statement: whether the subscription exists, the channel's
        // last offset, and the moved cursor when the ack is within it.
        let rows = self
            .write1::<SessionError>(
                "WITH head AS (
                   SELECT COALESCE((SELECT next_offset FROM channels WHERE name = $2), 1) - 1 AS last
                 ), moved AS (
                   UPDATE subscriptions SET cursor = GREATEST(cursor, $3)
                   WHERE session_id = $1 AND channel = $2 AND $3 <= (SELECT last FROM head)
                   RETURNING cursor
                 )
                 SELECT EXISTS (SELECT 1 FROM subscriptions WHERE session_id = $1 AND channel = $2),
                        (SELECT last FROM head), (SELECT cursor FROM moved)",
                &[&session.as_str(), &channel, &to_sql(offset)],
            )
            .await?;
        let row = rows
            .first()
            .ok_or(SessionError::Store(StoreError::Closed))?;
        let (subscribed, last, cursor): (bool, i64, Option<i64>) =
            (row.get(0), row.get(1), row.get(2));
        match cursor {
            Some(c) => Ok(c as Offset),
            None if !subscribed => Err(SessionError::NotSubscribed {
                session: session.clone(),
                channel: channel.to_owned(),
            }),
            None => Err(SessionError::BeyondHead {
                channel: channel.to_owned(),
                offset,
                last: last as Offset,
            }),
        }
    }

    async fn unsubscribe(&self, session: &SessionId, channel: &str) -> Result<bool, StoreError> {
        let rows = self
            .write1::<StoreError>(
                "DELETE FROM subscriptions WHERE session_id = $1 AND channel = $2 RETURNING 1",
                &[&session.as_str(), &channel],
            )
            .await?;
        Ok(!rows.is_empty())
    }

    async fn subscriptions(&self, session: &SessionId) -> Result<Vec<Subscription>, StoreError> {
        let rows = self
            .read::<StoreError>(
                "SELECT channel, cursor FROM subscriptions WHERE session_id = $1 ORDER BY channel",
                &[&session.as_str()],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Subscription {
                channel: r.get(0),
                cursor: r.get::<_, i64>(1) as Offset,
            })
            .collect())
    }

    async fn enqueue_within(
        &self,
        send: NewSend,
        max_pending: Option<u64>,
    ) -> Result<Enqueued, OutboxError> {
        let scope = match (&send.scope, &send.session_id) {
            (s, _) if !s.is_empty() => s.clone(),
            (_, Some(session)) => format!("session:{}", session.as_str()),
            (_, None) => String::new(),
        };
        let session = send.session_id.as_ref().map(SessionId::as_str);
        txn!(self, OutboxError, |tx, now| {
            let existing = tx
                .query_opt(
                    "SELECT id FROM outbox WHERE scope = $1 AND idem_key = $2",
                    &[&scope, &send.idem_key],
                )
                .await
                .map_err(pg)?;
            if let Some(r) = existing {
                return Ok(Enqueued {
                    id: OutboxId(r.get(0)),
                    duplicate: true,
                });
            }
            if let (Some(max), Some(session)) = (max_pending, session) {
                let pending: i64 = tx
                    .query_one(
                        "SELECT COUNT(*) FROM outbox
                         WHERE session_id = $1 AND state IN ('PENDING', 'CLAIMED')",
                        &[&session],
                    )
                    .await
                    .map_err(pg)?
                    .get(0);
                if pending as u64 >= max {
                    return Err(OutboxError::QuotaExceeded {
                        pending: pending as u64,
                        max,
                    });
                }
            }
            // A concurrent enqueue of the same key makes this a unique
            // violation: the transaction runs again and finds its row.
            let id: i64 = tx
                .query_one(
                    "INSERT INTO outbox(session_id, idem_key, payload, state, next_attempt_at,
                                        created_at, scope)
                     VALUES ($1, $2, $3, 'PENDING', $4, $4, $5) RETURNING id",
                    &[&session, &send.idem_key, &send.payload, &now, &scope],
                )
                .await
                .map_err(pg)?
                .get(0);
            Enqueued {
                id: OutboxId(id),
                duplicate: false,
            }
        })
    }

    async fn claim(
        &self,
        worker: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<OutboxItem>, OutboxError> {
        let now = self.now_millis();
        let until = now.saturating_add(ms(lease));
        let sql = format!(
            "UPDATE outbox SET state = 'CLAIMED', claimed_by = $1, claim_until = $2
             WHERE id IN (
               SELECT id FROM outbox
               WHERE (state = 'PENDING' AND next_attempt_at <= $3)
                  OR (state = 'CLAIMED' AND claim_until <= $3)
               ORDER BY id LIMIT $4 FOR UPDATE SKIP LOCKED)
             RETURNING {ITEM_COLUMNS}"
        );
        let rows = self
            .write1::<OutboxError>(&sql, &[&worker, &until, &now, &count(limit)])
            .await?;
        let mut items: Vec<OutboxItem> = rows.iter().map(item_from_row).collect();
        items.sort_by_key(|i| i.id);
        Ok(items)
    }

    async fn complete(&self, id: OutboxId, worker: &str) -> Result<OutboxItem, OutboxError> {
        let now = self.now_millis();
        let sql = format!(
            "UPDATE outbox SET state = 'SENT', sent_at = $3, claimed_by = NULL, claim_until = NULL
             WHERE id = $1 AND state = 'CLAIMED' AND claimed_by = $2 RETURNING {ITEM_COLUMNS}"
        );
        let rows = self
            .write1::<OutboxError>(&sql, &[&id.0, &worker, &now])
            .await?;
        match rows.first() {
            Some(r) => Ok(item_from_row(r)),
            None => Err(self.claimed_miss(id, worker).await),
        }
    }

    async fn fail(
        &self,
        id: OutboxId,
        worker: &str,
        error: &str,
        retry: Retry,
    ) -> Result<OutboxItem, OutboxError> {
        let now = self.now_millis();
        let (state, next) = match retry {
            Retry::After(delay) => (OutboxState::Pending, Some(now.saturating_add(ms(delay)))),
            Retry::Never => (OutboxState::Dead, None),
        };
        let sql = format!(
            "UPDATE outbox SET state = $3, attempts = attempts + 1, last_error = $4,
             next_attempt_at = COALESCE($5, next_attempt_at), claimed_by = NULL, claim_until = NULL
             WHERE id = $1 AND state = 'CLAIMED' AND claimed_by = $2 RETURNING {ITEM_COLUMNS}"
        );
        let rows = self
            .write1::<OutboxError>(&sql, &[&id.0, &worker, &state.as_str(), &error, &next])
            .await?;
        match rows.first() {
            Some(r) => Ok(item_from_row(r)),
            None => Err(self.claimed_miss(id, worker).await),
        }
    }

    async fn dead_letter(&self, id: OutboxId, reason: &str) -> Result<OutboxItem, OutboxError> {
        let sql = format!(
            "UPDATE outbox SET state = 'DEAD', last_error = $2, claimed_by = NULL, claim_until = NULL
             WHERE id = $1 AND state IN ('PENDING', 'CLAIMED') RETURNING {ITEM_COLUMNS}"
        );
        let rows = self.write1::<OutboxError>(&sql, &[&id.0, &reason]).await?;
        match rows.first() {
            Some(r) => Ok(item_from_row(r)),
            None => Err(self.outbox_miss(id, "PENDING or CLAIMED").await),
        }
    }

    async fn redrive(&self, id: OutboxId) -> Result<OutboxItem, OutboxError> {
        let now = self.now_millis();
        let sql = format!(
            "UPDATE outbox SET state = 'PENDING', attempts = 0, next_attempt_at = $2
             WHERE id = $1 AND state = 'DEAD' RETURNING {ITEM_COLUMNS}"
        );
        let rows = self.write1::<OutboxError>(&sql, &[&id.0, &now]).await?;
        match rows.first() {
            Some(r) => Ok(item_from_row(r)),
            None => Err(self.outbox_miss(id, "DEAD").await),
        }
    }

    async fn redrive_all(&self) -> Result<u64, StoreError> {
        let now = self.now_millis();
        let rows = self
            .write1::<StoreError>(
                "UPDATE outbox SET state = 'PENDING', attempts = 0, next_attempt_at = $1
                 WHERE state = 'DEAD' RETURNING 1",
                &[&now],
            )
            .await?;
        Ok(rows.len() as u64)
    }

    async fn release_expired_claims(&self) -> Result<u64, StoreError> {
        let now = self.now_millis();
        let rows = self
            .write1::<StoreError>(
                "UPDATE outbox SET state = 'PENDING', claimed_by = NULL, claim_until = NULL
                 WHERE state = 'CLAIMED' AND claim_until <= $1 RETURNING 1",
                &[&now],
            )
            .await?;
        Ok(rows.len() as u64)
    }

    async fn outbox_item(&self, id: OutboxId) -> Result<OutboxItem, OutboxError> {
        let sql = format!("SELECT {ITEM_COLUMNS} FROM outbox WHERE id = $1");
        let rows = self.read::<OutboxError>(&sql, &[&id.0]).await?;
        rows.first()
            .map(item_from_row)
            .ok_or(OutboxError::NotFound(id))
    }

    async fn outbox_items(
        &self,
        state: OutboxState,
        limit: usize,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        let sql =
            format!("SELECT {ITEM_COLUMNS} FROM outbox WHERE state = $1 ORDER BY id LIMIT $2");
        let rows = self
            .read::<StoreError>(&sql, &[&state.as_str(), &count(limit)])
            .await?;
        Ok(rows.iter().map(item_from_row).collect())
    }

    async fn outbox_counts(&self) -> Result<OutboxCounts, StoreError> {
        let rows = self
            .read::<StoreError>("SELECT state, COUNT(*) FROM outbox GROUP BY state", &[])
            .await?;
        let mut counts = OutboxCounts::default();
        for r in &rows {
            let n = r.get::<_, i64>(1) as u64;
            match outbox_state(r.get(0)) {
                OutboxState::Pending => counts.pending = n,
                OutboxState::Claimed => counts.claimed = n,
                OutboxState::Sent => counts.sent = n,
                OutboxState::Dead => counts.dead += n,
            }
        }
        Ok(counts)
    }

    async fn record_health_transition(
        &self,
        from: &str,
        to: &str,
        reason: &str,
    ) -> Result<HealthTransition, StoreError> {
        let now = self.now_millis();
        let rows = self
            .write1::<StoreError>(
                "INSERT INTO transitions(at, from_state, to_state, reason)
                 VALUES ($1, $2, $3, $4) RETURNING id",
                &[&now, &from, &to, &reason],
            )
            .await?;
        let id = rows.first().map_or(0, |r| r.get(0));
        Ok(HealthTransition {
            id,
            at: now,
            from: from.to_owned(),
            to: to.to_owned(),
            reason: reason.to_owned(),
        })
    }

    async fn health_transitions(&self, limit: usize) -> Result<Vec<HealthTransition>, StoreError> {
        let rows = self
            .read::<StoreError>(
                "SELECT id, at, from_state, to_state, reason FROM transitions
                 ORDER BY id DESC LIMIT $1",
                &[&count(limit)],
            )
            .await?;
        let mut out: Vec<HealthTransition> = rows
            .iter()
            .map(|r| HealthTransition {
                id: r.get(0),
                at: r.get(1),
                from: r.get(2),
                to: r.get(3),
                reason: r.get(4),
            })
            .collect();
        out.reverse();
        Ok(out)
    }
}

/// Marks `node`'s ACTIVE sessions CRASHED (with `recovered_at = now`,
/// `crash_count + 1`) inside `tx`, appending `notice`'s payload to each
/// one's private channel with id `crash-notice-<crash_count>`. `own`: the
/// node's recovery of itself, which also takes sessions no node holds
/// (from a single-node past) and rows with an unknown state; a survivor
/// recovering a dead node takes that node's sessions only.
pub(crate) async fn crash_sessions(
    tx: &deadpool_postgres::Transaction<'_>,
    now: UnixMillis,
    node: &str,
    own: bool,
    notice: Option<&CrashNotice>,
) -> Result<CrashMarked, StoreError> {
    let known: Vec<&str> = SessionState::ALL.iter().map(|s| s.as_str()).collect();
    let unknown: Vec<(SessionId, String)> = if own {
        tx.query(
            "SELECT id, state FROM sessions WHERE state <> ALL($1) ORDER BY id FOR UPDATE",
            &[&known],
        )
        .await
        .map_err(pg)?
        .iter()
        .map(|r| (SessionId(r.get(0)), r.get(1)))
        .collect()
    } else {
        Vec::new()
    };
    let mut marked: Vec<CrashedSession> = tx
        .query(
            "UPDATE sessions SET state = 'CRASHED', recovered_at = $1, updated_at = $1,
             crash_count = crash_count + 1
             WHERE state = 'ACTIVE' AND (node = $2 OR ($3 AND node IS NULL))
             RETURNING id, crash_count",
            &[&now, &node, &own],
        )
        .await
        .map_err(pg)?
        .iter()
        .map(|r| CrashedSession {
            id: SessionId(r.get(0)),
            previous_state: SessionState::Active.as_str().to_owned(),
            crash_count: r.get::<_, i32>(1) as u32,
            recovered_at: now,
        })
        .collect();
    marked.sort_by(|a, b| a.id.cmp(&b.id));
    let crashed: Vec<SessionId> = marked.iter().map(|c| c.id.clone()).collect();
    for (id, state) in &unknown {
        let row = tx
            .query_one(
                "UPDATE sessions SET state = 'CRASHED', recovered_at = $2, updated_at = $2,
                 crash_count = crash_count + 1 WHERE id = $1 RETURNING crash_count",
                &[&id.as_str(), &now],
            )
            .await
            .map_err(pg)?;
        marked.push(CrashedSession {
            id: id.clone(),
            previous_state: state.clone(),
            crash_count: row.get::<_, i32>(0) as u32,
            recovered_at: now,
        });
    }
    let notified = match notice {
        Some(notice) => append_notices(tx, now, &marked, notice).await?.len() as u64,
        None => 0,
    };
    Ok(CrashMarked {
        crashed,
        unknown,
        notified,
    })
}

/// Appends `notice`'s payload for each of `marked` to its private channel
/// (id `crash-notice-<crash_count>`, the system scope) inside `tx`; returns
/// the (channel, offset) of each notice newly written.
pub(crate) async fn append_notices(
    tx: &deadpool_postgres::Transaction<'_>,
    now: UnixMillis,
    marked: &[CrashedSession],
    notice: &CrashNotice,
) -> Result<Vec<(String, Offset)>, StoreError> {
    if marked.is_empty() {
        return Ok(Vec::new());
    }
    // The pooled connection's cached statements: a takeover or a
    // recovery prepares nothing (it prepared five per notice batch).
    let st = Statements::cached(tx).await?;
    let notices: Vec<(String, String, Vec<u8>)> = marked
        .iter()
        .map(|session| {
            (
                session.id.private_channel(),
                format!("crash-notice-{}", session.crash_count),
                notice(session),
            )
        })
        .collect();
    let items: Vec<Item<'_>> = notices
        .iter()
        .map(|(channel, id, payload)| {
            (
                channel.as_str(),
                SYSTEM_SCOPE,
                id.as_str(),
                payload.as_slice(),
            )
        })
        .collect();
    let done = append_batch(tx, &st, now, &items, Framing::Caller).await?;
    Ok(notices
        .into_iter()
        .zip(done)
        .filter(|(_, a)| !a.duplicate)
        .map(|((channel, _, _), a)| (channel, a.offset))
        .collect())
}
